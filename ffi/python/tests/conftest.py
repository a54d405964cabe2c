"""Shared fixtures. Timestamps are explicit, from ``T``; the engines the tests open read a
clock of their own standing at ``T`` (the engine forgets request ids and closed reservations,
ends leases and frees idle keys relative to its clock, so what it does must not depend on the
day the tests run), with no bound on how far ahead of it a stamp may be (some tests stamp days
after ``T``): ``UNBOUNDED``, ``unbounded(...)``."""

from __future__ import annotations

from collections.abc import Iterator

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
