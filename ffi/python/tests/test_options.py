"""tally.Options: each option reaches the engine, a value out of range raises
InvalidArgumentError naming it before anything is opened, and None keeps the default."""

from __future__ import annotations

import dataclasses
import time

import pytest

import tally
from conftest import UNBOUNDED, T, seated, unbounded

# One value past the allowed range of every integer option.
TOO_LARGE = {
    "max_keys": 2**32 + 1,
    "max_teams": 2**32 + 1,
    "max_users": 2**32 + 1,
    "idempotency_capacity": 2**32 + 1,
    "idempotency_horizon_ms": 366 * 86_400_000 + 1,
    "max_open_reservations": 2**32 + 1,
    "default_lease_ms": 86_400_000 + 1,
    "max_policy_generations": 65_537,
    "reclaim_idle_every_ms": 4_102_444_800_001,
    "retention_ms": 4_102_444_800_001,
    "max_ahead_of_clock_ms": 4_102_444_800_001,
    "manual_clock_ms": 4_102_444_800_000,
}


def test_options_of_none_are_the_defaults():
    now = int(time.time() * 1000)
    with tally.Engine.in_memory(options=tally.Options()) as engine:
        engine.create_user("ada", "tp-ada-1", at_ms=now)
        engine.assign_seat("@ada", "ada", "Plus", at_ms=now)
        assert engine.consume("tp-ada-1", "m2.7", {"requests": 1}, at_ms=now).admitted
        # The default bound ahead of the (system) clock, a day: two days ahead is refused.
        with pytest.raises(tally.BadTimestampError, match="max_ahead_of_clock_ms"):
            engine.consume("tp-ada-1", "m2.7", {"requests": 1}, at_ms=now + 2 * 86_400_000)
        assert now <= engine.clock_ms() <= int(time.time() * 1000)


def test_a_bound_set_in_options_reaches_the_engine():
    with tally.Engine.in_memory(options=unbounded(max_keys=1)) as engine:
        engine.create_user("ada", "tp-ada-1", at_ms=T)
        with pytest.raises(tally.CapacityExceededError, match="keys"):
            engine.create_user("bo", "tp-bo-1", at_ms=T)


def test_by_default_a_time_over_a_day_ahead_is_refused_and_one_within_it_is_taken():
    # Two days ahead of the engine's (system) clock is refused by the default bound of a day
    # (None and an explicit 86,400,000 alike), and nothing is created.
    now = int(time.time() * 1000)
    for options in [None, tally.Options(max_ahead_of_clock_ms=86_400_000)]:
        with tally.Engine.in_memory(options=options) as engine:
            with pytest.raises(
                tally.BadTimestampError, match="at_ms: .* ahead of the engine's clock"
            ):
                engine.create_user("ada", "tp-ada-1", at_ms=now + 2 * 86_400_000)
            engine.create_user("ada", "tp-ada-1", at_ms=now + 3_600_000)
            engine.assign_seat("@ada", "ada", "Plus", at_ms=now)
            with pytest.raises(tally.BadTimestampError, match="max_ahead_of_clock_ms"):
                engine.consume("tp-ada-1", "m2.7", {"requests": 1}, at_ms=now + 2 * 86_400_000)
            assert engine.usage("tp-ada-1", at_ms=now).limits[0].used == 0
            assert engine.consume("tp-ada-1", "m2.7", {"requests": 1}, at_ms=now).admitted
    with tally.Engine.in_memory(options=tally.Options(max_ahead_of_clock_ms=0)) as engine:
        # Opted out (0): a year ahead of the clock is taken.
        seated(engine, "ada", "tp-ada-1", "Plus")
        engine.consume("tp-ada-1", "m2.7", {"requests": 1}, at_ms=now + 366 * 86_400_000)


