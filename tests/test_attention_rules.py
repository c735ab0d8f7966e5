"""``--attention`` rules: the grammar, which backend computes each (layer, step, chunk, head) of a rollout, and
refusals before any model loads."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, tiny_wan

import toolkit.attention.backends as backends
from toolkit.attention.backends import (
    AttentionRule,
    backend_for,
    format_attention_rules,
    parse_attention_rules,
    use_attention,
)
from toolkit.attention.monarch import monarch_backend
from toolkit.cli import main
from toolkit.errors import ToolkitError
from toolkit.models.sampling import self_forcing_rollout
from toolkit.models.seam import AttentionContext, dense_attention, seams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("spec", [
    "dense",
    "monarch:1,2,1",
    "dense@layers=0+monarch:1,2,1@steps=0-1@heads=0-3+monarch:1,1,1",
    "monarch@steps=clean@chunks=0,2",
    "monarch:2,1,1@steps=0,3-5,9,clean",
])
def test_canonical_text_round_trips(spec):
    rules = parse_attention_rules(spec)
    assert format_attention_rules(rules) == spec
    assert parse_attention_rules(format_attention_rules(rules)) == rules


def test_spaces_ranges_and_all_read_as_the_same_rules():
    a = parse_attention_rules(" dense @ layers = 0 + monarch:1,2,1 @steps=0-1@heads=0-3@chunks=all + monarch ")
    b = parse_attention_rules("dense@layers=0+monarch:1,2,1@steps=0,1@heads=0,1,2,3+monarch")
    assert a == b
    assert a[1] == AttentionRule("monarch:1,2,1", steps=frozenset({0, 1}), heads=frozenset(range(4)))
    assert a[2].everywhere and not a[1].everywhere


@pytest.mark.parametrize(("spec", "says"), [
    ("sparse@layers=0", "expected 'dense', 'monarch'"),
    ("monarch:1,2@layers=0", "monarch:F,H,W"),
    ("monarch@layers=a", "cannot read layers 'a'"),
    ("monarch@layers=3-1", "cannot read layers '3-1'"),
    ("monarch@heads=-1", "cannot read heads '-1'"),
    ("monarch@layers=clean", "cannot read layers 'clean'"),
    ("monarch@depth=1", "'depth=1' is not a condition"),
    ("monarch@layers", "'layers' is not a condition"),
    ("monarch@layers=0@layers=1", "layers is given twice"),
    ("dense++monarch", "empty rule"),
    ("  ", "--attention is empty"),
])
def test_bad_rules_are_one_line_errors(spec, says):
    with pytest.raises(ToolkitError) as err:
        parse_attention_rules(spec)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_a_single_spec_is_the_backend_it_always_was():
    assert backend_for("dense") is None
    assert backend_for("monarch:1,2,1").__name__ == monarch_backend((1, 2, 1)).__name__
    assert backend_for("monarch").__name__ == monarch_backend((1, 1, 1)).__name__


def spy_monarch(calls: list):
    """A stand-in for ``monarch_backend``: records (tiling, layer, step, chunk, heads) per call, computes dense."""

    def factory(tiling):
        def backend(q, k, v, ctx):
            calls.append((tuple(tiling), ctx.layer, ctx.step, ctx.chunk, q.shape[2]))
            return dense_attention(q, k, v, ctx)

        return backend

    return factory


def expected_heads(layer: int, step: int, chunk: int, clean: bool, num_heads: int) -> dict:
    """Per backend (tiling, or None for dense), the heads RULES gives it at this call."""
    out: dict = {}
    for h in range(num_heads):
        if layer == 0:
            owner = None
        elif step in (0, 1) and chunk in (1, 2):
            owner = (1, 2, 1)
        elif clean and h == 1:
            owner = (1, 1, 1)
        elif layer == 2:
            owner = (2, 1, 1)
        else:
            owner = None
        out.setdefault(owner, []).append(h)
    return out


RULES = ("dense@layers=0 + monarch:1,2,1@steps=0-1@chunks=1,2 + monarch:1,1,1@steps=clean@heads=1 "
         "+ monarch:2,1,1@layers=2")


def test_rules_touch_exactly_the_layers_steps_chunks_and_heads_they_name(monkeypatch):
    calls: list = []
    monkeypatch.setattr(backends, "monarch_backend", spy_monarch(calls))
    model = tiny_wan(tiny_config())
    seen: list = []
    for seam in seams(model):
        seam.hooks.append(lambda q, k, v, out, ctx: seen.append((ctx.layer, ctx.step, ctx.chunk, ctx.is_clean)))
    g = torch.Generator().manual_seed(0)
    noise, context = torch.randn(1, 16, 6, 6, 10, generator=g), torch.randn(1, 4, 16, generator=g)
    with use_attention(model, RULES):
        self_forcing_rollout(model, noise, context, frames_per_chunk=2, generator=torch.Generator().manual_seed(1))
    assert all(s.backend is None for s in seams(model))  # the block restores dense
    heads = model.cfg.num_heads
    assert len(seen) == 3 * 5 * 3  # chunks x (4 steps + clean pass) x layers
    expected = []
    for layer, step, chunk, clean in seen:
        for owner, hs in expected_heads(layer, step, chunk, clean, heads).items():
            if owner is not None:
                expected.append((owner, layer, step, chunk, len(hs)))
    assert sorted(calls) == sorted(expected)
    assert {c[0] for c in calls} == {(1, 2, 1), (1, 1, 1), (2, 1, 1)}
    assert not any(c[1] == 0 for c in calls)  # layer 0 stays dense


def call(heads: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    grid = (2, 2, 3)
    q, k, v = (torch.randn(1, 12, heads, 8, generator=g) for _ in range(3))
    ctx = AttentionContext(layer=0, step=0, chunk=0, is_clean=False, timestep=0.0, scale=8**-0.5, grid=grid,
                           query_frames=(0, 2), key_frames=(0, 2))
    return q, k, v, ctx


def test_a_heads_rule_replaces_its_heads_only():
    q, k, v, ctx = call()
    out = backend_for("monarch@heads=1,3")(q, k, v, ctx)
    dense = dense_attention(q, k, v, ctx)
    monarch = monarch_backend((1, 1, 1))(q, k, v, ctx)
    assert torch.equal(out[:, :, [0, 2]], dense[:, :, [0, 2]])  # bit-identical to the dense call
    torch.testing.assert_close(out[:, :, [1, 3]], monarch[:, :, [1, 3]], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[:, :, [1, 3]], dense[:, :, [1, 3]], atol=1e-4)


def test_heads_split_between_two_backends_without_dense():
    q, k, v, ctx = call()
    out = backend_for("monarch:1,1,1@heads=0 + monarch:1,2,1")(q, k, v, ctx)
    torch.testing.assert_close(out[:, :, :1], monarch_backend((1, 1, 1))(q, k, v, ctx)[:, :, :1])
    torch.testing.assert_close(out[:, :, 1:], monarch_backend((1, 2, 1))(q, k, v, ctx)[:, :, 1:])


def test_a_rule_matching_no_head_of_a_call_leaves_it_dense():
    q, k, v, ctx = call()
    assert torch.equal(backend_for("monarch@layers=1")(q, k, v, ctx), dense_attention(q, k, v, ctx))


def test_use_attention_refuses_layers_and_heads_the_model_lacks():
    model = tiny_wan(tiny_config())
    for spec, says in (("monarch@layers=3", "layer 3 does not exist"), ("monarch@heads=0,7", "head 7")):
        with pytest.raises(ToolkitError, match=says):
            with use_attention(model, spec):
                pass


@pytest.fixture
def no_loading(monkeypatch):
    from toolkit.models import registry

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(registry, "load_model", refuse)


@pytest.mark.parametrize(("command", "spec", "says"), [
    ("generate", "monarch:1,1,1@layers=99", "layer 99 does not exist"),
    ("generate", "dense@layers=0+monarch@steps=0,42", "step 42 does not exist"),
    ("capture", "monarch@heads=2-99", "rule 'monarch@heads=2-99': head 4 does not exist"),
    ("capture", "monarch@chunks=50", "chunk 50 does not exist"),
    ("generate", "monarch@depth=1", "not a condition"),
    # tiles that do not fit the 12 x 20 x 32 grid or straddle a 3-frame chunk, as the backend would say later
    ("capture", "monarch:7,7,7", "f_tied must divide the number of frames: 7 does not divide 12"),
    ("capture", "dense@layers=0+monarch:2,1,1", "tiles straddle the frame range 0..3"),
    ("generate", "monarch:1,3,1@layers=1", "h_reduce must divide the height: 3 does not divide 20"),
    ("compare", "monarch:1,1,3", "w_reduce must divide the width"),
])
def test_cli_refuses_a_rule_the_model_cannot_have_before_loading(command, spec, says, no_loading, tmp_path, capsys):
    out = tmp_path / ("run.h5" if command == "capture" else "gen")
    if command == "capture":  # with --force an existing capture must survive a refusal
        out.write_bytes(b"an earlier capture")
    force = ["--force"] if command == "capture" else []
    assert main([command, "--attention", spec, "--out", str(out), "--quiet", *force]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1 and "Traceback" not in err
    if command == "capture":
        assert out.read_bytes() == b"an earlier capture"


def test_prepare_run_refuses_before_loading(no_loading):
    from toolkit.pipeline import prepare_run

    with pytest.raises(ToolkitError, match="step 9 does not exist"):
        prepare_run("bundled", attention="monarch@steps=9")


def test_provenance_records_the_full_rule_string(tmp_path):
    from toolkit.models.bundled import bundled_config
    from toolkit.models.checkpoints import random_state_dict, save_wan_native
    from toolkit.pipeline import prepare_run

    cfg = bundled_config(dim=32, ffn_dim=48, num_heads=2, num_layers=2)
    ckpt = save_wan_native(random_state_dict(cfg, seed=3), tmp_path / "ckpt", cfg)
    spec = "dense@layers=0 + monarch:1,1,1@steps=clean@heads=1"
    run = prepare_run("bundled", checkpoint=str(ckpt), attention=spec)
    assert run.provenance()["attention"] == spec
    assert all(s.backend.__name__ == "attention_rules" for s in seams(run.model))
    with pytest.raises(ToolkitError, match="layer 2 does not exist"):  # sizes of the checkpoint's own config
        prepare_run("bundled", checkpoint=str(ckpt), attention="monarch@layers=2")
