"""Every notebook in notebooks/ runs top to bottom (nbclient, fresh kernel) against the shipped bundled model and
fails on any error. In a checkout without data/bundled/model.safetensors a random-weight checkpoint of the same
architecture stands in (passed through TOOLKIT_NOTEBOOK_CHECKPOINT, which the notebooks read)."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.models import bundled

# optional [dev] dependencies, absent on the GPU image: skip the module rather than fail collection
nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (running notebooks needs it)")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (running notebooks needs it)")
NotebookClient = nbclient.NotebookClient

pytestmark = pytest.mark.slow  # six notebooks (the quickstart alone took 2 minutes on 2 CPU cores)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_every_analysis_has_a_notebook():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "periodic", "topk", "monarch", "kernels", "approximations"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str | None:
    if (bundled.DEFAULT_DIR / bundled.WEIGHTS_FILE).is_file():
        return None  # the shipped weights
    from toolkit.models.checkpoints import random_state_dict, save_wan_native

    cfg = bundled.bundled_config()
    folder = tmp_path_factory.mktemp("bundled_random")
    save_wan_native(random_state_dict(cfg, seed=0), folder, cfg)
    return str(folder)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, checkpoint, tmp_path, monkeypatch):
    if checkpoint is not None:
        monkeypatch.setenv("TOOLKIT_NOTEBOOK_CHECKPOINT", checkpoint)
    monkeypatch.setenv("TOOLKIT_NOTEBOOK_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # CI runners are small and shared: one intra-op thread avoids OpenMP oversubscription (minutes instead of
    # seconds when other jobs load the cores); the notebooks themselves leave torch's default.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the failing cell and traceback, on any error
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    if path.stem != "kernels":  # the kernel notebook prints checks and timings, no plots
        images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
        assert images, f"{path.name} showed no figure"
    assert list((tmp_path / "runs").glob("*.h5")), "the notebook captured nothing"
