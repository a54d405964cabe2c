"""What calls answer: decisions (copied out of ``tally_decision``), adjustments, memory stats
and parsed JSON reports.

All are frozen dataclasses: plain values, safe to keep and share between threads."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from . import _native
from .enums import ChargedTo, Denial, Unit

_Code = TypeVar("_Code", ChargedTo, Denial, Unit)


def _code(kind: type[_Code], value: int) -> _Code:
    """The member of ``kind`` for a code the library returned. A code this wrapper does not know
    (from a newer library) is a member of its own named ``UNKNOWN_<code>``, not a ``ValueError``:
    the decision is copied out after the call took effect, and an exception would hide an
    admitted, counted request from its caller. Constructing the enum itself still refuses it."""
    try:
        return kind(value)
    except ValueError:
        member = int.__new__(kind, value)
        member._name_ = f"UNKNOWN_{value}"
        member._value_ = value
        return member


def _name(raw: bytes) -> str | None:
    text = raw.decode("utf-8", errors="replace")
    return text or None


@dataclass(frozen=True)
class LimitStatus:
    """One limit of the key's plan as a decision saw it."""

    limit_index: int
    used: int
    amount: int
    remaining: int
    #: When what is counted now ages out (rolling) or the period ends; None if nothing counted.
    reset_at_ms: int | None


@dataclass(frozen=True)
class Decision:
    """The answer to consume, check, reserve or settle.

    A denial is a normal answer (``admitted`` False, ``denial`` says why); errors are
    exceptions. Names of plans and limits are None where the header has ""."""

    admitted: bool
    replayed: bool
    charged_to: ChargedTo
    denial: Denial
    #: The limit that denied, or the tightest one when admitted from quota.
    limit_index: int | None
    limit_name: str | None
    limit_amount: int
    limit_used: int
    remaining: int
    reset_at_ms: int | None
    retry_after_ms: int
    retry_at_ms: int | None
    at_ms: int
    charged_micros: int
    credits_balance_micros: int | None
    credits_needed_micros: int
    #: For OVER_REQUEST_MAXIMUM: the unit over its maximum.
    unit: Unit | None
    requested: int
    maximum: int
    limits: tuple[LimitStatus, ...]
    plan: str | None
    upgrade_plan: str | None

    def __bool__(self) -> bool:
        return self.admitted

    @property
    def retry_after_seconds(self) -> int:
        """``retry_after_ms`` in whole seconds, rounded up (for ``Retry-After``)."""
        return math.ceil(self.retry_after_ms / 1000)

    @classmethod
    def from_native(cls, raw: _native.Decision) -> Decision:
        count = min(raw.limit_count, _native.MAX_DECISION_LIMITS)
        limits = tuple(
            LimitStatus(
                limit_index=limit.limit_index,
                used=limit.used,
                amount=limit.amount,
                remaining=limit.remaining,
                reset_at_ms=limit.reset_at_ms or None,
            )
            for limit in raw.limits[:count]
        )
        denial = _code(Denial, raw.denial)
        return cls(
            admitted=bool(raw.admitted),
            replayed=bool(raw.replayed),
            charged_to=_code(ChargedTo, raw.charged_to),
            denial=denial,
            limit_index=None if raw.limit_index == _native.NO_INDEX else raw.limit_index,
            limit_name=_name(raw.limit_name),
            limit_amount=raw.limit_amount,
            limit_used=raw.limit_used,
            remaining=raw.remaining,
            reset_at_ms=raw.reset_at_ms or None,
            retry_after_ms=raw.retry_after_ms,
            retry_at_ms=raw.retry_at_ms or None,
            at_ms=raw.at_ms,
            charged_micros=raw.charged_micros,
            credits_balance_micros=(
                raw.credits_balance_micros if raw.has_credits_balance else None
            ),
            credits_needed_micros=raw.credits_needed_micros,
            unit=_code(Unit, raw.unit) if denial == Denial.OVER_REQUEST_MAXIMUM else None,
            requested=raw.requested,
            maximum=raw.maximum,
            limits=limits,
            plan=_name(raw.plan),
            upgrade_plan=_name(raw.upgrade_plan),
        )


@dataclass(frozen=True)
class Reservation:
    """The answer to reserve: the decision and, when admitted, the reservation's id. True
    exactly when admitted, as a ``Decision``."""

    decision: Decision
    #: The id to settle or void; None when denied.
    id: int | None

    @property
    def admitted(self) -> bool:
        return self.decision.admitted

    def __bool__(self) -> bool:
        # As `Decision`: a dataclass is always true, and `if engine.reserve(...)` would admit
        # a denied reservation.
        return self.admitted


@dataclass(frozen=True)
class AdjustedLimit:
    """One limit a usage correction touched."""

    limit_index: int
    name: str
    #: Units added, or removed (at most what still counted).
    moved: int


