"""Reading and writing Wan DiT checkpoints in every published layout, through ONE key-mapping table.

Our model (``toolkit.models.wan.WanModel``) uses the native Wan names (``docs/self-forcing.md``,
"Native Wan names"). Files come as

* **Self-Forcing ``.pt``** (``gdhe17/Self-Forcing``, ``checkpoints/self_forcing_dmd.pt``):
  ``{'generator_ema': {'model.' + native: fp32}, 'generator': ...}``; FSDP / activation-checkpointing /
  ``torch.compile`` wrappers may add ``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``, ``_orig_mod.``.
* **Wan native** (``Wan-AI/Wan2.1-T2V-1.3B``): ``diffusion_pytorch_model.safetensors`` with bare native names,
  ``config.json`` beside it. ComfyUI files carry the prefix ``model.diffusion_model.``.
* **diffusers** (``WanTransformer3DModel``): diffusers names, single file or shards listed in
  ``diffusion_pytorch_model.safetensors.index.json``, diffusers ``config.json``.

Every reader returns native names; every writer takes native names. Validation is strict: missing,
unexpected and wrong-shaped tensors are reported by name (``CheckpointError``), and an unreadable file gives a
one-line error naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from toolkit.errors import CheckpointError

# ---------------------------------------------------------------------------------------------------------------
# The key-mapping table: native Wan name <-> diffusers name (docs/self-forcing.md "diffusers names").
# Each row is a *full-name* pattern; ``{N}`` is a block index, ``{p}`` is ``weight`` or ``bias``. Matching whole
# names (not ordered substring replacement as diffusers' converter does) makes ``head.modulation`` vs
# ``blocks.N.modulation`` and the norm2/norm3 swap unambiguous in both directions.
# Native ``norm1``, ``norm2`` and ``head.norm`` have no parameters, so native ``norm3`` (the affine
# cross-attention norm) is the only norm row: it is diffusers' ``norm2``.
# ---------------------------------------------------------------------------------------------------------------
KEY_TABLE: tuple[tuple[str, str], ...] = (
    ("patch_embedding.{p}", "patch_embedding.{p}"),
    ("text_embedding.0.{p}", "condition_embedder.text_embedder.linear_1.{p}"),
    ("text_embedding.2.{p}", "condition_embedder.text_embedder.linear_2.{p}"),
    ("time_embedding.0.{p}", "condition_embedder.time_embedder.linear_1.{p}"),
    ("time_embedding.2.{p}", "condition_embedder.time_embedder.linear_2.{p}"),
    ("time_projection.1.{p}", "condition_embedder.time_proj.{p}"),
    ("head.head.{p}", "proj_out.{p}"),
    ("head.modulation", "scale_shift_table"),
    ("blocks.{N}.self_attn.q.{p}", "blocks.{N}.attn1.to_q.{p}"),
    ("blocks.{N}.self_attn.k.{p}", "blocks.{N}.attn1.to_k.{p}"),
    ("blocks.{N}.self_attn.v.{p}", "blocks.{N}.attn1.to_v.{p}"),
    ("blocks.{N}.self_attn.o.{p}", "blocks.{N}.attn1.to_out.0.{p}"),
    ("blocks.{N}.self_attn.norm_q.weight", "blocks.{N}.attn1.norm_q.weight"),
    ("blocks.{N}.self_attn.norm_k.weight", "blocks.{N}.attn1.norm_k.weight"),
    ("blocks.{N}.cross_attn.q.{p}", "blocks.{N}.attn2.to_q.{p}"),
    ("blocks.{N}.cross_attn.k.{p}", "blocks.{N}.attn2.to_k.{p}"),
    ("blocks.{N}.cross_attn.v.{p}", "blocks.{N}.attn2.to_v.{p}"),
    ("blocks.{N}.cross_attn.o.{p}", "blocks.{N}.attn2.to_out.0.{p}"),
    ("blocks.{N}.cross_attn.norm_q.weight", "blocks.{N}.attn2.norm_q.weight"),
    ("blocks.{N}.cross_attn.norm_k.weight", "blocks.{N}.attn2.norm_k.weight"),
    ("blocks.{N}.norm3.{p}", "blocks.{N}.norm2.{p}"),
    ("blocks.{N}.ffn.0.{p}", "blocks.{N}.ffn.net.0.proj.{p}"),
    ("blocks.{N}.ffn.2.{p}", "blocks.{N}.ffn.net.2.{p}"),
    ("blocks.{N}.modulation", "blocks.{N}.scale_shift_table"),
)

# Wrapper fragments that training frameworks insert into names (FSDP, activation checkpointing, torch.compile).
WRAPPER_FRAGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
SELF_FORCING_PREFIX = "model."
COMFYUI_PREFIX = "model.diffusion_model."

SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
SAFETENSORS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"


class KeyTable:
    """Full-name rename rules ``(left, right)`` with ``{N}`` = an integer and ``{p}`` = weight|bias, usable both ways.

    Also used for the T5 and VAE weights (text_encoder.py, vae.py)."""

    def __init__(self, rows: tuple[tuple[str, str], ...]) -> None:
        self.rows = rows
        self._fwd = [(self._compile(a), b) for a, b in rows]
        self._bwd = [(self._compile(b), a) for a, b in rows]

    @staticmethod
    def _compile(pattern: str) -> re.Pattern[str]:
        rx = re.escape(pattern).replace(r"\{N\}", r"(?P<N>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
        return re.compile(rx + r"\Z")

    @staticmethod
    def _apply(name: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
        for rx, target in rules:
            m = rx.match(name)
            if m:
                return target.format(**m.groupdict())
        raise KeyError(f"no rename rule matches {name!r}")

    def forward(self, name: str) -> str:
        """left name -> right name (KeyError if no rule matches)."""
        return self._apply(name, self._fwd)

    def backward(self, name: str) -> str:
        """right name -> left name (KeyError if no rule matches)."""
        return self._apply(name, self._bwd)


_WAN_DIFFUSERS = KeyTable(KEY_TABLE)


def native_to_diffusers(name: str) -> str:
    """Native Wan parameter name -> diffusers ``WanTransformer3DModel`` name (KeyError if unknown)."""
    return _WAN_DIFFUSERS.forward(name)


def diffusers_to_native(name: str) -> str:
    """diffusers ``WanTransformer3DModel`` parameter name -> native Wan name (KeyError if unknown)."""
    return _WAN_DIFFUSERS.backward(name)


# ---------------------------------------------------------------------------------------------------------------
# Names and shapes from a config alone (no weights): used for validation, sizes and the bijection test.
# ---------------------------------------------------------------------------------------------------------------
def _cfg(cfg: Any, key: str) -> Any:
    return cfg[key] if isinstance(cfg, Mapping) else getattr(cfg, key)


def native_param_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """Every parameter of a Wan DiT with config ``cfg`` (a WanConfig or its dict): native name -> shape.

    1.3B config: 825 tensors, 1,418,996,800 parameters (``docs/self-forcing.md`` "Architecture (Wan2.1-T2V-1.3B)").
    """
    dim, ffn = _cfg(cfg, "dim"), _cfg(cfg, "ffn_dim")
    in_dim, out_dim = _cfg(cfg, "in_dim"), _cfg(cfg, "out_dim")
    text_dim, freq_dim = _cfg(cfg, "text_dim"), _cfg(cfg, "freq_dim")
    pt, ph, pw = tuple(_cfg(cfg, "patch_size"))
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (dim, in_dim, pt, ph, pw),
        "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, text_dim),
        "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim),
        "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, freq_dim),
        "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim),
        "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim),
        "time_projection.1.bias": (6 * dim,),
    }
    for n in range(_cfg(cfg, "num_layers")):
        b = f"blocks.{n}"
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"{b}.{attn}.{proj}.weight"] = (dim, dim)
                shapes[f"{b}.{attn}.{proj}.bias"] = (dim,)
            shapes[f"{b}.{attn}.norm_q.weight"] = (dim,)
            shapes[f"{b}.{attn}.norm_k.weight"] = (dim,)
        shapes[f"{b}.norm3.weight"] = (dim,)
        shapes[f"{b}.norm3.bias"] = (dim,)
        shapes[f"{b}.ffn.0.weight"] = (ffn, dim)
        shapes[f"{b}.ffn.0.bias"] = (ffn,)
        shapes[f"{b}.ffn.2.weight"] = (dim, ffn)
        shapes[f"{b}.ffn.2.bias"] = (dim,)
        shapes[f"{b}.modulation"] = (1, 6, dim)
    shapes["head.head.weight"] = (out_dim * pt * ph * pw, dim)
    shapes["head.head.bias"] = (out_dim * pt * ph * pw,)
    shapes["head.modulation"] = (1, 2, dim)
    return shapes


def param_count(cfg: Any) -> int:
    """Number of parameters of the DiT described by ``cfg``."""
    total = 0
    for shape in native_param_shapes(cfg).values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


# ---------------------------------------------------------------------------------------------------------------
# config.json <-> WanConfig fields
# ---------------------------------------------------------------------------------------------------------------
CONFIG_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "patch_size", "text_dim",
                 "text_len", "freq_dim", "eps")


def config_from_json(d: Mapping[str, Any]) -> dict[str, Any]:
    """WanConfig keyword arguments from a Wan-native or diffusers ``config.json`` dict.

    Only keys present in the file are returned (Wan's file omits patch_size/text_dim, which keep the WanConfig
    defaults); keys of other tools (``_class_name``, ``model_type``, ...) are ignored. A toolkit config.json's
    ``extra`` (the bundled family's clip size, chunk length, prompt encoding) and ``prediction`` are kept: those facts
    belong to the checkpoint, not to the registry's default config.
    """
    if "num_attention_heads" in d:  # diffusers WanTransformer3DModel
        out: dict[str, Any] = {
            "num_heads": d["num_attention_heads"],
            "dim": d["num_attention_heads"] * d["attention_head_dim"],
        }
        renames = {"ffn_dim": "ffn_dim", "num_layers": "num_layers", "in_channels": "in_dim",
                   "out_channels": "out_dim", "patch_size": "patch_size", "text_dim": "text_dim",
                   "freq_dim": "freq_dim", "eps": "eps"}
        out.update({ours: d[theirs] for theirs, ours in renames.items() if theirs in d})
    else:
        out = {k: d[k] for k in CONFIG_FIELDS if k in d}
    if "patch_size" in out:
        out["patch_size"] = tuple(out["patch_size"])
    if isinstance(d.get("extra"), dict):
        out["extra"] = dict(d["extra"])
    if "prediction" in d:  # a toolkit config.json of an x0-predicting model (never a released Wan)
        out["prediction"] = d["prediction"]
    return out


def diffusers_config(cfg: Any) -> dict[str, Any]:
    """A diffusers ``WanTransformer3DModel`` config.json dict for ``cfg``."""
    heads = _cfg(cfg, "num_heads")
    return {
        "_class_name": "WanTransformer3DModel",
        "num_attention_heads": heads,
        "attention_head_dim": _cfg(cfg, "dim") // heads,
        "ffn_dim": _cfg(cfg, "ffn_dim"),
        "num_layers": _cfg(cfg, "num_layers"),
        "in_channels": _cfg(cfg, "in_dim"),
        "out_channels": _cfg(cfg, "out_dim"),
        "patch_size": list(_cfg(cfg, "patch_size")),
        "text_dim": _cfg(cfg, "text_dim"),
        "freq_dim": _cfg(cfg, "freq_dim"),
        "eps": _cfg(cfg, "eps"),
        "qk_norm": "rms_norm_across_heads",
        "cross_attn_norm": True,
        "rope_max_seq_len": 1024,
    }


def native_config(cfg: Any) -> dict[str, Any]:
    """A Wan-native config.json dict for ``cfg`` (all fields written, so nothing depends on defaults)."""
    out = {"_class_name": "WanModel", "model_type": "t2v"}
    out.update({k: _cfg(cfg, k) for k in CONFIG_FIELDS})
    out["patch_size"] = list(out["patch_size"])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A checkpoint read into memory, with native names (tensors may be memory-mapped)."""

    state_dict: dict[str, torch.Tensor]
    path: Path  # what the user pointed at (file or folder)
    files: list[Path]  # every file the tensors came from
    format: str  # "self-forcing" | "wan-native" | "comfyui" | "diffusers"
    entry: str | None = None  # key inside a .pt ("generator_ema" / "generator"), else None
    config: dict[str, Any] = field(default_factory=dict)  # WanConfig kwargs from config.json, if there was one
    config_path: Path | None = None  # the config.json the kwargs came from
    declared_model: str | None = None  # the registry name a toolkit config.json declares (``extra.model``)


def _read_error(path: Path, err: BaseException) -> CheckpointError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return CheckpointError(f"cannot read checkpoint file {path}: corrupt or truncated? ({type(err).__name__}: {first})")


def read_torch_file(path: Path) -> Any:
    """``torch.load`` (weights only, memory-mapped where possible); any failure -> one-line ``CheckpointError``."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # legacy (non-zip) serialisation cannot be memory-mapped
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to parse means an unusable file
        raise _read_error(path, err) from err


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; any failure -> one-line ``CheckpointError`` naming the file."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # noqa: BLE001
        raise _read_error(path, err) from err


def _strip(name: str) -> str:
    for frag in WRAPPER_FRAGMENTS:
        name = name.replace(frag, "")
    return name


def _is_diffusers(names: Iterable[str]) -> bool:
    return any(n.startswith("condition_embedder.") or ".attn1." in n or n == "scale_shift_table" for n in names)


def to_native_names(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Strip wrapper fragments and known prefixes, convert diffusers names; returns (state dict, naming).

    Names that match no rule are kept as they are, so that validation reports them as unexpected.
    """
    sd = {_strip(k): v for k, v in state_dict.items()}
    naming = "wan-native"
    if sd and all(k.startswith(COMFYUI_PREFIX) for k in sd):
        sd = {k[len(COMFYUI_PREFIX):]: v for k, v in sd.items()}
        naming = "comfyui"
    elif sd and all(k.startswith(SELF_FORCING_PREFIX) for k in sd):
        sd = {k[len(SELF_FORCING_PREFIX):]: v for k, v in sd.items()}
        naming = "self-forcing"
    if _is_diffusers(sd):
        out = {}
        for k, v in sd.items():
            try:
                out[diffusers_to_native(k)] = v
            except KeyError:
                out[k] = v
        return out, "diffusers"
    return sd, naming


def _config_of(raw: Any, where: Path) -> tuple[dict[str, Any], Path, str | None]:
    """(WanConfig kwargs, ``where``, the model it declares) of a parsed config dict (``extra.model``)."""
    if not isinstance(raw, dict):
        raise TypeError(f"expected a JSON object, found {type(raw).__name__}")
    extra = raw.get("extra")
    declared = extra.get("model") if isinstance(extra, dict) else None
    return config_from_json(raw), where, declared if isinstance(declared, str) else None


def _read_config(folder: Path) -> tuple[dict[str, Any], Path | None, str | None]:
    """(WanConfig kwargs, the config.json, the model it declares) of a checkpoint folder; ({}, None, None) without."""
    p = folder / CONFIG_NAME
    if not p.is_file():
        return {}, None, None
    try:
        return _config_of(json.loads(p.read_text()), p)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"cannot parse {p}: {err}") from None


