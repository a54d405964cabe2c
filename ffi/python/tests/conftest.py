"""Shared fixtures. Timestamps are explicit and after the machine's clock (2030): the engine
forgets request ids and closed reservations relative to its clock, so tests in the past would
see them vanish. Stamped years ahead of the (system) clock the engine reads, they would be
refused by the default bound (a day ahead), so the engines the tests open opt out of it
(``UNBOUNDED``, ``unbounded(...)``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import tally

# 2030-03-17T17:46:40Z, 01:46:40 on the 18th in the policy's zone (Asia/Shanghai).
T = 1_900_000_000_000
HOUR_MS = 3_600_000

#: Options that set no bound on how far ahead of the engine's clock a stamp may be.
UNBOUNDED = tally.Options(max_ahead_of_clock_ms=0)


def unbounded(**options: object) -> tally.Options:
    """``tally.Options(**options)`` with no bound ahead of the clock, as ``UNBOUNDED``."""
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
