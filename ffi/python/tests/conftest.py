"""Shared fixtures. Timestamps are explicit and after the machine's clock (2030): the engine
forgets request ids and closed reservations relative to its clock, so tests in the past would
see them vanish."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import tally

# 2030-03-17T17:46:40Z, 01:46:40 on the 18th in the policy's zone (Asia/Shanghai).
T = 1_900_000_000_000
HOUR_MS = 3_600_000


@pytest.fixture
def engine() -> Iterator[tally.Engine]:
    with tally.Engine.in_memory() as engine:
        yield engine


def seated(engine: tally.Engine, user: str, key: str, plan: str) -> str:
    """A user with a key seated on ``plan`` in their Default Team; returns the key."""
    engine.create_user(user, key, at_ms=T)
    engine.assign_seat(f"@{user}", user, plan, at_ms=T)
    return key