def metadata_config(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The config dict (``WanConfig.to_dict()``) a toolkit-written safetensors file keeps in its metadata under
    ``config`` (the bundled model's ``save_weights``); None for a file without one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            stored = (f.metadata() or {}).get("config")
        return json.loads(stored) if stored else None
    except Exception as err:  # noqa: BLE001 - unreadable header or metadata that is not JSON
        raise CheckpointError(f"cannot parse the config in the metadata of {path}: {err}") from None


def _metadata_config(path: Path) -> tuple[dict[str, Any], Path | None, str | None]:
    """As ``_read_config``, from ``metadata_config`` (a training stage's weights file, which has no config.json beside
    it); ({}, None, None) for a file without one."""
    raw = metadata_config(path)
    if not isinstance(raw, dict):
        return {}, None, None
    try:
        return _config_of(raw, path)
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"cannot parse the config in the metadata of {path}: {err}") from None


def _safetensors_files(path: Path) -> list[Path]:
    """The safetensors file(s) of a folder or an index json (shards in index order, deduplicated)."""
    index = path if path.name.endswith(".index.json") else path / SAFETENSORS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"cannot parse shard index {index}: {err}") from err
        return [index.parent / f for f in dict.fromkeys(weight_map.values())]
    single = path / SAFETENSORS_NAME
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found
    raise CheckpointError(
        f"{path}: expected {SAFETENSORS_NAME} or {SAFETENSORS_INDEX_NAME} (found {len(found)} .safetensors files)"
    )


