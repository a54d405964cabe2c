"""Many threads on one engine: the handle is thread-safe and ctypes releases the GIL."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import tally
from conftest import UNBOUNDED, T, seated

THREADS = 8
ATTEMPTS_PER_THREAD = 250  # 2,000 attempts at a 1,500 quota


def test_eight_threads_admit_exactly_the_starter_limit(engine):
    key = seated(engine, "ada", "tp-ada-1", "Starter")
    start = threading.Barrier(THREADS)

    def worker(thread: int) -> int:
        start.wait()
        admitted = 0
        for attempt in range(ATTEMPTS_PER_THREAD):
            decision = engine.consume(
                key, "m2.7", {"requests": 1}, at_ms=T, request_id=f"t{thread}-{attempt}"
            )
            admitted += decision.admitted
        return admitted

    with ThreadPoolExecutor(THREADS) as pool:
        total = sum(pool.map(worker, range(THREADS)))
    assert total == 1500
    assert engine.usage(key, at_ms=T).limits[0].used == 1500


def test_threads_racing_a_close_either_finish_or_see_closed():
    engine = tally.Engine.in_memory(options=UNBOUNDED)
    key = seated(engine, "bo", "tp-bo-1", "Max")
    outcomes = {"admitted": 0, "closed": 0}
    lock = threading.Lock()
    # Every thread has had a call answered before the close: it races calls in flight.
    # (Closing at once after starting them, on a loaded machine the threads had not run yet,
    # and every call they made came after the close.)
    calling = [threading.Event() for _ in range(THREADS)]
    first_outcomes: list[str] = []

    def worker(called: threading.Event) -> None:
        try:
            for attempt in range(2_000):
                try:
                    engine.consume(key, "m2.7", {"requests": 1}, at_ms=T)
                    outcome = "admitted"
                except tally.ClosedError:
                    outcome = "closed"
                with lock:
                    outcomes[outcome] += 1
                    if attempt == 0:
                        first_outcomes.append(outcome)
                called.set()
                if outcome == "closed":
                    return
        finally:
            called.set()  # a thread that raised is not waited for: the checks below report it

    threads = [threading.Thread(target=worker, args=(called,)) for called in calling]
    for thread in threads:
        thread.start()
    for called in calling:
        assert called.wait(timeout=60), "a thread never had a call answered"
    engine.close()
    for thread in threads:
        thread.join()
    assert first_outcomes == ["admitted"] * THREADS
    assert outcomes["closed"] + outcomes["admitted"] > 0
    assert engine.closed


def test_daemon_threads_still_calling_at_interpreter_exit_get_closed_errors_not_freed_memory(
    tmp_path,
):
    # At exit the engine is closed, not freed: a daemon thread's next call (and a call from an
    # atexit handler that runs after tally's) gets ClosedError, and the handle is never freed
    # under them (the process's exit takes the memory back).
    code = f"""
import atexit, os, sys, threading, time

def after_tally():  # registered before tally's own handler: runs after it
    try:
        engine.check("tp-ada", "m2.7", {{"requests": 1}}, at_ms={T})
        os.write(1, b"open\\n")
    except tally.ClosedError:
        os.write(1, b"closed\\n")

atexit.register(after_tally)
import tally, tally._native as native
real_free = native.lib.tally_engine_free
def recording_free(handle):
    os.write(1, b"freed\\n")
    real_free(handle)
native.lib.tally_engine_free = recording_free
engine = tally.Engine.open(
    sys.argv[1], durability=tally.Durability.NONE,
    options=tally.Options(max_ahead_of_clock_ms=0, manual_clock_ms={T}),  # on a clock at T
)
engine.create_user("ada", "tp-ada", at_ms={T})
engine.assign_seat("@ada", "ada", "Max", at_ms={T})
calling = threading.Event()
def hammer():
    while True:
        try:
            engine.check("tp-ada", "m2.7", {{"requests": 1}}, at_ms={T})
        except tally.ClosedError:
            time.sleep(0.001)
        calling.set()
threading.Thread(target=hammer, daemon=True).start()
calling.wait()
print("exiting", flush=True)
"""
    for run in range(3):
        result = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / f"db-{run}")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
        assert result.stdout.split() == ["exiting", "closed"], result.stdout


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_closed_errors_and_leaves_the_parents_database_alone(tmp_path):
    # A process forked after an open (gunicorn --preload, a fork-started multiprocessing pool)
    # has a copy of the engine without its threads, on the parent's files: its first call used
    # to wait forever for a flush no thread would do, and its exit closed that copy, writing a
    # checkpoint into the database the parent still has open.
    code = f"""
import os, signal, sys, tally
engine = tally.Engine.open(
    sys.argv[1],
    durability=tally.Durability.SYNC,
    options=tally.Options(max_ahead_of_clock_ms=0),  # stamped in 2030
)
engine.create_user("ada", "tp-ada", at_ms={T})
engine.assign_seat("@ada", "ada", "Max", at_ms={T})
child = os.fork()
if child == 0:
    signal.alarm(10)  # a child that hangs dies rather than outlive the test
    try:
        engine.consume("tp-ada", "m2.7", {{"requests": 1}}, at_ms={T})
        print("child: admitted", flush=True)
    except tally.ClosedError as error:
        print("child:", "fork" in error.message, engine.closed, flush=True)
    engine.close()  # a no-op in the child
    sys.exit(0)  # runs the child's atexit handlers
_, status = os.waitpid(child, 0)
assert status == 0, status
assert engine.consume("tp-ada", "m2.7", {{"requests": 1}}, at_ms={T}).admitted
engine.close()
report = tally.verify(sys.argv[1])
with tally.Engine.open(sys.argv[1], options=tally.Options(max_ahead_of_clock_ms=0)) as reopened:
    print("parent:", report.sound, reopened.usage("tp-ada", at_ms={T}).limits[0].used, flush=True)
