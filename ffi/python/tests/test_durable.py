"""A durable engine in a temporary directory: usage survives a reopen, the event log, cursors,
checkpoints, compaction and verify."""

from __future__ import annotations

import threading

import pytest

import tally
from conftest import (
    HOUR_MS,
    UNBOUNDED,
    T,
    consume_and_checkpoint,
    oldest_segment_unreadable,
    seated,
    unbounded,
)
from tally import Durability


def test_a_reopened_engine_keeps_its_usage_credits_and_request_ids(tmp_path):
    path = tmp_path / "db"
    with tally.Engine.open(path, durability=Durability.SYNC, options=UNBOUNDED) as engine:
        key = seated(engine, "ada", "tp-ada-1", "Starter")
        for i in range(10):
            assert engine.consume(key, "m2.7", {"requests": 1}, at_ms=T, request_id=f"r{i}")
        engine.top_up("@ada", 7_000, at_ms=T)
    with tally.Engine.open(str(path), durability="none", options=UNBOUNDED) as engine:
        usage = engine.usage("tp-ada-1", at_ms=T)
        assert usage.plan == "Starter"
        assert usage.limits[0].used == 10
        assert engine.credits("@ada") == 7_000
        replay = engine.consume("tp-ada-1", "m2.7", {"requests": 1}, at_ms=T, request_id="r3")
        assert replay.replayed
        assert engine.usage("tp-ada-1", at_ms=T).limits[0].used == 10


def test_the_event_log_and_a_billing_cursor(tmp_path):
    with tally.Engine.open(
        tmp_path / "db", durability=Durability.INTERVAL, interval_ms=50, options=UNBOUNDED
    ) as engine:
        key = seated(engine, "bo", "tp-bo-1", "Plus")
        engine.consume(key, "m2.7", {"requests": 2}, at_ms=T)
        engine.sync()
        events = engine.events_after(0, limit=1000)
        assert [event.seq for event in events] == list(range(1, len(events) + 1))
        kinds = [event.kind for event in events]
        assert "usage_admitted" in kinds
        admitted = events[kinds.index("usage_admitted")]
        assert admitted.body["quantities"] == {"requests": 2}
        # The team it concerns, named in every event; a policy swap concerns none.
        assert admitted.team == "@bo"
        assert events[kinds.index("policy_swapped")].team is None
        assert engine.cursor("billing") == 0
        engine.save_cursor("billing", events[-1].seq)
        assert engine.cursor("billing") == events[-1].seq
        engine.save_cursor("gone", 1)
        assert engine.cursors() == {"billing": events[-1].seq, "gone": 1}
        assert list(engine.cursors()) == ["billing", "gone"]
        assert engine.delete_cursor("gone") is True
        assert engine.cursors() == {"billing": events[-1].seq}
        assert engine.delete_cursor("gone") is False
        assert engine.cursor("gone") == 0
        assert engine.events_after(events[-1].seq) == []
        assert engine.checkpoint() == events[-1].seq
        assert engine.compact(at_ms=T) >= 0
    report = tally.verify(tmp_path / "db")
    assert report.sound and not report.problems
    assert report.last_seq is not None and report.last_seq >= len(events)


def test_reading_after_a_cursor_that_compaction_passed_names_the_events_lost(tmp_path):
    # The retention is how long a billing reader has; once compaction has passed its cursor,
    # reading after it says which events are gone instead of skipping them silently.
    options = unbounded(retention_ms=1_000)
    with tally.Engine.open(tmp_path / "db", durability="sync", options=options) as engine:
        key = seated(engine, "di", "tp-di-1", "Plus")
        for i in range(3):
            engine.consume(key, "m2.7", {"requests": 1}, at_ms=T + i)
        engine.save_cursor("billing", 2)
        snapshot = engine.checkpoint()
        later = T + 40 * 24 * HOUR_MS
        engine.consume(key, "m2.7", {"requests": 1}, at_ms=later)
        assert engine.compact(at_ms=later) > 0
        with pytest.raises(tally.InvalidArgumentError, match="compacted away"):
            engine.events_after(engine.cursor("billing"))
        kept = engine.events_after(snapshot)
        assert kept and kept[0].seq == snapshot + 1
        assert engine.events_after(0) == kept


def test_a_database_open_in_one_engine_is_locked_for_another(tmp_path):
    with tally.Engine.open(tmp_path / "db", durability="none", options=UNBOUNDED):
        with pytest.raises(tally.DatabaseLockedError):
            tally.Engine.open(tmp_path / "db", options=UNBOUNDED)
        with pytest.raises(tally.DatabaseLockedError):
            tally.verify(tmp_path / "db")


