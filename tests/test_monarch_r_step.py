"""The variational R-step option (issue 14 item 4): ``r_step="exact"`` (default) vs ``"monarchrt"``, the MonarchRT
authors' update for T > 1 (R-logits scaled by min(1/(c_R + 1e-6), 1e4)), against an independent float64
implementation written here from the algorithm's description (docs/monarch.md; not from the toolkit's code)."""

import math

import pytest
import torch
from test_analysis_monarch import fake_capture, kv_record

from toolkit.analysis.monarch import MonarchOptions, analyze, analyze_record
from toolkit.analysis.records import RecordSelection, RecordTensors
from toolkit.attention.monarch import map_errors, monarch_attention, monarch_backend, variational
from toolkit.commands.analyze import build_parser, options_from_args
from toolkit.errors import ToolkitError
from toolkit.grid import MonarchLayout, TokenGrid

GRID = TokenGrid(6, 6, 10)  # rows of 10, 2 chunks of 3 frames
TPF = GRID.tokens_per_frame
F64 = torch.float64
EPS, MAX_INV = 1e-6, 1e4

MODES = {  # name: (query_frames, key_frames, block_causal_frames)
    "bidirectional": (None, None, None),
    "block_causal": (None, None, 3),
    "kv_cache": ((3, 6), (0, 6), None),
}
LAYOUTS = [MonarchLayout.aligned(GRID, "fh,w", (1, 2, 1)), MonarchLayout.aligned(GRID, "hw,f", (3, 3, 2)),
           MonarchLayout.contiguous(GRID, 4, 15)]


