"""tally: an embedded quota-accounting engine, from Python (over its C ABI).

import tally

with tally.Engine.in_memory() as engine:          # the shipped Token Plan policy
    engine.create_user("ada", "tp-ada-1")          # user, Default Team "@ada", key
    engine.assign_seat("@ada", "ada", "Plus")
    decision = engine.consume("tp-ada-1", "m2.7", {"requests": 1})
    if not decision.admitted:
        print(decision.denial, decision.retry_after_seconds)
"""

from __future__ import annotations

from . import _native, errors
from ._native import LibraryNotFound
from .engine import Engine, Policy, Request, Submission, verify, version
from .enums import AdjustmentDirection, ChargedTo, Denial, Durability, PolicySource, Unit
from .errors import *  # noqa: F401,F403  (one exception class per status)
from .errors import ERRORS_BY_STATUS, TallyError, last_error, status_name
from .options import Options
from .results import (
    AdjustedLimit,
    Adjustment,
    Decision,
    Event,
    Health,
    LimitStatus,
    MemoryStats,
    Reservation,
    Usage,
    UsageLimit,
    VerifyReport,
)

__version__ = "0.1.0"

#: The most requests one consume_many takes (TALLY_MAX_BATCH).
MAX_BATCH = _native.MAX_BATCH
#: The largest amount of one quantity (TALLY_MAX_QUANTITY): more is BadQuantityError.
MAX_QUANTITY = _native.MAX_QUANTITY

__all__ = [
    "AdjustedLimit",
    "Adjustment",
    "AdjustmentDirection",
    "ChargedTo",
    "Decision",
    "Denial",
    "Durability",
    "Engine",
    "ERRORS_BY_STATUS",
    "Event",
    "LibraryNotFound",
    "LimitStatus",
    "MAX_BATCH",
    "MAX_QUANTITY",
    "Health",
    "MemoryStats",
    "Options",
    "Policy",
    "PolicySource",
    "Request",
    "Reservation",
    "Submission",
    "TallyError",
    "Unit",
    "Usage",
    "UsageLimit",
    "VerifyReport",
    "errors",
    "last_error",
    "status_name",
    "verify",
    "version",
    *(cls.__name__ for cls in ERRORS_BY_STATUS.values()),
]