"""
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "db")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.splitlines() == ["child: True True", "parent: True 1"], result.stdout


def test_a_forked_child_gets_closed_errors_from_a_submission_a_parents_thread_was_completing():
    # A fork while a thread is inside `Submission.complete()` (waiting for its fsync) copies
    # the submission's lock held, by a thread the child does not have: `durable` there waited
    # for it forever instead of raising ClosedError as every other call in the child does.
    code = f"""
import os, signal, sys, threading, tally
from tally import _native
engine = tally.Engine.in_memory(options=tally.Options(max_ahead_of_clock_ms=0))
engine.create_user("ada", "tp-ada", at_ms={T})
engine.assign_seat("@ada", "ada", "Max", at_ms={T})
submission = engine.submit("tp-ada", "m2.7", {{"requests": 1}}, at_ms={T})
inside, release = threading.Event(), threading.Event()
complete = _native.lib.tally_engine_complete
def slow_complete(*args):  # a complete waiting for its fsync
    inside.set()
    release.wait()
    return complete(*args)
_native.lib.tally_engine_complete = slow_complete
completing = threading.Thread(target=submission.complete)
completing.start()
inside.wait()
child = os.fork()
if child == 0:
    signal.alarm(5)  # a child that hangs dies rather than outlive the test
    for name in ("durable", "complete"):
        try:
            getattr(submission, name) if name == "durable" else submission.complete()
            print("child:", name, "answered", flush=True)
        except tally.ClosedError:
            print("child:", name, "closed", flush=True)
        except ValueError as error:
            print("child:", name, error, flush=True)
    os._exit(0)
_, status = os.waitpid(child, 0)
release.set()
completing.join()
print("parent:", status, flush=True)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.splitlines() == [
        "child: durable closed",
        "child: complete closed",
        "parent: 0",
    ], result.stdout


def test_an_engine_or_a_submission_is_shared_never_copied():
    # A shallow copy shared the handle but not the finalizer's hold on it: once the original
    # was collected, the handle was freed under the copy, and its next call crashed.
    engine = tally.Engine.in_memory(options=UNBOUNDED)
    key = seated(engine, "cy", "tp-cy-1", "Max")
    submission = engine.submit(key, "m2.7", {"requests": 1}, at_ms=T)
    for original in (engine, submission):
        for copy_it in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match=type(original).__name__):
                copy_it(original)
    assert submission.complete().admitted
    assert engine.usage(key, at_ms=T).limits[0].used == 1
    engine.close()


def test_an_interrupt_as_open_returns_leaves_the_database_free_to_open_again(tmp_path, monkeypatch):
    # A Ctrl-C landing as the library's open returned, before Python made the Engine, left
    # the engine open with nothing to close it: the database stayed locked until the process
    # exited, and opening it again raised DatabaseLockedError.
    made = tally.Engine.__init__

    def interrupted(self: tally.Engine, *args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(tally.Engine, "__init__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tally.Engine.open(tmp_path / "db", durability=tally.Durability.NONE, options=UNBOUNDED)
    monkeypatch.setattr(tally.Engine, "__init__", made)
    with tally.Engine.open(
        tmp_path / "db", durability=tally.Durability.NONE, options=UNBOUNDED
    ) as engine:
        seated(engine, "ada", "tp-ada-1", "Max")
        assert engine.consume("tp-ada-1", "m2.7", {"requests": 1}, at_ms=T).admitted


def test_an_interrupt_as_reserve_returns_leaves_nothing_held(monkeypatch):
    # A Ctrl-C landing as the library's reserve returned lost the reservation's id: nothing
    # could settle or void it, and it held its estimate until its lease ended.
    from tally import results

    real = results.Decision.from_native
    interrupts = [KeyboardInterrupt()]

    def interrupted(native: object) -> results.Decision:
        if interrupts:
            raise interrupts.pop()
        return real(native)  # type: ignore[arg-type]

    with tally.Engine.in_memory(options=UNBOUNDED) as engine:
        key = seated(engine, "ada", "tp-ada-1", "Max")
        monkeypatch.setattr(results.Decision, "from_native", staticmethod(interrupted))
        with pytest.raises(KeyboardInterrupt):
            engine.reserve(key, "m2.7", {"requests": 1, "tokens": 900}, at_ms=T)
        monkeypatch.setattr(results.Decision, "from_native", real)
        usage = engine.usage(key, at_ms=T)
        assert usage.open_reservations == 0
        assert usage.limits[0].used == 0
        assert engine.reserve(key, "m2.7", {"requests": 1}, at_ms=T).decision.admitted


def test_threads_failing_at_once_each_raise_their_own_calls_message(engine):
    """The library's last error is per thread, and the wrapper reads it on the thread that
    failed: threads failing with different errors at the same moment never swap messages."""
    rounds = 200
    start = threading.Barrier(THREADS)

    def worker(thread: int) -> list[str]:
        start.wait()
        seen = []
        for attempt in range(rounds):
            # Each thread's own length, so a message from another thread shows.
            too_long = "t" * (129 + thread)
            try:
                if attempt % 2:
                    engine.create_team(too_long, at_ms=T)
                else:
                    engine.consume(too_long, "m2.7", {"requests": 1}, at_ms=T)
            except tally.StringTooLongError as error:
                seen.append(error.message)
        return seen

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(worker, range(THREADS)))
    for thread, messages in enumerate(results):
        length = 129 + thread
        assert len(messages) == rounds
        assert set(messages) == {
            f"team: is {length} bytes; at most 128",
            f"key: is {length} bytes; at most 128",
        }, thread
