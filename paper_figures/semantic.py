"""Semantic correspondence: where one sprite token of the last chunk looks in earlier frames, drawn against that
sprite's ground-truth mask. Only the bundled model can show this: its clips are rendered, so the renderer knows
which pixels of every frame belong to which sprite (``bundled.data.render(..., with_truth=True)``), and a token is
a literal 4 × 4 pixel patch (no autoencoder), so a key token *is* a piece of the sprite or it is not.

    from toolkit.paper_figures import semantic
    prompt = "3 sprites: red circle left, blue square top-right, yellow triangle bottom"
    c = semantic.semantic_correspondence(model, prompt, seed=0)
    c.layer, c.head, c.masses()["lift"]          # the head with the most sprite mass in earlier frames, its lift
    semantic.plot(c.select(2, 1), "figs/")       # any other head: every head's row is kept
    semantic.make(model, "figs/", prompt=..., seed=...)   # PNG + PDF + JSON of the numbers (``toolkit figures``)

Procedure (``semantic_correspondence``):

1. Render the prompt's clip with ``seed``: video [1 3 F H W] in [0, 1] and the renderer's ``Truth`` (visible mask
   and centre of every sprite in every frame).
2. Run the model over it the way the Self-Forcing sampler fills its KV cache, with the ground-truth frames in place
   of the model's own (teacher forcing): the clean pass (t = 0) of chunks 0 .. C−2, which writes their K/V into the
   cache, then one forward of the last chunk at denoising step ``step``: x_t = (1 − σ)·x0 + σ·ε, σ = t/1000, ε from
   the same seeded generator (``step = len(timesteps)`` is the chunk's clean pass, t = 0). The chunk's own earlier
   steps do not matter: each forward rewrites the chunk's cache slots before attending, so this last forward sees
   exactly what the sampler's would at that step, had the sampler generated the ground truth.
3. The query is the sprite's token nearest its centre in the query frame (the clip's last frame by default). A
   hook on every layer's ``AttentionSeam`` takes that token's post-RoPE q and the attended keys (the cache up to the
   chunk's end) and keeps every head's exact probability row (``toolkit.attention.exact``: the row's log-sum-exp,
   then exp(s·q·k − lse)), so no second attention implementation is involved. The row is dense softmax attention
   whatever backend the seam runs.
4. A token is on a sprite when at least half of its pixels are in the sprite's visible mask. The head shown is the
   one whose row puts the most mass on the sprite's tokens in frames before the query frame (unless fixed). Its
   *lift* is the share of the earlier-frame mass that lands on the sprite divided by the share of earlier-frame
   tokens the sprite covers: 1 is what attention blind to the sprite (uniform, or any pattern uncorrelated with
   it) gives; a head that tracks the sprite through time scores far above 1.

Why a seam hook rather than a capture file: the figure needs one query row per layer (a few MB of keys, reduced
on the fly) and the renderer's truth, which a capture of a sampled clip does not have.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from toolkit.paper_figures import style

from toolkit.attention import exact
from toolkit.errors import ToolkitError
from toolkit.grid import TokenGrid
from toolkit.models import bundled
from toolkit.models.bundled import data
from toolkit.models.sampling import self_forcing_timesteps
from toolkit.models.seam import AttentionContext, seams
from toolkit.models.wan import KVCache

NAME = "semantic_correspondence"
TITLE = "semantic correspondence: a sprite token's attention over earlier frames, with the sprite's true mask"
ON_SPRITE = 0.5  # a token is on a sprite when at least this fraction of its pixels is in the sprite's mask


@dataclass
class Correspondence:
    """One query token's attention rows at every layer and head, with the clip and its ground truth.

    Arrays are numpy; ``Ft`` token frames, ``gh × gw`` tokens per frame, ``K`` sprites of the prompt."""

    model: str
    prompt: str
    seed: int
    step: int  # index into ``timesteps``; == len(timesteps): the last chunk's clean pass
    timestep: float
    layer: int  # the (layer, head) shown
    head: int
    chosen_by: str  # how (layer, head) was chosen: the most sprite mass in earlier frames, or by the caller
    sprite: int  # slot in the prompt (z-order)
    query: tuple[int, int, int]  # token (frame, row, col)
    centre: tuple[float, float]  # the sprite's centre (y, x) in pixels in the query frame
    grid: TokenGrid  # Ft gh gw
    patch: tuple[int, int, int]
    frames_per_chunk: int  # token frames
    rows: np.ndarray  # layer head Ft gh gw, float64: attention probability of the query on every clip token
    video: np.ndarray  # F H W 3 in [0, 1]: the ground-truth clip
    masks: np.ndarray  # K F H W bool: each sprite's visible pixels (Truth.masks)
    coverage: np.ndarray  # K Ft gh gw: fraction of each token's pixels in each sprite's mask
    query_input: np.ndarray  # H W 3 in [0, 1]: the query frame as the model saw it (x_t)
    sprite_names: list[str] = field(default_factory=list)  # "red circle", per slot
    sprite_colours: list[tuple[float, float, float]] = field(default_factory=list)

    @property
    def row(self) -> np.ndarray:
        """The shown head's row: Ft gh gw."""
        return self.rows[self.layer, self.head]

    @property
    def tokens(self) -> np.ndarray:
        """K Ft gh gw bool: the tokens on each sprite."""
        return self.coverage >= ON_SPRITE

    @property
    def chunks(self) -> int:
        return self.grid.frames // self.frames_per_chunk

    def masses(self, rows: np.ndarray | None = None) -> dict[str, Any]:
        """Mass of ``rows`` (default: the shown head's; any ``... Ft gh gw``) on the sprite in frames before the query
        frame: ``earlier`` (row mass in those frames), ``sprite`` (on the sprite's tokens there), ``share`` =
        sprite / earlier, ``cover`` (fraction of those tokens on the sprite) and ``lift`` = share / cover."""
        rows = self.row if rows is None else rows
        qf = self.query[0]
        tok = self.tokens[self.sprite, :qf]  # qf gh gw
        earlier = rows[..., :qf, :, :].sum((-3, -2, -1))
        sprite = (rows[..., :qf, :, :] * tok).sum((-3, -2, -1))
        cover = float(tok.mean())
        with np.errstate(divide="ignore", invalid="ignore"):
            share = sprite / earlier
            lift = share / cover if cover > 0 else np.full_like(share, np.nan)
        return dict(earlier=earlier, sprite=sprite, share=share, cover=cover, lift=lift)

    def scores(self) -> np.ndarray:
        """layer head: each head's mass on the sprite's tokens in earlier frames (what picks the default head)."""
        return self.masses(self.rows)["sprite"]

    def select(self, layer: int, head: int) -> Correspondence:
        """The same query shown at another (layer, head)."""
        _check_index("layer", layer, self.rows.shape[0])
        _check_index("head", head, self.rows.shape[1])
        return replace(self, layer=layer, head=head, chosen_by="caller")

    def frame_masses(self) -> dict[str, np.ndarray]:
        """Per key frame (Ft): the shown row's ``total`` mass, its mass on this ``sprite``, on ``other`` sprites, and
        the sprite mass ``expected`` if the frame's mass ignored the sprite (total × the sprite's token share)."""
        row, tok = self.row, self.tokens
        others = np.delete(tok, self.sprite, axis=0).any(0) & ~tok[self.sprite]
        total = row.sum((1, 2))
        return dict(total=total, sprite=(row * tok[self.sprite]).sum((1, 2)), other=(row * others).sum((1, 2)),
                    expected=total * tok[self.sprite].mean((1, 2)))

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers of the figure."""
        m = self.masses()
        return dict(model=self.model, prompt=self.prompt, seed=self.seed, step=self.step, timestep=self.timestep,
                    layer=self.layer, head=self.head, head_chosen_by=self.chosen_by, sprite=self.sprite,
                    sprite_name=self.sprite_names[self.sprite],
                    query_token=dict(zip(("frame", "row", "col"), self.query)), sprite_centre_px=list(self.centre),
                    grid=list(self.grid), patch=list(self.patch), frames_per_chunk=self.frames_per_chunk,
                    earlier_frames=[0, self.query[0] - 1], earlier_mass=float(m["earlier"]),
                    sprite_mass=float(m["sprite"]), sprite_share=float(m["share"]), sprite_cover=m["cover"],
                    lift=float(m["lift"]), sprite_mass_per_head=self.scores().round(6).tolist())


def _check_index(what: str, value: int, size: int) -> None:
    if not 0 <= value < size:
        raise ToolkitError(f"{what} {value} does not exist: the model has {size} (0..{size - 1})")


# ----------------------------------------------------------------------------------------------------------------
# Ground truth -> tokens


def token_coverage(masks: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """Fraction of each token's pixels inside a mask: ``... (f pt) (h ph) (w pw) -> ... f h w`` (float32)."""
    pt, ph, pw = patch
    *lead, frames, height, width = masks.shape
    if frames % pt or height % ph or width % pw:
        raise ToolkitError(f"mask {tuple(masks.shape[-3:])} does not split into patches {tuple(patch)}")
    m = masks.float().reshape(*lead, frames // pt, pt, height // ph, ph, width // pw, pw)
    return m.mean((-5, -3, -1))


def nearest_token(on_sprite: torch.Tensor, centre: tuple[float, float], patch_hw: tuple[int, int]) -> tuple[int, int]:
    """(row, col) of the ``True`` token of ``on_sprite`` [gh gw] whose centre is nearest the pixel ``centre`` (y, x):
    the token containing the centre when it is on the sprite (a ring's centre is not)."""
    ph, pw = patch_hw
    rows, cols = torch.nonzero(on_sprite, as_tuple=True)
    if rows.numel() == 0:
        raise ValueError("no token on the sprite")
    d2 = ((rows + 0.5) * ph - centre[0]) ** 2 + ((cols + 0.5) * pw - centre[1]) ** 2
    i = int(torch.argmin(d2))  # first minimum in raster order: deterministic ties
    return int(rows[i]), int(cols[i])


def _sprite_slot(sprite: int | str | None, prompt: data.Prompt, visible: torch.Tensor) -> int:
    """The prompt slot of ``sprite`` (slot, colour or "colour shape"), or the one covering most query-frame tokens."""
    names = [f"{s.colour} {s.shape}" for s in prompt.sprites]
    if sprite is None:
        counts = visible.sum((1, 2))
        if int(counts.max()) == 0:
            raise ToolkitError(f"no sprite of '{prompt}' covers half a token in the query frame; try another seed")
        return int(torch.argmax(counts))
    if isinstance(sprite, str) and not sprite.strip().isdigit():
        key = sprite.strip().lower()
        for i, (s, n) in enumerate(zip(prompt.sprites, names)):
            if key in (s.colour, n):
                return i
        raise ToolkitError(f"no sprite '{sprite}' in '{prompt}' (sprites: {', '.join(names)})")
    slot = int(sprite)
    if not 0 <= slot < len(names):
        raise ToolkitError(f"sprite {slot} does not exist: '{prompt}' has sprites 0..{len(names) - 1} "
                           f"({', '.join(names)})")
    return slot


# ----------------------------------------------------------------------------------------------------------------
# The teacher-forced forward and the query's rows


@torch.no_grad()
def query_rows(model: torch.nn.Module, x0: torch.Tensor, context: torch.Tensor, query: int, *, step: int,
               timesteps: torch.Tensor, frames_per_chunk: int, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced KV cache over ``x0`` [1 c F H W] (model space), then the last chunk at ``step``; returns
    (rows ``layer head token`` float64 over the whole clip's tokens, the last chunk's input x_t ``1 c f H W``).

    ``query`` is a clip token of the last chunk; its rows are the exact softmax rows of the last forward."""
    device, dtype = next(model.parameters()).device, model.dtype
    grid = model.grid_size(x0)
    pt = model.cfg.patch_size[0]
    per_chunk = frames_per_chunk * pt  # latent frames
    if x0.shape[2] % per_chunk:
        raise ToolkitError(f"{x0.shape[2]} frames do not split into chunks of {frames_per_chunk}")
    n_chunks, n_tokens = x0.shape[2] // per_chunk, grid[0] * grid[1] * grid[2]
    if not 0 <= step <= len(timesteps):
        raise ToolkitError(f"step {step} does not exist: denoising steps 0..{len(timesteps) - 1}, "
                           f"{len(timesteps)} = clean pass")
    clean = step == len(timesteps)
    t = 0.0 if clean else float(timesteps[step])
    x0 = x0.to(device=device, dtype=dtype)
    context = context.to(device=device, dtype=dtype)
    cache = KVCache(model.cfg, 1, n_tokens, device, dtype)
    common = dict(kv_cache=cache, clip_frames=grid[0])
    zeros = torch.zeros(1, frames_per_chunk, device=device)
    for c in range(n_chunks - 1):  # what the sampler's clean passes leave in the cache, on the ground truth
        model(x0[:, :, c * per_chunk:(c + 1) * per_chunk], zeros, context, start_frame=c * frames_per_chunk,
              chunk=c, step=len(timesteps), is_clean=True, **common)
    last = n_chunks - 1
    x_last = x0[:, :, last * per_chunk:]
    eps = torch.randn(x_last.shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    sigma = t / 1000
    x_t = x_last if clean else (1 - sigma) * x_last + sigma * eps

    rows: dict[int, torch.Tensor] = {}

    def grab(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, ctx: AttentionContext) -> None:
        # q b i h d: this chunk's queries; k b j h d: the attended keys, clip tokens key_offset.. (the whole cache)
        qi = q[0, query - ctx.query_offset].unsqueeze(1)  # h 1 d
        kj = k[0].transpose(0, 1)  # h j d
        p = exact.probs(qi, kj, exact.logsumexp(qi, kj, ctx.scale), ctx.scale)[:, 0]  # h j, sums to 1
        full = torch.zeros(p.shape[0], n_tokens, dtype=torch.float64)
        full[:, ctx.key_offset:ctx.key_offset + p.shape[1]] = p.double().cpu()
        rows[ctx.layer] = full

    hooked = seams(model)
    for s in hooked:
        s.hooks.append(grab)
    try:
        model(x_t, torch.full((1, frames_per_chunk), t, device=device), context, start_frame=last * frames_per_chunk,
              chunk=last, step=step, is_clean=clean, **common)
    finally:
        for s in hooked:
            s.hooks.remove(grab)
    return torch.stack([rows[s.layer] for s in hooked]), x_t


def semantic_correspondence(
    model: torch.nn.Module,
    prompt: str | data.Prompt,
    *,
    seed: int = 0,
    step: int | None = None,
    layer: int | None = None,
    head: int | None = None,
    sprite: int | str | None = None,
    query_frame: int = -1,
    timesteps: torch.Tensor | None = None,
    frames_per_chunk: int | None = None,
    name: str | None = None,
) -> Correspondence:
    """A query token on ``sprite`` in the last chunk and its attention rows (module docstring: the procedure).

    ``step``: denoising step of the last chunk (default the last one; ``len(timesteps)`` = its clean pass).
    ``layer``/``head``: the row shown (default: the head with the most mass on the sprite in earlier frames; fixing
    one picks the best of the other). ``sprite``: prompt slot, colour or "colour shape" (default: the sprite covering
    most tokens of the query frame). ``query_frame``: a token frame of the last chunk (default its last, −1).
    ``timesteps`` default to the bundled sampler's (1000, 937.5, 833.3, 625); the clip size and chunk length come
    from ``model.cfg`` (``bundled.clip_shape``, ``bundled.frames_per_chunk``)."""
    cfg = model.cfg
    parsed = data.parse_prompt(prompt) if isinstance(prompt, str) else prompt
    timesteps = self_forcing_timesteps(denoising_steps=bundled.SELF_FORCING_STEPS) if timesteps is None else \
        torch.as_tensor(timesteps, dtype=torch.float64)
    step = len(timesteps) - 1 if step is None else step
    if not 0 <= step <= len(timesteps):
        raise ToolkitError(f"step {step} does not exist: denoising steps 0..{len(timesteps) - 1}, "
                           f"{len(timesteps)} = the last chunk's clean pass")
    fpc = frames_per_chunk or bundled.frames_per_chunk(cfg)
    frames, height, width = bundled.clip_shape(cfg)
    patch = tuple(cfg.patch_size)
    grid = TokenGrid(frames // patch[0], height // patch[1], width // patch[2])
    if grid.frames % fpc:
        raise ToolkitError(f"{grid.frames} token frames do not split into chunks of {fpc}")
    qf = query_frame % grid.frames if query_frame < 0 else query_frame
    first_last = grid.frames - fpc
    if not first_last <= qf < grid.frames:
        raise ToolkitError(f"query frame {query_frame} is not in the last chunk "
                           f"(frames {first_last}..{grid.frames - 1})")
    if qf == 0:
        raise ToolkitError("the query frame has no earlier frames to attend to")
    for what, value, size in (("layer", layer, cfg.num_layers), ("head", head, cfg.num_heads)):
        if value is not None:
            _check_index(what, value, size)

    g = torch.Generator().manual_seed(seed)  # CPU: the same clip and noise on any device
    video, truth = data.render([parsed], g, frames=frames, height=height, width=width, with_truth=True)
    k = len(parsed.sprites)
    masks = truth.masks[0, :k]  # K F H W
    coverage = token_coverage(masks, patch)  # K Ft gh gw
    slot = _sprite_slot(sprite, parsed, coverage[:, qf] >= ON_SPRITE)
    pix = slice(qf * patch[0], (qf + 1) * patch[0])  # the query token frame's pixel frames
    centre = truth.centres[0, slot, pix].mean(0)  # (y, x)
    on = coverage[slot, qf] >= ON_SPRITE
    if not bool(on.any()):
        raise ToolkitError(f"sprite {slot} ({parsed.sprites[slot].colour} {parsed.sprites[slot].shape}) covers no "
                           f"token of frame {qf} (occluded or too small): choose another sprite or seed")
    r, c = nearest_token(on, (float(centre[0]), float(centre[1])), patch[1:])
    query = int(grid.index(qf, r, c))

    rows, x_t = query_rows(model, bundled.to_model_space(video), data.encode_prompts([parsed]), query, step=step,
                           timesteps=timesteps, frames_per_chunk=fpc, generator=g)
    rows = rows.view(rows.shape[0], rows.shape[1], *grid).numpy()
    qpix = qf * patch[0] + patch[0] - 1 - (grid.frames - fpc) * patch[0]  # last pixel frame of the query token frame
    out = Correspondence(
        model=name or str(cfg.extra.get("model", "model")), prompt=str(parsed), seed=seed, step=step,
        timestep=0.0 if step == len(timesteps) else float(timesteps[step]), layer=0, head=0, chosen_by="",
        sprite=slot, query=(qf, r, c), centre=(float(centre[0]), float(centre[1])), grid=grid, patch=patch,
        frames_per_chunk=fpc, rows=rows, video=video[0].permute(1, 2, 3, 0).numpy(), masks=masks.numpy(),
        coverage=coverage.numpy(), query_input=bundled.to_pixels(x_t[0, :, qpix]).permute(1, 2, 0).cpu().numpy(),
        sprite_names=[f"{s.colour} {s.shape}" for s in parsed.sprites],
        sprite_colours=[data.COLOURS[s.colour] for s in parsed.sprites])
    score = out.scores()  # layer head
    if layer is None and head is None:
        layer, head = (int(i) for i in np.unravel_index(int(np.argmax(score)), score.shape))
        chosen_by = "most sprite mass in earlier frames"
    elif head is None:
        head, chosen_by = int(np.argmax(score[layer])), f"most sprite mass in earlier frames among layer {layer}"
    elif layer is None:
        layer, chosen_by = int(np.argmax(score[:, head])), f"most sprite mass in earlier frames among head {head}"
    else:
        chosen_by = "caller"
    return replace(out, layer=layer, head=head, chosen_by=chosen_by)


# ----------------------------------------------------------------------------------------------------------------
# The figure


def _percent(x: float) -> str:
    """Whole percent, one decimal below 9.5 % and from 99.5 % (so 99.6 % does not read as all of it)."""
    return f"{100 * x:.0f} %" if 0.095 <= x < 0.995 or x == 1 else f"{100 * x:.1f} %"


def _outline(ax, mask: np.ndarray, color, *, lw: float = 1.2, ls: str = "-", halo: bool = True) -> None:
    """Contour of a pixel mask [H W] at its pixel edges' midpoints, on an image drawn with extent (0, W, H, 0)."""
    if not mask.any():
        return
    import matplotlib.patheffects as pe

    h, w = mask.shape
    cs = ax.contour(np.arange(w) + 0.5, np.arange(h) + 0.5, mask.astype(float), levels=[0.5], colors=[color],
                    linewidths=lw, linestyles=ls)
    if halo:
        cs.set_path_effects([pe.withStroke(linewidth=lw + 1.6, foreground="black")])


@style.use_style
def plot(c: Correspondence, out_dir: str | Path, *, name: str = NAME) -> list[Path]:
    """Write ``name.png`` and ``name.pdf``: one panel per key frame (rows = chunks), the model's input at the query
    frame, the mass per key frame on the sprite vs elsewhere, and every head's sprite mass."""
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    ft, gh, gw = c.grid
    fpc, n_chunks = c.frames_per_chunk, c.chunks
    pt, ph, pw = c.patch
    height, width = c.video.shape[1:3]
    qf, qr, qc = c.query
    row = c.row
    m, fm = c.masses(), c.frame_masses()
    label, sprite_name = style.head_label(c.layer, c.head), c.sprite_names[c.sprite]
    step_text = "clean pass, t = 0" if c.timestep == 0 else f"step {c.step}, t = {c.timestep:.4g}"

    positive = row[row > 0]
    vmax = float(positive.max())
    vmin = max(float(positive.min()), vmax / 1e3)  # 3 decades: a row's structure without its tail of noise
    norm = LogNorm(vmin=vmin, vmax=vmax, clip=True)
    cmap = plt.get_cmap(style.SEQUENTIAL)
    level = np.clip((np.log(np.clip(row, vmin, vmax)) - np.log(vmin)) / np.log(vmax / vmin), 0, 1)
    rgba = cmap(level)
    rgba[..., 3] = 0.9 * level**0.6  # low attention fades to the frame under it

    panel_w = 2.0
    panel_h = panel_w * height / width
    fig = plt.figure(figsize=(fpc * panel_w + 3.6, max(n_chunks * (panel_h + 0.12) + 0.8, 5.4)), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[fpc * panel_w + 0.5, 3.3], wspace=0.02)
    axes = left.subplots(n_chunks, fpc, squeeze=False, sharex=True, sharey=True)
    box = dict(facecolor="black", alpha=0.55, lw=0, pad=1.2)
    for f in range(ft):
        ax = axes[f // fpc, f % fpc]
        frame = c.video[f * pt + pt - 1]  # H W 3
        grey = 0.12 + 0.5 * (frame @ np.array([0.299, 0.587, 0.114]))
        ax.imshow(grey, cmap="gray", vmin=0, vmax=1, extent=(0, width, height, 0), interpolation="nearest")
        ax.imshow(rgba[f], extent=(0, width, height, 0), interpolation="nearest")
        for s in range(len(c.sprite_names)):
            if s != c.sprite:
                _outline(ax, c.masks[s, f * pt + pt - 1], c.sprite_colours[s], lw=0.8, ls=":", halo=False)
        _outline(ax, c.masks[c.sprite, f * pt + pt - 1], "white")
        y, x = (qr + 0.5) * ph, (qc + 0.5) * pw
        if f == qf:
            ax.add_patch(Rectangle((qc * pw, qr * ph), pw, ph, fill=False, ec=style.OKABE_ITO["vermillion"], lw=1.8))
        else:  # where the query sits, for reading motion against it
            ax.plot([x], [y], marker="+", ms=6, mew=1.0, color=style.OKABE_ITO["vermillion"])
        ax.text(0.02, 0.97, f"f{f}", transform=ax.transAxes, color="white", fontsize=7, va="top", bbox=box)
        ax.text(0.98, 0.03, f"Σ {_percent(fm['total'][f])} · sprite {_percent(fm['sprite'][f])}",
                transform=ax.transAxes, color="white", fontsize=6.5, ha="right", va="bottom", bbox=box)
        ax.set(xticks=[], yticks=[], xlim=(0, width), ylim=(height, 0))
        ax.grid(False)
        for spine in ax.spines.values():
            spine.set_visible(True)
            spine.set_color(style.OKABE_ITO["orange"] if f // fpc == n_chunks - 1 else "0.6")
    for ch in range(n_chunks):
        last_chunk = ch == n_chunks - 1
        text = f"chunk {ch}: f{ch * fpc}–{ch * fpc + fpc - 1}\n" + (step_text if last_chunk else "clean → KV cache")
        axes[ch, 0].set_ylabel(text, fontsize=7.5, color=style.OKABE_ITO["orange"] if last_chunk else "black")
    left.colorbar(ScalarMappable(norm, cmap), ax=axes, location="bottom", shrink=0.55, aspect=45, pad=0.01,
                  label=f"attention probability of the query, {label} (log; fades out below {vmin:.1e})")

    a, b, e = right.subplots(3, 1, height_ratios=[1.0, 1.25, 1.25])
    a.imshow(c.query_input, extent=(0, width, height, 0), interpolation="nearest")
    _outline(a, c.masks[c.sprite, qf * pt + pt - 1], "white")
    a.add_patch(Rectangle((qc * pw, qr * ph), pw, ph, fill=False, ec=style.OKABE_ITO["vermillion"], lw=1.8))
    a.set(xticks=[], yticks=[], title=f"(a) model input x_t, frame {qf}",
          xlabel=f"query: {sprite_name}, token (row {qr}, col {qc})")
    a.grid(False)

    frames_x = np.arange(ft)
    rest = fm["total"] - fm["sprite"] - fm["other"]
    b.bar(frames_x, fm["sprite"], color=style.OKABE_ITO["blue"], label=f"on the {sprite_name} (white outline)")
    b.bar(frames_x, fm["other"], bottom=fm["sprite"], color=style.OKABE_ITO["sky_blue"], label="on other sprites")
    b.bar(frames_x, rest, bottom=fm["sprite"] + fm["other"], color="0.82", label="background")
    b.scatter(frames_x, fm["expected"], marker="_", s=90, linewidths=1.6, color="black", zorder=3,
              label="on the sprite if blind to it")
    for ch in range(1, n_chunks):
        b.axvline(ch * fpc - 0.5, color="0.4", lw=0.8, ls="--")
    b.set(xlabel="key frame", ylabel="row mass", xticks=frames_x, xlim=(-0.6, ft - 0.4),
          title=f"(b) {label}: mass per key frame")
    b.tick_params(axis="x", labelsize=6.5)
    top = float(max(fm["total"].max(), fm["expected"].max()))
    b.set_ylim(0, 1.6 * top if top > 0 else 1)  # headroom for the legend (one outside would squeeze the column)
    b.legend(fontsize=6, loc="upper left", framealpha=0.85)

    score = c.scores()
    im = e.imshow(score, cmap=style.SEQUENTIAL, aspect="auto", origin="lower")
    e.add_patch(Rectangle((c.head - 0.5, c.layer - 0.5), 1, 1, fill=False, ec=style.OKABE_ITO["vermillion"], lw=2))
    n_layers, n_heads = score.shape
    e.set(xlabel="head", ylabel="layer", xticks=range(n_heads), yticks=range(n_layers),
          title=f"(c) sprite mass in frames 0–{qf - 1}, every head")
    e.grid(False)
    if score.size <= 64:
        for (i, j), v in np.ndenumerate(score):
            e.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                   color="black" if v > 0.6 * score.max() else "white")
    right.colorbar(im, ax=e, label="row mass on the sprite", shrink=0.9)

    chosen = "chosen" if c.chosen_by == "caller" else "the head with the most sprite mass"
    lines = [f"Semantic correspondence · {c.model}: “{c.prompt}” (seed {c.seed})",
             f"{label} ({chosen}) · query on the {sprite_name} in frame {qf}, last chunk at {step_text}",
             f"frames 0–{qf - 1} get {_percent(float(m['earlier']))} of its attention, "
             f"{_percent(float(m['share']))} of that on the {sprite_name}, which covers {_percent(m['cover'])} of "
             f"their tokens → lift {float(m['lift']):.1f}×"]
    # a title wider than the figure collapses constrained layout: wrap to the figure's width
    chars = int(fig.get_figwidth() * 14)
    fig.suptitle("\n".join(textwrap.fill(x, chars) for x in lines), fontsize=9)
    return style.save(fig, out_dir, name)


def make(model: torch.nn.Module, out_dir: str | Path, *, prompt: str | data.Prompt, seed: int = 0,
         log: Callable[[str], None] = print, **options: int | str | torch.Tensor | None) -> list[Path]:
    """``semantic_correspondence(model, prompt, seed=seed, **options)``, then the figure (PNG + PDF) and its numbers
    (``NAME.json``) in ``out_dir``; returns the paths written."""
    c = semantic_correspondence(model, prompt, seed=seed, **options)
    paths = plot(c, out_dir)
    summary = Path(out_dir) / f"{NAME}.json"
    summary.write_text(json.dumps(c.summary(), indent=1) + "\n")
    m = c.masses()
    log(f"{NAME}: {style.head_label(c.layer, c.head)}, query {c.sprite_names[c.sprite]} at token "
        f"{c.query}, lift {float(m['lift']):.1f}× ({_percent(float(m['share']))} of earlier-frame mass on "
        f"{_percent(m['cover'])} of the tokens)")
    return [*paths, summary]
