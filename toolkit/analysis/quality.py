"""End-to-end quality of attention approximations: each ``--attention`` spec against dense, from the same noise.

    from toolkit.analysis.quality import compare_attention, quality_table
    ds = compare_attention("bundled", ["2 sprites: red circle, blue square"], [0, 1],
                           ["monarch:1,1,1", "monarch:3,1,1"])
    print(quality_table(ds))
    write_quality(ds, "out/compare/quality.nc")

For every prompt and seed the model samples the dense *reference* and then each spec from the same initial noise and
the same re-noising draws: the run's generator is rewound to its state right after the initial noise before every
video, so ``dense`` as a spec reproduces the reference bit for bit (relative L2 0, PSNR inf, SSIM 1). Measured
(``docs/compare.md``):

* ``rel_l2`` / ``rel_l2_chunk``: ‖x − x_dense‖ / ‖x_dense‖ over the sampler's output (latents; for the bundled
  model pixels in model space [-1, 1]), the whole clip and each chunk's latent frames.
* ``psnr`` / ``ssim`` per frame: scikit-image's ``peak_signal_noise_ratio`` and ``structural_similarity`` of the
  frames in [0, 1] (``data_range=1``, colour channels as ``channel_axis``) — the bundled model's pixels, or for the
  Wan models the Wan VAE's decoded frames when the ``[video]`` extra and the VAE weights are there (else latent
  metrics only, and ``attrs["pixels"]`` says why).
* bundled model: the sprite evaluator's ``colour_match``, ``persistence`` and ``score`` per video, dense included.
* ``seconds``: wall time of sampling one video (model calls only, no metrics).

The result is an ``xr.Dataset`` with dims ``spec`` (``"reference"`` first: the dense reference run, then the
specs as given), ``prompt``, ``seed``, ``chunk`` and ``frame``; coordinates ``attention`` (the spec string),
``family`` and ``density`` (fraction of the dense attention entries a spec keeps, NaN where its family reports
none) per spec, and ``chunk_of_frame``. Plotting lives in the figures layer (``paper_figures/quality.py``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from toolkit._version import __version__
from toolkit.attention import backends
from toolkit.attention.backends import check_attention, parse_attention_rules, use_attention
from toolkit.errors import ToolkitError
from toolkit.models.layout import RunLayout

FORMAT_NAME = "toolkit-quality"
FORMAT_VERSION = 1
REFERENCE = "reference"  # label of the dense reference run on the spec dim
METRICS_EXTRA = "pip install 'toolkit[metrics]' (or: pip install scikit-image)"
HELDOUT = "heldout:"


# ---- metrics ------------------------------------------------------------------------------------------------
def _skimage_metrics():
    try:
        from skimage import metrics
    except ImportError:
        raise ToolkitError(f"PSNR / SSIM need scikit-image: {METRICS_EXTRA}") from None
    return metrics


def require_metrics() -> None:
    """One-line ``ToolkitError`` naming the extra when scikit-image is missing (call before any generation)."""
    _skimage_metrics()


def relative_l2(reference: torch.Tensor | np.ndarray, test: torch.Tensor | np.ndarray) -> float:
    """‖test − reference‖₂ / ‖reference‖₂ in float64 (0 for identical inputs)."""
    ref = torch.as_tensor(reference).double()
    diff = torch.as_tensor(test).double() - ref
    return float(diff.norm() / ref.norm().clamp_min(1e-300))


def frame_metrics(reference: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame PSNR (dB) and SSIM of ``test`` against ``reference``, both ``[3, frames, h, w]`` in [0, 1].

    scikit-image with ``data_range=1`` and ``channel_axis=-1``; identical frames give PSNR ``inf`` and SSIM 1. The
    SSIM window is scikit-image's 7 × 7, shrunk to the largest odd size that fits a smaller frame."""
    metrics = _skimage_metrics()
    ref = np.moveaxis(np.asarray(reference, dtype=np.float64), 0, -1)  # f h w 3
    out = np.moveaxis(np.asarray(test, dtype=np.float64), 0, -1)
    side = min(ref.shape[1:3])
    win = min(7, side if side % 2 else side - 1)
    psnr = np.empty(ref.shape[0])
    ssim = np.empty(ref.shape[0])
    for f in range(ref.shape[0]):
        with np.errstate(divide="ignore"):  # identical frames: MSE 0 -> inf dB, as scikit-image defines it
            psnr[f] = metrics.peak_signal_noise_ratio(ref[f], out[f], data_range=1.0)
        ssim[f] = metrics.structural_similarity(ref[f], out[f], data_range=1.0, channel_axis=-1, win_size=win)
    return psnr, ssim


