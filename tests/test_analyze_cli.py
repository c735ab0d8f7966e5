"""`toolkit analyze periodic|topk` end to end on a tiny captured Self-Forcing rollout: results equal float64
brute force on the probabilities the seam saw; several runs through dask; one-line errors for bad inputs."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch
import xarray as xr
from conftest import dense_attention, tiny_config, tiny_wan

from toolkit.analysis import topk
from toolkit.analysis.records import RecordTensors
from toolkit.capture import RunLayout, Selection, capture, open_capture
from toolkit.cli import main
from toolkit.models.sampling import self_forcing_rollout, self_forcing_timesteps
from toolkit.models.seam import seams

FPC = 2
CFG = tiny_config(num_layers=2)
NOISE_SHAPE = (1, 16, 6, 6, 10)  # token grid (6, 3, 5): 3 chunks of 2 frames


def rollout(path, store, reference=None):
    model = tiny_wan(CFG, sharpen=4.0)  # sharpened so maps are far from uniform
    g = torch.Generator().manual_seed(1)
    noise, context = torch.randn(NOISE_SHAPE, generator=g), torch.randn(1, 4, CFG.text_dim, generator=g)

    def spy(q, k, v, out, ctx):
        probs = dense_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), scale=ctx.scale).probs
        reference[(ctx.step, ctx.chunk, ctx.layer)] = (probs, v[0].double().transpose(0, 1))

    if reference is not None:
        for s in seams(model):
            s.hooks.append(spy)
    layout = RunLayout.self_forcing(model.cfg, model.grid_size(noise), self_forcing_timesteps(), FPC)
    with capture(model, Selection(store=store), path, layout=layout, progress=False):
        self_forcing_rollout(model, noise, context, frames_per_chunk=FPC, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cap") / "run.h5"
    ref: dict = {}
    rollout(path, ("q", "k", "v", "lse"), ref)
    return path, ref


def analyze(*argv):
    return main(["analyze", *map(str, argv), "--no-progress"])


def test_topk_cli_equals_brute_force_on_seam_probabilities(run_file, tmp_path):
    path, ref = run_file
    out = tmp_path / "topk.nc"
    sparsities = (0.0, 0.3, 0.5, 0.9)
    assert analyze("topk", path, "--out", out, "--layers", "1", "--chunks", "1-2", "--steps", "0,4",
                   "--sparsities", ",".join(map(str, sparsities)), "--query-chunk", "7") == 0
    ds = xr.open_dataset(out, engine="h5netcdf")
    assert ds.sizes["record"] == 4 and set(ds["layer"].values) == {1}
    assert ds.sizes["head"] == 3 and list(ds["sparsity"].values) == list(sparsities)
    for r in range(ds.sizes["record"]):
        key = (int(ds["step"][r]), int(ds["chunk"][r]), int(ds["layer"][r]))
        a, v = ref[key]  # what the seam computed, float64: h i j, h j e
        n = a.shape[-1]
        desc = torch.sort(a, dim=-1, descending=True).values
        cover = (desc.cumsum(-1) < torch.tensor([0.5, 0.9, 0.95, 0.99])[:, None, None, None]).sum(-1) + 1
        got = ds["coverage_keys"].isel(record=r).values  # head query mass
        assert np.abs(got - cover.permute(1, 2, 0).numpy()).max() <= 1  # float32 capture vs float64 seam
        for s, kept in enumerate(topk.keep_counts(n, sparsities)):
            mask = a >= desc[..., kept - 1 : kept]
            trunc = a * mask
            mse = (a - trunc).square().mean((-1, -2)).numpy()
            np.testing.assert_allclose(ds["map_mse"].isel(record=r, sparsity=s).sel(variant="truncated"), mse,
                                       rtol=1e-3, atol=1e-12)
            renorm = trunc / trunc.sum(-1, keepdim=True)
            rel = ((a - renorm) @ v).norm(dim=(-1, -2)) / (a @ v).norm(dim=(-1, -2))
            np.testing.assert_allclose(ds["output_rel_l2"].isel(record=r, sparsity=s).sel(variant="renormalized"),
                                       rel.numpy(), rtol=1e-3, atol=1e-6)


def test_periodic_cli_matches_capture_pooled_view(run_file, tmp_path):
    path, _ = run_file
    out = tmp_path / "periodic.nc"
    assert analyze("periodic", path, "--out", out, "--layers", "0", "--steps", "3", "--heads", "0,2") == 0
    ds = xr.open_dataset(out, engine="h5netcdf")
    assert ds.sizes["record"] == 3 and list(ds["head"].values) == [0, 2]  # 3 chunks
    assert ds["profile"].dims == ("record", "head", "dt", "dh", "dw")
    with open_capture(path) as cap:
        for r in range(3):
            rec = cap.record(int(ds["step"][r]), int(ds["chunk"][r]), int(ds["layer"][r]))
            pooled = cap.pooled(rec, heads=[0, 2])
            f0, f1 = rec.query_frames
            mine = ds["frame_mass"].isel(record=r).sel(from_frame=slice(f0, f1 - 1))
            np.testing.assert_allclose(mine.values, pooled["frame_mass"].values, rtol=1e-4, atol=1e-6)
            others = ds["frame_mass"].isel(record=r).drop_sel(from_frame=range(f0, f1))
            assert others.isnull().all()  # no stored query in those frames
    assert set(ds["head_type"].values.ravel()) <= {"spatial", "temporal", "global"}


def test_several_runs_through_dask(run_file, tmp_path):
    path, _ = run_file
    second = tmp_path / "second.h5"
    shutil.copy(path, second)
    single, both = tmp_path / "one.nc", tmp_path / "both.nc"
    common = ("--layers", "0", "--steps", "4", "--chunks", "2", "--sparsities", "0,0.5")
    assert analyze("topk", path, "--out", single, *common) == 0
    assert analyze("topk", path, second, "--out", both, *common, "--workers", "2") == 0
    one, two = xr.open_dataset(single, engine="h5netcdf"), xr.open_dataset(both, engine="h5netcdf")
    assert two.sizes["record"] == 2 and list(two["run"].values) == ["run.h5", "second.h5"]
    for r in range(2):
        np.testing.assert_array_equal(two["map_mse"].isel(record=r).values, one["map_mse"].isel(record=0).values)


API_VS_CLI = {  # name -> (CLI options, the same as RecordSelection / options keywords)
    "topk": (("--steps", "1", "--layers", "0", "--heads", "0,2", "--masses", "0.5,0.9", "--sparsities", "0,0.5,0.9",
              "--method", "sort", "--query-chunk", "7"),
             dict(steps=[1], layers=[0], heads=[0, 2]),
             dict(masses=(0.5, 0.9), sparsities=(0, 0.5, 0.9), method="sort", query_chunk=7)),
    "periodic": (("--steps", "3", "--chunks", "0,2", "--layers", "1", "--spike-factor", "5", "--n-spikes", "3",
                  "--temporal-threshold", "0.3"),
                 dict(steps=[3], chunks=[0, 2], layers=[1]),
                 dict(spike_factor=5.0, n_spikes=3, temporal_threshold=0.3)),
    "monarch": (("--steps", "0", "--chunks", "1", "--heads", "1", "--iters", "2", "--layout", "fh,w:1,1,1",
                 "--layout", "default", "--no-topk"),
                dict(steps=[0], chunks=[1], heads=[1]),
                dict(layouts=("fh,w:1,1,1", "default"), iters=2, topk_baseline=False)),
}


@pytest.mark.parametrize("name", list(API_VS_CLI))
def test_python_api_with_options_equals_cli(run_file, tmp_path, name):
    """``toolkit.analysis.NAME.analyze(cap, records=..., options=NAMEOptions(...))`` gives the CLI's Dataset."""
    import importlib

    from toolkit.analysis import netcdf_attrs
    from toolkit.analysis.records import RecordSelection

    path, _ = run_file
    argv, records, options = API_VS_CLI[name]
    assert analyze(name, path, "--out", tmp_path / "cli.nc", "--device", "cpu", *argv) == 0
    cli = xr.open_dataset(tmp_path / "cli.nc", engine="h5netcdf").load()
    module = importlib.import_module(f"toolkit.analysis.{name}")
    options_class = {"topk": "TopkOptions", "periodic": "PeriodicOptions", "monarch": "MonarchOptions"}[name]
    with open_capture(path) as cap:
        api = module.analyze(cap, records=RecordSelection(**records),
                             options=getattr(module, options_class)(**options), device="cpu", progress=False)
    assert api.sizes["record"] == cli.sizes["record"] > 0
    netcdf_attrs(api).to_netcdf(tmp_path / "api.nc", engine="h5netcdf")  # the same NetCDF round trip
    api = xr.open_dataset(tmp_path / "api.nc", engine="h5netcdf").load()
    cli = cli.drop_vars(["run", "record"])
    api = api.drop_vars("record", errors="ignore")
    added = ("analysis", "runs", "command", "complete", "resume_key")
    for ds in (cli, api):  # what the CLI adds: the analysis name, the input files, its command line, resume state
        ds.attrs = {k: v for k, v in ds.attrs.items() if k not in added}
    xr.testing.assert_identical(cli, api)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("toolkit analyze: error:"), err
    return err[0]


