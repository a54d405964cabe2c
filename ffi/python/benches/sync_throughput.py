"""SYNC durability from Python: ``consume`` from threads against ``submit`` with many requests
in flight from one thread, and ``reserve`` then ``settle`` from threads (a chat call billed by
tokens). Not a test; run it after ``bash scripts/test-python.sh`` built the
library and the environment:

    target/python-venv/bin/python ffi/python/benches/sync_throughput.py [REQUESTS]

Every request is admitted and logged (the key's team has credits for whatever its plan does not
cover). Prints requests per second for each way, medians of three runs.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import tally


def engine_in(directory: Path) -> tally.Engine:
    engine = tally.Engine.open(directory / "db", durability=tally.Durability.SYNC)
    engine.create_user("ada", "tp-ada")
    engine.assign_seat("@ada", "ada", "Plus")
    engine.top_up("@ada", 1 << 60)
    return engine


def from_threads(calls: int, threads: int, call: Callable[[], None]) -> None:
    """Makes ``calls`` calls of ``call`` spread over ``threads`` threads."""
    left = iter(range(calls))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if next(left, None) is None:
                    return
            call()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def consume_from_threads(engine: tally.Engine, requests: int, threads: int) -> None:
    def consume() -> None:
        assert engine.consume("tp-ada", "m2.7", {"requests": 1}).admitted

    from_threads(requests, threads, consume)


def reserve_and_settle_from_threads(engine: tally.Engine, pairs: int, threads: int) -> None:
    def reserve_and_settle() -> None:
        held = engine.reserve("tp-ada", "m2.7", {"requests": 1, "tokens": 2_000})
        assert held.decision.admitted and held.id is not None
        assert engine.settle(held.id, {"requests": 1, "tokens": 1_200}).admitted

    from_threads(pairs, threads, reserve_and_settle)


def submit_in_flight(engine: tally.Engine, requests: int, in_flight: int) -> None:
    window: deque[tally.Submission] = deque()
    for _ in range(requests):
        if len(window) == in_flight:
            assert window.popleft().complete().admitted
        window.append(engine.submit("tp-ada", "m2.7", {"requests": 1}))
    while window:
        assert window.popleft().complete().admitted


def rate(run, requests: int) -> float:  # type: ignore[no-untyped-def]
    rates = []
    for _ in range(3):
        with tempfile.TemporaryDirectory() as directory, engine_in(Path(directory)) as engine:
            started = time.perf_counter()
            run(engine, requests)
            rates.append(requests / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> None:
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    print(f"tally {tally.version()}, {requests} requests per run, SYNC, median of 3")
    for threads in (1, 16, 64):
        per_second = rate(lambda e, n, t=threads: consume_from_threads(e, n, t), requests)
        print(f"consume, {threads:>4} threads            {per_second:>10,.0f} requests/s")
    for in_flight in (16, 256, 1000):
        per_second = rate(lambda e, n, w=in_flight: submit_in_flight(e, n, w), requests)
        print(f"submit,  {in_flight:>4} in flight, 1 thread {per_second:>10,.0f} requests/s")
    pairs = max(requests // 4, 1)
    for threads in (1, 16, 64):
        per_second = rate(lambda e, n, t=threads: reserve_and_settle_from_threads(e, n, t), pairs)
        print(f"reserve + settle, {threads:>4} threads  {per_second:>10,.0f} pairs/s")


if __name__ == "__main__":
    main()