def test_a_directory_of_other_files_is_foreign(tmp_path):
    (tmp_path / "notes.txt").write_text("not a database")
    with pytest.raises(tally.DatabaseForeignError):
        tally.Engine.open(tmp_path, options=UNBOUNDED)


def test_a_policy_file_and_an_invalid_one(tmp_path):
    policy = tmp_path / "plans.toml"
    policy.write_text(
        'time_zone = "UTC"\n'
        '[resources.chat]\nunits = ["requests"]\nrequired = ["requests"]\n'
        "price_micros = { requests = 10 }\n"
        '[plans.Tiny]\nlimits = [{ resource = "chat", unit = "requests", amount = 2, '
        'window = "daily" }]\n'
    )
    with tally.Engine.open(tmp_path / "db", policy, durability="none", options=UNBOUNDED) as engine:
        key = seated(engine, "cy", "tp-cy-1", "Tiny")
        assert [
            engine.consume(key, "chat", {"requests": 1}, at_ms=T).admitted for _ in range(3)
        ] == [
            True,
            True,
            False,
        ]
    with tally.Engine.in_memory(tally.Policy.toml(policy.read_text()), options=UNBOUNDED) as engine:
        assert "Tiny" in engine.policy()["plans"]
    policy.write_text("time_zone = ")
    with pytest.raises(tally.PolicyInvalidError):
        tally.Engine.in_memory(tally.Policy.file(policy), options=UNBOUNDED)


def test_verify_replays_with_the_options_the_database_was_opened_with(tmp_path):
    path = tmp_path / "db"
    options = unbounded(max_policy_generations=2)
    with tally.Engine.open(path, durability="none", options=options) as engine:
        for swap in range(4):
            engine.swap_policy(tally.Policy.default(), at_ms=T + swap)
        engine.checkpoint()
    report = tally.verify(path, options=options)
    assert report.sound and report.snapshot_matches_replay and not report.problems
    # No options: those the database recorded when it was opened (2 generations).
    report = tally.verify(path)
    assert report.sound and report.snapshot_matches_replay and not report.problems
    assert report.replayed_with_recorded_options
    # Options() are the defaults (1,024 generations), not the recorded ones: the replay keeps
    # every generation and is compared on those the snapshot kept, so the database is sound
    # under them too.
    report = tally.verify(path, options=tally.Options())
    assert report.sound and report.snapshot_matches_replay
    assert not report.replayed_with_recorded_options
    with pytest.raises(tally.InvalidArgumentError, match="max_policy_generations"):
        tally.verify(path, options=tally.Options(max_policy_generations=1))


def test_health_reports_a_compaction_that_failed_in_the_background(tmp_path):
    # Each periodic checkpoint compacts what the retention lets go; a failure there goes to
    # no call's answer, only to ``health`` (cleared once one succeeds).
    day = 24 * 3_600_000
    path = tmp_path / "db"
    options = unbounded(retention_ms=1_000, checkpoint_every_events=4)
    with tally.Engine.open(path, durability="sync", options=options) as engine:
        key = seated(engine, "he", "tp-he-1", "Max")
        assert engine.health() == tally.Health(None, None, None) and engine.health().healthy
        consume_and_checkpoint(engine, key, T)
        later = T + 40 * day  # past the longest window (a month) and the retention
        with oldest_segment_unreadable(path):
            engine.set_clock(later)
            consume_and_checkpoint(engine, key, later)
            health = engine.health()
            assert not health.healthy and health.compaction_failure is not None
            assert health.log_failure is None and health.checkpoint_failure is None
        consume_and_checkpoint(engine, key, later + 100)
        assert engine.health().healthy
        assert engine.events_after(0, limit=1)[0].seq > 1


def test_verify_says_where_a_torn_tail_is_and_the_next_open_cuts_it(tmp_path):
    path = tmp_path / "db"
    with tally.Engine.open(path, durability="sync", options=UNBOUNDED) as engine:
        engine.create_team("acme", at_ms=T)
        engine.top_up("acme", 1_000, at_ms=T)
    segment = max((path / "events").iterdir())
    with segment.open("ab") as file:
        file.write(b"\x5a" * 100)  # a write a crash cut short
    report = tally.verify(path)
    assert report.sound and not report.problems
    assert report.torn_tail is not None
    assert "ends in 100 bytes" in report.torn_tail and segment.name in report.torn_tail
    with tally.Engine.open(path, durability="sync", options=UNBOUNDED) as engine:
        assert engine.credits("acme") == 1_000
    report = tally.verify(path)
    assert report.sound and report.torn_tail is None