@pytest.mark.parametrize("extra, message", [
    (("--masses", "0.5,1.5"), "impossible"),
    (("--sparsities", "0.5,1"), "impossible"),
    (("--layers", "7"), "not captured"),
    (("--heads", "5"), "not captured"),
])
def test_bad_selections_one_line(run_file, tmp_path, capsys, extra, message):
    path, _ = run_file
    assert analyze("topk", path, "--out", tmp_path / "x.nc", *extra) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "x.nc").exists()


def test_capture_without_qk_one_line(tmp_path, capsys):
    path = tmp_path / "pooled_only.h5"
    rollout(path, ("pooled",))
    for name in ("topk", "periodic"):
        assert analyze(name, path, "--out", tmp_path / "x.nc") == 2
        assert "has no q/k" in one_error_line(capsys)


def test_incomplete_file_one_line(run_file, tmp_path, capsys):
    path, _ = run_file
    broken = tmp_path / "broken.h5"
    shutil.copy(path, broken)
    with h5py.File(broken, "r+") as f:
        f.attrs["complete"] = 0
    assert analyze("topk", broken, "--out", tmp_path / "x.nc") == 2
    assert "incomplete" in one_error_line(capsys)
    # ... and with --allow-incomplete the complete records are analysed
    assert analyze("topk", broken, "--out", tmp_path / "x.nc", "--layers", "0", "--steps", "0", "--chunks", "0",
                   "--allow-incomplete") == 0


