"""Text conditioning for Wan / Self-Forcing: umT5-XXL encoder outputs ``[B, 512, 4096]``, zero beyond each prompt.

The weights are Wan's own encoder-only file ``models_t5_umt5-xxl-enc-bf16.pth`` (Wan-T5 module names); we run them
with transformers' ``UMT5EncoderModel`` after renaming (``T5_KEYS``). The architectures are the same: pre-norm
T5 blocks with RMS-style norms, per-layer relative position bias (32 buckets, max distance 128, bidirectional),
unscaled attention, gated-GELU(tanh) FFN without biases. Tokenizer: the ``google/umt5-xxl`` folder of the Wan
release, 512 tokens, max-length padding, truncation, special tokens, Wan's whitespace cleaning.

Embeddings are cached on disk per prompt (``cache_dir()/prompt_embeds/<hash>.safetensors``, keyed by prompt,
encoder file identity and length), so a prompt is encoded once; ``load_prompt_embeds`` reads a user's own file
(``--prompt-embeds FILE``) and skips the encoder entirely.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from toolkit.errors import CheckpointError, ToolkitError
from toolkit.models import checkpoints as ck
from toolkit.models import registry

TEXT_LEN = 512

# transformers UMT5Config of umT5-XXL's encoder (Wan ``umt5_xxl``: vocab 256384, dim 4096, 64 heads of 64,
# FFN 10240, 24 layers, 32 buckets; docs/self-forcing.md "Text encoder and VAE").
UMT5_XXL = dict(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6, dropout_rate=0.0, tie_word_embeddings=False,
)

# Wan-T5 name <-> transformers UMT5EncoderModel name. Wan's FFN is ``fc2(fc1(x) * gelu(gate(x)))``; HF's gated FFN
# is ``wo(act(wi_0(x)) * wi_1(x))``: gate.0 -> wi_0 (the activated branch), fc1 -> wi_1, fc2 -> wo.
T5_KEYS = ck.KeyTable((
    ("token_embedding.weight", "shared.weight"),
    ("blocks.{N}.norm1.weight", "encoder.block.{N}.layer.0.layer_norm.weight"),
    ("blocks.{N}.attn.q.weight", "encoder.block.{N}.layer.0.SelfAttention.q.weight"),
    ("blocks.{N}.attn.k.weight", "encoder.block.{N}.layer.0.SelfAttention.k.weight"),
    ("blocks.{N}.attn.v.weight", "encoder.block.{N}.layer.0.SelfAttention.v.weight"),
    ("blocks.{N}.attn.o.weight", "encoder.block.{N}.layer.0.SelfAttention.o.weight"),
    ("blocks.{N}.pos_embedding.embedding.weight",
     "encoder.block.{N}.layer.0.SelfAttention.relative_attention_bias.weight"),
    ("blocks.{N}.norm2.weight", "encoder.block.{N}.layer.1.layer_norm.weight"),
    ("blocks.{N}.ffn.gate.0.weight", "encoder.block.{N}.layer.1.DenseReluDense.wi_0.weight"),
    ("blocks.{N}.ffn.fc1.weight", "encoder.block.{N}.layer.1.DenseReluDense.wi_1.weight"),
    ("blocks.{N}.ffn.fc2.weight", "encoder.block.{N}.layer.1.DenseReluDense.wo.weight"),
    ("norm.weight", "encoder.final_layer_norm.weight"),
))
TIED_EMBEDDING = "encoder.embed_tokens.weight"  # the same tensor as shared.weight in UMT5EncoderModel


def wan_t5_to_hf(state_dict: Mapping[str, torch.Tensor], source: str | os.PathLike[str] = "T5 weights"
                 ) -> dict[str, torch.Tensor]:
    """Rename a Wan-T5 encoder state dict to ``UMT5EncoderModel`` names (unknown names -> ``CheckpointError``)."""
    out, unknown = {}, []
    for k, v in state_dict.items():
        try:
            out[T5_KEYS.forward(k)] = v
        except KeyError:
            unknown.append(k)
    if unknown:
        names = ", ".join(unknown[:4])
        raise CheckpointError(f"{source}: {len(unknown)} tensors are not Wan-T5 encoder names: {names}")
    if "shared.weight" in out:
        out[TIED_EMBEDDING] = out["shared.weight"]
    return out


def hf_to_wan_t5(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``wan_t5_to_hf`` (writes Wan's layout, e.g. for tests)."""
    return {T5_KEYS.backward(k): v for k, v in state_dict.items() if k != TIED_EMBEDDING}


