"""The repository's top-level ``kernels/`` folder is ``toolkit.kernels``: run from the repository root (where
``python -m`` puts it on sys.path) it must not stand in for the PyPI package ``kernels``, which transformers
depends on and diffusers imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python_at_root(code: str) -> subprocess.CompletedProcess:
    # -S: no site-packages, so the outcome does not depend on what this machine has installed
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_top_level_kernels_name_goes_to_the_installed_package(tmp_path):
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("MARK = 'pypi'\n")
    run = _python_at_root(f"import sys; sys.path.append({str(tmp_path / 'site')!r}); import kernels; "
                          "print(kernels.MARK, kernels.__file__)")
    assert run.returncode == 0, run.stderr
    mark, path = run.stdout.split()
    assert mark == "pypi" and Path(path) == other / "__init__.py"


def test_top_level_kernels_name_without_the_package_is_a_missing_module():
    run = _python_at_root("import kernels")
    assert run.returncode == 1 and "ModuleNotFoundError: No module named 'kernels'" in run.stderr
