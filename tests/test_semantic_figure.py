"""The semantic-correspondence figure (``toolkit.paper_figures.semantic``) on fresh random weights, float64, on an
awkward clip (6 frames × 28 × 44 pixels -> token grid 6 × 7 × 11, two 3-frame chunks): the rows it plots are the
model's own attention (a float64 brute-force softmax of the q/k the seams saw, and they reproduce the seams'
outputs), the ground truth reaches the tokens as the renderer drew it, the head and sprite choices follow their
definitions, and the figure, its JSON and the CLI entry are written."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest
import torch
from conftest import dense_attention, tiny_wan
from toolkit.paper_figures import semantic

from toolkit.cli import main
from toolkit.errors import ToolkitError
from toolkit.models import bundled
from toolkit.models.bundled import data
from toolkit.models.checkpoints import random_state_dict, save_wan_native
from toolkit.models.seam import seams

matplotlib.use("Agg")

CLIP = (6, 28, 44)  # token grid 6 × 7 × 11
PROMPT = "3 sprites: red circle, blue ring, yellow square; pan left"
SEED = 1


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_wan(bundled.tiny_config(clip=CLIP), dtype=torch.float64)


def spy_run(model, **kw):
    """``semantic_correspondence`` with an independent spy on every seam: (result, {layer: (q, k, v, out, ctx)}) of
    the calls the figure's query lives in (the last chunk at the asked step)."""
    calls = {}

    def spy(q, k, v, out, ctx):
        if ctx.chunk == 1:  # the last of two chunks; earlier chunks are the cache's clean passes
            calls[ctx.layer] = tuple(t.detach().clone() for t in (q, k, v, out)) + (ctx,)

    for s in seams(model):
        s.hooks.append(spy)
    try:
        c = semantic.semantic_correspondence(model, PROMPT, seed=SEED, **kw)
    finally:
        for s in seams(model):
            s.hooks.remove(spy)
    assert all(not s.hooks for s in seams(model))  # the figure's own hooks are gone too
    return c, calls


@pytest.fixture(scope="module")
def run(model):
    return spy_run(model)


def test_rows_are_the_models_softmax_from_its_own_q_and_k(run):
    c, calls = run
    assert tuple(c.grid) == (6, 7, 11) and c.rows.shape == (2, 2, 6, 7, 11) and c.rows.dtype == np.float64
    qf, r, col = c.query
    token = (qf * 7 + r) * 11 + col
    for layer, (q, k, v, out, ctx) in calls.items():
        assert (ctx.step, ctx.timestep, ctx.is_clean) == (3, pytest.approx(625.0), False)
        assert ctx.key_frames == (0, 6) and k.shape[1] == 6 * 77  # the whole clip: cache + own chunk
        i = token - ctx.query_offset
        for head in range(2):
            brute = dense_attention(q[0, i, head], k[0, :, head], scale=ctx.scale).probs.numpy()  # j
            row = c.rows[layer, head].reshape(-1)
            np.testing.assert_allclose(row, brute, rtol=1e-10, atol=1e-15)
            assert row.sum() == pytest.approx(1.0, abs=1e-12)
            # the row is the one the model used: it reproduces the seam's output for that query
            np.testing.assert_allclose(row @ v[0, :, head].numpy(), out[0, i, head].numpy(), rtol=1e-9, atol=1e-12)


def test_clean_pass_step_and_first_step(model):
    c, calls = spy_run(model, step=4)
    assert c.timestep == 0.0 and all(x[4].is_clean and x[4].timestep == 0.0 for x in calls.values())
    c0, calls = spy_run(model, step=0)
    assert c0.timestep == 1000.0 and all(x[4].step == 0 for x in calls.values())
    assert np.allclose(c.rows.sum((-3, -2, -1)), 1) and np.allclose(c0.rows.sum((-3, -2, -1)), 1)
    assert not np.allclose(c.rows, c0.rows)  # the query's input differs (clean vs pure noise)
    with pytest.raises(ToolkitError, match="step 5 does not exist"):
        semantic.semantic_correspondence(model, PROMPT, seed=SEED, step=5)


def test_token_coverage_of_a_planted_sprite():
    masks = torch.zeros(2, 12, 20, dtype=torch.bool)  # frames h w, patch (1, 4, 4) -> 2 × 3 × 5 tokens
    masks[1, 5:12, 8:16] = True  # rows 5..11: token row 1 has 3 of 4 pixel rows, row 2 all
    cov = semantic.token_coverage(masks, (1, 4, 4))
    want = torch.zeros(2, 3, 5)
    want[1, 1, 2:4], want[1, 2, 2:4] = 0.75, 1.0
    torch.testing.assert_close(cov, want)
    on = cov[1] >= semantic.ON_SPRITE
    assert semantic.nearest_token(on, (9.0, 13.0), (4, 4)) == (2, 3)  # the token holding the centre
    ring = torch.ones(3, 5, dtype=torch.bool)
    ring[1, 2] = False  # a ring's centre token is off the sprite: the nearest on-sprite token (raster-first tie)
    assert semantic.nearest_token(ring, (6.0, 10.0), (4, 4)) == (0, 2)
    with pytest.raises(ToolkitError, match="split into patches"):
        semantic.token_coverage(torch.zeros(3, 10, 8, dtype=torch.bool), (1, 4, 4))