def mean_psnr(values: np.ndarray | xr.DataArray) -> float:
    """Mean PSNR over the frames that differ from dense (finite values); ``inf`` when every frame is identical,
    NaN when there are none. (A mean including identical frames would be inf as soon as one frame is.)"""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if not v.size:
        return math.nan
    finite = v[np.isfinite(v)]
    return float(finite.mean()) if finite.size else math.inf


# ---- spec facts -------------------------------------------------------------------------------------------------
def spec_family(spec: str) -> str:
    """The backend families a spec uses besides dense: ``monarch``, ``dense`` (all dense), ``monarch+other``."""
    names = sorted({rule.attention.split(":")[0].strip() for rule in parse_attention_rules(spec)} - {"dense"})
    return "+".join(names) if names else "dense"


def backend_density(attention: str, grid: tuple[int, int, int]) -> float | None:
    """Fraction of the dense attention entries one backend spec keeps on the token ``grid`` (``dense`` 1, Monarch
    its parameter fraction (b1 + b2) / (b1·b2), a family its clip density: ``backends.backend_density``), or None
    where the family reports none or the spec does not fit the grid."""
    try:
        value = backends.backend_density(attention, grid)
    except (ToolkitError, ValueError, TypeError):
        return None
    return None if value is None else float(value)


def spec_density(spec: str, layout: RunLayout) -> float | None:
    """Density of a whole spec on a run: each (layer, step, chunk, head)'s backend density (first matching rule,
    dense if none), weighted by the call's query × key entries (causal: keys = the frames up to the chunk's end).
    None if any backend used has no density."""
    rules = parse_attention_rules(spec)
    dens = [backend_density(rule.attention, layout.grid) for rule in rules]
    total = kept = 0.0
    clean = layout.clean_step
    for chunk in range(layout.num_chunks):
        q0, q1 = layout.chunk_tokens(chunk)
        entries = (q1 - q0) * (q1 if layout.causal else layout.num_tokens)
        for step in range(layout.num_steps):
            for layer in range(layout.num_layers):
                for head in range(layout.num_heads):
                    d = 1.0
                    for rule, rd in zip(rules, dens):
                        if _rule_matches(rule, layer, step, chunk, head, step == clean):
                            d = rd
                            break
                    if d is None:
                        return None
                    total += entries
                    kept += d * entries
    return kept / total if total else None


def _rule_matches(rule: Any, layer: int, step: int, chunk: int, head: int, is_clean: bool) -> bool:
    if rule.steps is not None and not (step in rule.steps or (rule.clean and is_clean)):
        return False
    return all(values is None or index in values for values, index in
               ((rule.layers, layer), (rule.chunks, chunk), (rule.heads, head)))


# ---- runs -------------------------------------------------------------------------------------------------
def parse_prompts(items: Sequence[str]) -> list[str]:
    """Prompt arguments -> prompts: text as given, ``heldout:N`` the bundled evaluator's first N held-out prompts."""
    prompts: list[str] = []
    for item in items:
        if item.strip().startswith(HELDOUT):
            text = item.strip()[len(HELDOUT):]
            if not text.isdigit() or int(text) < 1:
                raise ToolkitError(f"--prompts {item!r}: heldout:N takes a positive number of prompts")
            from toolkit.models.bundled.evaluate import heldout_prompts

            prompts += [str(p) for p in heldout_prompts(int(text))]
        elif not item.strip():
            raise ToolkitError("--prompts: an empty prompt")
        else:
            prompts.append(item)
    if len(set(prompts)) != len(prompts):
        raise ToolkitError("--prompts: a prompt is given twice")
    return prompts


