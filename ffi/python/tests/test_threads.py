"""Many threads on one engine: the handle is thread-safe and ctypes releases the GIL."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import tally
from conftest import T, seated

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
    engine = tally.Engine.in_memory()
    key = seated(engine, "bo", "tp-bo-1", "Max")
    outcomes = {"admitted": 0, "closed": 0}
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(2_000):
            try:
                engine.consume(key, "m2.7", {"requests": 1}, at_ms=T)
                outcome = "admitted"
            except tally.ClosedError:
                outcome = "closed"
            with lock:
                outcomes[outcome] += 1
            if outcome == "closed":
                return

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    engine.close()
    for thread in threads:
        thread.join()
    assert outcomes["closed"] + outcomes["admitted"] > 0
    assert engine.closed