# Starter with 7 m2.7 requests per 5 hours (the shipped Token Plan's Starter has 1,500).
CUSTOM_POLICY = """
time_zone = "UTC"
[resources."m2.7"]
units = ["requests"]
required = ["requests"]
price_micros = { requests = 1 }
[plans.Starter]
limits = [{ resource = "m2.7", unit = "requests", amount = 7, window = "rolling:5h" }]
"""


def test_the_stored_policy_keeps_a_database_s_own_policy_and_logs_nothing(tmp_path):
    path = tmp_path / "db"
    with tally.Engine.open(
        path, tally.Policy.toml(CUSTOM_POLICY), durability="none", options=UNBOUNDED
    ) as engine:
        with pytest.raises(tally.InvalidArgumentError, match="policy_source"):
            engine.swap_policy(tally.Policy.stored(), at_ms=T)
        seated(engine, "ada", "tp-ada-1", "Starter")
        last = engine.checkpoint()
    with tally.Engine.open(
        path, tally.Policy.stored(), durability="none", options=UNBOUNDED
    ) as engine:
        assert [limit.amount for limit in engine.usage("tp-ada-1", at_ms=T).limits] == [7]
        assert engine.events_after(last) == []
        # Past the last event is an error, not an empty page a poller would skip ahead from.
        with pytest.raises(tally.InvalidArgumentError, match="past the end of the log"):
            engine.events_after(last + 1)
    # The shipped policy given instead is swapped in, and the swap logged.
    with tally.Engine.open(path, durability="none", options=UNBOUNDED) as engine:
        assert engine.usage("tp-ada-1", at_ms=T).limits[0].amount == 1500
        assert "policy_swapped" in [event.kind for event in engine.events_after(last)]


def test_a_new_database_opened_with_the_stored_policy_runs_the_token_plan(tmp_path):
    with tally.Engine.open(
        tmp_path / "db", tally.Policy.stored(), durability="none", options=UNBOUNDED
    ) as engine:
        seated(engine, "bo", "tp-bo-1", "Starter")
        assert engine.usage("tp-bo-1", at_ms=T).limits[0].amount == 1500


def test_an_in_memory_engine_has_no_stored_policy():
    with pytest.raises(tally.InvalidArgumentError, match="policy_source"):
        tally.Engine.in_memory(tally.Policy.stored(), options=UNBOUNDED)


def test_a_second_close_returns_only_once_the_first_has_closed_the_database(monkeypatch):
    # The library answers a close racing another at once (TALLY_CLOSED); a program that exits
    # once its close returns must not cut the first one short (its checkpoint and flush). The
    # first close here is held inside the library, past the point where the handle is marked
    # closed, until the test lets it go.
    from tally import _native

    inside, release = threading.Event(), threading.Event()
    real_close = _native.lib.tally_engine_close

    def slow_close(handle):
        status = real_close(handle)
        if status == _native.OK:  # the first close: the handle is closed, the rest is slow
            inside.set()
            release.wait(timeout=30)
        return status

    monkeypatch.setattr(_native.lib, "tally_engine_close", slow_close)
    engine = tally.Engine.in_memory()
    first = threading.Thread(target=engine.close)
    first.start()
    assert inside.wait(timeout=30)
    second = threading.Thread(target=engine.close)
    second.start()
    second.join(timeout=0.2)
    still_waiting = second.is_alive()
    release.set()
    first.join()
    second.join()
    assert still_waiting, "the second close returned while the first was still closing"
    assert engine.closed


def test_a_database_path_given_as_bytes_opens_as_verify_and_policy_file_take_it(tmp_path):
    # verify() and Policy.file() take a bytes path (os.fsencode), and so does Go's Open (a
    # string of any bytes); Engine.open alone refused one with a TypeError.
    path = bytes(tmp_path / "db")
    with tally.Engine.open(path, durability="none", options=UNBOUNDED) as engine:
        seated(engine, "by", "tp-by-1", "Starter")
    assert tally.verify(path).sound
    with pytest.raises(TypeError, match="path must be"):
        tally.Engine.open(None)  # type: ignore[arg-type]


def test_interval_ms_is_read_only_for_interval_durability(tmp_path):
    # Documented as read only for INTERVAL: a stray value with another mode was range-checked
    # and refused all the same (Go's Options ignore it).
    with tally.Engine.open(
        tmp_path / "sync", durability=Durability.SYNC, interval_ms=-1, options=UNBOUNDED
    ) as engine:
        seated(engine, "cy", "tp-cy-1", "Plus")
    # (A ValueError, as for every int argument; InvalidArgumentError is one.)
    with pytest.raises(ValueError, match="interval_ms"):
        tally.Engine.open(
            tmp_path / "interval", durability=Durability.INTERVAL, interval_ms=-1, options=UNBOUNDED
        )
    assert not (tmp_path / "interval").exists()