def _module_run(model: torch.nn.Module, prompt: str, frames: int | None = None):
    """A ``pipeline.Run`` around an already loaded bundled-family model (its own clip size, e.g. ``tiny_config``,
    or ``frames`` latent frames of it)."""
    from toolkit.models import registry
    from toolkit.models.bundled import clip_shape, frames_per_chunk
    from toolkit.models.sampling import SelfForcingSampler
    from toolkit.pipeline import Run

    cfg = model.cfg
    if cfg.extra.get("model") != "bundled":
        raise ToolkitError("compare_attention takes a model name, or a loaded model of the bundled family")
    device = next(model.parameters()).device
    sampler = SelfForcingSampler(frames_per_chunk(cfg))
    settings = {"sampler": sampler.name, "frames_per_chunk": sampler.frames_per_chunk,
                "denoising_steps": sampler.denoising_steps, "shift": sampler.shift}
    info = registry.ModelInfo(name="bundled", causal=True, checkpoint=Path("<in-memory model>"), files=[],
                              sha256=None, format="module", entry=None, config=cfg.to_dict(), sampler=settings)
    clip = clip_shape(cfg)
    if frames is not None:
        per_chunk = frames_per_chunk(cfg) * cfg.patch_size[0]
        if frames < 1 or frames % per_chunk or frames > clip[0]:
            raise ToolkitError(f"frames {frames}: this model takes a positive multiple of {per_chunk} latent frames "
                               f"up to its {clip[0]} (whole chunks)")
        clip = (frames, *clip[1:])
    noise = torch.zeros(1, cfg.in_dim, *clip, device=device, dtype=model.dtype)
    return Run(model, registry.get_spec("bundled"), info, prompt, 0, torch.zeros(0), None, noise, sampler, device)


def _draw(base, prompt: str, seed: int, prompt_embeds: Any = None):
    """``base`` with ``prompt`` and ``seed`` (``pipeline.redraw``: conditioning and initial noise exactly as
    ``prepare_run`` draws them), and the generator state right after the initial noise (to rewind re-noising)."""
    from toolkit.pipeline import redraw

    run = redraw(base, prompt=prompt, seed=seed, prompt_embeds=prompt_embeds)
    return run, run.extra["generator"].get_state()


def _pixels_of(run, latents: torch.Tensor, vae: Any) -> np.ndarray | None:
    """[3, frames, h, w] float64 in [0, 1] (bundled: the latents are pixels; Wan: through ``vae``), or None."""
    if run.spec.output == "pixels":
        from toolkit.models.bundled import to_pixels

        return to_pixels(latents)[0].double().cpu().numpy()
    if vae is None:
        return None
    from toolkit.models.vae import decode_latents

    return ((decode_latents(vae, latents)[0].double() + 1) / 2).clamp(0, 1).cpu().numpy()


def _load_vae(run) -> tuple[Any, str]:
    """The Wan VAE for a latent model if the ``[video]`` extra and its weights are there: (vae, how pixels are
    made) or (None, the one-line reason there are latent metrics only)."""
    from toolkit.models import registry
    from toolkit.models.vae import WAN21_VAE, load_vae

    if run.noise.shape[1] != WAN21_VAE.get("z_dim", 16):
        return None, f"latent metrics only: {run.noise.shape[1]} latent channels do not fit the Wan VAE"
    try:
        return load_vae(registry.wan_file(registry.VAE_FILE), device=run.device), "Wan VAE"
    except ToolkitError as err:
        return None, f"latent metrics only: no Wan VAE ({err})"


