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


def test_bundled_failures_counts_every_clip_once_and_draws_the_crowded_ones(tmp_path, monkeypatch):
    """``bundled_failures.py`` on a tiny random teacher: per sprite count the clips add up to prompts x seeds, each
    failure column is bounded by its clips, the per-clip outcomes add up to the matches, ``--teacher-steps`` sets
    the sampler, and ``--strip`` draws the crowded prompts only."""
    import json

    import torch

    from toolkit.models.bundled import evaluate
    from toolkit.models.bundled.config import tiny_teacher_config
    from toolkit.models.bundled.model import save_weights
    from toolkit.models.wan import WanModel

    torch.manual_seed(0)
    weights = save_weights(WanModel(tiny_teacher_config((6, 16, 24))), tmp_path / "t.safetensors")
    weak = save_weights(WanModel(tiny_teacher_config((6, 16, 24), num_layers=1)), tmp_path / "weak.safetensors")
    script = Path(__file__).parents[1] / "benchmarks" / "bundled_failures.py"
    monkeypatch.syspath_prepend(str(script.parent))
    argv = ["--prompts", "6", "--batch", "4", "--weights", str(weights), "--teacher-cfg", "2", "--teacher-steps", "7",
            "--cfg-interval", "0.3", "0.9", "--teacher-eta", "0.5", "--guide", str(weak), "--guide-scale", "1.5",
            "--leave-one-out", "--seeds", "2", "--strip", "1", "--out", str(tmp_path), "--name", "x"]
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    runpy.run_path(str(script), run_name="__main__")
    result = json.loads((tmp_path / "bundled_failures_cpu_x.json").read_text())
    rows = result["by_sprite_count"]
    wanted = [len(p.sprites) for p in evaluate.heldout_prompts(64)[:6]]
    assert {int(n): r["clips"] for n, r in rows.items()} == {n: 2 * wanted.count(n) for n in set(wanted)}
    assert result["seeds"] == evaluate.heldout_seeds(2) and len(result["sampler"]["denoising_steps"]) == 7
    assert result["sampler"]["guidance_interval"] == [0.3, 0.9]
    assert result["sampler"]["solver"] == "ancestral" and result["sampler"]["eta"] == 0.5
    assert result["sampler"]["guide"].endswith("weak.safetensors") and result["sampler"]["guide_scale"] == 1.5
    sampler_text = runpy.run_path(str(script), run_name="imported_by_test")["sampler_text"]
    assert sampler_text(result["sampler"]) == (
        f"7 ancestral (η = 0.5) steps, CFG 2 for σ in [0.3, 0.9] against each sprite left out, autoguided by "
        f"{result['sampler']['guide']} at 1.5")
    outcomes = result["colour_match_outcomes"]
    assert len(outcomes) == 12 and outcomes.count("1") == sum(r["colour_match"] for r in rows.values())
    for r in rows.values():
        assert all(0 <= r[c] <= r["clips"] for c in ("colour_match", "missing_any", "extra_any", "count_low",
                                                       "count_high"))
    assert (tmp_path / "bundled_failures_x.png").is_file() == any(n >= 3 for n in wanted)
    assert result["seeds_asked"] == 2

    # a run cut short (here: the second seed fails) keeps the seeds it finished, each clip scored once
    from toolkit.models import bundled

    generate, second = bundled.generate, evaluate.heldout_seeds(2)[1]

    def fails_on_the_second_seed(model, prompts, seed, **kwargs):
        assert kwargs["guide_scale"] == 1.5 and kwargs["guide"].cfg.num_layers == 1  # the weak model, loaded
        assert kwargs["negatives"] == "leave_one_out"
        if seed == second:
            raise RuntimeError("cut short")
        return generate(model, prompts, seed=seed, **kwargs)

    monkeypatch.setattr(bundled, "generate", fails_on_the_second_seed)
    monkeypatch.setattr(sys, "argv", [str(script), *argv[:-1], "cut"])
    with pytest.raises(RuntimeError, match="cut short"):
        runpy.run_path(str(script), run_name="__main__")
    cut = json.loads((tmp_path / "bundled_failures_cpu_cut.json").read_text())
    assert cut["seeds"] == evaluate.heldout_seeds(1) and cut["seeds_asked"] == 2
    assert cut["colour_match_outcomes"] == outcomes[:6]  # the same clips as the full run's first seed
    assert sum(r["clips"] for r in cut["by_sprite_count"].values()) == 6

    # bad options: one line and a non-zero exit before anything is generated or written
    for bad in (["--seeds", "0"], ["--teacher-eta", "1.5", "--teacher-cfg", "2"], ["--teacher-eta", "1"],
                ["--teacher-cfg", "2", "--guide", str(weak)], ["--leave-one-out"],
                ["--guide", str(weak), "--guide-scale", "2"],
                ["--teacher-cfg", "2", "--guide", str(tmp_path / "none.safetensors"), "--guide-scale", "2"]):
        monkeypatch.setattr(sys, "argv", [str(script), "--weights", str(weights), "--out", str(tmp_path / "bad"), *bad])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(script), run_name="__main__")
        assert exit_.value.code == 2
    assert not (tmp_path / "bad").exists()


