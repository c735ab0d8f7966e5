"""`toolkit figures` on a small capture of the bundled architecture (random weights, 6 × 6 × 10 token grid, two
3-frame chunks): every figure writes non-empty PNG + PDF, each plotted number equals the analysis result it
claims to show (recomputed here directly from the record's tensors), the manifest is right, cached analyses are
reused, and captures that lack what a figure needs are refused in one line naming the capture option."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import xarray as xr
from toolkit.paper_figures import FIGURES, FigureSettings, figure_module, make_figures

from toolkit import __version__
from toolkit.analysis import monarch, periodic, topk
from toolkit.analysis.records import RecordTensors
from toolkit.capture import RunLayout, Selection, capture, open_capture
from toolkit.cli import main
from toolkit.grid import MonarchLayout
from toolkit.models import bundled
from toolkit.models.checkpoints import random_state_dict, save_wan_native
from toolkit.models.registry import load_model
from toolkit.models.sampling import self_forcing_rollout, self_forcing_timesteps

NOISE_SHAPE = (1, 3, 6, 24, 40)  # pixels; patch (1, 4, 4) -> token grid (6, 6, 10)
SETTINGS = dict(layers=[0, 1], steps=[2, 3])  # coverage over two steps keeps the test short


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = bundled.bundled_config(dim=32, ffn_dim=48, num_heads=2, num_layers=2)
    folder = tmp_path_factory.mktemp("ckpt")
    save_wan_native(random_state_dict(cfg, seed=3), folder, cfg)
    net, _ = load_model("bundled", str(folder), sha256=False)
    return net


def record_run(model, path, selection: Selection) -> str:
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(NOISE_SHAPE, generator=g)
    context = bundled.encode_prompt("2 sprites: red circle, blue square; pan left")
    layout = RunLayout.self_forcing(model.cfg, model.grid_size(noise), self_forcing_timesteps(), 3)
    with capture(model, selection, str(path), layout=layout, progress=False,
                 provenance={"model": "bundled", "prompt": "test"}):
        self_forcing_rollout(model, noise, context, frames_per_chunk=3, generator=g)
    return str(path)


@pytest.fixture(scope="module")
def run_h5(model, tmp_path_factory):
    return record_run(model, tmp_path_factory.mktemp("cap") / "run.h5", Selection())


def bench_json(path) -> dict:
    from toolkit.kernels.bench import Row

    rows = []
    for shape, times in (("ar-111", (1.83, 1.13)), ("full-121", (11.15, 11.91))):
        for variant, ms in zip(("sdpa-cudnn", f"monarch{(1, 1, 1) if shape == 'ar-111' else (1, 2, 1)}"), times):
            r = Row(shape, variant, ok=True, median_ms=[ms])
            rows.append(r.__dict__ | {"ms": r.ms})
    rows.append(Row("full-121", "sdpa-flash", ok=False, error="OOM").__dict__ | {"ms": None})
    result = {"environment": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6"}, "shapes": {},
              "rows": rows}
    path.write_text(json.dumps(result))
    return result


@pytest.fixture(scope="module")
def figs(run_h5, tmp_path_factory):
    out = tmp_path_factory.mktemp("figs")
    bench = bench_json(out / "bench_kernels.json")
    plotted: dict = {}
    manifest = make_figures(run_h5, out, FigureSettings(bench=(str(out / "bench_kernels.json"),), **SETTINGS),
                            log=lambda *a: None, progress=False, plotted=plotted)
    return dict(out=out, manifest=manifest, plotted=plotted, bench=bench)


@pytest.fixture(scope="module")
def direct(run_h5):
    """Analyses computed here straight from the focus records' tensors (not through the figures' cache)."""
    cap = open_capture(run_h5)
    out = {}
    for layer in (0, 1):
        rec = cap.record(3, 1, layer)
        t = RecordTensors.read(rec)
        out[("periodic", layer)] = periodic.analyze_record(t)
        out[("topk", layer)] = topk.analyze_record(t)
    yield cap, out
    cap.close()


def test_every_figure_writes_png_and_pdf(figs):
    names = {figure_module(n).NAME for n in FIGURES}
    assert set(figs["manifest"]["figures"]) == names
    for name in names:
        png, pdf = figs["out"] / f"{name}.png", figs["out"] / f"{name}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 2000, name
        import matplotlib.image

        h, w = matplotlib.image.imread(png).shape[:2]
        assert h > 200 and w > 200


def test_manifest_records_input_hash_version_settings(figs, run_h5):
    m = json.loads((figs["out"] / "manifest.json").read_text())
    with open(run_h5, "rb") as f:
        assert m["input"]["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert m["versions"]["toolkit"] == __version__
    assert m["settings"]["pairs"] == [[0, 0], [0, 1]] and (m["settings"]["step"], m["settings"]["chunk"]) == (3, 1)
    assert m["settings"]["layers"] == SETTINGS["layers"]
    assert {"periodic", "topk", "monarch", "topk_pairs"} <= set(m["analyses"])
    for entry in m["analyses"].values():
        assert (figs["out"] / entry["file"]).is_file()


def test_fig1_plots_topk_and_monarch_errors(figs, direct, run_h5):
    cap, res = direct
    p = figs["plotted"]["fig1_mse_vs_sparsity"]
    for head in (0, 1):
        want = res[("topk", 0)]["map_mse"].sel(head=head, variant="renormalized")
        np.testing.assert_allclose(p[f"L0H{head}/topk_sparsity"], want["sparsity"].values)
        np.testing.assert_allclose(p[f"L0H{head}/topk_mse"], want.values, rtol=1e-6)
    # one Monarch point: the framewise fh,w layout, exact projection, from the Monarch analysis on this record
    rec = cap.record(3, 1, 0)
    lay = MonarchLayout.aligned(cap.grid, "fh,w", (1, 1, 1))
    m = monarch.analyze_record(RecordTensors.read(rec), monarch.MonarchOptions(layouts=[lay], iters=1,
                                                                              topk_baseline=False))
    x = p["L0H1/monarch_sparsity"]
    i = int(np.argmin(abs(x - lay.effective_sparsity)))
    assert x[i] == pytest.approx(lay.effective_sparsity)
    assert p["L0H1/projection_mse"][i] == pytest.approx(float(m["projection_map_mse"].sel(head=1)[0]), rel=1e-6)
    assert p["L0H1/variational_mse"][i] == pytest.approx(
        float(m["variational_map_mse"].sel(head=1, iters=1)[0]), rel=1e-6)


def test_fig1_crossing_compares_monarch_and_topk_at_each_tilings_budget(figs, run_h5):
    """The crossing table beside Fig. 1: per fh,w tiling the Monarch analysis' own projection and top-k-at-budget
    MSEs, recomputed here from the record; the same table in fig1_mse_vs_sparsity.json."""
    cap = open_capture(run_h5)
    rec = cap.record(3, 1, 0)
    p = figs["plotted"]["fig1_mse_vs_sparsity"]
    table = json.loads((figs["out"] / "fig1_mse_vs_sparsity.json").read_text())
    assert (table["step"], table["chunk"]) == (3, 1) and set(table["pairs"]) == {"L0H0", "L0H1"}
    cross = p["L0H1/crossing"]
    assert table["pairs"]["L0H1"] == cross and len(cross["tilings"]) == len(p["L0H1/projection_mse"]) >= 2
    row = cross["tilings"][1]
    lay = MonarchLayout.aligned(cap.grid, "fh,w", tuple(int(v) for v in row["tiling"].strip("()").split(",")))
    m = monarch.analyze_record(RecordTensors.read(rec), monarch.MonarchOptions(layouts=[lay], iters=1))
    assert row["sparsity"] == pytest.approx(lay.effective_sparsity)
    assert row["monarch_mse"] == pytest.approx(float(m["projection_map_mse"].sel(head=1)[0]), rel=1e-6)
    assert row["topk_mse"] == pytest.approx(float(m["topk_map_mse"].sel(head=1, variant="renormalized")[0]),
                                            rel=1e-6)


@pytest.mark.parametrize(("monarch_mse", "topk_mse", "lower_from"), [
    ([3.0, 2.0, 1.0], [1.0, 3.0, 4.0], 0.8),   # top-k lower at the densest tiling only
    ([1.0, 2.0, 1.0], [2.0, 1.0, 4.0], 0.9),   # lower, then not, then lower: only the last stretch counts
    ([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], 0.7),   # lower everywhere
    ([2.0, 2.0, 2.0], [1.0, 1.0, 2.0], None),  # a tie at the sparsest is not lower
])
def test_fig1_crossing_is_where_monarch_stays_below_topk(monarch_mse, topk_mse, lower_from):
    from toolkit.paper_figures.fig1_mse_sparsity import crossing

    # three fh,w tilings given out of order, a misaligned control and a layout without a sparsity, which it ignores
    configs = ["fh,w (3,1,1)", "fh,w (1,1,1)", "w,fh (1,1,1)", "fh,w (1,2,1)", "fh,w (2,2,2)"]
    sparsity = [0.9, 0.7, 0.7, 0.8, -0.1]
    order = [2, 0, None, 1, None]  # position of each config in monarch_mse / topk_mse
    pick = lambda values: [values[i] if i is not None else 9.0 for i in order]  # noqa: E731
    m = xr.Dataset(
        dict(projection_map_mse=("config", pick(monarch_mse)),
             topk_map_mse=(("config", "variant"), np.stack([pick(topk_mse), np.zeros(5)], axis=1)),
             base=("config", [c.split(" ")[0] for c in configs]), effective_sparsity=("config", sparsity)),
        coords=dict(config=configs, variant=["renormalized", "truncated"]))
    cross = crossing(m)
    assert [r["tiling"] for r in cross["tilings"]] == ["(1,1,1)", "(1,2,1)", "(3,1,1)"]
    assert [r["monarch_mse"] for r in cross["tilings"]] == monarch_mse
    assert [r["topk_mse"] for r in cross["tilings"]] == topk_mse
    assert cross["monarch_lower_from"] == lower_from
    assert crossing(m.drop_vars("topk_map_mse")) == dict(tilings=[], monarch_lower_from=None)


def test_fig2_plots_frame_mass_tile_and_spikes(figs, direct):
    cap, res = direct
    p = figs["plotted"]["fig2_structure"]
    per = res[("periodic", 0)].sel(head=0)
    np.testing.assert_allclose(p["frame_mass"][3:6], per["frame_mass"].values[3:6], rtol=1e-6)
    np.testing.assert_allclose(p["d_w"], per["d_w"].values, rtol=1e-6)
    tpf = 60
    tile = cap.tile(cap.record(3, 1, 0), 0, q_range=(3 * tpf, 4 * tpf), k_range=(3 * tpf, 4 * tpf))
    np.testing.assert_allclose(p["tile"], tile.values)
    # every marked spike is one the analysis found for that query, inside frame pair (3, 3)
    spikes = {(int(qt) % tpf, int(kt) % tpf) for qt, keys in zip(per["query_token"].values, per["spike_key"].values)
              for kt in keys if kt >= 0 and qt // tpf == 3 and kt // tpf == 3}
    assert set(zip(p["spike_rows"].tolist(), p["spike_cols"].tolist())) == spikes


def test_coverage_plots_the_topk_coverage_fraction(figs, run_h5):
    p = figs["plotted"]["coverage"]
    cap = open_capture(run_h5)
    values = []
    for key in cap.records:
        if key.layer == 1 and key.step in SETTINGS["steps"]:
            rec = cap.record(*key)
            t = RecordTensors(q=rec.q(0), k=rec.k(0), lse=rec.lse(0), scale=rec.scale)
            ds = topk.analyze_record(t, topk.TopkOptions(masses=(0.95,), sparsities=(0.5,)))
            values.append(ds["coverage_fraction"].sel(mass=0.95).values.ravel())
    cap.close()
    assert list(p["layers"]) == [0, 1] and list(p["steps"]) == SETTINGS["steps"]
    assert p["median"][1, 0] == pytest.approx(float(np.median(np.concatenate(values))))


def test_alignment_plots_median_projection_error_over_heads(figs, direct):
    cap, _ = direct
    p = figs["plotted"]["alignment_tiling"]
    rec = cap.record(3, 1, 0)
    lay = MonarchLayout.aligned(cap.grid, "fh,w", (1, 2, 1))
    m = monarch.analyze_record(RecordTensors.read(rec, v=False),
                               monarch.MonarchOptions(layouts=[lay], iters=0, topk_baseline=False))
    i = list(p["config"]).index(lay.name)
    assert p["sparsity"][i] == pytest.approx(lay.effective_sparsity)
    assert p["projection_median"][i] == pytest.approx(float(np.median(m["projection_rel_fro"].values)), rel=1e-6)


def test_offsets_spectra_and_head_types_plot_the_periodic_analysis(figs, direct):
    _, res = direct
    off, spec, types = (figs["plotted"][n] for n in ("offset_profiles", "spectra", "head_types"))
    per0 = res[("periodic", 0)]
    np.testing.assert_allclose(off["L0H1/dh_dw"], per0["profile"].sel(head=1, dt=0).values, rtol=1e-6)
    np.testing.assert_allclose(spec["L0H0/power"], per0["power"].sel(head=0).values[1:], rtol=1e-6)
    for layer in (0, 1):
        per = res[("periodic", layer)]
        np.testing.assert_allclose(spec["frame_periodicity"][layer], per["frame_periodicity"].values, rtol=1e-6)
        assert list(types["head_type"][layer]) == [str(x) for x in per["head_type"].values]


def test_kernel_tables_show_benchmark_medians_and_card(figs):
    ms = figs["plotted"]["kernel_tables"]["0/ms"]  # shapes (ar-111, full-121) × (sdpa-cudnn, monarch, sdpa-flash)
    rows = figs["bench"]["rows"]
    assert ms[0, 0] == pytest.approx(rows[0]["ms"]) and ms[1, 1] == pytest.approx(rows[3]["ms"])
    assert np.isnan(ms[1, 2]) and np.isnan(ms[0, 2])  # failed / not run: a gap, not a number
    md = (figs["out"] / "kernel_tables.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in md and "1.62×" in md  # 1.83 / 1.13


def test_cached_analyses_are_reused(figs, run_h5):
    m = make_figures(run_h5, figs["out"], FigureSettings(figures=("head-types",), **SETTINGS), log=lambda *a: None,
                     progress=False)
    assert m["analyses"]["periodic"]["reused"] is True
    assert m["analyses"]["periodic"]["cache_key"] == figs["manifest"]["analyses"]["periodic"]["cache_key"]


def test_cache_is_keyed_on_the_analysis_options(run_h5, tmp_path):
    from toolkit.paper_figures.results import ResultCache

    from toolkit.analysis.records import RecordSelection

    records = RecordSelection(steps=[3], chunks=[1], layers=[0], heads=[1])
    with open_capture(run_h5) as cap:
        def get(options):
            cache = ResultCache(cap, tmp_path, "sha-of-the-input", log=lambda *a: None, progress=False, device="cpu")
            ds = cache.get("topk", records, options, tag="t")
            return ds, cache.used["topk_t"]

        first, used = get(topk.TopkOptions(sparsities=(0.5,)))
        assert not used["reused"] and used["args"]["options"]["sparsities"] == [0.5]
        again, used_again = get(topk.TopkOptions(sparsities=[0.5]))  # equal options: the file is reused
        assert used_again["reused"] and used_again["cache_key"] == used["cache_key"]
        np.testing.assert_array_equal(again["map_mse"].values, first["map_mse"].values)
        other, used_other = get(topk.TopkOptions(sparsities=(0.5, 0.9)))  # different options: recomputed
        assert not used_other["reused"] and used_other["cache_key"] != used["cache_key"]
        assert list(other["sparsity"].values) == [0.5, 0.9]
        with pytest.raises(TypeError, match="TopkOptions"):
            ResultCache(cap, tmp_path, "x", log=lambda *a: None).get("topk", records, periodic.PeriodicOptions())


def refusal(argv, capsys) -> str:
    assert main(["figures", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_refuses_strided_queries_for_monarch_figures(model, tmp_path, capsys):
    path = record_run(model, tmp_path / "strided.h5", Selection(queries="stride:7", steps="3", store=("q", "k", "lse")))
    err = refusal([path, "--out", str(tmp_path / "f"), "--figures", "fig1"], capsys)
    assert "fig1_mse_vs_sparsity" in err and "--queries all" in err
    assert not list((tmp_path / "f").glob("*"))  # refused before any analysis ran


def test_refuses_pooled_only_capture_naming_store_option(model, tmp_path, capsys):
    path = record_run(model, tmp_path / "pooled.h5", Selection(steps="3", store=("pooled",)))
    err = refusal([path, "--out", str(tmp_path / "f"), "--figures", "coverage"], capsys)
    assert "--store q,k,lse" in err


def test_refuses_uncaptured_pair_and_missing_bench(run_h5, tmp_path, capsys):
    err = refusal([run_h5, "--out", str(tmp_path / "f"), "--figures", "fig1", "--pairs", "5:0"], capsys)
    assert "--layers" in err and "[5]" in err
    err = refusal([run_h5, "--out", str(tmp_path / "f"), "--figures", "kernels"], capsys)
    assert "--bench" in err
    err = refusal([run_h5, "--out", str(tmp_path / "f"), "--figures", "fig9"], capsys)
    assert "unknown figure" in err
    err = refusal([run_h5, "--out", str(tmp_path / "f"), "--figures", "fig2", "--frame-pair", "1,0"], capsys)
    assert "query frames 3-5" in err
    assert not (tmp_path / "f").exists()


def test_refuses_incomplete_capture(run_h5, tmp_path, capsys):
    import shutil

    import h5py

    path = tmp_path / "interrupted.h5"
    shutil.copy(run_h5, path)
    with h5py.File(path, "r+") as f:  # what an interrupted capture leaves: complete = 0
        f.attrs["complete"] = 0
    err = refusal([str(path), "--out", str(tmp_path / "f"), "--figures", "head-types"], capsys)
    assert "incomplete" in err and "--resume" in err


def test_cli_makes_figures_reusing_a_cached_analysis(figs, run_h5, tmp_path, capsys):
    import shutil

    out = tmp_path / "cli"
    out.mkdir()
    shutil.copy(figs["out"] / "analysis_periodic.nc", out)  # same capture, same selection: reused, not rerun
    argv = ["figures", run_h5, "--out", str(out), "--figures", "spectra,head-types", "--pairs", "L1H1",
            "--layers", "0,1"]
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert "periodic: reusing analysis_periodic.nc" in log and "running" not in log
    m = json.loads((out / "manifest.json").read_text())
    assert m["settings"]["pairs"] == [[1, 1]] and set(m["figures"]) == {"spectra", "head_types"}
    assert all((out / f).stat().st_size > 0 for entry in m["figures"].values() for f in entry["files"])


# issue 14, item 5 -------------------------------------------------------------------------------------------------


def test_fig2_reads_a_constant_spike_threshold_from_the_file_attribute(model, tmp_path):
    """A bidirectional capture: every record has the same keys, so the periodic analysis keeps `spike_threshold`
    as a file attribute; Fig. 2 must print that number, not "A − D > nan"."""
    from toolkit.models.sampling import shift_sigma, wan_sample

    noise = torch.randn(NOISE_SHAPE, generator=torch.Generator().manual_seed(1))
    context = bundled.encode_prompt("2 sprites: red circle, blue square; pan left")
    sig = shift_sigma(torch.linspace(1.0, 0.0, 3, dtype=torch.float64), 5.0)
    layout = RunLayout.bidirectional(model.cfg, model.grid_size(noise), (sig[:-1] * 1000).tolist())
    path = tmp_path / "bidi.h5"
    with capture(model, Selection(), str(path), layout=layout, progress=False, provenance={"model": "bundled"}):
        wan_sample(model, noise, context, steps=2, guidance_scale=1.0, solver="euler")
    plotted: dict = {}
    out = tmp_path / "f"
    make_figures(path, out, FigureSettings(figures=("fig2",)), log=lambda *a: None, progress=False, plotted=plotted)
    per = xr.open_dataset(out / "analysis_periodic.nc")
    assert "spike_threshold" not in per.variables  # constant over the records: an attribute
    p = plotted["fig2_structure"]
    assert p["spike_threshold"] == pytest.approx(per.attrs["spike_threshold"]) and np.isfinite(p["spike_threshold"])
    assert "nan" not in p["spike_label"]
    per.close()


def test_figures_skips_what_a_random_query_capture_cannot_make(model, tmp_path, capsys):
    path = record_run(model, tmp_path / "random.h5", Selection(queries="random:16", steps="3",
                                                                   store=("q", "k", "lse")))
    out = tmp_path / "f"
    assert main(["figures", path, "--out", str(out), "--layers", "0,1"]) == 0
    log = capsys.readouterr().out
    skipped = [line for line in log.splitlines() if line.startswith("skipped ")]
    needs_all = {figure_module(n).NAME for n in ("fig1", "fig2", "alignment")}
    assert len(skipped) == len(needs_all)  # one line per figure that needs every query
    for name in needs_all:
        (line,) = [x for x in skipped if x.startswith(f"skipped {name}:")]
        assert "--queries all" in line
        assert not list(out.glob(f"{name}.*"))
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["skipped"]) == needs_all
    made = {figure_module(n).NAME for n in ("coverage", "offsets", "spectra", "head-types")}
    assert set(m["figures"]) == made
    for name in made:
        assert (out / f"{name}.png").stat().st_size > 5000


def test_refusal_suggests_only_heads_and_layers_the_model_has(run_h5, tmp_path, capsys):
    err = refusal([run_h5, "--out", str(tmp_path / "f"), "--figures", "fig1", "--pairs", "0:7"], capsys)
    assert "--heads 0,1,7" not in err and "[7]" in err and "2 (0-1)" in err


def test_fig1_titles_the_stand_in_head_labels_tilings_and_scales_y(figs):
    from toolkit.paper_figures.fig1_mse_sparsity import LOG_RANGE, needs_log

    p = figs["plotted"]["fig1_mse_vs_sparsity"]
    assert "stands in for the paper's L8H7" in p["L0H1/title"]  # default pairs on a 2 × 2 model: L0H0, L0H1
    assert "stands in" not in p["L0H0/title"]
    assert "(1,1,1)" in p["L0H1/monarch_tiling"] and len(p["L0H1/monarch_tiling"]) == len(p["L0H1/projection_mse"])
    for head in (0, 1):
        values = np.concatenate([p[f"L0H{head}/{k}"] for k in ("topk_mse", "projection_mse", "variational_mse")])
        values = values[np.isfinite(values) & (values > 0)]
        wide = values.max() / values.min() > LOG_RANGE
        assert p[f"L0H{head}/yscale"] == ("log" if wide else "linear")
    assert needs_log([1e-6, 1e-3]) and not needs_log([1e-4, 5e-3]) and not needs_log([0.0, 1e-3])


@pytest.mark.parametrize(("argv", "says"), [
    (["--layout", "nonsense", "--figures", "fig1"], "unknown Monarch base 'nonsense'"),
    (["--layout", "fh,w:1,2,1", "--figures", "fig2"], "neither is asked for"),
])
def test_layout_is_checked_before_any_analysis(run_h5, tmp_path, capsys, argv, says):
    out = tmp_path / "f"
    err = refusal([run_h5, "--out", str(out), *argv], capsys)
    assert says in err and not out.exists()