def read_checkpoint(path: str | os.PathLike[str], *, use_ema: bool = True) -> Checkpoint:
    """Read a DiT checkpoint in any supported layout; tensors come back with native Wan names.

    ``path``: a Self-Forcing ``.pt``/``.pth``, a ``.safetensors`` file, a shard-index ``.json``, or a folder
    holding ``diffusion_pytorch_model.safetensors`` (or shards) and ``config.json``. ``use_ema`` picks
    ``generator_ema`` over ``generator`` in a Self-Forcing file (falling back to the one that exists).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    entry = None
    if path.is_dir() and not any(path.glob("*.safetensors")) and (path / "transformer").is_dir():
        path = path / "transformer"  # root of a diffusers pipeline folder
    if path.is_dir() or path.name.endswith(".json"):
        files = _safetensors_files(path)
        raw: dict[str, torch.Tensor] = {}
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"shard listed in the index is missing: {f}")
            raw.update(read_safetensors(f))
        config, config_path, declared = _read_config(path if path.is_dir() else path.parent)
    elif path.suffix == ".safetensors":
        files = [path]
        raw = read_safetensors(path)
        config, config_path, declared = _read_config(path.parent)
        if config_path is None:
            config, config_path, declared = _metadata_config(path)
    else:
        files = [path]
        obj = read_torch_file(path)
        raw, entry = _pick_entry(obj, path, use_ema)
        config, config_path, declared = {}, None, None
    sd, naming = to_native_names(raw)
    if entry is not None and naming in ("self-forcing", "wan-native"):
        naming = "self-forcing"
    return Checkpoint(state_dict=sd, path=path, files=files, format=naming, entry=entry, config=config,
                      config_path=config_path, declared_model=declared)


def _pick_entry(obj: Any, path: Path, use_ema: bool) -> tuple[dict[str, torch.Tensor], str | None]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    order = ("generator_ema", "generator") if use_ema else ("generator", "generator_ema")
    # Self-Forcing's trainer also accepts a bare 'model' entry (ode_init.pt) or a raw state dict.
    for key in (*order, "model", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            return _tensors_only(obj[key], path), key
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), None
    raise CheckpointError(
        f"{path}: no 'generator_ema' or 'generator' entry (top-level keys: {', '.join(map(str, list(obj)[:8]))})"
    )


def _tensors_only(d: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    bad = [k for k, v in d.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: non-tensor entries in the state dict: {', '.join(bad[:5])}")
    return dict(d)


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------
def _listing(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def validate_state_dict(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]],
                        source: str | os.PathLike[str]) -> None:
    """Raise ``CheckpointError`` naming missing, unexpected, wrong-shaped and non-floating tensors (first few of
    each, counts). Integer or bool tensors would be cast silently into float weights by ``load_state_dict``."""
    not_float = [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in state_dict.items()
                 if isinstance(v, torch.Tensor) and not v.dtype.is_floating_point]
    if not_float:
        raise CheckpointError(f"checkpoint {source} holds {len(not_float)} non-floating tensors where weights must be "
                              f"floating point: {_listing(not_float)}")
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {list(state_dict[k].shape)} (model {list(s)})" for k, s in expected.items()
             if k in state_dict and tuple(state_dict[k].shape) != tuple(s)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} wrong shape: {_listing(wrong, 3)}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not match the model config: " + "; ".join(problems))


def load_checkpoint(path: str | os.PathLike[str], cfg: Any, *, use_ema: bool = True) -> Checkpoint:
    """``read_checkpoint`` then strict validation against the names/shapes of ``cfg``."""
    ckpt = read_checkpoint(path, use_ema=use_ema)
    validate_state_dict(ckpt.state_dict, native_param_shapes(cfg), ckpt.path)
    return ckpt


def load_into(model: torch.nn.Module, path: str | os.PathLike[str], *, use_ema: bool = True) -> Checkpoint:
    """Load a checkpoint strictly into ``model`` (its state_dict names are native); casts to the model's dtype."""
    ckpt = read_checkpoint(path, use_ema=use_ema)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    validate_state_dict(ckpt.state_dict, expected, ckpt.path)
    model.load_state_dict(ckpt.state_dict, strict=True)
    return ckpt