def test_a_default_lease_set_in_options_is_the_lease_of_a_reservation_without_one():
    options = unbounded(default_lease_ms=1_000, expire_leases_on_its_own=False)
    with tally.Engine.in_memory(options=options) as engine:
        key = seated(engine, "ada", "tp-ada-1", "Plus")
        reservation = engine.reserve(key, "m2.7", {"requests": 1}, at_ms=T)
        assert reservation.id is not None
        assert engine.expire_reservations(at_ms=T + 999) == 0
        assert engine.expire_reservations(at_ms=T + 1_000) == 1


@pytest.mark.parametrize("option", sorted(TOO_LARGE))
def test_a_value_out_of_range_raises_invalid_argument_naming_the_option(option):
    options = tally.Options(**{option: TOO_LARGE[option]})
    with pytest.raises(tally.InvalidArgumentError, match=rf"\): {option}: \d+ is out of range"):
        tally.Engine.in_memory(options=options)


@pytest.mark.parametrize("option", ["max_keys", "default_lease_ms", "checkpoint_every_events"])
def test_a_zero_where_zero_means_nothing_is_refused(option):
    with pytest.raises(tally.InvalidArgumentError, match=rf"\): {option}: 0 is out of range"):
        tally.Engine.in_memory(options=tally.Options(**{option: 0}))


def test_zero_is_taken_where_it_has_a_meaning():
    options = unbounded(idempotency_horizon_ms=0, reclaim_idle_every_ms=0, retention_ms=0)
    with tally.Engine.in_memory(options=options) as engine:
        seated(engine, "ada", "tp-ada-1", "Plus")


def test_bad_options_on_open_create_no_directory(tmp_path):
    path = tmp_path / "db"
    with pytest.raises(tally.InvalidArgumentError, match="max_policy_generations"):
        tally.Engine.open(path, options=tally.Options(max_policy_generations=1))
    assert not path.exists()


def test_the_database_options_are_taken_by_open(tmp_path):
    options = unbounded(checkpoint_every_events=1, retention_ms=0, max_users=1)
    with tally.Engine.open(tmp_path / "db", durability="none", options=options) as engine:
        engine.create_user("ada", "tp-ada-1", at_ms=T)
        with pytest.raises(tally.CapacityExceededError, match="users"):
            engine.create_user("bo", "tp-bo-1", at_ms=T)


def test_use_recorded_reopens_a_database_with_the_options_it_recorded(tmp_path):
    path = tmp_path / "db"
    with tally.Engine.open(path, durability="none", options=unbounded(max_users=1)) as engine:
        engine.create_user("ada", "tp-ada-1", at_ms=T)
    # The recorded max_users of 1 wins over the 5 given beside use_recorded.
    options = tally.Options(use_recorded=True, max_users=5)
    with tally.Engine.open(path, durability="none", options=options) as engine:
        with pytest.raises(tally.CapacityExceededError, match="users"):
            engine.create_user("bo", "tp-bo-1", at_ms=T)
    # Without it, the options given apply (the defaults but for the bound ahead of the clock).
    with tally.Engine.open(path, durability="none", options=UNBOUNDED) as engine:
        engine.create_user("bo", "tp-bo-1", at_ms=T)


def test_an_open_with_max_keys_below_the_keys_held_is_refused_naming_it(tmp_path):
    path = tmp_path / "db"
    with tally.Engine.open(path, durability="none", options=UNBOUNDED) as engine:
        engine.create_user("ada", "tp-ada-1", at_ms=T)
        engine.create_user("bo", "tp-bo-1", at_ms=T)
    message = "max_keys: 1 is below the 2 keys the database holds"
    with pytest.raises(tally.InvalidArgumentError, match=message):
        tally.Engine.open(path, durability="none", options=unbounded(max_keys=1))
    with tally.Engine.open(path, durability="none", options=unbounded(max_keys=2)) as engine:
        with pytest.raises(tally.CapacityExceededError, match="keys"):
            engine.create_user("cy", "tp-cy-1", at_ms=T)