def _chunk_of_pixel_frame(num_frames: int, latent_frames: int, frames_per_chunk: int) -> np.ndarray:
    """Chunk of each output frame: latent frame k of a Wan VAE decode covers pixel frames 4k-3..4k (k ≥ 1)."""
    frames = np.arange(num_frames)
    if num_frames == latent_frames:
        latent = frames
    else:
        latent = np.where(frames == 0, 0, (frames + 3) // 4)
    return np.minimum(latent // frames_per_chunk, math.ceil(latent_frames / frames_per_chunk) - 1)


def compare_attention(
    model: str | torch.nn.Module,
    prompts: Sequence[str],
    seeds: Sequence[int],
    specs: Sequence[str],
    *,
    checkpoint: str | None = None,
    prompt_embeds: Sequence[str] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    decode: bool = True,
    frames: int | None = None,
    report: Callable[[str], None] | None = None,
) -> xr.Dataset:
    """Sample the dense reference and every spec of ``specs`` for each prompt × seed from the same noise and measure
    them against the reference (module docstring). ``model``: a registry name (loaded through ``toolkit.pipeline``
    as ``toolkit generate`` does, with ``checkpoint``) or a loaded model of the bundled family (sampled at its own
    clip size). ``prompt_embeds``: one embeddings file per prompt for the umT5 models (skips the text
    encoder). ``decode=False`` skips the Wan VAE. ``frames``: latent frames of the clip (default the model's; a
    causal model takes whole chunks), e.g. a short clip for a quick look. ``report`` gets one line per finished
    video.

    Every spec is checked (``check_attention``, against the run's layout) and scikit-image is looked for before
    anything is sampled."""
    from toolkit.pipeline import prepare_run, spec_layout

    prompts, seeds, specs = list(prompts), [int(s) for s in seeds], list(specs)
    if not prompts or not seeds or not specs:
        raise ToolkitError("compare needs at least one prompt, one seed and one --attention spec")
    if len(set(specs)) != len(specs) or REFERENCE in specs:
        raise ToolkitError(f"--attention: specs must be distinct (and not {REFERENCE!r})")
    if prompt_embeds is not None and len(prompt_embeds) != len(prompts):
        raise ToolkitError(f"--prompt-embeds: {len(prompt_embeds)} files for {len(prompts)} prompts")
    for spec in specs:
        parse_attention_rules(spec)
    require_metrics()
    embeds = list(prompt_embeds) if prompt_embeds is not None else [None] * len(prompts)

    if isinstance(model, str):
        from toolkit.models.registry import get_spec

        if checkpoint is None:
            layout = spec_layout(model, frames=frames) if frames is not None else get_spec(model).layout()
            for spec in specs:
                check_attention(spec, layout)
        base = prepare_run(model, prompt=prompts[0], prompt_embeds=embeds[0], seed=seeds[0], checkpoint=checkpoint,
                           device=device, dtype=dtype, frames=frames)
    else:
        base = _module_run(model, prompts[0], frames)
    layout = base.layout()
    for spec in specs:
        check_attention(spec, layout)
        check_attention(spec, num_layers=layout.num_layers, num_heads=layout.num_heads)

    vae, pixels_note = (None, "pixels") if base.spec.output == "pixels" else (None, "latent metrics only")
    if base.spec.output != "pixels" and decode:
        vae, pixels_note = _load_vae(base)
    elif base.spec.output != "pixels":
        pixels_note = "latent metrics only: decoding skipped"
    evaluate = base.spec.output == "pixels"

    labels = [REFERENCE, *specs]
    attention = ["dense", *specs]
    n_s, n_p, n_d = len(labels), len(prompts), len(seeds)
    latent_frames = base.noise.shape[2]
    fpc = layout.frames_per_chunk or latent_frames
    n_chunks = layout.num_chunks
    rel = np.full((n_s, n_p, n_d), np.nan)
    rel_chunk = np.full((n_s, n_p, n_d, n_chunks), np.nan)
    seconds = np.full((n_s, n_p, n_d), np.nan)
    adherence = {k: np.full((n_s, n_p, n_d), np.nan) for k in ("colour_match", "persistence", "score")}
    psnr = ssim = None
    chunk_of_frame = None
    total, done = n_s * n_p * n_d, 0
    for p, prompt in enumerate(prompts):
        for d, seed in enumerate(seeds):
            run, state = _draw(base, prompt, seed, embeds[p])
            ref_latents = ref_pixels = None
            for s, spec in enumerate(attention):
                run.extra["generator"].set_state(state)  # the same re-noising draws for every video
                t0 = time.perf_counter()
                with torch.no_grad(), use_attention(run.model, spec):
                    latents = run.sampler.sample(run.model, run.noise, run.context,
                                                 negative_context=run.negative_context,
                                                 generator=run.extra["generator"], noise_layout="toolkit")
                if run.device.type == "cuda":
                    torch.cuda.synchronize(run.device)
                seconds[s, p, d] = time.perf_counter() - t0
                latents = latents.float()
                pixels = _pixels_of(run, latents, vae)
                if s == 0:
                    ref_latents, ref_pixels = latents, pixels
                rel[s, p, d] = relative_l2(ref_latents, latents)
                for c in range(n_chunks):
                    sl = slice(c * fpc, min((c + 1) * fpc, latent_frames))
                    rel_chunk[s, p, d, c] = relative_l2(ref_latents[:, :, sl], latents[:, :, sl])
                if pixels is not None:
                    if psnr is None:
                        n_f = pixels.shape[1]
                        psnr, ssim = np.full((n_s, n_p, n_d, n_f), np.nan), np.full((n_s, n_p, n_d, n_f), np.nan)
                        chunk_of_frame = _chunk_of_pixel_frame(n_f, latent_frames, fpc)
                    psnr[s, p, d], ssim[s, p, d] = frame_metrics(ref_pixels, pixels)
                if evaluate:
                    _evaluate(adherence, (s, p, d), pixels, prompt, fpc)
                done += 1
                if report is not None:
                    line = (f"[{done}/{total}] {labels[s] if s else 'dense (reference)'} | prompt {p + 1}/{n_p} "
                            f"seed {seed}: {seconds[s, p, d]:.1f} s")
                    if s:
                        line += f", rel L2 {rel[s, p, d]:.3g}"
                        if pixels is not None:
                            line += f", PSNR {mean_psnr(psnr[s, p, d]):.2f} dB, SSIM {np.mean(ssim[s, p, d]):.4f}"
                    report(line)

    dims = ("spec", "prompt", "seed")
    data: dict[str, Any] = {
        "rel_l2": (dims, rel, dict(long_name="relative L2 error of the latents vs dense", units="1")),
        "rel_l2_chunk": ((*dims, "chunk"), rel_chunk,
                         dict(long_name="relative L2 error of the chunk's latent frames vs dense", units="1")),
        "seconds": (dims, seconds, dict(long_name="wall time of sampling one video", units="s")),
    }
    coords: dict[str, Any] = {
        "spec": ("spec", labels),
        "attention": ("spec", attention, dict(long_name="--attention spec")),
        "family": ("spec", ["dense", *(spec_family(s) for s in specs)], dict(long_name="backend family")),
        "density": ("spec", [_nan(spec_density(s, layout)) for s in attention],
                    dict(long_name="fraction of dense attention entries kept", units="1")),
        "prompt": ("prompt", [str(p) for p in prompts]),
        "seed": ("seed", np.asarray(seeds, dtype=np.int64)),
        "chunk": ("chunk", np.arange(n_chunks)),
    }
    if psnr is not None:
        data["psnr"] = ((*dims, "frame"), psnr, dict(long_name="peak signal-to-noise ratio of the frame vs dense",
                                                     units="dB", data_range=1.0))
        data["ssim"] = ((*dims, "frame"), ssim, dict(long_name="structural similarity of the frame vs dense",
                                                     units="1", data_range=1.0))
        coords["frame"] = ("frame", np.arange(psnr.shape[-1]))
        coords["chunk_of_frame"] = ("frame", chunk_of_frame, dict(long_name="chunk of the frame"))
    if evaluate:
        names = {"colour_match": "present colours are exactly the prompt's (sprite evaluator)",
                 "persistence": "fraction of (prompted sprite, frame) pairs seen (sprite evaluator)",
                 "score": "clip passes every sprite-evaluator check"}
        for key, values in adherence.items():
            data[key] = (dims, values, dict(long_name=names[key], units="1"))
    ds = xr.Dataset({k: xr.Variable(*v) for k, v in data.items()},
                    coords={k: xr.Variable(*v) for k, v in coords.items()})
    prov = base.provenance()
    ds.attrs.update(
        title="attention approximations vs dense, same noise",
        Conventions="CF-1.8",
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        toolkit_version=__version__,
        model=base.name,
        checkpoint=str(prov.get("checkpoint", "")),
        checkpoint_sha256=str(prov.get("checkpoint_sha256") or ""),
        specs=json.dumps(specs),
        seeds=np.asarray(seeds, dtype=np.int64),
        prompts=json.dumps([str(p) for p in prompts]),
        device=str(base.device),
        compute_dtype=prov["compute_dtype"],
        torch_version=str(torch.__version__),
        noise="toolkit",
        frames_per_chunk=int(fpc),
        grid=list(layout.grid),
        pixels=pixels_note,
    )
    return ds


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _evaluate(out: dict[str, np.ndarray], index: tuple[int, int, int], pixels: np.ndarray, prompt: str,
              frames_per_chunk: int) -> None:
    from toolkit.models.bundled import data
    from toolkit.models.bundled.evaluate import evaluate_clips

    try:
        parsed = data.parse_prompt(prompt)
    except (ValueError, ToolkitError):
        return  # not a sprite prompt the evaluator can read: adherence stays NaN
    (m,) = evaluate_clips(torch.from_numpy(pixels).float()[None], [parsed], frames_per_chunk=frames_per_chunk)
    out["colour_match"][index] = float(m.colour_match)
    out["persistence"][index] = m.persistence
    out["score"][index] = m.score


# ---- results --------------------------------------------------------------------------------------------------
def summarise(ds: xr.Dataset) -> list[dict[str, Any]]:
    """One row per spec (reference first): mean rel L2, PSNR (``mean_psnr`` over all frames, prompts and seeds),
    SSIM, fraction of frames identical to dense, adherence score, persistence and seconds per video."""
    rows = []
    for label in ds["spec"].values.tolist():
        d = ds.sel(spec=label)
        row: dict[str, Any] = {"spec": "dense (reference)" if label == REFERENCE else label,
                               "density": float(d["density"]), "rel_l2": float(d["rel_l2"].mean()),
                               "seconds": float(d["seconds"].mean())}
        if "psnr" in ds:
            row["psnr"] = mean_psnr(d["psnr"].values)
            row["ssim"] = float(d["ssim"].mean())
            row["identical"] = float(np.isinf(d["psnr"].values).mean())
        if "score" in ds:
            row["score"] = float(d["score"].mean())
            row["colour_match"] = float(d["colour_match"].mean())
            row["persistence"] = float(d["persistence"].mean())
        rows.append(row)
    return rows


def quality_table(ds: xr.Dataset) -> str:
    """The printed table: one row per spec (``summarise``)."""
    rows = summarise(ds)
    cols = [("spec", "spec", "{}"), ("density", "density", "{:.3f}"), ("rel_l2", "rel L2", "{:.3g}")]
    if "psnr" in ds:
        cols += [("psnr", "PSNR dB", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"), ("identical", "ident.", "{:.0%}")]
    if "score" in ds:
        cols += [("score", "score", "{:.2f}"), ("colour_match", "colour", "{:.2f}"),
                 ("persistence", "persist.", "{:.3f}")]
    cols += [("seconds", "s/video", "{:.2f}")]
    cells = [[h for _, h, _ in cols]]
    for row in rows:
        cells.append([("-" if isinstance(row[k], float) and math.isnan(row[k]) else fmt.format(row[k]))
                      for k, _, fmt in cols])
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    clips = f"{ds.sizes['prompt']} prompt(s) x {ds.sizes['seed']} seed(s)"
    notes = [f"{ds.attrs.get('model')}: means over {clips}; rel L2 of the latents"
             + ("" if ds.attrs.get("model") != "bundled" else " (pixels in [-1, 1])")]
    if "psnr" in ds:
        notes.append("PSNR: mean over the frames that differ from dense (inf: all identical); ident.: frames equal "
                     "to dense")
    else:
        notes.append(str(ds.attrs.get("pixels", "latent metrics only")))
    return "\n".join(lines + notes)


def write_quality(ds: xr.Dataset, path: str | Path) -> Path:
    """netCDF4 (h5netcdf) of a ``compare_attention`` result; ``xr.open_dataset(path)`` reads it back."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    ds.to_netcdf(tmp, engine="h5netcdf")
    tmp.replace(path)
    return path


__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "REFERENCE", "backend_density", "compare_attention", "frame_metrics",
    "mean_psnr", "parse_prompts", "quality_table", "relative_l2", "require_metrics", "spec_density", "spec_family",
    "summarise", "write_quality",
]
