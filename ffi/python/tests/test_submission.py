"""Submitted consumes (``Engine.submit``, ``Submission.complete``): the decisions of
``consume``, applied at once, acknowledged once durable, each completed once."""

from __future__ import annotations

import gc
import threading
import time

import pytest

import tally
from conftest import UNBOUNDED, T, seated
from tally import Durability

# (key, resource, quantities, request id): plan quota, a denial over a maximum, an unknown
# key, a repeated id, credits once the Starter window is short.
MIX = [
    ("tp-ada-1", "m2.7", {"requests": 1}, None),
    ("tp-ada-1", "m2.7", {"requests": 2}, "a"),
    ("tp-ada-1", "music-2.6", {"songs": 1, "seconds": 400}, None),
    ("tp-nobody", "m2.7", {"requests": 1}, None),
    ("tp-ada-1", "m2.7", {"requests": 2}, "a"),
    ("tp-ada-1", "m2.7", {"requests": 1_490}, "b"),
    ("tp-ada-1", "m2.7", {"requests": 20}, None),
]


def accounts(engine: tally.Engine) -> str:
    key = seated(engine, "ada", "tp-ada-1", "Starter")
    engine.top_up("@ada", 10_000_000, at_ms=T)
    return key


def test_submissions_decide_as_consume_does_all_in_flight_at_once():
    with (
        tally.Engine.in_memory(options=UNBOUNDED) as engine,
        tally.Engine.in_memory(options=UNBOUNDED) as twin,
    ):
        accounts(engine)
        accounts(twin)
        submissions = [
            engine.submit(key, resource, quantities, at_ms=T, request_id=request_id)
            for key, resource, quantities, request_id in MIX
        ]
        for drawn, submission in zip(MIX, submissions, strict=True):
            key, resource, quantities, request_id = drawn
            expected = twin.consume(key, resource, quantities, at_ms=T, request_id=request_id)
            assert submission.complete() == expected, drawn
            assert submission.completed
        assert engine.usage("tp-ada-1", at_ms=T) == twin.usage("tp-ada-1", at_ms=T)
        assert engine.credits("@ada") == twin.credits("@ada")
        kinds = {
            (d.admitted, d.replayed, d.charged_to)
            for d in (twin.check(k, r, q, at_ms=T) for k, r, q, _ in MIX)
        }
        assert len(kinds) > 1, "the mix is not all one kind of decision"


def test_a_submission_is_applied_at_once_and_durable_once_completed(tmp_path):
    path = tmp_path / "db"
    with tally.Engine.open(path, durability=Durability.SYNC, options=UNBOUNDED) as engine:
        key = seated(engine, "ada", "tp-ada-1", "Plus")
        submissions = [
            engine.submit(key, "m2.7", {"requests": 1}, at_ms=T, request_id=f"s{i}")
            for i in range(300)
        ]
        assert engine.usage(key, at_ms=T).limits[0].used == 300, "applied at submission"
        decisions = [submission.complete() for submission in submissions]
        assert all(d.admitted and not d.replayed for d in decisions)
        assert [d.remaining for d in decisions] == sorted(
            (d.remaining for d in decisions), reverse=True
        )
        assert submissions[0].completed and "completed" in repr(submissions[0])
    with tally.Engine.open(path, durability=Durability.NONE, options=UNBOUNDED) as engine:
        assert engine.usage("tp-ada-1", at_ms=T).limits[0].used == 300
        replay = engine.submit("tp-ada-1", "m2.7", {"requests": 1}, at_ms=T, request_id="s7")
        assert replay.durable, "a replay of a durable decision waits for nothing"
        assert replay.complete().replayed
        assert engine.usage("tp-ada-1", at_ms=T).limits[0].used == 300


def test_a_submission_completes_once():
    with tally.Engine.in_memory(options=UNBOUNDED) as engine:
        key = accounts(engine)
        submission = engine.submit(key, "m2.7", {"requests": 1}, at_ms=T)
        assert "in flight" in repr(submission)
        assert submission.durable, "an in-memory engine has no log to wait for"
        assert submission.complete().admitted
        with pytest.raises(ValueError, match="completed already"):
            submission.complete()
        with pytest.raises(ValueError, match="completed already"):
            _ = submission.durable
        assert engine.usage(key, at_ms=T).limits[0].used == 1