def rand(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def inputs(mode, seed, std, heads=2, d=5):
    qfr, _, _ = MODES[mode]
    nq = TPF * (6 if qfr is None else qfr[1] - qfr[0])
    return rand(heads, nq, d, seed=seed, scale=std), rand(heads, 6 * TPF, d, seed=seed + 1, scale=std), rand(
        heads, 6 * TPF, d, seed=seed + 2)


def authors_reference(q, k, v, layout, iters, scale, q_frames=None, k_frames=None, slow_at_t1=False):
    """The authors' ``monarch_attn`` written out plainly in float64 (q ``h i d`` of ``q_frames``, k/v ``h j d`` of
    ``k_frames``, no mask): T = 1 is their one-step op (no scaling of the R-logits); T > 1 their slow path, whose
    every R-step multiplies the logits α_R·k̃ by min(1/(c_R + 1e-6), 1e4), with α_R = q̃, c_R = 1 at the start and
    α_R = Σ_i L q̃, c_R = Σ_i L after each L-step. ``slow_at_t1``: run the slow path at T = 1 too.
    Returns (out ``h i d``, whether the 1e4 clamp was active anywhere)."""
    s = math.sqrt(scale)
    _, qtok = layout.tiles_of_frames(q_frames)  # a i j -> token of the frame range
    _, ktok = layout.tiles_of_frames(k_frames)  # f k l
    Q, K, V = q[:, qtok] * s, k[:, ktok] * s, v[:, ktok]  # h a i j d ; h f k l d ; h f k l d
    h, A, b1, b2, d = Q.shape
    F = K.shape[1]
    scaled = iters > 1 or slow_at_t1
    a_r = Q.unsqueeze(2).expand(h, A, F, b1, b2, d)  # h a f k j d: row k of the query tile (L = identity)
    c_r = torch.ones(h, A, F, b1, b2, dtype=F64)  # h a f k j
    clamp_active = False
    for it in range(iters):
        z = torch.einsum("hafkjd,hfkld->hafkjl", a_r, K)
        if scaled:
            inv = 1.0 / (c_r + EPS)
            clamp_active |= bool((inv > MAX_INV).any())
            z = z * inv.clamp_max(MAX_INV).unsqueeze(-1)
        r = torch.softmax(z, -1)
        a_l = torch.einsum("hafkjl,hfkld->hafkjd", r, K)
        c_l = (r * torch.log_softmax(z, -1)).sum(-1)  # h a f k j  (Σ R log R)
        y = torch.einsum("hafkjl,hfkld->hafkjd", r, V)
        b_l = torch.einsum("hafkjd,haijd->hajifk", a_l, Q) - c_l.permute(0, 1, 4, 2, 3).unsqueeze(3)
        L = torch.softmax(b_l.flatten(-2), -1).unflatten(-1, (F, b1))  # h a j i f k
        if it + 1 < iters:
            a_r = torch.einsum("hajifk,haijd->hafkjd", L, Q)
            c_r = L.sum(3).permute(0, 1, 3, 4, 2)  # h a j f k -> h a f k j
    out_t = torch.einsum("hajifk,hafkjd->haijd", L, y)
    out = torch.zeros(h, q.shape[1], v.shape[-1], dtype=F64)
    out[:, qtok.flatten()] = out_t.flatten(1, 3)
    return out, clamp_active


def authors_model(q, k, v, layout, iters, scale, mode, slow_at_t1=False):
    """Modes as the authors' code: block-causal = one run per 3-frame query chunk against the keys up to its end."""
    qfr, kfr, causal = MODES[mode]
    if causal is None:
        return authors_reference(q, k, v, layout, iters, scale, qfr, kfr, slow_at_t1)
    outs, active = [], False
    for c in range(GRID.frames // causal):
        rows, keys = slice(c * causal * TPF, (c + 1) * causal * TPF), slice(0, (c + 1) * causal * TPF)
        o, a = authors_reference(q[:, rows], k[:, keys], v[:, keys], layout, iters, scale,
                                 (c * causal, (c + 1) * causal), (0, (c + 1) * causal), slow_at_t1)
        outs.append(o)
        active |= a
    return torch.cat(outs, 1), active


def toolkit_out(q, k, v, layout, iters, scale, mode, r_step):
    qfr, kfr, causal = MODES[mode]
    out, _ = variational(q, k, v, layout, query_frames=qfr, key_frames=kfr, block_causal_frames=causal, iters=iters,
                         scale=scale, r_step=r_step)
    return out


def rel(a, b):
    return ((a - b).norm(dim=(-1, -2)) / b.norm(dim=(-1, -2))).max().item()


@pytest.mark.parametrize("iters", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.name)
@pytest.mark.parametrize("std", [1.0, 3.0], ids=["mild", "sharp"])
def test_monarchrt_equals_independent_authors_update(layout, mode, iters, std):
    seed = 1000 + 17 * iters + 101 * list(MODES).index(mode) + 7 * LAYOUTS.index(layout) + int(std)
    q, k, v = inputs(mode, seed, std, d=5 if iters % 2 else 7)
    scale = 0.45
    want, clamp_active = authors_model(q, k, v, layout, iters, scale, mode)
    got = toolkit_out(q, k, v, layout, iters, scale, mode, "monarchrt")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if std > 1 and iters > 1:
        assert clamp_active  # the sharp inputs do exercise the 1e4 clamp


@pytest.mark.parametrize("mode", MODES)
def test_default_r_step_is_exact_and_unchanged(mode):
    q, k, v = inputs(mode, 7, 2.0)
    lay = LAYOUTS[0]
    for iters in (1, 3):
        default = toolkit_out(q, k, v, lay, iters, 0.5, mode, "exact")
        qfr, kfr, causal = MODES[mode]
        out, _ = variational(q, k, v, lay, query_frames=qfr, key_frames=kfr, block_causal_frames=causal,
                             iters=iters, scale=0.5)
        torch.testing.assert_close(out, default, rtol=0, atol=0)
    with pytest.raises(ToolkitError, match="r_step"):
        variational(q, k, v, lay, iters=2, r_step="authors")


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.name)
def test_monarchrt_r_step_on_sharp_inputs(layout):
    mode = "bidirectional"
    q, k, v = inputs(mode, 31, 3.0, d=8)
    scale = 8 ** -0.5
    exact = {t: toolkit_out(q, k, v, layout, t, scale, mode, "exact") for t in (1, 2, 3)}
    authors = {t: toolkit_out(q, k, v, layout, t, scale, mode, "monarchrt") for t in (1, 2, 3)}
    # T = 1: identical. The authors' monarch_attn runs its one-step op at T = 1 (R-logits q̃·k̃ unscaled), which is
    # the exact update with identity initialisation; the clamp only enters through c_R of later rounds.
    torch.testing.assert_close(authors[1], exact[1], rtol=0, atol=0)
    # Even their slow path at T = 1 would only scale the logits by 1/(1 + 1e-6) (c_R = 1): ~1e-6 relative.
    slow_t1, _ = authors_model(q, k, v, layout, 1, scale, mode, slow_at_t1=True)
    assert 0 < rel(slow_t1, exact[1]) < 1e-5
    # T >= 2 on sharp maps: c_R < 1e-4 for key rows with little L-mass, the clamp caps 1/c_R at 1e4 and the
    # outputs differ substantially (measured 0.2-0.6 relative; the module docstring gives the table).
    for t in (2, 3):
        assert rel(authors[t], exact[t]) > 1e-3
    # ... while on mild inputs they stay close (only the 1e-6 in c_R + 1e-6 acts): ~1e-5 relative
    q, k, v = inputs(mode, 31, 1.0, d=8)
    for t in (2, 3):
        assert rel(toolkit_out(q, k, v, layout, t, scale, mode, "monarchrt"),
                   toolkit_out(q, k, v, layout, t, scale, mode, "exact")) < 1e-3


def test_seam_functions_take_r_step():
    q, k, v = (x.transpose(0, 1)[None] for x in inputs("bidirectional", 41, 3.0))
    out = monarch_attention(q, k, v, GRID, (1, 2, 1), iters=2, r_step="monarchrt", scale=0.5)
    want, _ = authors_model(*(x[0].transpose(0, 1) for x in (q, k, v)), LAYOUTS[0], 2, 0.5, "bidirectional")
    torch.testing.assert_close(out[0].transpose(0, 1), want, rtol=1e-10, atol=1e-12)
    be = monarch_backend((1, 2, 1), iters=2, r_step="monarchrt")
    assert be.__name__.endswith("_T2_monarchrt") and monarch_backend((1, 2, 1), iters=2).__name__.endswith("_T2")
    with pytest.raises(ToolkitError):
        monarch_backend(r_step="clamped")


def test_sweep_records_r_step_and_uses_authors_update():
    q, k, v, qt, kt = kv_record(seed=3)
    q, k = q * 2, k * 2  # sharp enough for the clamp
    scale = 0.6
    lay = MonarchLayout.aligned(GRID, "fh,w", (1, 2, 1))
    t = RecordTensors(q=q, k=k, v=v, query_tokens=qt, key_tokens=kt, grid=GRID, scale=scale)
    common = dict(layouts=[lay], iters=3, projection=False, topk_baseline=False)
    ds_exact = analyze_record(t, MonarchOptions(**common))
    ds = analyze_record(t, MonarchOptions(**common, r_step="monarchrt"))
    assert ds_exact.attrs["r_step"] == "exact" and ds.attrs["r_step"] == "monarchrt"
    assert ds.variational_rel_fro.attrs["r_step"] == "monarchrt"
    # each T is the authors' T-run: T = 1 their exact one-step op, T = 2, 3 their clamped slow path
    for iters in (1, 2, 3):
        _, fac = variational(q, k, v, lay, query_frames=(3, 6), key_frames=(0, 6), iters=iters, scale=scale,
                             r_step="monarchrt")
        err = map_errors(q, k, fac, v=v, scale=scale)
        torch.testing.assert_close(torch.from_numpy(ds.variational_rel_fro.values[:, 0, iters - 1]),
                                   err.rel_frobenius, rtol=1e-9, atol=0)
        torch.testing.assert_close(torch.from_numpy(ds.variational_out_rel_l2.values[:, 0, iters - 1]),
                                   err.out_rel_l2, rtol=1e-9, atol=0)
    assert (ds.variational_rel_fro.values[:, 0, 0] == ds_exact.variational_rel_fro.values[:, 0, 0]).all()
    assert (abs(ds.variational_rel_fro - ds_exact.variational_rel_fro).values[:, 0, 1:] > 1e-6).all()
    with pytest.raises(ToolkitError, match="r_step"):
        MonarchOptions(r_step="authors")
    # stacked over records of a capture, the choice stays a Dataset attribute
    cap, _ = fake_capture()
    stacked = analyze(cap, RecordSelection(steps=[1], heads=[3]),
                      MonarchOptions(layouts=("fh,w:1,2,1",), iters=2, projection=False, topk_baseline=False,
                                     r_step="monarchrt"), device="cpu", progress=False)
    assert stacked.attrs["r_step"] == "monarchrt" and stacked.sizes["record"] == 2


def test_cli_r_step_flag(capsys):
    parser = build_parser("monarch")
    base = ["run.h5", "--out", "x.nc"]
    assert options_from_args("monarch", parser.parse_args(base)).r_step == "exact"
    assert options_from_args("monarch", parser.parse_args([*base, "--r-step", "monarchrt"])).r_step == "monarchrt"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--r-step", "authors"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--r-step {exact,monarchrt}" in text and "min(1/(c_R + 1e-6), 1e4)" in text
