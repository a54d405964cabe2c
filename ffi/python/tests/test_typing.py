"""The package's types as a user's mypy --strict sees them: the calls the documentation shows
type-check as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")

USES = """
from pathlib import Path

import tally


def uses(engine: tally.Engine, names: dict[str, int], units: dict[tally.Unit, int]) -> None:
    decision: tally.Decision = engine.consume("tp-ada-1", "m2.7", {"requests": 1})
    engine.consume("tp-ada-1", "m2.7", {tally.Unit.TOKENS: 900})
    engine.consume("tp-ada-1", "m2.7", {tally.Unit.TOKENS: 900, "requests": 1})  # a mix
    engine.check(b"tp-ada-1", "m2.7", names, request_id="req-1")
    reservation = engine.reserve("tp-ada-1", "m2.7", units, lease_ms=60_000)
    engine.settle(reservation, {"requests": 1, tally.Unit.TOKENS: 1_500})
    engine.adjust_usage("k", "m2.7", {"tokens": 1}, usage_at_ms=1, direction="add")
    for result in engine.consume_many([tally.Request("k", "m2.7", {tally.Unit.REQUESTS: 1})]):
        if isinstance(result, tally.TallyError):
            print(result.status, result.name, result.message)
        else:
            print(result.admitted, decision.retry_after_seconds)
    submitted: tally.Decision = engine.submit("k", "m2.7", names).complete()
    print(submitted, engine.usage("k").limits, tally.verify(Path("db")).sound)
    with tally.Engine.open(Path("db"), options=tally.Options(max_keys=100_000)) as other:
        other.swap_policy(tally.Policy.toml("..."))
"""


def test_the_documented_calls_type_check_under_mypy_strict(tmp_path: Path) -> None:
    program = tmp_path / "uses.py"
    program.write_text(USES)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(program),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