def test_sprite_tokens_match_the_renderers_truth(run):
    c, _ = run
    _, truth = data.render([data.parse_prompt(PROMPT)], torch.Generator().manual_seed(SEED), frames=CLIP[0],
                           height=CLIP[1], width=CLIP[2], with_truth=True)
    masks = truth.masks[0, :3].numpy()  # K F H W
    np.testing.assert_array_equal(c.masks, masks)
    pooled = masks.reshape(3, 6, 7, 4, 11, 4).mean((3, 5))
    np.testing.assert_allclose(c.coverage, pooled)
    qf, r, col = c.query
    # the query sits on its sprite: at least half of its pixels are in the sprite's visible mask
    assert masks[c.sprite, qf, 4 * r:4 * r + 4, 4 * col:4 * col + 4].mean() >= 0.5
    # default sprite: the one covering most tokens of the query frame
    assert c.sprite == int(np.argmax((pooled[:, qf] >= 0.5).sum((1, 2))))
    y, x = truth.centres[0, c.sprite, qf].tolist()
    if pooled[c.sprite, qf, int(y // 4), int(x // 4)] >= 0.5:
        assert (r, col) == (int(y // 4), int(x // 4))
    # the figure's numbers from those tokens
    tok = pooled[c.sprite, :qf] >= 0.5
    row = c.row[:qf]
    m = c.masses()
    assert float(m["sprite"]) == pytest.approx(row[tok].sum())
    assert m["cover"] == pytest.approx(tok.mean())
    assert float(m["lift"]) == pytest.approx(row[tok].sum() / row.sum() / tok.mean())


def test_default_head_has_the_most_sprite_mass_and_choices_can_be_fixed(model, run):
    c, _ = run
    score = c.scores()
    assert score[c.layer, c.head] == score.max() and c.chosen_by.startswith("most")
    other = c.select(1, 0)
    assert np.array_equal(other.row, c.rows[1, 0]) and other.chosen_by == "caller" and other.query == c.query
    fixed = semantic.semantic_correspondence(model, PROMPT, seed=SEED, layer=0)
    assert fixed.layer == 0 and fixed.head == int(np.argmax(score[0]))
    blue = semantic.semantic_correspondence(model, PROMPT, seed=SEED, sprite="blue", layer=1, head=1)
    assert blue.sprite == 1 and (blue.layer, blue.head) == (1, 1)
    with pytest.raises(ToolkitError, match="head 2 does not exist"):
        semantic.semantic_correspondence(model, PROMPT, seed=SEED, head=2)
    with pytest.raises(ToolkitError, match="no sprite 'green'"):
        semantic.semantic_correspondence(model, PROMPT, seed=SEED, sprite="green")
    with pytest.raises(ToolkitError, match="not in the last chunk"):
        semantic.semantic_correspondence(model, PROMPT, seed=SEED, query_frame=2)


def test_figure_and_numbers_are_written(run, tmp_path):
    c, _ = run
    paths = semantic.plot(c, tmp_path)
    png, pdf = tmp_path / f"{semantic.NAME}.png", tmp_path / f"{semantic.NAME}.pdf"
    assert paths == [png, pdf]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 5_000
    h, w = matplotlib.image.imread(png).shape[:2]
    assert h > 400 and w > 800
    fm = c.frame_masses()
    assert fm["total"].sum() == pytest.approx(1.0) and np.all(fm["sprite"] + fm["other"] <= fm["total"] + 1e-12)
    s = c.summary()
    json.dumps(s)
    assert (s["layer"], s["head"], s["lift"]) == (c.layer, c.head, pytest.approx(float(c.masses()["lift"])))


def test_cli_makes_the_semantic_figure_without_a_capture(tmp_path, capsys):
    cfg = bundled.bundled_config(dim=32, ffn_dim=48, num_heads=2, num_layers=2)
    folder = save_wan_native(random_state_dict(cfg, seed=3), tmp_path / "ckpt", cfg)
    out = tmp_path / "figs"
    argv = ["figures", "--figures", "semantic", "--checkpoint", str(folder), "--out", str(out), "--device", "cpu",
            "--prompt", "2 sprites: green diamond, white square", "--seed", "2", "--query-head", "L1H0"]
    assert main(argv) == 0
    assert "lift" in capsys.readouterr().out
    s = json.loads((out / f"{semantic.NAME}.json").read_text())
    assert (s["layer"], s["head"], s["head_chosen_by"]) == (1, 0, "caller")
    assert s["prompt"] == "2 sprites: green diamond, white square" and s["step"] == 3
    assert all((out / f"{semantic.NAME}.{ext}").stat().st_size > 0 for ext in ("png", "pdf"))


@pytest.mark.parametrize("argv, message", [
    ([], "needs a capture"),
    (["--figures", "semantic", "--step", "7"], "--step 7"),
    (["--figures", "semantic", "--query-head", "0:0,1:1"], "one LAYER:HEAD"),
    (["--figures", "semantic", "--prompt", "a corgi"], "unknown colour"),
])
def test_cli_refusals_are_one_line(argv, message, tmp_path, capsys):
    assert main(["figures", "--out", str(tmp_path / "f"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "f").exists()


def test_percent_labels_keep_a_decimal_where_whole_percents_mislead():
    """Near 0 and near 100 % a whole percent hides what the figure is about (99.6 % of the mass is not all of it)."""
    assert [semantic._percent(x) for x in (0.066, 0.5, 0.976, 0.996, 1.0)] == [
        "6.6 %", "50 %", "98 %", "99.6 %", "100 %"]
