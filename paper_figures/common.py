"""What every figure module shares: the settings of a ``toolkit figures`` run, the context handed to each figure
(capture, cached analysis results, the focus record and the (layer, head) pairs), and the checks that refuse,
in one line naming the capture option to use, when a capture lacks what a figure needs.

A figure module defines ``NAME``, ``TITLE``, ``check(ctx)`` (raise `ToolkitError` if the capture cannot make
it), ``data(ctx) -> dict`` (analysis Datasets / arrays it plots) and ``plot(data, out_dir, **options) -> dict``
(writes ``NAME.png`` / ``NAME.pdf``, returns the plotted arrays so tests can compare them with the analysis).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from toolkit.errors import ToolkitError

if TYPE_CHECKING:
    from toolkit.capture.reader import Capture

# The paper's Fig. 1 heads on Self-Forcing (30 layers × 12 heads).
PAPER_PAIRS = ((0, 0), (8, 7))


@dataclass
class FigureSettings:
    """Options of ``toolkit figures`` (None = chosen from the capture)."""

    figures: tuple[str, ...] = ("all",)
    pairs: tuple[tuple[int, int], ...] | None = None  # (layer, head) for Fig. 1, zooms and offset maps
    step: int | None = None  # focus record of the single-record figures
    chunk: int | None = None
    layers: list[int] | None = None  # records of the across-layers figures (coverage); None = all stored
    heads: list[int] | None = None  # heads analysed (None = all stored); must include the pairs' heads
    steps: list[int] | None = None
    chunks: list[int] | None = None
    mass: float = 0.95  # coverage level
    frame_pair: tuple[int, int] | None = None  # Fig. 2 zoom (query frame, key frame)
    bench: tuple[str, ...] = ()  # benchmark JSON files for the kernel tables
    layouts: tuple[str, ...] | None = None  # Monarch layouts (``fh,w:1,2,1``, ``contiguous:30x24``); None = default
    device: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass
class Context:
    """Everything a figure's ``check``/``data`` may use."""

    cap: Any  # toolkit.capture.Capture
    results: Any  # paper_figures.results.ResultCache
    settings: FigureSettings
    step: int
    chunk: int
    pairs: list[tuple[int, int]]
    log: Any = print
    notes: dict = field(default_factory=dict)

    @property
    def focus(self) -> dict:
        return dict(step=self.step, chunk=self.chunk)

    def pair_layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.pairs})


def stored_options(cap: Capture) -> list[str]:
    """What the capture stored, in ``--store`` vocabulary (``frame_mass`` & offsets = ``pooled``)."""
    return [{"frame_mass": "pooled"}.get(x, x) for x in cap.stored]


def require_stored(cap: Capture, figure: str, items: tuple[str, ...] = ("q", "k", "lse")) -> None:
    have = stored_options(cap)
    if any(x not in have for x in items):
        want = list(items) + [x for x in have if x not in items]
        raise ToolkitError(f"figure '{figure}' needs {','.join(items)} but this capture stored "
                           f"{','.join(have) or 'nothing'}: capture with --store {','.join(want)}")


def require_all_queries(cap: Capture, figure: str) -> None:
    """Monarch tiles and frame zooms need every query of a frame (no stride / random subset)."""
    if len(cap.queries) != cap.layout.num_tokens:
        spec = cap.selection.get("queries", "a subset")
        raise ToolkitError(f"figure '{figure}' needs every query of the record but this capture stored queries "
                           f"'{spec}' ({len(cap.queries)} of {cap.layout.num_tokens}): capture with --queries all")


