"""Shared fixtures. Timestamps are explicit, from ``T``; the engines the tests open read a
clock of their own standing at ``T`` (the engine forgets request ids and closed reservations,
ends leases and frees idle keys relative to its clock, so what it does must not depend on the
day the tests run), with no bound on how far ahead of it a stamp may be (some tests stamp days
after ``T``): ``UNBOUNDED``, ``unbounded(...)``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import tally

# 2030-03-17T17:46:40Z, 01:46:40 on the 18th in the policy's zone (Asia/Shanghai).
T = 1_900_000_000_000
HOUR_MS = 3_600_000

#: Options for the tests' engines: a clock of the engine's own at ``T``, and no bound on how
#: far ahead of it a stamp may be.
UNBOUNDED = tally.Options(max_ahead_of_clock_ms=0, manual_clock_ms=T)


def unbounded(**options: object) -> tally.Options:
    """``tally.Options(**options)`` with the engine's own clock at ``T`` and no bound ahead of
    it, as ``UNBOUNDED`` (``manual_clock_ms`` may be given)."""
    options.setdefault("manual_clock_ms", T)
    return tally.Options(max_ahead_of_clock_ms=0, **options)  # type: ignore[arg-type]


@pytest.fixture
def engine() -> Iterator[tally.Engine]:
    with tally.Engine.in_memory(options=UNBOUNDED) as engine:
        yield engine


def seated(engine: tally.Engine, user: str, key: str, plan: str) -> str:
    """A user with a key seated on ``plan`` in their Default Team; returns the key."""
    engine.create_user(user, key, at_ms=T)
    engine.assign_seat(f"@{user}", user, plan, at_ms=T)
    return key


def consume_and_checkpoint(engine: tally.Engine, key: str, at_ms: int) -> None:
    """Twelve requests on ``key`` from ``at_ms``, a millisecond apart, then a checkpoint: the
    last periodic checkpoint (and the compaction after it) ends first."""
    for i in range(12):
        assert engine.consume(key, "m2.7", {"requests": 1}, at_ms=at_ms + i).admitted
    engine.checkpoint()


@contextlib.contextmanager
def oldest_segment_unreadable(path: Path) -> Iterator[None]:
    """The oldest log segment of the database at ``path`` replaced by a directory (a
    compaction that judges it fails) until the block ends, then put back."""
    oldest = min((path / "events").glob("*.seg"))
    aside = oldest.with_suffix(".kept")
    oldest.rename(aside)
    oldest.mkdir()
    try:
        yield
    finally:
        oldest.rmdir()
        aside.rename(oldest)
