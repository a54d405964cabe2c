"""The engine's and the database's options (``tally_options``), for ``Engine.open``,
``Engine.in_memory`` and ``tally.verify``."""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from . import _convert, _native, errors


@dataclass(frozen=True)
class Options:
    """Options for ``Engine.open``, ``Engine.in_memory`` and ``tally.verify`` (which without
    options reads those the database recorded); ``None`` (every field's default) keeps the
    library's default. Each value is checked by the library against its range before anything is
    opened: one out of range raises ``InvalidArgumentError`` naming the option and the range,
    and the open does not happen (no directory is created)::

        tally.Engine.open("tally-data", options=tally.Options(max_keys=100_000))

    Ranges (the header's ``TALLY_MAX_*`` constants): the tables (``max_keys``, ``max_teams``,
    ``max_users``, ``idempotency_capacity``, ``max_open_reservations``) hold 1 to 2^32, and
    an open given one below what the database holds is refused (``InvalidArgumentError``
    naming the option, the bound and how many it holds; nothing changed);
    ``default_lease_ms`` is 1 to 86,400,000 (a day); ``max_policy_generations`` 2 to 65,536;
    ``idempotency_horizon_ms`` 0 (the policy's longest window) or up to 366 days;
    ``reclaim_idle_every_ms`` 0 (never) or up to the span of timestamps (to 2100);
    ``checkpoint_every_events`` at least 1; ``retention_ms`` 0 up to the span of timestamps;
    ``max_ahead_of_clock_ms`` 0 (no bound) or up to the span of timestamps (default a day);
    ``manual_clock_ms`` 0 (the system clock) or a timestamp before 2100.
    ``checkpoint_every_events`` and ``retention_ms`` are read by ``Engine.open`` only, and
    ``use_recorded`` by ``Engine.open`` and ``tally.verify``."""

    #: Keys at most (default 16,000,000).
    max_keys: int | None = None
    #: Teams at most, each user's Default Team included (default 4,000,000).
    max_teams: int | None = None
    #: Users at most (default 8,000,000).
    max_users: int | None = None
    #: Request ids remembered at once (default 1,000,000).
    idempotency_capacity: int | None = None
    #: How long a request id is remembered; 0 (the default): the policy's longest window.
    idempotency_horizon_ms: int | None = None
    #: Reservations open at once (default 1,000,000); also how many closed ones are remembered
    #: (the most recently closed) so a repeated settle or void is idempotent. An open with a
    #: lower bound than the database ran with keeps the closed ones it restores until its
    #: first close.
    max_open_reservations: int | None = None
    #: The lease of a reservation made without one (default 600,000: 10 minutes).
    default_lease_ms: int | None = None
    #: Policies kept so requests from before a swap are refunded exactly (default 1,024).
    max_policy_generations: int | None = None
    #: How often idle keys' window memory is freed on its own; 0: never (default 10 minutes).
    reclaim_idle_every_ms: int | None = None
    #: Whether ended leases are expired from the admission path (default True).
    expire_leases_on_its_own: bool | None = None
    #: How far ahead of the engine's clock a call's ``at_ms`` may be; one further ahead raises
    #: ``BadTimestampError`` and changes nothing (default 86,400,000: a day). 0: no bound, for
    #: tests and replays that run ahead of the clock; without one, a request stamped months
    #: ahead moves its key's windows there (for requests stamped now its usage does not age out
    #: until the clock reaches that time) and keeps its log segment, and every later one, from
    #: being compacted until the clock passes it by the longest window and the retention. The
    #: log's own times are never refused at open.
    max_ahead_of_clock_ms: int | None = None
    #: A clock of the engine's own, standing at this time (milliseconds since the Unix epoch,
    #: UTC, before 2100) until ``Engine.set_clock`` moves it, instead of the system clock: for
    #: tests, simulations and replays, which then control every time the engine reads (an
    #: omitted ``at_ms``, the bound ahead of the clock, how long request ids are remembered,
    #: when leases end and idle keys are freed). Each engine opened gets a clock of its own.
    #: ``None`` or 0: the system clock (the default). ``tally.verify`` reads no clock.
    manual_clock_ms: int | None = None
    #: A checkpoint every this many events (default 1,000,000); one whose work took 10 ms
    #: or more holds the next back until four times that has passed, or twice this many
    #: events came. ``Engine.open`` only.
    checkpoint_every_events: int | None = None
    #: How long an export reader has (default 7 days): an event is compacted (by ``compact``,
    #: and by each periodic checkpoint on its own) only once its timestamp is this long past
    #: the longest window and it was logged at least this long ago on the engine's clock.
    #: ``Engine.open``.
    retention_ms: int | None = None
    #: Open as a tool: an existing database runs with the options its owner recorded (an open
    #: without it records its own) instead of these, which then apply only to a database that
    #: recorded none, and nothing is recorded (default False). For tools on a gateway's
    #: database. ``Engine.open`` and ``tally.verify``.
    use_recorded: bool | None = None