def test_missing_file_one_line(tmp_path, capsys):
    assert analyze("periodic", tmp_path / "nope.h5", "--out", tmp_path / "x.nc") == 2
    assert "no such capture file" in one_error_line(capsys)


def test_monarch_on_the_cpu_defaults_to_one_step_of_the_last_chunk_and_full_asks_for_everything(run_file, tmp_path,
                                                                                                  capsys):
    path, _ = run_file
    assert analyze("monarch", path, "--out", tmp_path / "quick.nc", "--device", "cpu", "--heads", "0") == 0
    assert "CPU default: step 3, chunk 2" in capsys.readouterr().err
    quick = xr.open_dataset(tmp_path / "quick.nc", engine="h5netcdf")
    assert set(quick["chunk"].values) == {2} and set(quick["step"].values) == {3}
    assert set(quick["layer"].values) == {0, 1}
    assert list(quick.config.values) == ["fh,w (1,1,1)", "fh,w (2,1,1)"] and list(quick.iters.values) == [1]
    assert analyze("monarch", path, "--out", tmp_path / "full.nc", "--device", "cpu", "--heads", "0", "--full",
                   "--layers", "1") == 0
    full = xr.open_dataset(tmp_path / "full.nc", engine="h5netcdf")
    assert full.sizes["record"] == 5 * 3 and list(full.iters.values) == [1, 2, 3]  # 5 steps x 3 chunks of layer 1
    assert full.sizes["config"] > 2


