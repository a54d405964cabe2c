"""The header's enums (``tally_unit``, ``tally_charged_to``, ``tally_denial``,
``tally_durability``, ``tally_policy_source``, ``tally_adjustment_direction``) with the same
values."""

from __future__ import annotations

import enum


class Unit(enum.IntEnum):
    """What a quantity counts."""

    REQUESTS = 0
    CHARACTERS = 1
    IMAGES = 2
    VIDEOS = 3
    SONGS = 4
    SECONDS = 5
    TOKENS = 6

    @classmethod
    def parse(cls, value: Unit | str) -> Unit:
        """A ``Unit`` from itself or its name (``"requests"``, any case).

        Plain integers are refused so that a count is never mistaken for a unit."""
        if isinstance(value, Unit):
            return value
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                names = ", ".join(unit.name.lower() for unit in cls)
                raise ValueError(f"unknown unit {value!r}: one of {names}") from None
        raise TypeError(f"a unit is a tally.Unit or its name, not {type(value).__name__}")


class ChargedTo(enum.IntEnum):
    """Where an admitted request was charged."""

    NONE = 0
    PLAN_QUOTA = 1
    CREDITS = 2
    PAY_AS_YOU_GO = 3


class Denial(enum.IntEnum):
    """Why a request was denied (``NONE`` when admitted)."""

    NONE = 0
    UNKNOWN_KEY = 1
    NO_RESOURCES = 2
    RESOURCE_NOT_COVERED = 3
    OVER_REQUEST_MAXIMUM = 4
    QUOTA_EXHAUSTED = 5
    EXCEEDS_LIMIT = 6
    INSUFFICIENT_CREDITS = 7
    TOO_MANY_RESERVATIONS = 8
    KEY_REVOKED = 9


class Durability(enum.IntEnum):
    """When an acknowledged change is on disk, and what a crash can lose.

    ``SYNC``: a call returns after its event is written and fsynced (concurrent calls share a
    flush); a crash, even a power loss, loses nothing acknowledged.
    ``INTERVAL``: a call returns once its event is queued; the log starts its fsync at the latest
    ``interval_ms`` after the call returned (later only while an earlier write or fsync is still
    running then: a slow disk). A process crash loses the events not yet written (queued or
    being written: at most 32,768); a power loss also those written since the last completed
    fsync. A write or fsync that fails after its calls returned fails every later call
    (``LogFailedError``) until the engine is reopened; the events it carried may be missing from
    the database.
    ``NONE``: no fsync of events (only when a log segment is sealed, on ``sync()`` and on
    close): a process crash loses what it loses with ``INTERVAL``, a power loss whatever the
    kernel had not written back. For tests and benchmarks.
    """

    SYNC = 0
    INTERVAL = 1
    NONE = 2


class PolicySource(enum.IntEnum):
    """Where a policy comes from."""

    DEFAULT = 0
    FILE = 1
    TOML = 2
    JSON = 3
    #: ``Engine.open`` only: the policy the database last ran with (``Policy.stored()``).
    STORED = 4


class AdjustmentDirection(enum.IntEnum):
    """Which way ``Engine.adjust_usage`` corrects."""

    #: Usage that happened but was not counted: counted now, whatever the limit.
    ADD = 1
    #: Usage counted that should not have been: given back where its window still counts it.
    REMOVE = 2