# The setter of each yes-or-no option, by field name.
_BOOL_SETTERS = {
    "expire_leases_on_its_own": "tally_options_set_expire_leases_on_its_own",
    "use_recorded": "tally_options_set_use_recorded",
}

# The setter of each integer option, by field name.
_SETTERS = {
    "max_keys": "tally_options_set_max_keys",
    "max_teams": "tally_options_set_max_teams",
    "max_users": "tally_options_set_max_users",
    "idempotency_capacity": "tally_options_set_idempotency_capacity",
    "idempotency_horizon_ms": "tally_options_set_idempotency_horizon_ms",
    "max_open_reservations": "tally_options_set_max_open_reservations",
    "default_lease_ms": "tally_options_set_default_lease_ms",
    "max_policy_generations": "tally_options_set_max_policy_generations",
    "reclaim_idle_every_ms": "tally_options_set_reclaim_idle_every_ms",
    "checkpoint_every_events": "tally_options_set_checkpoint_every_events",
    "retention_ms": "tally_options_set_retention_ms",
    "max_ahead_of_clock_ms": "tally_options_set_max_ahead_of_clock_ms",
    "manual_clock_ms": "tally_options_set_manual_clock",
}


@contextmanager
def native(options: Options | None) -> Iterator[ctypes.c_void_p | None]:
    """A ``tally_options`` handle with ``options`` set, for the duration of one open or verify
    (``None`` for no options, NULL: the defaults of an open, the recorded options of a verify;
    ``Options()`` is a handle with nothing set). Raises before any open if a value is
    refused."""
    if options is None:
        yield None
        return
    if not isinstance(options, Options):
        raise TypeError(f"options must be a tally.Options, not {type(options).__name__}")
    handle = ctypes.c_void_p()
    errors.check(_native.lib.tally_options_new(ctypes.byref(handle)))
    try:
        for field in dataclasses.fields(options):
            value = getattr(options, field.name)
            if value is None:
                continue
            if field.name in _BOOL_SETTERS:
                if not isinstance(value, bool):
                    raise TypeError(f"{field.name} must be a bool, not {type(value).__name__}")
                status = getattr(_native.lib, _BOOL_SETTERS[field.name])(handle, value)
            else:
                setter = getattr(_native.lib, _SETTERS[field.name])
                try:
                    number = _convert.u64(field.name, value)
                except ValueError as error:
                    # Out of every option's range (negative, past 64 bits): the error the
                    # library gives a value out of range, as the docstring says (and Go's
                    # Options answer a negative duration), still a ValueError.
                    raise errors.InvalidArgumentError(
                        errors.InvalidArgumentError.status_code, str(error)
                    ) from None
                status = setter(handle, number)
            errors.check(status)
        yield handle
    finally:
        _native.lib.tally_options_free(handle)
