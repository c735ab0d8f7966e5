"""The data model xarray users expect (issue 14, item 6): analysis results select records by label
(``ds.sel(layer=0)``) in memory and from a results file, a capture's grid coordinates are numpy (``groupby`` works),
several runs get unique labels, and runs of different grids / heads are not silently NaN-padded."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import tiny_config, tiny_wan

from toolkit.analysis import netcdf_attrs, open_results, topk
from toolkit.analysis.records import RecordSelection
from toolkit.capture import RunLayout, Selection, capture, open_capture
from toolkit.cli import main
from toolkit.models.sampling import self_forcing_rollout, self_forcing_timesteps

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FPC = 2
CFG = tiny_config(num_layers=2)
TOPK = topk.TopkOptions(masses=(0.5, 0.9), sparsities=(0.0, 0.5))
CLI_TOPK = ("--masses", "0.5,0.9", "--sparsities", "0,0.5", "--no-progress")


def rollout(path, *, rows: int = 6, heads: str = "all", layers: str = "all") -> None:
    """A tiny causal capture; the latent's ``rows`` set the token grid (6, rows // 2, 5)."""
    model = tiny_wan(CFG, sharpen=4.0)
    g = torch.Generator().manual_seed(1)
    noise, context = torch.randn(1, 16, 6, rows, 10, generator=g), torch.randn(1, 4, CFG.text_dim, generator=g)
    layout = RunLayout.self_forcing(model.cfg, model.grid_size(noise), self_forcing_timesteps(), FPC)
    select = Selection(layers=layers, heads=heads, store=("q", "k", "v", "lse"))
    with capture(model, select, path, layout=layout, progress=False):
        self_forcing_rollout(model, noise, context, frames_per_chunk=FPC, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("a") / "run.h5"
    rollout(path)
    return path


@pytest.fixture(scope="module")
def result(run_file):
    """Top-k of steps 3 and 4, every chunk and layer: 2 × 3 × 2 records."""
    with open_capture(run_file) as cap:
        return topk.analyze(cap, RecordSelection(steps=[3, 4]), TOPK, device="cpu", progress=False)


def _keys(ds: xr.Dataset) -> list[tuple[int, int, int]]:
    return list(zip(ds["step"].values.tolist(), ds["chunk"].values.tolist(), ds["layer"].values.tolist()))


def test_analyze_result_selects_records_by_step_chunk_layer(result):
    keys = _keys(result)
    assert len(keys) == 12 == len(set(keys))
    layer0 = result.sel(layer=0)
    assert _keys(layer0) == [k for k in keys if k[2] == 0]
    assert _keys(result.sel(step=3, chunk=1)) == [(3, 1, 0), (3, 1, 1)]
    assert _keys(result.sel(layer=[1], chunk=[0, 2])) == [k for k in keys if k[2] == 1 and k[1] in (0, 2)]
    one = result.sel(step=4, chunk=2, layer=1)  # the full key: that record, as ds.isel(record=i)
    assert "record" not in one.dims
    xr.testing.assert_identical(one.drop_vars(["step", "chunk", "layer"]),
                                result.isel(record=keys.index((4, 2, 1))).drop_vars(["step", "chunk", "layer"]))
    # the index follows positional selection, and grouping by a record coordinate still works
    assert _keys(result.isel(record=slice(6, None)).sel(layer=1)) == [k for k in keys[6:] if k[2] == 1]
    assert result["map_mse"].groupby("layer").mean().sizes["layer"] == 2
    with pytest.raises(KeyError, match="layer=7"):
        result.sel(layer=7)


def test_results_file_opens_plainly_and_open_results_restores_the_index(result, tmp_path):
    path = tmp_path / "topk.nc"
    netcdf_attrs(result.copy()).to_netcdf(path, engine="h5netcdf")  # what the figures' cache writes
    with xr.open_dataset(path, engine="h5netcdf") as plain:
        assert plain["map_mse"].dims == ("record", "head", "sparsity", "variant")
        assert _keys(plain) == _keys(result)
        with pytest.raises(ValueError):  # unindexed on disk: xarray selects by one coordinate only
            plain.sel(step=3, layer=1)
    with open_results(path) as ds:
        np.testing.assert_array_equal(ds.sel(step=3, layer=1)["map_mse"].values,
                                      result.sel(step=3, layer=1)["map_mse"].values)


def test_cli_result_selects_by_label(run_file, tmp_path):
    out = tmp_path / "res.nc"
    assert main(["analyze", "topk", str(run_file), "--out", str(out), "--steps", "4", *CLI_TOPK]) == 0
    with open_results(out) as ds:
        assert list(ds.sel(chunk=2)["layer"].values) == [0, 1]
        assert ds.sel(run="run.h5", step=4, chunk=2, layer=0)["map_mse"].dims == ("head", "sparsity", "variant")


def test_capture_dataset_coordinates_are_numpy_so_groupby_works(run_file):
    with open_capture(run_file) as cap:
        ds = cap.dataset
        for name in ("key_frame", "key_row", "key_col", "query_frame", "query_row", "query_col", "timestep"):
            assert isinstance(ds[name].variable._data, np.ndarray), name
        k = ds.k.sel(step=4, layer=1, head=0)
        per_frame = k.groupby("key_frame").sum()
        assert per_frame.sizes["key_frame"] == 6
        tpf = cap.layout.tokens_per_frame
        np.testing.assert_allclose(per_frame.sel(key_frame=2).values,
                                   k.isel(key=slice(2 * tpf, 3 * tpf)).sum("key").values, rtol=1e-5)
        assert ds.q.groupby(ds.query_row).mean().sizes["query_row"] == cap.layout.grid[1]
        att = cap.attended(cap.record(4, 2, 0))
        assert isinstance(att.key_frame.variable._data, np.ndarray)
        assert att.k.groupby(att.key_frame).mean().sizes["key_frame"] == 6


def test_same_named_runs_in_two_folders_get_unique_labels(run_file, tmp_path):
    second = tmp_path / "b" / "run.h5"
    second.parent.mkdir()
    shutil.copy(run_file, second)
    out = tmp_path / "both.nc"
    assert main(["analyze", "topk", str(run_file), str(second), "--out", str(out), "--steps", "4", "--layers", "0",
                 "--chunks", "1", *CLI_TOPK]) == 0
    with open_results(out) as ds:
        labels = list(ds["run"].values)
        assert len(set(labels)) == 2 and labels[1] == "b/run.h5" and labels[0].endswith("/run.h5")
        assert json.loads(ds.attrs["runs"]) == [str(run_file.resolve()), str(second.resolve())]
        np.testing.assert_array_equal(ds.sel(run=labels[0])["map_mse"].values, ds.sel(run="b/run.h5")["map_mse"].values)


@pytest.mark.parametrize("differs", ["token grid", "heads"])
def test_runs_of_different_grids_or_heads_are_refused_unless_asked(run_file, tmp_path, capsys, differs):
    other = tmp_path / "other.h5"
    rollout(other, layers="0", **({"rows": 4} if differs == "token grid" else {"heads": "0,2"}))
    out = tmp_path / "mixed.nc"
    argv = ["analyze", "topk", str(run_file), str(other), "--out", str(out), "--steps", "4", "--layers", "0", *CLI_TOPK]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and differs in err and str(run_file) in err and str(other) in err
    assert "--stack-mismatched" in err and not out.exists()
    assert main([*argv, "--stack-mismatched"]) == 0  # asked for: stacked, NaN-padded
    with open_results(out) as ds:
        assert set(ds["run"].values) == {"run.h5", "other.h5"}
        if differs == "heads":
            assert ds["map_mse"].sel(run="other.h5", head=1).isnull().all()
            assert ds["map_mse"].sel(run="run.h5", head=1).notnull().all()


def test_stack_mismatched_is_documented(capsys):
    with pytest.raises(SystemExit):
        main(["analyze", "topk", "--help"])
    assert "--stack-mismatched" in capsys.readouterr().out