def random_result(prompts: list, seeds: list[int], rng) -> dict:
    """A ``bundled_failures.py`` result with random per-clip colour matches (seed-major, as the script keeps them),
    its per-sprite-count totals, and the count too low on every other clip that missed."""
    bits = "".join(rng.choice("01") for _ in range(len(seeds) * len(prompts)))
    rows: dict[str, dict] = {}
    for k, bit in enumerate(bits):
        row = rows.setdefault(str(len(prompts[k % len(prompts)].sprites)),
                              dict(clips=0, colour_match=0, count_low=0, count_high=0))
        row["clips"] += 1
        row["colour_match"] += int(bit)
        row["count_low"] += int(bit == "0" and k % 2 == 0)
    return dict(prompts=len(prompts), seed=seeds[0], seeds=seeds, by_sprite_count=rows, colour_match_outcomes=bits)


def test_compare_failures_pairs_clips_by_prompt_and_seed(monkeypatch):
    """``compare_failures.compare``: totals per sprite count from each result, a Wilson interval around each
    fraction, and the paired split counted on the clips both results scored (one seed shared of two)."""
    import random

    from toolkit.models.bundled import evaluate

    script = Path(__file__).parents[1] / "benchmarks" / "compare_failures.py"
    monkeypatch.syspath_prepend(str(script.parent))  # it imports its neighbour bundled_failures
    compare = runpy.run_path(str(script), run_name="imported_by_test")["compare"]
    prompts = evaluate.heldout_prompts(64)[:10]
    rng = random.Random(3)
    a, b = (random_result(prompts, evaluate.heldout_seeds(n), rng) for n in (2, 1))
    out = compare({"a": a, "b": b})
    assert out["table"]["all"]["a"]["clips"] == 20 and out["table"]["all"]["b"]["clips"] == 10
    for name, r in (("a", a), ("b", b)):
        c = out["table"]["all"][name]
        assert c["match"] == r["colour_match_outcomes"].count("1")
        assert c["interval"][0] <= c["match"] / c["clips"] <= c["interval"][1]
    first_seed = a["colour_match_outcomes"][:10]  # seed-major: the shared seed's clips come first
    expected = evaluate.paired(first_seed, b["colour_match_outcomes"])
    assert out["paired"]["b"] == dict(clips=10, **expected)