def test_capture_with_only_q_and_k(run_file, tmp_path):
    """No v: map metrics only; no lse: recomputed by a streaming pass, same results as with the stored one."""
    path, _ = run_file
    qk_only = tmp_path / "qk.h5"
    rollout(qk_only, ("q", "k"))
    common = ("--layers", "1", "--steps", "2", "--chunks", "2", "--sparsities", "0,0.5,0.9")
    assert analyze("topk", qk_only, "--out", tmp_path / "a.nc", *common) == 0
    assert analyze("topk", path, "--out", tmp_path / "b.nc", *common) == 0
    a, b = (xr.open_dataset(tmp_path / n, engine="h5netcdf") for n in ("a.nc", "b.nc"))
    assert "output_rel_l2" not in a and "output_rel_l2" in b
    np.testing.assert_allclose(a["map_mse"].values, b["map_mse"].values, rtol=1e-4)
    assert np.abs(a["coverage_keys"].values - b["coverage_keys"].values).max() <= 1


def test_scheduler_address(run_file, tmp_path):
    """--scheduler ADDRESS sends the per-file tasks to a dask.distributed cluster (in-process one here)."""
    distributed = pytest.importorskip("distributed")
    path, _ = run_file
    second = tmp_path / "second.h5"
    shutil.copy(path, second)
    out, local = tmp_path / "cluster.nc", tmp_path / "local.nc"
    common = ("--layers", "0", "--steps", "4", "--chunks", "2", "--sparsities", "0,0.5")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster:
        assert analyze("topk", path, second, "--out", out, *common, "--scheduler", cluster.scheduler_address) == 0
    assert analyze("topk", path, second, "--out", local, *common) == 0
    a, b = xr.open_dataset(out, engine="h5netcdf"), xr.open_dataset(local, engine="h5netcdf")
    assert list(a["run"].values) == ["run.h5", "second.h5"]
    np.testing.assert_array_equal(a["coverage_keys"].values, b["coverage_keys"].values)


def test_stack_records_pads_varying_query_counts():
    from toolkit.analysis import stack_records

    g = torch.Generator().manual_seed(0)
    parts = []
    for n_q, n_k, step in ((5, 40, 0), (9, 60, 1)):
        q, k = torch.randn(2, n_q, 8, generator=g), torch.randn(2, n_k, 8, generator=g)
        t = RecordTensors(q=q, k=k, scale=0.3, query_tokens=torch.arange(n_q) + 100 * step)
        ds = topk.analyze_record(t, topk.TopkOptions(sparsities=(0.0, 0.5)))
        ds.attrs.update(step=step, chunk=0, layer=0, timestep=1.0, is_clean=False)
        parts.append(ds)
    out = stack_records(parts)
    assert out.sizes["record"] == 2 and out.sizes["query"] == 9
    assert list(out["step"].values) == [0, 1] and list(out["n_keys"].values) == [40, 60]
    assert out["coverage_fraction"].isel(record=0, query=slice(5, None)).isnull().all()
    np.testing.assert_array_equal(out["query_token"].isel(record=1).values, np.arange(9) + 100)
    np.testing.assert_array_equal(out["kept_keys"].values, [[40, 20], [60, 30]])
