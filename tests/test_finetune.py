"""Finetuning with another attention (``toolkit/models/bundled/finetune.py``, ``toolkit train --finetune``) and the
Monarch backend specs it trains through (T > 1, the contiguous misaligned layout, autograd)."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from conftest import tiny_wan

from toolkit.attention.backends import MonarchSpec, backend_density, backend_for, parse_attention
from toolkit.attention.monarch import monarch_attention, monarch_backend
from toolkit.cli import main
from toolkit.errors import ToolkitError
from toolkit.grid import MonarchLayout
from toolkit.models.bundled import load_bundled, tiny_config
from toolkit.models.bundled.finetune import FinetuneSettings, distillation_loss, save_finetuned, train_finetune
from toolkit.models.bundled.teacher import ClipSetup
from toolkit.models.seam import AttentionContext, dense_attention, use_backend


def _call(seed: int, grid=(2, 3, 5), heads: int = 2, d: int = 4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(1, n, heads, d, generator=g, dtype=dtype) for _ in range(3))
    ctx = AttentionContext(layer=0, step=0, chunk=0, is_clean=False, timestep=0.0, scale=d**-0.5, grid=grid,
                           query_frames=(0, grid[0]), key_frames=(0, grid[0]))
    return q, k, v, ctx


# ---- the specs ---------------------------------------------------------------------------------------------------
def test_monarch_specs_parse_to_iterations_and_contiguous_layouts():
    assert parse_attention("monarch:3,1,1") == ("monarch", (3, 1, 1))  # the kernels' case is unchanged
    assert parse_attention("monarch:1,2,1:T=10") == ("monarch", MonarchSpec(tiling=(1, 2, 1), iters=10))
    assert parse_attention("monarch-contiguous:32,20") == ("monarch", MonarchSpec(block=(32, 20)))
    assert parse_attention("monarch-contiguous:6,5:T=2") == ("monarch", MonarchSpec(block=(6, 5), iters=2))
    for bad in ("monarch:1,1,1:T=0", "monarch:1,1,1:X=2", "monarch-contiguous:3", "monarch-contiguous",
                "monarch:1,1:T=2"):
        with pytest.raises(ToolkitError, match="--attention"):
            parse_attention(bad)


def test_contiguous_and_iterated_backends_compute_their_layouts():
    q, k, v, ctx = _call(1)
    grid = ctx.grid
    got = backend_for("monarch-contiguous:5,3")(q, k, v, ctx)  # 15-token tiles (one frame) of 5 rows of 3
    want = monarch_attention(q, k, v, grid, layout=MonarchLayout.contiguous(grid, 5, 3), scale=ctx.scale)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    aligned = backend_for("monarch:1,1,1")(q, k, v, ctx)
    assert (got - aligned).abs().max() > 1e-3  # rows of 3 cut the grid's rows of 5: misaligned
    # contiguous (height, width) tiles are the aligned framewise layout (toolkit/grid.py)
    torch.testing.assert_close(backend_for("monarch-contiguous:3,5")(q, k, v, ctx), aligned, rtol=1e-12, atol=1e-12)
    t3 = backend_for("monarch:1,1,1:T=3")(q, k, v, ctx)
    torch.testing.assert_close(t3, monarch_backend((1, 1, 1), iters=3)(q, k, v, ctx), rtol=0, atol=0)
    assert (t3 - aligned).abs().max() > 1e-6
    assert backend_density("monarch-contiguous:32,20", (12, 20, 32)) == pytest.approx((32 + 20) / 640)
    assert backend_density("monarch:3,1,1:T=2", (12, 20, 32)) == backend_density("monarch:3,1,1", (12, 20, 32))


def test_autograd_through_the_monarch_reference_matches_finite_differences():
    q, k, v, ctx = _call(2, grid=(2, 2, 3), heads=1, d=3)
    backend = backend_for("monarch:1,1,1")
    inputs = tuple(x.clone().requires_grad_(True) for x in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: backend(a, b, c, ctx), inputs, eps=1e-6, atol=1e-7)


# ---- the distillation objective ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return tiny_wan(tiny_config(), seed=3, sharpen=4.0)


def _loss(student, reference, backend, exit_step: int, seed: int = 0):
    setup = ClipSetup.of(student.cfg, "cpu")
    g = torch.Generator().manual_seed(seed)
    from toolkit.models.bundled import data

    context = data.encode_prompts(data.random_prompts(2, g))
    noise = torch.randn(2, 3, setup.frames, setup.height, setup.width, generator=g)
    with torch.no_grad(), use_backend(student, backend), use_backend(reference, setup.backend):
        return float(distillation_loss(student, reference, context, noise, setup, torch.Generator().manual_seed(7),
                                       exit_step))


@pytest.mark.parametrize("exit_step", [0, 3])
def test_distillation_loss_is_zero_for_dense_attention_and_not_for_monarch(tiny, exit_step):
    """The teacher-forced dense target equals the KV-cache rollout's own prediction, so the loss measures only
    what the attention changes."""
    reference = copy.deepcopy(tiny)
    dense = _loss(tiny, reference, dense_attention, exit_step)
    monarch = _loss(tiny, reference, backend_for("monarch:1,1,1"), exit_step)
    assert dense < 1e-10
    assert monarch > 1e-5


def test_a_monarch_gradient_step_lowers_the_distillation_loss(tiny):
    """Gradients reach the weights through the Monarch reference and point downhill (one SGD step, fixed batch)."""
    student, reference = copy.deepcopy(tiny).requires_grad_(True), copy.deepcopy(tiny)
    backend = backend_for("monarch:1,1,1")
    setup = ClipSetup.of(student.cfg, "cpu")
    g = torch.Generator().manual_seed(5)
    from toolkit.models.bundled import data

    context = data.encode_prompts(data.random_prompts(2, g))
    noise = torch.randn(2, 3, setup.frames, setup.height, setup.width, generator=g)

    def loss() -> torch.Tensor:
        with use_backend(student, backend), use_backend(reference, setup.backend):
            return distillation_loss(student, reference, context, noise, setup, torch.Generator().manual_seed(7), 2)

    before = loss()
    before.backward()
    before = float(before)
    q_grad = student.blocks[0].self_attn.q.weight.grad
    assert q_grad is not None and q_grad.abs().max() > 0  # through the Monarch backend into the queries
    with torch.no_grad():
        for p in student.parameters():
            if p.grad is not None:
                p -= 1e-3 * p.grad
    with torch.no_grad():
        after = loss()
    assert float(after) < before


def test_finetuning_lowers_the_held_out_loss_and_changes_only_the_copy(tiny, tmp_path):
    """``distill`` from a perturbed copy back onto the model: the held-out loss falls; the source is untouched."""
    perturbed = copy.deepcopy(tiny)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in perturbed.parameters():
            p += 0.3 * p.abs().mean() * torch.randn(p.shape, generator=g)
    before = {k: v.clone() for k, v in perturbed.state_dict().items()}
    settings = FinetuneSettings(steps=6, batch=2, lr=3e-4, warmup=1)
    student, record = train_finetune(perturbed, settings, None, reference=tiny, seed=1, log=lambda *_: None)
    assert record["heldout_loss_end"] < 0.8 * record["heldout_loss_init"], record  # measured 0.66x
    assert all(torch.equal(before[k], v) for k, v in perturbed.state_dict().items())
    assert student.state_dict().keys() == tiny.state_dict().keys()
    assert all(getattr(s, "backend", None) is None for s in student.modules())  # backends restored
    save_finetuned(tmp_path, student, dict(record, attention="dense"))
    loaded, info = load_bundled(path=tmp_path)  # strict: every tensor, right shapes
    for k, v in student.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v.half().float())
    assert info["training"]["attention"] == "dense"


# ---- the command -------------------------------------------------------------------------------------------------
def _digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_train_finetune_command(tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["train", "--finetune", "--tiny", "--attention", "monarch:1,1,1:T=2", "--ft-steps", "1",
                 "--ft-batch", "1", "--out", str(out), "--quiet"]) == 0
    log = json.loads((out / "finetune_log.json").read_text())
    assert log["attention"] == "monarch:1,1,1:T=2" and log["settings"]["steps"] == 1
    digest = _digest(out)
    capsys.readouterr()
    # a folder holding a model is refused, byte-identical; bad specs and missing flags in one line, nothing written
    for argv, message in [
        (["--attention", "monarch"], "already holds a model"),
        (["--attention", "monarch:1,1"], "--attention"),
        ([], "needs --attention"),
        (["--attention", "monarch", "--objective", "self_forcing"], "needs --teacher"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            code = main(["train", "--finetune", "--tiny", "--out", str(out), *argv])
            raise SystemExit(code)
        assert exit_info.value.code != 0
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert _digest(out) == digest
