"""Every script in benchmarks/ imports (its top level runs; main() is guarded): a rename in the library that a script
still uses fails here, not on the GPU machine."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_benchmark_script_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(script.parent))  # scripts import their neighbour `timing`
    monkeypatch.setattr(sys, "argv", [str(script)])
    runpy.run_path(str(script), run_name="imported_by_test")