# ---------------------------------------------------------------------------------------------------------------
# Writing (tests, benchmarks, conversions)
# ---------------------------------------------------------------------------------------------------------------
def _cpu_contiguous(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_self_forcing(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *,
                      entry: str = "generator_ema") -> Path:
    """Write ``{entry: {'model.' + native: tensor}}`` with ``torch.save`` (the official Self-Forcing layout)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({entry: {SELF_FORCING_PREFIX + k: v for k, v in _cpu_contiguous(state_dict).items()}}, path)
    return path


def save_wan_native(state_dict: Mapping[str, torch.Tensor], folder: str | os.PathLike[str], cfg: Any, *,
                    prefix: str = "") -> Path:
    """Write ``diffusion_pytorch_model.safetensors`` (native names, optional ComfyUI ``prefix``) + config.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v for k, v in _cpu_contiguous(state_dict).items()}, str(folder / SAFETENSORS_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps(native_config(cfg), indent=2))
    return folder


def save_diffusers(state_dict: Mapping[str, torch.Tensor], folder: str | os.PathLike[str], cfg: Any, *,
                   max_shard_bytes: int | None = None) -> Path:
    """Write diffusers-named safetensors (+ config.json); sharded with an index json if ``max_shard_bytes``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {native_to_diffusers(k): v for k, v in _cpu_contiguous(state_dict).items()}
    (folder / CONFIG_NAME).write_text(json.dumps(diffusers_config(cfg), indent=2))
    if max_shard_bytes is None:
        save_file(sd, str(folder / SAFETENSORS_NAME))
        return folder
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name))
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFETENSORS_INDEX_NAME).write_text(json.dumps(index, indent=2))
    return folder


def random_state_dict(cfg: Any, *, seed: int = 0, dtype: torch.dtype = torch.float32, std: float = 0.02,
                      device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Random weights for every native tensor of ``cfg`` (norm weights near 1), for tests and benchmarks.

    ``device="cuda"`` draws them on the GPU (the 1.3B layout takes ~50 s on 2 CPU cores); the writers move
    tensors to the CPU themselves. The values depend on the device's generator, not only on ``seed``."""
    g = torch.Generator(device).manual_seed(seed)
    out = {}
    for k, shape in native_param_shapes(cfg).items():
        t = torch.randn(shape, generator=g, dtype=torch.float32, device=device) * std
        if ".norm_q." in k or ".norm_k." in k or k.endswith("norm3.weight"):
            t += 1.0
        out[k] = t.to(dtype)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Provenance: streaming SHA-256, cached by (path, mtime, size)
