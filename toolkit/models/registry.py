"""Model names -> architecture, sampler defaults, and where their weights are looked for.

``load_model(name)`` finds the weights without asking: ``--checkpoint PATH``, then an environment variable, then
the standard Hugging Face cache read offline (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``), then a local folder (the paths Self-Forcing's README downloads to). A user who ran
the ``huggingface-cli download`` commands needs nothing else. If nothing is found it raises ``WeightsNotFound``
listing every path tried and the exact download commands: there is never a silent substitute.

The text encoder and VAE of both real models come from the Wan2.1-T2V-1.3B folder: ``wan_file(relpath)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from toolkit.errors import CheckpointError, ToolkitError, WeightsNotFound
from toolkit.models import checkpoints as ck
from toolkit.models.layout import RunLayout
from toolkit.models.sampling import Sampler, sampler_from

SF_REPO, SF_FILE = "gdhe17/Self-Forcing", "checkpoints/self_forcing_dmd.pt"
WAN_REPO = "Wan-AI/Wan2.1-T2V-1.3B"
WAN_DIFFUSERS_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
WAN_ENV = "TOOLKIT_WAN_DIR"
SF_ENV = "TOOLKIT_SELF_FORCING_CKPT"
WAN_LOCAL_DIR = Path("wan_models/Wan2.1-T2V-1.3B")  # Self-Forcing README's --local-dir
# Files of the Wan2.1-T2V-1.3B release used by both real models (text conditioning and pixels).
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
VAE_FILE = "Wan2.1_VAE.pth"
WAN_ASSETS = {"text encoder": T5_FILE, "tokenizer": TOKENIZER_DIR, "VAE": VAE_FILE}


def _download_sf() -> list[str]:
    return [f"huggingface-cli download {SF_REPO} {SF_FILE}"]


def _download_wan(*files: str) -> list[str]:
    return [f"huggingface-cli download {WAN_REPO}" + "".join(f" {f}" for f in files)]


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, resolved as huggingface_hub does (read offline, never written)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def hf_snapshot_candidates(repo: str, relpath: str) -> tuple[str, list[Path]]:
    """(glob pattern shown to the user, existing matches) for ``relpath`` inside ``repo``'s cached snapshots.

    The snapshot named by ``refs/main`` comes first, then the others newest first.
    """
    root = hf_hub_cache() / f"models--{repo.replace('/', '--')}"
    pattern = root / "snapshots" / "*" / relpath
    snapshots = [p for p in (root / "snapshots").glob("*") if p.is_dir()]
    snapshots.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    ref = root / "refs" / "main"
    if ref.is_file():
        main = root / "snapshots" / ref.read_text().strip()
        snapshots.sort(key=lambda p: p != main)
    return str(pattern), [s / relpath for s in snapshots if (s / relpath).exists()]


@dataclass(frozen=True)
class Location:
    """One place weights are looked for: ``label`` (shown), ``pattern`` (the path or glob), first ``found`` match."""

    label: str
    pattern: str
    found: Path | None


@dataclass(frozen=True)
class ModelSpec:
    """Everything the toolkit knows about a model by name; code asks the spec, never the name."""

    name: str
    description: str
    causal: bool
    config: Callable[[], Any]  # -> WanConfig (a function: the bundled model's config is imported lazily)
    # the sampling loop's settings and the clip size in pixels, for a config (None: ``config()``); a checkpoint's
    # own config may carry its own clip (the bundled family keeps it in ``extra``)
    sampler: Callable[[Any | None], dict[str, Any]]
    locations: Callable[[], list[Location]]
    download: Callable[[], list[str]]
    accepts: str  # what a --checkpoint for this model may be
    default_prompt: str
    conditioning: str = "umt5"  # "umt5": umT5-XXL embeddings (Wan folder); "toy": the bundled model's toy prompts
    output: str = "wan-vae"  # "wan-vae": latents, decoded to mp4 by the Wan VAE; "pixels": PNG strip + GIF
    spatial_compression: int = 8  # pixels per latent cell (Wan VAE 8; the bundled model works on pixels: 1)
    # Config fields a checkpoint's config.json must share with ``config()``: what the conditioning and output
    # fix (the toy prompt encoder's width and length, pixel channels). Other fields may differ (variants).
    interface: tuple[str, ...] = ()
    # The config a checkpoint's own config.json completes (None: ``config``). The bundled model's ``config`` is the
    # shipped folder's, which also records what those weights trained on (``extra``); other weights must not
    # inherit that, so their config.json completes the family's defaults instead.
    architecture: Callable[[], Any] | None = None

    @property
    def uses_wan_assets(self) -> bool:
        """Needs the Wan2.1 folder's text encoder (and VAE for video)."""
        return self.conditioning == "umt5"

    def make_sampler(self, cfg: Any | None = None) -> Sampler:
        return sampler_from(self.sampler(cfg))

    def latent_shape(self, cfg: Any | None = None) -> tuple[int, int, int, int]:
        """(channels, latent frames, latent height, latent width) of one clip."""
        cfg = cfg or self.config()
        s, c = self.sampler(cfg), self.spatial_compression
        return cfg.in_dim, s["latent_frames"], s["height"] // c, s["width"] // c

    def layout(self, cfg: Any | None = None) -> RunLayout:
        """The run's shape as the seams will see it, from the config and sampler alone (no weights)."""
        cfg = cfg or self.config()
        _, frames, height, width = self.latent_shape(cfg)
        pt, ph, pw = cfg.patch_size
        return self.make_sampler(cfg).layout(cfg, (frames // pt, height // ph, width // pw))


def _env(var: str, is_valid: Callable[[Path], bool]) -> Location:
    value = os.environ.get(var)
    path = Path(value).expanduser() if value else None
    return Location(f"${var}", str(path) if path else "(unset)", path if path and is_valid(path) else None)


def _is_dit_dir(p: Path) -> bool:
    return p.is_dir() and ((p / ck.SAFETENSORS_NAME).is_file() or (p / ck.SAFETENSORS_INDEX_NAME).is_file())


def _wan_dit_dir(p: Path) -> bool:
    return _is_dit_dir(p) or _is_dit_dir(p / "transformer")


def _self_forcing_locations() -> list[Location]:
    pattern, found = hf_snapshot_candidates(SF_REPO, SF_FILE)
    local = Path(SF_FILE)
    return [
        _env(SF_ENV, Path.is_file),
        Location("Hugging Face cache", pattern, found[0] if found else None),
        Location("local", str(local.resolve()), local.resolve() if local.is_file() else None),
    ]


def _wan_locations() -> list[Location]:
    pattern, found = hf_snapshot_candidates(WAN_REPO, ck.SAFETENSORS_NAME)
    # the diffusers repo's transformer/ may hold one file or shards
    dpattern, dfound = hf_snapshot_candidates(WAN_DIFFUSERS_REPO, "transformer")
    dfound = [p for p in dfound if _is_dit_dir(p)]
    env = _env(WAN_ENV, _wan_dit_dir)
    if env.found and not _is_dit_dir(env.found):
        env = Location(env.label, env.pattern, env.found / "transformer")
    local = WAN_LOCAL_DIR.resolve()
    return [
        env,
        Location("Hugging Face cache", pattern, found[0].parent if found else None),
        Location("Hugging Face cache (diffusers)", dpattern, dfound[0] if dfound else None),
        Location("local", str(local), local if _is_dit_dir(local) else None),
    ]


def _wan_1p3b_config() -> Any:
    from toolkit.models.wan import WanConfig

    return WanConfig()


# The bundled model (toolkit/models/bundled/): ``DEFAULT_DIR`` holding ``WEIGHTS_FILE``
# (native names) and ``CONFIG_FILE`` (WanConfig.to_dict() + training notes); ``bundled_config()`` as fallback.
def _bundled() -> Any:
    try:
        from toolkit.models import bundled
    except ImportError as err:
        raise ToolkitError(f"the bundled model is not available in this installation ({err})") from err
    return bundled


def _bundled_config() -> Any:
    import json

    from toolkit.models.wan import WanConfig

    b = _bundled()
    config = Path(b.DEFAULT_DIR) / b.CONFIG_FILE
    if not config.is_file():
        return b.bundled_config()
    try:
        return WanConfig.from_dict(json.loads(config.read_text()))
    except (OSError, ValueError) as err:  # unreadable or not JSON
        raise CheckpointError(f"cannot parse {config}: {err}") from None
    except CheckpointError as err:  # out of bounds
        raise CheckpointError(f"{config}: {err}") from None


def _bundled_locations() -> list[Location]:
    b = _bundled()
    path = Path(b.DEFAULT_DIR) / b.WEIGHTS_FILE
    return [Location("bundled with the toolkit", str(path), path if path.is_file() else None)]


def _bundled_sampler(cfg: Any | None = None) -> dict[str, Any]:
    b = _bundled()
    cfg = cfg or _bundled_config()
    frames, height, width = b.clip_shape(cfg)
    return {"sampler": "self-forcing", "frames_per_chunk": b.frames_per_chunk(cfg),
            "denoising_steps": (1000, 750, 500, 250),
            "shift": 5.0, "latent_frames": frames, "height": height, "width": width}


REAL_DEFAULT_PROMPT = "A white SUV drives along a winding mountain road at sunset, cinematic, high detail"
SELF_FORCING_SAMPLER = {
    "sampler": "self-forcing",
    "frames_per_chunk": 3,
    "denoising_steps": (1000, 750, 500, 250),
    "shift": 5.0,
    "latent_frames": 21,
    "height": 480,
    "width": 832,
    "fps": 16,
}
WAN_SAMPLER = {
    "sampler": "wan",
    "steps": 50,
    "shift": 5.0,
    "guidance_scale": 5.0,
    "latent_frames": 21,
    "height": 480,
    "width": 832,
    "fps": 16,
}

MODELS: dict[str, ModelSpec] = {
    "bundled": ModelSpec(
        name="bundled",
        description="small autoregressive video DiT trained on procedural videos (ships with the toolkit)",
        causal=True,
        config=_bundled_config,
        sampler=_bundled_sampler,
        locations=_bundled_locations,
        download=lambda: ["toolkit train --out data/bundled  (one GPU, about an hour on an H200; normally shipped)"],
        accepts="a checkpoint of the bundled architecture (any supported layout)",
        default_prompt="3 sprites: red circle left, blue square top-right, yellow triangle bottom; pan left",
        conditioning="toy",
        output="pixels",
        spatial_compression=1,
        interface=("in_dim", "out_dim", "text_dim", "text_len"),
        architecture=lambda: _bundled().bundled_config(),
    ),
    "self-forcing": ModelSpec(
        name="self-forcing",
        description="Self-Forcing (causal, KV cache, 4-step DMD) on Wan2.1-T2V-1.3B",
        causal=True,
        config=_wan_1p3b_config,
        sampler=lambda cfg=None: dict(SELF_FORCING_SAMPLER),
        locations=_self_forcing_locations,
        download=_download_sf,
        accepts="a Self-Forcing .pt (or any supported layout of the 1.3B DiT)",
        default_prompt=REAL_DEFAULT_PROMPT,
    ),
    "wan2.1-t2v-1.3b": ModelSpec(
        name="wan2.1-t2v-1.3b",
        description="Wan2.1-T2V-1.3B, bidirectional, flow matching with classifier-free guidance",
        causal=False,
        config=_wan_1p3b_config,
        sampler=lambda cfg=None: dict(WAN_SAMPLER),
        locations=_wan_locations,
        download=lambda: _download_wan(),
        accepts="the Wan2.1-T2V-1.3B folder, a diffusion_pytorch_model.safetensors, or a diffusers folder",
        default_prompt=REAL_DEFAULT_PROMPT,
    ),
}
DEFAULT_MODEL = "bundled"


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ToolkitError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def _not_found(what: str, tried: list[str], commands: list[str]) -> WeightsNotFound:
    return WeightsNotFound(
        f"{what} not found. Tried: " + "; ".join(tried) + ". Download with: " + " && ".join(commands)
        + f" (Hugging Face cache: {hf_hub_cache()})"
    )


def find_weights(name: str, checkpoint: str | os.PathLike[str] | None = None) -> Path:
    """Path of the weights of model ``name`` (an explicit ``checkpoint`` wins), or ``WeightsNotFound``."""
    spec = get_spec(name)
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if path.exists():
            return path
        raise _not_found(f"checkpoint for {name}", [f"--checkpoint {path}"], spec.download())
    locations = spec.locations()
    for loc in locations:
        if loc.found is not None:
            return loc.found
    raise _not_found(f"weights for {name}", [f"{loc.label} {loc.pattern}" for loc in locations], spec.download())


def wan_file(relpath: str) -> Path:
    """A file (or folder) of the Wan2.1-T2V-1.3B release (T5, VAE, tokenizer), or ``WeightsNotFound``.

    Looked for under ``$TOOLKIT_WAN_DIR``, the Hugging Face cache snapshots of Wan-AI/Wan2.1-T2V-1.3B, and
    ``wan_models/Wan2.1-T2V-1.3B``.
    """
    env = os.environ.get(WAN_ENV)
    pattern, found = hf_snapshot_candidates(WAN_REPO, relpath)
    local = WAN_LOCAL_DIR.resolve() / relpath
    candidates = ([Path(env).expanduser() / relpath] if env else []) + found + [local]
    for p in candidates:
        if p.exists():
            return p
    tried = [f"${WAN_ENV} " + (str(candidates[0]) if env else "(unset)"), f"Hugging Face cache {pattern}",
             f"local {local}"]
    raise _not_found(f"{relpath} (from {WAN_REPO})", tried, _download_wan(relpath))


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ModelInfo:
    """Provenance of a loaded model (goes into capture files and run logs)."""

    name: str
    causal: bool
    checkpoint: Path
    files: list[Path]
    sha256: str | None
    format: str
    entry: str | None
    config: dict[str, Any]
    sampler: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "causal": self.causal,
            "checkpoint": str(self.checkpoint),
            "checkpoint_files": [str(f) for f in self.files],
            "checkpoint_sha256": self.sha256,
            "checkpoint_format": self.format,
            "checkpoint_entry": self.entry,
            "config": self.config,
            "sampler": {k: list(v) if isinstance(v, tuple) else v for k, v in self.sampler.items()},
        }


def check_identity(spec: ModelSpec, ckpt: ck.Checkpoint, base: Any) -> None:
    """A model name and a checkpoint that disagree is an error, never a substitute: a config.json that declares
    another registry model (the toolkit writes ``extra.model``), or one whose fields fixed by the model's
    conditioning and output (``spec.interface``) differ, is refused naming both."""
    where = ckpt.config_path or ckpt.path
    declared = ckpt.declared_model
    if declared is not None and declared != spec.name:
        hint = f"; use --model {declared}" if declared in MODELS else ""
        raise CheckpointError(f"{where} declares model '{declared}', not {spec.name}: a model name and a checkpoint "
                              f"must agree{hint}")
    wrong = [f"{k} {ckpt.config[k]!r} (model {getattr(base, k)!r})" for k in spec.interface
             if k in ckpt.config and ckpt.config[k] != getattr(base, k)]
    if wrong:
        raise CheckpointError(f"{where} does not fit model {spec.name} ({spec.accepts}): " + ", ".join(wrong))


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPU (as Self-Forcing runs), fp32 on CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_model(name: str = DEFAULT_MODEL, checkpoint: str | os.PathLike[str] | None = None, *,
               device: torch.device | str = "cpu", dtype: torch.dtype | None = None, use_ema: bool = True,
               sha256: bool = True) -> tuple[torch.nn.Module, ModelInfo]:
    """Find, read, validate (strictly) and load model ``name``; returns ``(model.eval(), info)``.

    A ``config.json`` next to the weights overrides the registry's architecture (and is then what is validated),
    after its bounds are checked; one that declares another model, or changes what the model's conditioning fixes
    (``ModelSpec.interface``), is refused (``check_identity``).
    """
    from toolkit.models.wan import WanConfig, WanModel

    spec = get_spec(name)
    path = find_weights(name, checkpoint)
    ckpt = ck.read_checkpoint(path, use_ema=use_ema)
    base = spec.config()
    check_identity(spec, ckpt, base)
    cfg = base
    try:
        if ckpt.config:
            family = (spec.architecture or spec.config)()
            cfg = WanConfig.from_dict({**family.to_dict(), **ckpt.config})
    except CheckpointError as err:  # bounds checked before anything is sized from the config
        raise CheckpointError(f"{ckpt.config_path}: {err}") from None
    ck.validate_state_dict(ckpt.state_dict, ck.native_param_shapes(cfg), ckpt.path)
    dtype = dtype or default_dtype(device)
    # Build without initialising (every parameter is overwritten by the strict load; RoPE tables are computed
    # lazily outside the state dict), then copy the checkpoint in, casting to ``dtype``.
    with torch.device("meta"):
        model = WanModel(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.load_state_dict(ckpt.state_dict, strict=True)
    info = ModelInfo(
        name=name, causal=spec.causal, checkpoint=ckpt.path, files=ckpt.files,
        sha256=ck.checkpoint_sha256(ckpt.files) if sha256 else None, format=ckpt.format, entry=ckpt.entry,
        config=cfg.to_dict(), sampler=spec.sampler(cfg),
    )
    return model.eval(), info