def test_two_threads_completing_one_submission_get_one_decision():
    with tally.Engine.in_memory(options=UNBOUNDED) as engine:
        key = accounts(engine)
        for _ in range(50):
            submission = engine.submit(key, "m2.7", {"requests": 1}, at_ms=T)
            outcomes: list[object] = []
            barrier = threading.Barrier(2)

            def complete(
                submission: tally.Submission = submission,
                outcomes: list[object] = outcomes,
                barrier: threading.Barrier = barrier,
            ) -> None:
                barrier.wait()
                try:
                    outcomes.append(submission.complete())
                except ValueError as error:
                    outcomes.append(error)

            threads = [threading.Thread(target=complete) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert sorted(type(outcome).__name__ for outcome in outcomes) == [
                "Decision",
                "ValueError",
            ]


def test_bad_input_to_submit_raises_and_changes_nothing():
    with tally.Engine.in_memory(options=UNBOUNDED) as engine:
        key = accounts(engine)
        engine.submit(key, "m2.7", {"requests": 1}, at_ms=T, request_id="x").complete()
        before = engine.usage(key, at_ms=T)
        with pytest.raises(tally.UnknownResourceError):
            engine.submit(key, "m9", {"requests": 1}, at_ms=T)
        with pytest.raises(tally.RequestIdConflictError):
            engine.submit(key, "m2.7", {"requests": 2}, at_ms=T, request_id="x")
        with pytest.raises(tally.BadQuantityError):
            engine.submit(key, "m2.7", {"requests": 0}, at_ms=T)
        with pytest.raises(TypeError):
            engine.submit(key, "m2.7", [("requests", 1)], at_ms=T)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            tally.Submission(engine, None)  # type: ignore[arg-type]
        assert engine.usage(key, at_ms=T) == before


def test_an_uncompleted_submission_keeps_its_effect_and_is_freed_when_collected():
    with tally.Engine.in_memory(options=UNBOUNDED) as engine:
        key = accounts(engine)
        submission = engine.submit(key, "m2.7", {"requests": 3}, at_ms=T)
        finalizer = submission._finalizer
        del submission
        gc.collect()
        assert not finalizer.alive, "collected and freed"
        assert engine.usage(key, at_ms=T).limits[0].used == 3


def test_completing_after_a_close_answers_the_decision_the_close_kept(tmp_path):
    # The close flushed the submission's event: completing it after answers its decision (a
    # ClosedError read as "not admitted", and a retry without a request id counted it twice).
    path = tmp_path / "db"
    engine = tally.Engine.open(path, durability=Durability.SYNC, options=UNBOUNDED)
    key = seated(engine, "ada", "tp-ada-1", "Plus")
    submission = engine.submit(key, "m2.7", {"requests": 4}, at_ms=T, request_id="late")
    engine.close()
    decision = submission.complete()
    assert decision.admitted and not decision.replayed
    with tally.Engine.open(path, durability=Durability.NONE, options=UNBOUNDED) as reopened:
        assert reopened.usage(key, at_ms=T).limits[0].used == 4


def test_a_submission_is_durable_after_a_close_that_kept_it(tmp_path):
    # `durable` says whether `complete()` would return at once; after a clean close it returns
    # the decision at once, so `durable` is True, not a ClosedError (read as "not admitted").
    engine = tally.Engine.open(tmp_path / "db", durability=Durability.INTERVAL, options=UNBOUNDED)
    key = seated(engine, "ada", "tp-ada-1", "Plus")
    submission = engine.submit(key, "m2.7", {"requests": 1}, at_ms=T)
    engine.close()
    assert submission.durable is True
    assert submission.complete().admitted


def test_complete_waits_for_a_durable_inside_the_library_before_freeing_the_submission(
    monkeypatch,
):
    # `complete` frees the submission in the library; `durable` from another thread must never
    # be inside the library then: it is waited for, or sees the submission completed.
    from tally import _native

    inside = threading.Event()
    overlaps: list[str] = []
    durable = _native.lib.tally_engine_submission_durable
    complete = _native.lib.tally_engine_complete

    def slow_durable(*args: object) -> int:
        inside.set()
        time.sleep(0.002)  # a call that takes a while, so a racing complete would overlap it
        status = durable(*args)
        inside.clear()
        return int(status)

    def checked_complete(*args: object) -> int:
        if inside.is_set():
            overlaps.append("complete freed the submission while durable was inside")
        return int(complete(*args))

    monkeypatch.setattr(_native.lib, "tally_engine_submission_durable", slow_durable)
    monkeypatch.setattr(_native.lib, "tally_engine_complete", checked_complete)
    with tally.Engine.in_memory(options=UNBOUNDED) as engine:
        key = seated(engine, "ada", "tp-ada-1", "Max")
        for _ in range(40):
            submission = engine.submit(key, "m2.7", {"requests": 1}, at_ms=T)
            answers: list[object] = []

            def ask(submission: tally.Submission = submission, answers: list = answers) -> None:
                while True:
                    try:
                        answers.append(submission.durable)
                    except ValueError:
                        answers.append("completed")
                        return

            asker = threading.Thread(target=ask)
            asker.start()
            while not inside.is_set() and asker.is_alive():
                time.sleep(0)
            assert submission.complete().admitted
            asker.join()
            assert answers[-1] == "completed"
            assert all(answer is True for answer in answers[:-1]), answers
    assert overlaps == []


def test_an_interrupt_before_the_library_takes_a_submission_leaves_it_to_complete(monkeypatch):
    # A Ctrl-C while `complete()` got its call ready, before the library had the submission,
    # left it marked completed without the library ever taking it: never acknowledged, never
    # freed, and the retry raised "completed already".
    from tally import _native

    real = _native.Decision
    interrupts = [KeyboardInterrupt()]

    def interrupted() -> object:
        if interrupts:
            raise interrupts.pop()
        return real()

    with tally.Engine.in_memory(options=UNBOUNDED) as engine:
        key = accounts(engine)
        submission = engine.submit(key, "m2.7", {"requests": 1}, at_ms=T)
        monkeypatch.setattr(_native, "Decision", interrupted)
        with pytest.raises(KeyboardInterrupt):
            submission.complete()
        assert not submission.completed, "the library never had it"
        assert submission.complete().admitted
        assert submission.completed
        assert engine.usage(key, at_ms=T).limits[0].used == 1


def test_an_interrupt_after_the_library_took_a_submission_frees_it_once(monkeypatch):
    # The library completed and freed it; the interrupt came before Python saw the status.
    from tally import _native

    real = _native.lib.tally_engine_complete

    def then_interrupted(*args: object) -> int:
        real(*args)
        raise KeyboardInterrupt

    with tally.Engine.in_memory(options=UNBOUNDED) as engine:
        key = accounts(engine)
        submission = engine.submit(key, "m2.7", {"requests": 1}, at_ms=T)
        monkeypatch.setattr(_native.lib, "tally_engine_complete", then_interrupted)
        with pytest.raises(KeyboardInterrupt):
            submission.complete()
        monkeypatch.setattr(_native.lib, "tally_engine_complete", real)
        assert submission.completed
        with pytest.raises(ValueError, match="completed already"):
            submission.complete()
        del submission
        gc.collect()  # freed by the library: the finalizer must not free it again
        assert engine.usage(key, at_ms=T).limits[0].used == 1


def test_an_interrupt_as_submit_returns_frees_the_submission_once(monkeypatch):
    # A Ctrl-C landing as the library's submit returned, before Python made the Submission,
    # left the library's submission with no one to complete or free it.
    from tally import _native

    real_free = _native.lib.tally_submission_free
    made = tally.Submission.__init__
    freed: list[object] = []

    def counted_free(handle: object) -> None:
        freed.append(handle)
        real_free(handle)

    def interrupted(self: tally.Submission, *args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with tally.Engine.in_memory(options=UNBOUNDED) as engine:
        key = accounts(engine)
        monkeypatch.setattr(_native.lib, "tally_submission_free", counted_free)
        monkeypatch.setattr(tally.Submission, "__init__", interrupted)
        with pytest.raises(KeyboardInterrupt):
            engine.submit(key, "m2.7", {"requests": 1}, at_ms=T)
        monkeypatch.setattr(tally.Submission, "__init__", made)
        gc.collect()
        assert len(freed) == 1, "freed once, not leaked"
        assert engine.usage(key, at_ms=T).limits[0].used == 1, "its effect kept, as documented"
        assert engine.submit(key, "m2.7", {"requests": 1}, at_ms=T).complete().admitted