def require_in_model(cap: Capture, figure: str, *, layers: Sequence[int] = (), heads: Sequence[int] = ()) -> None:
    """Layers/heads the model does not have cannot be captured: say so (and what it has) instead of suggesting a
    capture option that would be refused."""
    n_layers, n_heads = cap.layout.num_layers, cap.layout.num_heads
    bad_layers = sorted(x for x in set(layers) if not 0 <= x < n_layers)
    bad_heads = sorted(x for x in set(heads) if not 0 <= x < n_heads)
    if bad_layers or bad_heads:
        what = "; ".join(x for x in (
            f"layers {bad_layers} but the model has {n_layers} (0-{n_layers - 1})" if bad_layers else "",
            f"heads {bad_heads} but the model has {n_heads} (0-{n_heads - 1})" if bad_heads else "") if x)
        raise ToolkitError(f"figure '{figure}' asks for {what}: choose --pairs/--layers/--heads among them")


def require_records(
    cap: Capture, figure: str, *, layers: Sequence[int], heads: Sequence[int] = (), step: int, chunk: int
) -> None:
    require_in_model(cap, figure, layers=layers, heads=heads)
    missing_layers = sorted(set(layers) - set(cap.layers))
    missing_heads = sorted(set(heads) - set(cap.heads))
    if missing_layers or missing_heads:
        what = "; ".join(x for x in (
            f"layers {missing_layers} (stored {cap.layers})" if missing_layers else "",
            f"heads {missing_heads} (stored {cap.heads})" if missing_heads else "") if x)
        want = {"layers": ",".join(map(str, sorted(set(layers) | set(cap.layers))))}
        if heads:
            want["heads"] = ",".join(map(str, sorted(set(heads) | set(cap.heads))))
        options = " ".join(f"--{k} {v}" for k, v in want.items())
        raise ToolkitError(f"figure '{figure}' needs {what}: capture with {options} (or pick stored ones with --pairs)")
    have = {(r.step, r.chunk) for r in cap.records}
    if (step, chunk) not in have:
        raise ToolkitError(f"figure '{figure}' needs step {step} of chunk {chunk}, which this capture lacks: capture "
                           f"with --steps {step} --chunks {chunk} (or choose stored ones with --step/--chunk)")


def require_pair_records(ctx: Context, figure: str) -> None:
    """The focus step/chunk records of every (layer, head) pair in ``ctx.pairs`` are stored."""
    layers, heads = zip(*ctx.pairs)
    require_records(ctx.cap, figure, layers=layers, heads=heads, **ctx.focus)


def default_focus(cap: Capture) -> tuple[int, int]:
    """The last chunk at its last denoising step (not the clean pass) among the stored records."""
    keys = cap.records
    if not keys:
        raise ToolkitError(f"{cap.path} has no complete records")
    clean = cap.layout.clean_step
    chunk = max(r.chunk for r in keys)
    steps = sorted({r.step for r in keys if r.chunk == chunk})
    noisy = [s for s in steps if s != clean]
    return (noisy or steps)[-1], chunk


def default_pairs(
    cap: Capture, heads: list[int] | None = None, layers: list[int] | None = None
) -> list[tuple[int, int]]:
    """L0H0 and L8H7 (the paper's) when stored; otherwise the analogues at the same relative depth and head
    position among the stored (and asked) layers/heads: the first head of the first layer and the head ~7/11 through the
    heads of the layer ~8/29 deep."""
    layers = [x for x in cap.layers if layers is None or x in layers] or cap.layers
    heads = [h for h in cap.heads if heads is None or h in heads] or cap.heads
    if all(layer in layers and head in heads for layer, head in PAPER_PAIRS):
        return list(PAPER_PAIRS)
    n_layers = cap.layout.num_layers
    first = (layers[0], heads[0])
    want_layer = round(8 / 29 * (n_layers - 1))
    want_head = round(7 / 11 * (cap.layout.num_heads - 1))
    layer = min(layers, key=lambda x: (abs(x - want_layer), x))
    head = min(heads, key=lambda x: (abs(x - want_head), x))
    second = (layer, head)
    if second == first and len(heads) > 1:
        second = (layer, heads[-1])
    return [first] if second == first else [first, second]
