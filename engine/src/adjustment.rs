//! Refunds and corrections of recorded usage.
