"""What every analysis takes: which records (`RecordSelection`), one record's tensors (`RecordTensors`), and a
stable serialisation of options dataclasses (`options_dict`, the key ``toolkit figures`` caches results on).

    from toolkit.analysis import topk
    from toolkit.analysis.records import RecordSelection, RecordTensors

    ds = topk.analyze(cap, records=RecordSelection(steps=(3,), layers=(0, 8)), options=topk.TopkOptions())
    t = RecordTensors.read(cap.record(3, 6, 8), heads=[0, 7])   # q, k, v, lse, tokens, grid, scale
    one = topk.analyze_record(t, topk.TopkOptions(sparsities=(0.5, 0.9)))
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from toolkit.errors import ToolkitError

if TYPE_CHECKING:
    import torch


def _ints(values: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if values is None else tuple(int(v) for v in values)


@dataclass(frozen=True)
class RecordSelection:
    """Which complete records (and heads) of a capture an analysis runs on; None = everything stored.

    ``allow_incomplete``: analyse the complete records of an interrupted capture instead of refusing it."""

    steps: tuple[int, ...] | None = None
    chunks: tuple[int, ...] | None = None
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    allow_incomplete: bool = False

    def __post_init__(self) -> None:  # lists are accepted; stored as tuples (hashable, stable to serialise)
        for name in ("steps", "chunks", "layers", "heads"):
            object.__setattr__(self, name, _ints(getattr(self, name)))


@dataclass(kw_only=True)
class RecordTensors:
    """One attention record as the analyses read it: q ``h i d``, k ``h j d``, optional v ``h j d`` and lse
    ``h i`` (natural-log LSE of ``scale·q·kᵀ`` over the attended keys; recomputed where an analysis needs it and
    it is None), the clip raster indices of the queries (``i``) and keys (``j``), the clip's token ``grid``
    (frames, height, width), the softmax ``scale`` and the head labels of the leading dim (None = 0..h-1).

    Top-k needs only q, k (and v for output errors); the periodic and Monarch analyses also need the tokens and
    the grid."""

    q: torch.Tensor
    k: torch.Tensor
    scale: float
    v: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    query_tokens: torch.Tensor | None = None
    key_tokens: torch.Tensor | None = None
    grid: tuple[int, int, int] | None = None
    heads: list[int] | None = None

    @classmethod
    def read(cls, rec: Any, heads: Sequence[int] | None = None, device: Any = None, *, v: bool = True,
             lse: bool = True) -> RecordTensors:
        """The tensors of a capture record (``toolkit.capture.Record``) for ``heads`` (None = every stored head)
        on ``device``; ``v`` / ``lse``: read them (False: left None)."""
        heads = None if heads is None else list(heads)
        return cls(q=rec.q(heads, device), k=rec.k(heads, device), scale=rec.scale,
                   v=rec.v(heads, device) if v else None, lse=rec.lse(heads, device) if lse else None,
                   query_tokens=rec.query_tokens, key_tokens=rec.key_tokens, grid=tuple(rec.grid),
                   heads=list(rec.heads) if heads is None else heads)

    @property
    def head_labels(self) -> list[int]:
        return list(range(self.q.shape[0])) if self.heads is None else list(self.heads)

    def require_positions(self, analysis: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
        """(query_tokens, key_tokens, grid), or a `ToolkitError` naming the analysis that needs them."""
        if self.query_tokens is None or self.key_tokens is None or self.grid is None:
            raise ToolkitError(f"the {analysis} analysis needs the record's query_tokens, key_tokens and grid")
        return self.query_tokens, self.key_tokens, tuple(self.grid)


def _plain(value: Any) -> Any:
    if hasattr(value, "name") and hasattr(value, "grid"):  # a MonarchLayout: its name on its grid
        return {"layout": str(value.name), "grid": [int(x) for x in value.grid]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if callable(getattr(value, "tolist", None)):  # tensors, arrays, numpy scalars
        return value.tolist()
    return repr(value)


def options_dict(options: Any) -> dict:
    """A JSON-ready dict of an options / selection dataclass (tuples as lists, a Monarch layout as its name and
    grid, tensors as lists, other objects by repr): equal options give equal dicts, in every process."""
    out = _plain(options)
    json.dumps(out)  # fails here, not in a cache, if something is not serialisable
    return out