def umt5_config(**overrides: Any) -> Any:
    from transformers import UMT5Config

    return UMT5Config(**{**UMT5_XXL, **overrides})


def build_umt5_encoder(wan_state_dict: Mapping[str, torch.Tensor], config: Any, *,
                       source: str | os.PathLike[str] = "T5 weights") -> Any:
    """``UMT5EncoderModel`` holding the Wan-named weights (strict: every tensor present and of the right shape)."""
    from transformers import UMT5EncoderModel

    sd = wan_t5_to_hf(wan_state_dict, source)
    with torch.device("meta"):  # no random init of 5.7 B parameters; every tensor is assigned below
        model = UMT5EncoderModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ck.validate_state_dict(sd, expected, source)
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    return model.eval().requires_grad_(False)


def clean_prompt(text: str) -> str:
    """Wan's ``clean='whitespace'``: ftfy repair (if installed), HTML unescape twice, collapse whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    """umT5-XXL from the Wan release: ``encoder(prompts) -> [B, text_len, 4096]``, rows past each prompt are zero."""

    def __init__(self, t5_path: str | os.PathLike[str] | None = None,
                 tokenizer_path: str | os.PathLike[str] | None = None, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.bfloat16, text_len: int = TEXT_LEN, config: Any = None) -> None:
        from transformers import AutoTokenizer

        self.t5_path = Path(t5_path) if t5_path else registry.wan_file(registry.T5_FILE)
        tok = Path(tokenizer_path) if tokenizer_path else registry.wan_file(registry.TOKENIZER_DIR)
        self.text_len, self.device, self.dtype = text_len, torch.device(device), dtype
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(tok))
        except Exception as err:  # noqa: BLE001 - missing sentencepiece/tokenizer files: say which folder
            raise ToolkitError(f"cannot load the umT5 tokenizer from {tok}: {err}") from err
        weights = _load_torch_file(self.t5_path)
        self.model = build_umt5_encoder(weights, config or umt5_config(), source=self.t5_path)
        self.model.to(device=self.device, dtype=dtype)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context ``[B, text_len, D]`` zero past each prompt, token counts ``[B]`` incl. the end token)."""
        batch = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=self.text_len,
                               truncation=True, add_special_tokens=True, return_tensors="pt")
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        # Wan trims each row to its true length, then zero-pads to text_len
        return out * mask[..., None].to(out.dtype), mask.sum(-1).cpu()

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encode(prompts)[0]


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return ck.read_safetensors(path)
    obj = ck.read_torch_file(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return dict(obj)


# ---------------------------------------------------------------------------------------------------------------
# Prompt-embedding files and the per-prompt cache
# ---------------------------------------------------------------------------------------------------------------
def pad_context(context: torch.Tensor, text_len: int = TEXT_LEN) -> torch.Tensor:
    """``[L, D]`` or ``[B, L, D]`` -> ``[B, text_len, D]`` with zero rows appended."""
    if context.dim() == 2:
        context = context[None]
    if context.dim() != 3 or context.shape[1] > text_len:
        raise ToolkitError(f"prompt embeddings must be [L, D] or [B, L, D] with L <= {text_len}, got "
                           f"{list(context.shape)}")
    return torch.nn.functional.pad(context, (0, 0, 0, text_len - context.shape[1]))


def save_prompt_embeds(path: str | os.PathLike[str], context: torch.Tensor, *,
                       metadata: Mapping[str, str] | None = None) -> Path:
    """Write prompt embeddings ``[B, L, D]`` (or ``[L, D]``) as safetensors under the key ``context``, to a
    temporary name renamed into place: a kill or a full disk mid-write leaves the old file or none, never a
    truncated one that every later run would trip over."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        save_file({"context": context.detach().cpu().contiguous()}, str(tmp), metadata=dict(metadata or {}))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_prompt_embeds(path: str | os.PathLike[str], text_len: int = TEXT_LEN) -> torch.Tensor:
    """``--prompt-embeds FILE``: a safetensors or torch file with one tensor (or key ``context`` /
    ``prompt_embeds``) of shape ``[L, D]`` or ``[B, L, D]``; returned zero-padded to ``[B, text_len, D]``."""
    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"prompt embeddings file not found: {path}")
    tensors = ck.read_safetensors(path) if path.suffix == ".safetensors" else ck.read_torch_file(path)
    if isinstance(tensors, torch.Tensor):
        tensors = {"context": tensors}
    if not isinstance(tensors, Mapping):
        raise ToolkitError(f"{path}: expected a tensor or a dict of tensors, found {type(tensors).__name__}")
    key = next((k for k in ("context", "prompt_embeds") if k in tensors), None)
    if key is None and len(tensors) == 1:
        key = next(iter(tensors))
    if key is None:
        raise ToolkitError(f"{path}: expected one tensor or a 'context' entry, found "
                           f"{', '.join(map(str, list(tensors)[:5]))}")
    value = tensors[key]
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
        what = str(value.dtype).removeprefix("torch.") + " tensor" if isinstance(value, torch.Tensor) else (
            type(value).__name__)
        raise ToolkitError(f"{path}: entry '{key}' is a {what}, not floating-point prompt embeddings")
    return pad_context(value.float(), text_len)


def _cache_key(prompt: str, encoder_id: str, text_len: int) -> str:
    return hashlib.sha256(json.dumps([prompt, encoder_id, text_len]).encode()).hexdigest()[:32]


def _encoder_id(t5_path: Path) -> str:
    st = t5_path.stat()  # identity without hashing 11 GB: resolved path, size, mtime
    return f"{t5_path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def encode_prompts(prompts: Sequence[str], *, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.bfloat16, text_len: int = TEXT_LEN, cache: bool = True,
                   encoder: TextEncoder | None = None) -> torch.Tensor:
    """Prompts -> ``[B, text_len, 4096]`` (float32 on CPU), from the on-disk cache where possible.

    The encoder (11 GB of bf16 weights) is loaded only if some prompt is not cached yet. A damaged cache entry is
    encoded again and replaced (with a warning); an unwritable cache folder means no caching (with a warning).
    ``cache=False`` neither reads nor writes the cache."""
    t5_path = encoder.t5_path if encoder else registry.wan_file(registry.T5_FILE)
    enc_id = _encoder_id(t5_path)
    folder = ck.cache_dir() / "prompt_embeds"
    files = [folder / f"{_cache_key(p, enc_id, text_len)}.safetensors" for p in prompts]
    got: dict[int, torch.Tensor] = {}
    if cache:
        for i, f in enumerate(files):
            if f.is_file():
                try:
                    got[i] = load_prompt_embeds(f, text_len)
                except ToolkitError as err:  # truncated or corrupt entry: recompute and replace it
                    warnings.warn(f"ignoring a damaged prompt-embedding cache entry ({err}); encoding again",
                                  stacklevel=2)
    todo = [i for i in range(len(prompts)) if i not in got]
    if todo:
        encoder = encoder or TextEncoder(t5_path, device=device, dtype=dtype, text_len=text_len)
        fresh, lengths = encoder.encode([prompts[i] for i in todo])
        fresh = fresh.float().cpu()
        unwritable = None
        for row, i in enumerate(todo):
            emb = fresh[row, : int(lengths[row])]
            got[i] = pad_context(emb, text_len)
            if not cache or unwritable:
                continue
            try:
                save_prompt_embeds(files[i], emb,
                                   metadata={"prompt": prompts[i], "encoder": enc_id, "text_len": str(text_len)})
            except OSError as err:  # read-only or full cache folder: the run goes on without caching
                unwritable = err
        if unwritable is not None:
            warnings.warn(f"prompt-embedding cache {folder} is not writable ({unwritable.strerror or unwritable}); "
                          "continuing without caching (set TOOLKIT_CACHE_DIR to a writable folder)", stacklevel=2)
    return torch.cat([got[i] for i in range(len(prompts))])
