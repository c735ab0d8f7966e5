"""The README's Python example for the bundled model runs as printed (a stale layer or token count fails here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def bundled_examples() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    return [b for b in blocks if 'prepare_run("bundled"' in b]


def test_readme_has_a_bundled_example():
    assert len(bundled_examples()) == 1


@pytest.mark.slow
def test_readme_capture_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes run.h5 into the working folder
    scope: dict = {}
    exec(compile(bundled_examples()[0], str(README), "exec"), scope)
    cap, rec, p = scope["cap"], scope["rec"], scope["p"]
    frames, height, width = cap.grid
    assert (frames, height, width) == (12, 20, 32)
    # the tile: one query frame against every key the record attends; its rows are probability rows
    assert tuple(p.shape) == (height * width, height * width * (rec.key_frames[1] - rec.key_frames[0]))
    assert float(abs(p.sum("key") - 1).max()) < 1e-4
    cap.close()
