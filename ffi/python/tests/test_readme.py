"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[3] / "README.md"


def test_the_readmes_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no Python example"
    monkeypatch.chdir(tmp_path)  # the example opens ./tally-data
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
        app = namespace.get("app")
        if app is not None:
            app.engine.close()
    assert "m2.7:requests per rolling:5h" in capsys.readouterr().out