@dataclass(frozen=True)
class Adjustment:
    """The answer to adjust_usage: one entry per limit of the key's plan that counts the
    resource, in the plan's order."""

    limits: tuple[AdjustedLimit, ...]

    @classmethod
    def from_native(cls, raw: _native.Adjustment) -> Adjustment:
        count = min(raw.limit_count, _native.MAX_DECISION_LIMITS)
        return cls(
            tuple(
                AdjustedLimit(
                    limit_index=limit.limit_index,
                    name=limit.name.decode("utf-8", errors="replace"),
                    moved=limit.moved,
                )
                for limit in raw.limits[:count]
            )
        )


@dataclass(frozen=True)
class MemoryStats:
    """What the engine's keys hold in memory (``Engine.memory_stats``)."""

    keys: int
    #: Keys holding window memory (they counted usage and were not reclaimed since).
    keys_with_usage: int
    usage_bytes: int
    table_bytes: int


@dataclass(frozen=True)
class Health:
    """What has gone wrong where no call's answer reports it (``Engine.health``), each a
    message or None. For a monitor: ``check`` and ``usage`` never learn of them."""

    #: The log failed (with ``INTERVAL`` or ``NONE`` its writer may fail after the calls
    #: returned): every call that logs raises until the database is reopened.
    log_failure: str | None
    #: The last periodic checkpoint could not store its snapshot, or its thread could not
    #: start or panicked (cleared by one that stores).
    checkpoint_failure: str | None
    #: The last automatic compaction failed (cleared by one that succeeds, or ``compact``).
    compaction_failure: str | None

    @property
    def healthy(self) -> bool:
        return (
            self.log_failure is None
            and self.checkpoint_failure is None
            and self.compaction_failure is None
        )


@dataclass(frozen=True)
class UsageLimit:
    """One limit of a usage report (the console's usage bar)."""

    name: str
    meter: str
    window: str
    used: int
    amount: int
    remaining: int
    reset_at_ms: int | None


@dataclass(frozen=True)
class Usage:
    """A key's usage report (``tally_engine_usage``); ``raw`` keeps the whole JSON object."""

    key: str
    kind: str
    user: str | None
    team: str | None
    plan: str | None
    at_ms: int
    limits: tuple[UsageLimit, ...]
    credits_balance_micros: int | None
    credits_charged_micros: int | None
    open_reservations: int | None
    pay_as_you_go_micros: int | None
    #: The key was revoked (``Engine.revoke_key``): every request on it is denied.
    revoked: bool
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Usage:
        limits = tuple(
            UsageLimit(
                name=limit["name"],
                meter=limit["meter"],
                window=limit["window"],
                used=limit["used"],
                amount=limit["amount"],
                remaining=limit["remaining"],
                reset_at_ms=limit.get("reset_at_ms"),
            )
            for limit in document.get("limits", [])
        )
        return cls(
            key=document["key"],
            kind=document["kind"],
            user=document.get("user"),
            team=document.get("team"),
            plan=document.get("plan"),
            at_ms=document["at_ms"],
            limits=limits,
            credits_balance_micros=document.get("credits_balance_micros"),
            credits_charged_micros=document.get("credits_charged_micros"),
            open_reservations=document.get("open_reservations"),
            pay_as_you_go_micros=document.get("pay_as_you_go_micros"),
            revoked=bool(document.get("revoked", False)),
            raw=document,
        )


@dataclass(frozen=True)
class Event:
    """One event of the log (``tally_engine_events_after``)."""

    seq: int
    at_ms: int
    kind: str
    body: Mapping[str, Any]
    #: The team the event concerns (its key's, whose credits it draws on), ``None`` for a
    #: policy swap and for a denial of a key unknown then: billing by team needs no record of
    #: the event that made the key.
    team: str | None = None


@dataclass(frozen=True)
class VerifyReport:
    """What ``tally.verify`` found in a database directory."""

    sound: bool
    records: int
    events: int
    first_seq: int | None
    last_seq: int | None
    snapshot_seq: int | None
    snapshot_matches_replay: bool | None
    problems: tuple[str, ...]
    #: Whether the replay ran with the options the database's owner recorded.
    replayed_with_recorded_options: bool = False
    #: Where the log ends in a write a crash cut short (never acknowledged, so not a
    #: problem), which the next open cuts off; None if it does not.
    torn_tail: str | None = None

    @classmethod
    def from_json(cls, sound: bool, document: dict[str, Any]) -> VerifyReport:
        return cls(
            sound=sound,
            records=document.get("records", 0),
            events=document.get("events", 0),
            first_seq=document.get("first_seq"),
            last_seq=document.get("last_seq"),
            snapshot_seq=document.get("snapshot_seq"),
            snapshot_matches_replay=document.get("snapshot_matches_replay"),
            problems=tuple(document.get("problems", [])),
            replayed_with_recorded_options=document.get("replayed_with_recorded_options", False),
            torn_tail=document.get("torn_tail"),
        )
