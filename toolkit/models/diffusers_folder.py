"""A diffusers pipeline saved in a local folder (``save_pretrained``) as a model to run: loaded offline with its own
scheduler, and probed for what its transformer will see (input shape, forward keywords, timesteps) before the run,
so a capture's layout can be fixed up front (``toolkit capture --diffusers PATH``; ``docs/adapters.md``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from toolkit.errors import ToolkitError, WeightsNotFound

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


def load_pipeline(path: str | os.PathLike, *, device: torch.device | str = "cpu",
                  dtype: torch.dtype | None = None) -> DiffusionPipeline:
    """``DiffusionPipeline.from_pretrained(path)`` without network access, on ``device`` in ``dtype`` (None: as
    saved); one-line errors for a missing folder, a folder that is not a pipeline, or one without a transformer."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise WeightsNotFound(f"--diffusers {path}: no model_index.json there (a folder written by a diffusers "
                              "pipeline's save_pretrained)")
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        raise ToolkitError("--diffusers needs diffusers: pip install 'toolkit[video]'") from None
    import json

    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    # components saved as absent (e.g. no VAE: the capture stops at latents) must be passed as None explicitly
    kwargs = {k: None for k, v in index.items() if isinstance(v, list) and v[:1] == [None]}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ToolkitError(f"--diffusers {path}: cannot load the pipeline ({first})") from None
    if getattr(pipe, "transformer", None) is None:
        raise ToolkitError(f"--diffusers {path}: {type(pipe).__name__} has no transformer to capture")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@dataclass(frozen=True)
class TransformerCall:
    """What the pipeline's transformer receives at its first call: the ``hidden_states`` shape, its other
    forward arguments by name, and the scheduler's timesteps of the whole run; with the call's effective
    ``guidance_scale`` (given or the pipeline's default; None if it has none)."""

    latent_shape: tuple[int, ...]
    kwargs: dict
    timesteps: tuple[float, ...]
    guidance_scale: float | None = None


class _FirstCall(Exception):
    """Raised by the probe hook to stop the pipeline at its transformer's first call."""


def probe(pipe: DiffusionPipeline, call: dict) -> TransformerCall:
    """Run ``pipe(**call)`` up to its transformer's first call (text encoding and latent preparation only) and
    return what that call gets; the scheduler has set its timesteps by then."""
    import inspect

    seen: dict = {}
    transformer = pipe.transformer

    def stop(module, args, kwargs):
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        seen.update(bound)
        raise _FirstCall

    handle = transformer.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(**call)
    except _FirstCall:
        pass
    except (TypeError, ValueError) as err:  # an unknown pipeline argument, or one its check_inputs refuses
        raise ToolkitError(f"{type(pipe).__name__}: {(str(err).strip() or type(err).__name__).splitlines()[0]}") \
            from None
    finally:
        handle.remove()
    if not seen:
        raise ToolkitError(f"{type(pipe).__name__} finished without calling its transformer")
    hidden = seen.pop("hidden_states")
    timesteps = tuple(float(t) for t in pipe.scheduler.timesteps)
    plain = {k: v for k, v in seen.items() if isinstance(v, (int, float, str, bool)) or v is None}
    default = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
    scale = call.get("guidance_scale", None if default is None else default.default)
    return TransformerCall(tuple(hidden.shape), plain, timesteps,
                           float(scale) if isinstance(scale, (int, float)) else None)
