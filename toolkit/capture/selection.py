"""What a capture records: the user's choice (``Selection``) against the run's shape (``RunLayout``, which the
sampler gives: ``toolkit/models/layout.py``) and the resolved ``Plan`` (concrete records, K/V slices, query
tokens, byte estimates).

Everything here is pure Python + torch on CPU and runs before any model is loaded, so invalid selections are
refused early with the valid range in the message (``SelectionError``).

A *record* is one self-attention call ``(step, chunk, layer)``. For the causal (Self-Forcing) model a chunk's
queries are its own tokens and its attended keys are ``[clean-pass K of chunks < c ‖ K of chunk c at step s]``;
so the plan stores each ``(step, chunk)`` K/V slice of the *new* tokens once — the record's own slice plus the
clean-pass slices of the earlier chunks it reads — and never copies the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from toolkit.errors import SelectionError
from toolkit.indices import index_range
from toolkit.models.layout import RunLayout

STORE_ITEMS = ("q", "k", "v", "lse", "maps", "pooled", "text_mass")  # text_mass: joint text+video models
DEFAULT_STORE = ("q", "k", "v", "lse")
STORAGE_DTYPES = ("auto", "bfloat16", "float16", "float32")
COMPRESSIONS = ("none", "gzip", "lzf")


@dataclass(frozen=True)
class Selection:
    """The user's choice. Index specs are ``"all"``, or comma lists of integers and inclusive ranges ``"3-5"``;
    steps also accept ``"clean"`` (the clean-context pass). ``queries``: ``"all"``, ``"stride:N"`` (every N-th
    token of each frame in raster order) or ``"random:N"`` (N distinct tokens per frame drawn with ``seed``)."""

    layers: str = "all"
    heads: str = "all"
    steps: str = "all"
    chunks: str = "all"
    queries: str = "all"
    seed: int = 0  # of random:N queries (the noise seed is the run's, in the file's top-level `seed`)
    store: tuple[str, ...] = DEFAULT_STORE
    dtype: str = "auto"  # storage of q/k/v: auto = the model's dtype (bf16 as lossless uint16 bits)
    compression: str = "none"
    max_map_bytes: int = 4 << 30  # size guard for ``maps``
    batch_index: int = 0

    @classmethod
    def everything(cls) -> Selection:
        return cls(store=("q", "k", "v", "lse", "maps", "pooled"), max_map_bytes=1 << 62)


def parse_indices(spec: str | int | list, size: int, what: str, plural: str, aliases: dict | None = None) -> list:
    """``"all"``, ``"0,3,8-10"`` (inclusive ranges), an int or a list -> sorted unique ints in ``range(size)``."""
    valid = f"valid: 0-{size - 1}" if size > 1 else "valid: 0"
    if aliases and any(v is not None for v in aliases.values()):
        valid += ", " + ", ".join(k for k, v in aliases.items() if v is not None)
    if isinstance(spec, int):
        parts = [str(spec)]
    elif isinstance(spec, (list, tuple)):
        parts = [str(x) for x in spec]
    else:
        spec = str(spec).strip()
        if spec == "all":
            return list(range(size))
        parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise SelectionError(f"empty {what} selection ({valid})")
    out: set[int] = set()
    for part in parts:
        if aliases and part in aliases:
            if aliases[part] is None:
                raise SelectionError(f"{what} '{part}' does not exist in this run ({valid})")
            out.add(aliases[part])
            continue
        try:
            vals = index_range(part)
        except ValueError:
            raise SelectionError(f"cannot parse {what} '{part}' ({valid}; ranges like 3-5)") from None
        for x in vals:
            if not 0 <= x < size:
                raise SelectionError(f"{what} {x} is out of range: this run has {size} {plural} ({valid})")
            out.add(x)
    return sorted(out)


def query_tokens(spec: str, grid: tuple[int, int, int], seed: int) -> torch.Tensor:
    """Sorted clip raster indices of the stored queries for a ``Selection.queries`` spec."""
    frames, height, width = grid
    tpf = height * width
    spec = spec.strip()
    if spec == "all":
        return torch.arange(frames * tpf)
    kind, _, arg = spec.partition(":")
    try:
        n = int(arg)
    except ValueError:
        n = 0
    if kind not in ("stride", "random") or n < 1:
        raise SelectionError(f"queries '{spec}' not understood (valid: all, stride:N, random:N with N >= 1)")
    if kind == "stride":
        within = torch.arange(0, tpf, n)
    else:
        if n > tpf:
            raise SelectionError(f"queries random:{n} asks for more than the {tpf} tokens of a frame")
        gen = torch.Generator().manual_seed(seed)
        within = torch.stack([torch.randperm(tpf, generator=gen)[:n].sort().values for _ in range(frames)])
        return (within + torch.arange(frames)[:, None] * tpf).flatten()
    return (within[None, :] + torch.arange(frames)[:, None] * tpf).flatten()


def chunk_query_range(layout: RunLayout, queries: torch.Tensor, chunk: int) -> tuple[int, int]:
    """Positions ``[a, b)`` along a sorted stored query axis (clip tokens) that belong to ``chunk``."""
    t0, t1 = layout.chunk_tokens(chunk)
    return int(torch.searchsorted(queries, t0)), int(torch.searchsorted(queries, t1))


@dataclass
class Plan:
    """A Selection resolved against a RunLayout: what exactly gets written."""

    layout: RunLayout
    selection: Selection
    layers: list[int]
    heads: list[int]
    steps: list[int]  # selected record steps
    chunks: list[int]
    queries: torch.Tensor  # sorted clip tokens of stored queries
    store: frozenset[str]
    kv_cells: set[tuple[int, int]] = field(default_factory=set)  # (step, chunk) K/V slices stored per layer

    @property
    def records(self) -> list[tuple[int, int, int]]:
        """(step, chunk, layer) in sampler order (chunk-major, then step, then layer)."""
        return [(s, c, l) for c in self.chunks for s in self.steps for l in self.layers]

    @property
    def stored_steps(self) -> list[int]:
        """Step axis of the file: selected steps plus steps whose K/V slices are needed as context."""
        return sorted(set(self.steps) | {s for s, _ in self.kv_cells})

    @property
    def wants_kv(self) -> bool:
        return bool({"k", "v"} & self.store)

    def chunk_queries(self, chunk: int) -> tuple[int, int]:
        """Positions ``[a, b)`` along the stored query axis that belong to ``chunk``."""
        return chunk_query_range(self.layout, self.queries, chunk)

    def estimate_bytes(self, model_dtype: torch.dtype | None = None) -> dict[str, int]:
        """Bytes each variable will occupy when every record is written (computed from shapes; q/k/v at 2 bytes
        unless float32 storage is chosen or ``auto`` meets a float32 model)."""
        lay, nh = self.layout, len(self.heads)
        item = {"float32": 4}.get(resolve_storage_dtype(self.selection.dtype, model_dtype), 2)
        out: dict[str, int] = {}
        nq = {c: self.chunk_queries(c) for c in self.chunks}
        qrows = sum(len(self.steps) * (b - a) for c, (a, b) in nq.items()) * len(self.layers) * nh
        if "q" in self.store:
            out["q"] = qrows * lay.head_dim * item
        for name in ("lse", "text_mass"):
            if name in self.store:
                out[name] = qrows * 4
        kv_tokens = sum(lay.chunk_tokens(c)[1] - lay.chunk_tokens(c)[0] for _, c in self.kv_cells)
        for name in ("k", "v"):
            if name in self.store:
                out[name] = kv_tokens * len(self.layers) * nh * lay.head_dim * item
        if "maps" in self.store:
            out["maps"] = self.map_bytes()
        if "pooled" in self.store:
            f, h, w = lay.grid
            per = len(self.layers) * nh * 4
            out["pooled"] = per * (len(self.steps) * f * f + len(self.steps) * len(self.chunks) * (
                (2 * f - 1) + (2 * h - 1) + (2 * w - 1)))
        return out

    def map_bytes(self) -> int:
        """float32 entries of the attention probabilities of every selected record (stored queries × attended keys)."""
        total = 0
        for c in self.chunks:
            a, b = self.chunk_queries(c)
            spans = self.layout.key_frame_spans(c)  # the clip start to the chunk's end, unless the cache rolls
            total += (b - a) * sum(y - x for x, y in spans) * self.layout.tokens_per_frame
        return total * len(self.steps) * len(self.layers) * len(self.heads) * 4


def resolve_storage_dtype(choice: str, model_dtype: torch.dtype | None) -> str:
    """``auto`` keeps the model's precision: bf16 -> lossless uint16 bits, fp16 -> float16, else float32."""
    if choice not in STORAGE_DTYPES:
        raise SelectionError(f"storage dtype '{choice}' unknown (valid: {', '.join(STORAGE_DTYPES)})")
    if choice != "auto":
        return choice
    if model_dtype is None:
        return "bfloat16"
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(model_dtype, "float32")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def resolve(selection: Selection, layout: RunLayout) -> Plan:
    """Check a Selection against a RunLayout (before any model loads) and compute what to store."""
    store = frozenset(selection.store)
    unknown = store - set(STORE_ITEMS)
    if unknown or not store:
        raise SelectionError(
            f"cannot store {', '.join(sorted(unknown)) or 'nothing'} (valid: {', '.join(STORE_ITEMS)})")
    if selection.compression not in COMPRESSIONS:
        raise SelectionError(f"compression '{selection.compression}' unknown (valid: {', '.join(COMPRESSIONS)})")
    resolve_storage_dtype(selection.dtype, None)
    layers = parse_indices(selection.layers, layout.num_layers, "layer", "layers")
    heads = parse_indices(selection.heads, layout.num_heads, "head", "heads")
    steps = parse_indices(selection.steps, layout.num_steps, "step", "steps", {"clean": layout.clean_step})
    chunks = parse_indices(selection.chunks, layout.num_chunks, "chunk", "chunks")
    if selection.batch_index < 0:
        raise SelectionError("batch index must be >= 0")
    plan = Plan(layout, selection, layers, heads, steps, chunks,
                query_tokens(selection.queries, layout.grid, selection.seed), store)
    if plan.wants_kv:
        for c in chunks:
            for s in steps:
                plan.kv_cells.add((s, c))
            if layout.causal:  # earlier chunks are attended through their clean-pass K/V
                ctx_step = layout.clean_step if layout.clean_step is not None else layout.num_steps - 1
                spans = layout.key_frame_spans(c)  # a rolling cache attends a sink and a window, not every chunk
                plan.kv_cells.update((ctx_step, c2) for c2 in range(c)
                                     if any(a < layout.chunk_frames(c2)[1] and layout.chunk_frames(c2)[0] < b
                                            for a, b in spans))
    if "maps" in store and plan.map_bytes() > selection.max_map_bytes:
        raise SelectionError(
            f"maps for this selection would take {human_bytes(plan.map_bytes())} (> limit "
            f"{human_bytes(selection.max_map_bytes)}): store q,k,lse and recompute any map exactly with "
            "open_capture(...).rows/.tile, or select fewer layers/heads/steps/chunks or queries (e.g. random:8), "
            "or raise --max-map-bytes")
    return plan
