//! Counting decisions: where admitted requests were charged and why denied ones were refused.

use tally_engine::{ChargedTo, Decision, DenialReason, Error};

/// Every denial reason, in the order the report lists them: `(JSON name, words)`.
pub const DENIAL_REASONS: [(&str, &str); 9] = [
    ("unknown_key", "unknown key"),
    ("no_resources", "no resources"),
    ("resource_not_covered", "resource not covered"),
    ("over_request_maximum", "over per-request maximum"),
    ("quota_exhausted", "quota exhausted"),
    ("exceeds_limit", "exceeds limit"),
    ("insufficient_credits", "insufficient credits"),
    ("too_many_reservations", "too many reservations"),
    ("key_revoked", "key revoked"),
];

const QUOTA_EXHAUSTED: usize = 4;
const EXCEEDS_LIMIT: usize = 5;
const KEY_REVOKED: usize = 8;

/// The position of `reason` in `DENIAL_REASONS`.
pub fn reason_index(reason: &DenialReason) -> usize {
    match reason {
        DenialReason::UnknownKey => 0,
        DenialReason::NoResources => 1,
        DenialReason::ResourceNotCovered { .. } => 2,
        DenialReason::OverRequestMaximum { .. } => 3,
        DenialReason::QuotaExhausted { .. } => QUOTA_EXHAUSTED,
        DenialReason::ExceedsLimit { .. } => EXCEEDS_LIMIT,
        DenialReason::InsufficientCredits { .. } => 6,
        DenialReason::TooManyReservations { .. } => 7,
        DenialReason::KeyRevoked => KEY_REVOKED,
    }
}

/// A short name for an engine error, to count them by kind (a healthy run has none).
pub fn error_kind(error: &Error) -> &'static str {
    match error {
        Error::InvalidArgument { .. } => "invalid_argument",
        Error::UnknownResource { .. } => "unknown_resource",
        Error::RequestIdConflict { .. } => "request_id_conflict",
        Error::CapacityExceeded { .. } => "capacity_exceeded",
        Error::Overflow { .. } => "overflow",
        _ => "other",
    }
}

/// Counts of decisions for some set of requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub sent: u64,
    pub plan_quota: u64,
    pub credits: u64,
    pub credits_micros: u64,
    pub pay_as_you_go: u64,
    pub pay_as_you_go_micros: u64,
    pub denied: [u64; DENIAL_REASONS.len()],
    pub errors: u64,
}

impl Counts {
    pub fn record(&mut self, outcome: &Result<Decision, Error>) {
        self.sent += 1;
        match outcome {
            Ok(Decision::Admitted(admission)) => match admission.charged_to {
                ChargedTo::PlanQuota { .. } => self.plan_quota += 1,
                ChargedTo::Credits { micros } => {
                    self.credits += 1;
                    self.credits_micros += micros;
                }
                ChargedTo::PayAsYouGo { micros } => {
                    self.pay_as_you_go += 1;
                    self.pay_as_you_go_micros += micros;
                }
            },
            Ok(Decision::Denied(denial)) => self.denied[reason_index(&denial.reason)] += 1,
            Err(_) => self.errors += 1,
        }
    }

    pub fn admitted(&self) -> u64 {
        self.plan_quota + self.credits + self.pay_as_you_go
    }

    pub fn denied_total(&self) -> u64 {
        self.denied.iter().sum()
    }

    /// Requests refused by a limit of the plan (waiting or a bigger plan would help).
    pub fn limited(&self) -> u64 {
        self.denied[QUOTA_EXHAUSTED] + self.denied[EXCEEDS_LIMIT]
    }

    pub fn quota_exhausted(&self) -> u64 {
        self.denied[QUOTA_EXHAUSTED]
    }

    pub fn key_revoked(&self) -> u64 {
        self.denied[KEY_REVOKED]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_engine::Decision;

    #[test]
    fn every_reason_has_its_own_slot() {
        let reasons = [
            DenialReason::UnknownKey,
            DenialReason::NoResources,
            DenialReason::ResourceNotCovered {
                resource: tally_engine::ResourceId(0),
            },
            DenialReason::OverRequestMaximum {
                unit: tally_engine::Unit::Seconds,
                maximum: 300,
                requested: 301,
            },
            DenialReason::QuotaExhausted {
                limit: 0,
                retry_at_ms: 1,
                retry_after_ms: 1,
                reset_at_ms: 1,
            },
            DenialReason::ExceedsLimit {
                limit: 0,
                amount: 1,
                requested: 2,
            },
            DenialReason::InsufficientCredits {
                balance_micros: 1,
                price_micros: 2,
            },
            DenialReason::TooManyReservations {
                open: 4,
                maximum: 4,
            },
            DenialReason::KeyRevoked,
        ];
        let slots: Vec<usize> = reasons.iter().map(reason_index).collect();
        assert_eq!(slots, (0..DENIAL_REASONS.len()).collect::<Vec<_>>());
    }

    #[test]
    fn sent_is_admitted_plus_denied_plus_errors() {
        let mut counts = Counts::default();
        counts.record(&Ok(Decision::denied(DenialReason::NoResources)));
        counts.record(&Ok(Decision::denied(DenialReason::UnknownKey)));
        counts.record(&Err(Error::Overflow { field: "x" }));
        assert_eq!(counts.sent, 3);
        assert_eq!(counts.admitted() + counts.denied_total() + counts.errors, 3);
        assert_eq!(counts.denied[1], 1);
    }
}