def test_values_python_cannot_pass_are_refused_before_the_library():
    with pytest.raises(ValueError, match="max_keys must not be negative"):
        tally.Engine.in_memory(options=tally.Options(max_keys=-1))
    with pytest.raises(ValueError, match="must be at most"):
        tally.Engine.in_memory(options=tally.Options(max_keys=2**64))
    with pytest.raises(TypeError, match="max_keys must be an int"):
        tally.Engine.in_memory(options=tally.Options(max_keys=1.5))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expire_leases_on_its_own must be a bool"):
        tally.Engine.in_memory(
            options=tally.Options(expire_leases_on_its_own=1)  # type: ignore[arg-type]
        )
    with pytest.raises(TypeError, match="use_recorded must be a bool"):
        tally.verify("unused", options=tally.Options(use_recorded=1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tally.Options"):
        tally.Engine.in_memory(options={"max_keys": 1})  # type: ignore[arg-type]


def test_every_option_of_the_header_has_a_field():
    fields = {field.name for field in dataclasses.fields(tally.Options)}
    assert fields == set(TOO_LARGE) | {
        "expire_leases_on_its_own",
        "checkpoint_every_events",
        "use_recorded",
    }


def test_an_engine_with_a_clock_of_its_own_reads_the_time_it_was_set_to(tmp_path):
    # Each engine opened with manual_clock_ms reads a clock of its own: an omitted at_ms, the
    # bound ahead of the clock and the request-id horizon all follow it, in memory and on disk.
    day = 86_400_000
    options = tally.Options(manual_clock_ms=T)
    with (
        tally.Engine.in_memory(options=options) as in_memory,
        tally.Engine.open(tmp_path / "db", options=options) as on_disk,
    ):
        for engine in (in_memory, on_disk):
            assert engine.clock_ms() == T
            engine.create_user("ada", "tp-ada-1")  # at the clock's T, refused by the system clock
            engine.assign_seat("@ada", "ada", "Max", at_ms=T)
            with pytest.raises(tally.BadTimestampError, match="max_ahead_of_clock_ms"):
                engine.consume("tp-ada-1", "m2.7", {"requests": 1}, at_ms=T + 2 * day)
            engine.set_clock(T + 2 * day)
            assert engine.clock_ms() == T + 2 * day
            assert engine.consume("tp-ada-1", "m2.7", {"requests": 1}, at_ms=T + 2 * day).admitted
            first = engine.consume("tp-ada-1", "m2.7", {"requests": 1}, at_ms=T, request_id="r1")
            assert first.admitted
            engine.set_clock(T + 400 * day)
            with pytest.raises(tally.BadTimestampError, match="before the engine's clock"):
                engine.consume("tp-ada-1", "m2.7", {"requests": 1}, at_ms=T, request_id="r1")
            for bad in (0, 4_102_444_800_000):
                with pytest.raises(tally.InvalidArgumentError, match="now_ms"):
                    engine.set_clock(bad)
            with pytest.raises(ValueError, match="now_ms"):
                engine.set_clock(-1)
            assert engine.clock_ms() == T + 400 * day
    with tally.Engine.in_memory(options=tally.Options(manual_clock_ms=0)) as engine:
        with pytest.raises(tally.InvalidArgumentError, match="manual_clock"):
            engine.set_clock(T)


@pytest.mark.parametrize("value", [-1, 2**64])
def test_an_option_python_cannot_pass_raises_invalid_argument_as_the_docstring_says(value):
    # Options promises InvalidArgumentError naming the option for a value out of range (Go's
    # Options{DefaultLease: -1} is ErrInvalidArgument); a negative or oversized int raised a
    # bare ValueError, which `except tally.InvalidArgumentError` does not catch.
    with pytest.raises(tally.InvalidArgumentError, match="default_lease_ms"):
        tally.Engine.in_memory(options=tally.Options(default_lease_ms=value))
    with pytest.raises(tally.InvalidArgumentError, match="max_keys"):
        tally.verify("unused", options=tally.Options(max_keys=value))