# ---------------------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Toolkit cache folder: ``$TOOLKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/toolkit``, else ``~/.cache/toolkit``."""
    if os.environ.get("TOOLKIT_CACHE_DIR"):
        return Path(os.environ["TOOLKIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "toolkit"


def file_sha256(path: str | os.PathLike[str], *, chunk_bytes: int = 1 << 24, cache: bool = True) -> str:
    """SHA-256 hex digest of a file, streamed; with ``cache`` (the default) cached in ``cache_dir()/sha256.json``
    by path, mtime and size, without it computed and nothing written."""
    if not cache:
        return _stream_sha256(path, chunk_bytes)
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_mtime_ns}|{st.st_size}"
    cache_file = cache_dir() / "sha256.json"
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    digest = _stream_sha256(path, chunk_bytes)
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        known[key] = digest
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=0))
        tmp.replace(cache_file)  # atomic: concurrent runs never see half a file
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return digest


def _stream_sha256(path: str | os.PathLike[str], chunk_bytes: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def checkpoint_sha256(files: list[Path]) -> str:
    """One digest for a checkpoint: the file's SHA-256, or for shards the SHA-256 of ``name:digest`` lines."""
    if len(files) == 1:
        return file_sha256(files[0])
    lines = "".join(f"{Path(f).name}:{file_sha256(f)}\n" for f in sorted(files, key=lambda p: Path(p).name))
    return hashlib.sha256(lines.encode()).hexdigest()
