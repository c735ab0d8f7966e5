"""`toolkit analyze approximations`: every family's metrics on a record equal a float64 brute force over the whole
map (awkward grid, a KV-cache record); the command on a tiny capture gives the same numbers; bad families are one
line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import tiny_config, tiny_wan

from toolkit.analysis.approximations import ApproximationOptions, analyze_record, expand_levels
from toolkit.analysis.monarch import tiling_sweep_layouts
from toolkit.analysis.records import RecordTensors
from toolkit.attention.families import parse_family, tokens_context
from toolkit.capture import RunLayout, Selection, capture, open_capture
from toolkit.cli import main
from toolkit.models.sampling import self_forcing_rollout, self_forcing_timesteps

GRID = (6, 5, 7)  # 35 tokens per frame; no axis a power of two


def _record(query_frames=(4, 6), seed=0, heads=2, dim=8) -> RecordTensors:
    """A KV-cache record: queries = frames 4-5, keys = frames 0-5 (float64, maps far from uniform)."""
    g = torch.Generator().manual_seed(seed)
    tpf = GRID[1] * GRID[2]
    n_q, n_k = (query_frames[1] - query_frames[0]) * tpf, query_frames[1] * tpf
    q, k, v = (torch.randn(heads, n, dim, generator=g, dtype=torch.float64) * s
               for n, s in ((n_q, 2.0), (n_k, 2.0), (n_k, 1.0)))
    return RecordTensors(q=q, k=k, v=v, scale=dim**-0.5, query_tokens=torch.arange(query_frames[0] * tpf, n_k),
                         key_tokens=torch.arange(n_k), grid=GRID)


def _brute(a: torch.Tensor, approx: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
    out, out_hat = a @ v, approx @ v
    cos = (out * out_hat).sum(-1) / (out.norm(dim=-1) * out_hat.norm(dim=-1))
    return {"map_mse": float((a - approx).square().mean()),
            "map_rel_fro": float((a - approx).norm() / a.norm()),
            "output_rel_l2": float((out - out_hat).norm() / out.norm()),
            "output_cosine": float(cos.mean())}


def test_every_mask_family_and_topk_equal_brute_force_on_a_kv_cache_record():
    t = _record()
    densities = (0.1, 0.35)
    families = ("topk", "blocktopk:1,2,3", "blocktopk-pred:1,2,3", "sta:1,2,3", "radial", "svg")
    ds = analyze_record(t, ApproximationOptions(families=families, densities=densities))
    assert dict(ds.sizes) == {"head": 2, "family": len(families), "level": 2}
    ctx = tokens_context(GRID, t.scale, t.query_tokens, t.key_tokens)
    a = torch.softmax(t.scale * t.q @ t.k.transpose(-1, -2), dim=-1)  # h i j, float64
    n_k = t.k.shape[1]
    for f, fam in enumerate(families):
        for lv in range(2):
            spec = str(ds["spec"].values[f, lv])
            for h in range(2):
                if fam == "topk":  # random float64 rows have no ties
                    kept = max(1, round(densities[lv] * n_k))
                    mask = a[h] >= torch.sort(a[h], -1, descending=True).values[:, kept - 1 : kept]
                else:
                    mask = parse_family(spec).mask(t.q[h : h + 1], t.k[h : h + 1], t.v[h : h + 1], ctx)
                    mask = torch.broadcast_to(mask, (1, *a.shape[1:]))[0]
                approx = a[h] * mask / (a[h] * mask).sum(-1, keepdim=True)
                want = _brute(a[h], approx, t.v[h])
                got = ds.isel(head=h, family=f, level=lv)
                for m, val in want.items():
                    assert float(got[m]) == pytest.approx(val, rel=1e-9, abs=1e-15), (spec, h, m)
                assert float(got["density"]) == pytest.approx(float(mask.double().mean()), abs=1e-12), spec
    # templates set to a density land near it; topk exactly (kept keys / keys)
    assert np.allclose(ds["density"].sel(family="topk").values, [[round(d * n_k) / n_k for d in densities]] * 2)
    assert abs(float(ds["density"].sel(family="sta:1,2,3", level=1).mean()) - 0.35) < 0.1


def test_monarch_levels_are_the_aligned_tilings_closest_to_each_density():
    t = _record(query_frames=(3, 6))
    densities = (0.15, 0.4)
    ds = analyze_record(t, ApproximationOptions(families=("monarch", "monarch-projection"), densities=densities))
    layouts = tiling_sweep_layouts(GRID)
    for lv, d in enumerate(densities):
        best = min(layouts, key=lambda lay: (abs(1 - lay.effective_sparsity - d), lay.name))
        assert str(ds["spec"].values[0, lv]) == "monarch:fh,w:" + ",".join(map(str, best.tiling))
        assert np.allclose(ds["density"].isel(level=lv).values, 1 - best.effective_sparsity)
    proj, var = (ds["map_rel_fro"].sel(family=f).values for f in ("monarch-projection", "monarch"))
    assert np.isfinite(proj).all() and (proj <= var + 1e-12).all()  # the projection is the best Monarch map


def test_bad_families_are_refused_before_anything_runs():
    with pytest.raises(Exception, match="unknown family 'nope'"):
        expand_levels(("nope",), (0.1,), GRID)
    with pytest.raises(Exception, match="densities must lie in"):
        ApproximationOptions(densities=(0.0,))


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    """A tiny Self-Forcing capture: token grid (6, 3, 5), 3 chunks of 2 frames, 2 layers."""
    path = tmp_path_factory.mktemp("approx") / "run.h5"
    cfg = tiny_config(num_layers=2)
    model = tiny_wan(cfg, sharpen=4.0)
    g = torch.Generator().manual_seed(1)
    noise, context = torch.randn(1, 16, 6, 6, 10, generator=g), torch.randn(1, 4, cfg.text_dim, generator=g)
    layout = RunLayout.self_forcing(model.cfg, model.grid_size(noise), self_forcing_timesteps(), 2)
    with capture(model, Selection(store=("q", "k", "v", "lse"), layers="1", steps="3", chunks="1,2"), path,
                 layout=layout, progress=False):
        self_forcing_rollout(model, noise, context, frames_per_chunk=2, generator=torch.Generator().manual_seed(2))
    return path


def test_cli_result_has_record_family_level_dims_and_equals_the_python_api(run_file, tmp_path):
    out = tmp_path / "approx.nc"
    families = "topk;blocktopk:1,2,2;svg;monarch"
    assert main(["analyze", "approximations", str(run_file), "--out", str(out), "--families", families,
                 "--densities", "0.2,0.5", "--no-progress", "--full"]) == 0
    ds = xr.open_dataset(out, engine="h5netcdf")
    assert dict(ds.sizes)["record"] == 2 and list(ds["family"].values) == families.split(";")
    assert ds["map_mse"].dims == ("record", "head", "family", "level")
    with open_capture(run_file) as cap:
        for r in range(2):
            rec = cap.record(int(ds["step"][r]), int(ds["chunk"][r]), int(ds["layer"][r]))
            want = analyze_record(RecordTensors.read(rec), ApproximationOptions(
                families=tuple(families.split(";")), densities=(0.2, 0.5)))
            for m in ("density", "map_mse", "output_rel_l2"):
                np.testing.assert_allclose(ds[m].isel(record=r).values, want[m].values, rtol=1e-6, equal_nan=True)
    assert np.isnan(ds["target_density"].sel(family="svg").values).all()
    from toolkit.paper_figures import approximations

    from toolkit.analysis import open_results

    fig = approximations.plot(open_results(out), tmp_path / "fig", heads=[(1, 0)])
    assert all(p.endswith((".png", ".pdf")) for p in fig["files"]) and len(fig["curves"]) == 2 * 4


def test_cli_refuses_an_unknown_family_in_one_line(run_file, tmp_path, capsys):
    out = tmp_path / "bad.nc"
    with pytest.raises(SystemExit) as err:
        main(["analyze", "approximations", str(run_file), "--out", str(out), "--families", "topk;nope"])
    assert err.value.code == 2 and not out.exists()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "unknown family 'nope'" in lines[0]