def test_compare_failures_writes_its_table_into_a_model_card(tmp_path, monkeypatch):
    """``compare_failures.py --card DIR``: the rows land in ``DIR/train_log.json`` (the rest of the record as it was)
    and in ``DIR/MODEL_CARD.md`` with each model's totals, sampler and pairing; a folder that is not a model folder,
    or a missing result, exits 2 with every file as it was."""
    import json
    import random
    import shutil

    from toolkit.models.bundled import evaluate

    here = Path(__file__).parents[1]
    monkeypatch.syspath_prepend(str(here / "benchmarks"))
    main = runpy.run_path(str(here / "benchmarks" / "compare_failures.py"), run_name="imported_by_test")["main"]
    model = tmp_path / "model"
    model.mkdir()
    for f in ("train_log.json", "model.safetensors", "config.json"):
        shutil.copy(here / "data" / "bundled" / f, model / f)
    before = json.loads((model / "train_log.json").read_text())
    prompts, rng = evaluate.heldout_prompts(64)[:12], random.Random(5)
    euler = dict(denoising_steps=list(range(1000, 0, -25)), solver="euler", guidance_scale=3.0)

    def write(name: str, sampler) -> dict:
        r = dict(random_result(prompts, evaluate.heldout_seeds(2), rng), sampler=sampler, device="a card",
                 weights=f"/somewhere/runs/x/{name}.safetensors")
        (tmp_path / f"bundled_failures_cpu_{name}.json").write_text(json.dumps(r))
        return r

    a = write("teacher", euler)
    b = write("teacher_eta", {**euler, "solver": "ancestral", "eta": 0.5})
    c = write("student", "the student's 4 steps")
    paths = [str(tmp_path / f"bundled_failures_cpu_{n}.json") for n in ("teacher", "teacher_eta", "student")]

    for bad in (["--card", str(tmp_path)], [str(tmp_path / "nothing.json"), "--card", str(model)]):
        with pytest.raises(SystemExit) as exit_:
            main([*paths, *bad])
        assert exit_.value.code == 2
    assert json.loads((model / "train_log.json").read_text()) == before
    assert not (model / "MODEL_CARD.md").exists()

    main([*paths, "--card", str(model)])
    record = json.loads((model / "train_log.json").read_text())
    entry = record.pop("clip_comparison")
    before.pop("clip_comparison", None)  # the shipped record's own table, replaced
    assert record == before
    assert entry["source"] == str(tmp_path) and entry["devices"] == ["a card"] and entry["paired_with"] == "teacher"
    card = (model / "MODEL_CARD.md").read_text()
    for name, r, sampler in (("teacher", a, "40 Euler steps, CFG 3"), ("teacher_eta", b, "40 ancestral (η = 0.5) "
                             "steps, CFG 3"), ("student", c, "4 steps")):
        bits = r["colour_match_outcomes"]
        low = sum(row["count_low"] for row in r["by_sprite_count"].values())
        row = next(line for line in card.splitlines() if f"`runs/x/{name}.safetensors`" in line)
        assert row.startswith(f"| {name} | `runs/x/{name}.safetensors` | {sampler} | {bits.count('1')} / {len(bits)} (")
        assert f"| {low} / 0 |" in row
        if name != "teacher":
            p = evaluate.paired(a["colour_match_outcomes"], bits)
            assert row.endswith(f"| +{p['gained']} −{p['lost']} of {len(bits)} (p = {p['p_value']:.2g}) |")


def test_plot_streamed_ring_memory_matches_the_measured_peaks(tmp_path, monkeypatch):
    """``plot_streamed.py`` computes each tuned ring's extra memory; for the config the tuner chose, that must be the
    peak the benchmark measured (the committed H100 run: rings of 8 and of 5 slots, one-slot rings at the AR
    chunk), and the figure is written."""
    import json

    root = Path(__file__).parents[1]
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    import plot_streamed

    result_path = root / "benchmarks" / "results" / "streamed_h100" / "bench_kernels.json"
    result = json.loads(result_path.read_text())
    checked = 0
    for name, shape in result["shapes"].items():
        for row in result["rows"]:
            if row["shape"] != name or row.get("version") != "streamed" or not row.get("ok"):
                continue
            chosen = row["tuning"][0]["config"]
            only = {**row, "tuning": [{"timings": [[chosen, 1.0]]}]}
            (memory, _, _), = plot_streamed.ring_points(shape, [only])
            # the measured peak also holds the counters and the allowed-tiles table (a few KB)
            assert memory == pytest.approx(row["peak_extra_over_q"], rel=2e-3), (name, row["variant"])
            checked += 1
    assert checked == 8
    out = tmp_path / "fig.png"
    assert plot_streamed.main([str(result_path), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
