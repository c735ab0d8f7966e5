"""``--attention SPEC``: what computes self-attention at each seam of a model — per layer, step, chunk and head.

A *backend spec* names one way to compute attention:

* ``dense``: PyTorch SDPA (the seam's default; cuDNN / flash backends on GPU).
* ``monarch`` / ``monarch:F,H,W``: zero-shot variational MonarchAttention (T = 1) with tiling
  (f_tied, h_reduce, w_reduce) — default (1, 1, 1), framewise. Triton kernels on GPU (``toolkit.kernels``),
  the PyTorch reference (``toolkit.attention.monarch``) on CPU.
* the sparse approximation families of ``toolkit.attention.families`` (``docs/approximation-families.md``), as
  their PyTorch references on any device: ``blocktopk:KEEP:TF,TH,TW`` (oracle block top-k: fraction KEEP of the
  key tiles of TF×TH×TW tokens by exact mass), ``blocktopk-pred:KEEP:TF,TH,TW`` (the same, ranked by mean-pooled
  q·k), ``sta:WF,WH,WW:TF,TH,TW`` (sliding tile attention, window in tiles), ``radial:DENSE_FRAMES,RADIUS`` (radial
  attention), ``svg:ROWS:FRAME_BAND,SPATIAL_BAND`` (Sparse VideoGen) and ``py:MODULE:FUNCTION`` (a callable
  ``f(q, k, v, ctx)`` returning an output or a boolean mask). ``backend_density`` gives a spec's density on the
  whole clip without data where it has one.

An ``--attention`` value is a list of *rules*, each a backend spec with optional conditions::

    SPEC      := RULE ( "+" RULE )*
    RULE      := BACKEND ( "@" CONDITION )*
    CONDITION := ("layers" | "steps" | "heads" | "chunks") "=" LIST
    LIST      := "all" | ITEM ( "," ITEM )*        ITEM := N | N-M (inclusive); steps also: clean

e.g. ``dense@layers=0 + monarch:1,2,1@steps=0-1@heads=0-3 + monarch:1,1,1`` (spaces around ``+`` and ``@`` are
optional; with none the value needs no shell quoting). Commas belong to backend specs and index lists only, so
``+`` and ``@`` split a value unambiguously. ``steps`` are the seam's step index: 0..n-1 the denoising steps and,
for the causal model, ``clean`` (= n) the clean-context pass that rewrites the KV cache.

Semantics: for every self-attention call (layer, step, chunk) and every head, the *first* rule whose conditions
all hold computes that head; a head no rule matches is computed dense. A single spec without ``@`` or ``+``
(``monarch:1,2,1``) applies everywhere, exactly as before rules existed.

Cost of a ``heads`` condition: a call whose heads are split between rules runs each rule's backend on its heads
only, and — when some heads stay dense — dense SDPA on *all* heads (the dense heads are then bit-identical to a
fully dense call); at most one dense call plus each rule's share. Calls that one rule covers entirely cost what
that backend costs. Rules are checked against the model (``check_attention``) before it loads: a layer, step,
chunk or head it does not have is refused in one line.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from toolkit.attention.families import FAMILY_FORMS, Family, family_backend, parse_family
from toolkit.attention.monarch import monarch_backend
from toolkit.errors import ToolkitError
from toolkit.grid import MonarchLayout, TokenGrid, as_grid
from toolkit.indices import index_range
from toolkit.models.layout import RunLayout
from toolkit.models.seam import AttentionContext, Backend, dense_attention, seams, set_backend, use_backend

CONDITIONS = ("layers", "steps", "heads", "chunks")
CLEAN = "clean"  # the steps alias of the causal model's clean-context pass (ctx.is_clean)


BACKEND_FORMS = ("dense", "monarch", "monarch:F,H,W[:T=N]", "monarch-contiguous:B1,B2[:T=N]", *FAMILY_FORMS)


@dataclass(frozen=True)
class MonarchSpec:
    """Monarch attention beyond the kernels' case (aligned ``fh,w`` tiling, T = 1), computed by the PyTorch
    reference: ``monarch:F,H,W:T=N`` (N iterations of variational MonarchAttention) or
    ``monarch-contiguous:B1,B2[:T=N]`` (tiles of B1·B2 consecutive raster tokens: MonarchAttention's original,
    grid-misaligned layout; ``toolkit.grid``)."""

    tiling: tuple[int, int, int] | None = None
    block: tuple[int, int] | None = None
    iters: int = 1

    def layout(self, grid: TokenGrid | Sequence[int]) -> MonarchLayout:
        if self.block is not None:
            return MonarchLayout.contiguous(grid, *self.block)
        return MonarchLayout.aligned(grid, "fh,w", self.tiling or (1, 1, 1))


def _positive_ints(text: str, count: int) -> tuple[int, ...] | None:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        return None
    return values if len(values) == count and all(v >= 1 for v in values) else None


def _monarch(name: str, rest: str) -> tuple[int, int, int] | MonarchSpec | None:
    """'monarch' parameters: a tiling tuple (the kernels' case) or a MonarchSpec; None if malformed."""
    sizes, _, option = rest.partition(":")
    iters = 1
    if option:
        if not option.startswith("T=") or not option[2:].isdigit() or int(option[2:]) < 1:
            return None
        iters = int(option[2:])
    if name == "monarch-contiguous":
        block = _positive_ints(sizes, 2)
        return None if block is None else MonarchSpec(block=block, iters=iters)  # type: ignore[arg-type]
    tiling = (1, 1, 1) if not sizes else _positive_ints(sizes, 3)
    if tiling is None:
        return None
    return tiling if iters == 1 else MonarchSpec(tiling=tiling, iters=iters)  # type: ignore[return-value]


def parse_attention(spec: str) -> tuple[str, tuple[int, int, int] | MonarchSpec | Family | None]:
    """'dense' -> ('dense', None); 'monarch' -> ('monarch', (1,1,1)); 'monarch:3,1,1' -> ('monarch', (3,1,1));
    'monarch:1,1,1:T=10' and 'monarch-contiguous:32,20' -> ('monarch', MonarchSpec(...)); a family's spec
    (``toolkit.attention.families``), e.g. 'sta:3,3,3:1,4,4' -> ('sta', SlidingTileAttention)."""
    family = parse_family(spec)
    if family is not None:
        return spec.strip().partition(":")[0], family
    name, _, rest = spec.strip().partition(":")
    if name == "dense" and not rest:
        return "dense", None
    if name in ("monarch", "monarch-contiguous") and (name == "monarch" or rest):
        params = _monarch(name, rest)
        if params is not None:
            return "monarch", params
    forms = ", ".join(f"'{form}'" for form in BACKEND_FORMS[:-1])
    raise ToolkitError(f"--attention {spec!r}: expected {forms} or '{BACKEND_FORMS[-1]}' (e.g. monarch:1,2,1)")


@dataclass(frozen=True)
class AttentionRule:
    """One rule: ``attention`` (a backend spec) computes the calls and heads its conditions select.

    A condition of ``None`` selects everything; ``clean`` selects the clean-context pass besides ``steps``."""

    attention: str
    layers: frozenset[int] | None = None
    steps: frozenset[int] | None = None
    heads: frozenset[int] | None = None
    chunks: frozenset[int] | None = None
    clean: bool = False

    @property
    def everywhere(self) -> bool:
        return all(getattr(self, key) is None for key in CONDITIONS)

    def matches_call(self, ctx: AttentionContext) -> bool:
        """Whether this rule applies to the call ``ctx`` (its heads condition aside)."""
        if self.steps is not None and not (ctx.step in self.steps or (self.clean and ctx.is_clean)):
            return False
        return ((self.layers is None or ctx.layer in self.layers)
                and (self.chunks is None or ctx.chunk in self.chunks))

    def __str__(self) -> str:
        parts = [self.attention]
        for key in CONDITIONS:
            values = getattr(self, key)
            if values is not None:
                items = _runs(values) + ([CLEAN] if key == "steps" and self.clean else [])
                parts.append(f"{key}={','.join(items)}")
        return "@".join(parts)


def _runs(values: frozenset[int]) -> list[str]:
    """Sorted indices as index-list items, consecutive ones as inclusive ranges: {0, 1, 2, 5} -> ['0-2', '5']."""
    items: list[str] = []
    for i in sorted(values):
        if items and i - 1 in values:
            items[-1] = f"{items[-1].split('-')[0]}-{i}"
        else:
            items.append(str(i))
    return items


def _condition(rule: str, key: str, text: str) -> tuple[frozenset[int] | None, bool]:
    """An index list of a condition -> (indices or None for 'all', whether 'clean' was named)."""
    text = text.strip()
    if text == "all":
        return None, False
    indices: set[int] = set()
    clean = False
    parts = [p.strip() for p in text.split(",")]
    for part in parts:
        if key == "steps" and part == CLEAN:
            clean = True
            continue
        try:
            values = index_range(part)
            if values.start < 0:
                raise ValueError(part)
        except ValueError:
            extra = ", or clean" if key == "steps" else ""
            raise ToolkitError(f"--attention rule {rule!r}: cannot read {key} {part!r} (an index list such as "
                               f"0,3,8-10{extra})") from None
        indices.update(values)
    return frozenset(indices), clean


def parse_rule(text: str) -> AttentionRule:
    """``'monarch:1,2,1@steps=0-1@heads=0-3'`` -> :class:`AttentionRule` (the backend spec is checked too)."""
    attention, *conditions = (part.strip() for part in text.split("@"))
    parse_attention(attention)
    found: dict = {}
    for condition in conditions:
        key, eq, values = (s.strip() for s in condition.partition("="))
        if not eq or key not in CONDITIONS:
            raise ToolkitError(f"--attention rule {text.strip()!r}: {condition!r} is not a condition "
                               f"(expected {', '.join(k + '=LIST' for k in CONDITIONS)})")
        if key in found:
            raise ToolkitError(f"--attention rule {text.strip()!r}: {key} is given twice")
        found[key], clean = _condition(text.strip(), key, values)
        if key == "steps":
            found["clean"] = clean
    return AttentionRule(attention, **found)


def parse_attention_rules(spec: str) -> tuple[AttentionRule, ...]:
    """An ``--attention`` value (see the module docstring) -> its rules, first to last; one-line errors."""
    if not spec.strip():
        raise ToolkitError("--attention is empty: expected e.g. 'dense', 'monarch:1,2,1' or "
                           "'dense@layers=0+monarch:1,2,1'")
    texts = [t.strip() for t in spec.split("+")]
    if not all(texts):
        raise ToolkitError(f"--attention {spec!r}: an empty rule between '+' separators")
    return tuple(parse_rule(t) for t in texts)


def format_attention_rules(rules: tuple[AttentionRule, ...]) -> str:
    """The canonical text of ``rules``; ``parse_attention_rules`` reads it back to the same rules."""
    return "+".join(str(rule) for rule in rules)


def check_attention(spec: str, layout: RunLayout | None = None, *, num_layers: int | None = None,
                    num_heads: int | None = None) -> tuple[AttentionRule, ...]:
    """Parse ``spec`` and refuse a rule naming a layer, step, chunk or head the run does not have.

    ``layout`` (``ModelSpec.layout()``, no weights needed) checks all four; without it ``num_layers`` /
    ``num_heads`` check what a loaded model knows."""
    rules = parse_attention_rules(spec)
    sizes = {"layers": num_layers, "heads": num_heads}
    if layout is not None:
        sizes = {"layers": layout.num_layers, "heads": layout.num_heads, "steps": layout.num_steps,
                 "chunks": layout.num_chunks}
    for rule in rules:
        for key, size in sizes.items():
            values = getattr(rule, key)
            if size is None or values is None:
                continue
            bad = sorted(i for i in values if i >= size)
            if bad:
                raise ToolkitError(f"--attention rule {str(rule)!r}: {key[:-1]} {bad[0]} does not exist; this "
                                   f"model's run has {size} {key} (valid: 0-{size - 1})")
        if rule.clean and layout is not None and layout.clean_step is None:
            raise ToolkitError(f"--attention rule {str(rule)!r}: steps=clean, but this model's sampler has no "
                               "clean-context pass")
        if layout is not None:
            try:
                check_on_grid(rule.attention, layout)
            except ToolkitError as err:
                raise ToolkitError(f"--attention rule {str(rule)!r}: {err}") from None
    return rules


def check_on_grid(attention: str, layout: RunLayout) -> None:
    """Refuse a Monarch backend whose tiles do not fit the run: tilings that do not divide the token grid, and tiles
    that straddle the frames of a call (a chunk's queries or a run of its keys), as the backend itself would at the
    first forward; checked from the layout alone, so before a model loads or an output is touched."""
    name, params = parse_attention(attention)
    if name != "monarch":
        return
    grid = as_grid(layout.grid)
    monarch = monarch_layout(params, grid)
    for chunk in range(layout.num_chunks):
        for frames in (layout.chunk_frames(chunk), *layout.key_frame_spans(chunk)):
            monarch.tiles_of_frames(frames)


def monarch_layout(params: tuple[int, int, int] | MonarchSpec, grid: TokenGrid) -> MonarchLayout:
    """The Monarch layout a ``monarch`` backend spec's parameters give on ``grid`` (the ``fh,w`` base for a
    tiling)."""
    if isinstance(params, MonarchSpec):
        return params.layout(grid)
    return MonarchLayout.aligned(grid, "fh,w", params)


def backend_density(attention: str, grid: tuple[int, int, int]) -> float | None:
    """Fraction of the dense attention's entries one backend spec computes on a bidirectional call over the whole
    clip ``grid``, without data: ``dense`` 1; ``monarch:F,H,W`` the parameter fraction (b1 + b2) / (b1·b2) of the
    aligned ``fh,w`` layout (``toolkit.grid``); a family its ``clip_density`` (None for those whose mask depends on
    q and k: ``svg``, ``py``, block top-k with tiles that do not divide the grid)."""
    name, params = parse_attention(attention)
    if name == "dense":
        return 1.0
    if isinstance(params, Family):
        return params.clip_density(grid)
    return float(monarch_layout(params, as_grid(grid)).density)


def _single_backend(spec: str, device: torch.device | str) -> Backend | None:
    name, tiling = parse_attention(spec)
    if name == "dense":
        return None
    if isinstance(tiling, Family):  # the families' PyTorch references, on the model's device
        return family_backend(tiling)
    if isinstance(tiling, MonarchSpec):  # T > 1 or a contiguous layout: the PyTorch reference on every device
        return monarch_backend(tiling.tiling or (1, 1, 1), iters=tiling.iters, contiguous=tiling.block)
    if torch.device(device).type == "cuda":  # the Triton op, differentiable through its backward kernels
        from toolkit.kernels import monarch_backend_triton  # needs Triton: imported only where it runs

        return monarch_backend_triton(tiling)
    return monarch_backend(tiling)


def rules_backend(rules: tuple[AttentionRule, ...], device: torch.device | str = "cpu") -> Backend:
    """One seam backend that computes each call and head with the first rule matching it (dense if none)."""
    backends = [_single_backend(rule.attention, device) for rule in rules]
    owners_of: dict[tuple, tuple[int, ...]] = {}  # (layer, step, chunk, is_clean, heads) -> rule per head (-1 dense)

    def owners(ctx: AttentionContext, num_heads: int) -> tuple[int, ...]:
        key = (ctx.layer, ctx.step, ctx.chunk, ctx.is_clean, num_heads)
        if key not in owners_of:
            found = [-1] * num_heads
            open_heads = set(range(num_heads))
            for i, rule in enumerate(rules):
                if not open_heads:
                    break
                if rule.matches_call(ctx):
                    taken = open_heads if rule.heads is None else open_heads & rule.heads
                    for h in taken:
                        found[h] = i if backends[i] is not None else -1
                    open_heads = open_heads - taken
            owners_of[key] = tuple(found)
        return owners_of[key]

    def attention_rules(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        heads_of: dict[int, list[int]] = {}
        for h, owner in enumerate(owners(ctx, q.shape[2])):
            heads_of.setdefault(owner, []).append(h)
        if len(heads_of) == 1:  # one rule covers the whole call: no splitting, exactly that backend
            (owner,) = heads_of
            return (dense_attention if owner < 0 else backends[owner])(q, k, v, ctx)
        # dense over all heads keeps the dense heads bit-identical to a dense call; the rules overwrite theirs
        out = dense_attention(q, k, v, ctx) if -1 in heads_of else q.new_empty(*q.shape[:3], v.shape[-1])
        for owner, heads in heads_of.items():
            if owner >= 0:
                idx = torch.tensor(heads, device=q.device)
                out[:, :, idx] = backends[owner](q[:, :, idx], k[:, :, idx], v[:, :, idx], ctx).to(out.dtype)
        return out

    attention_rules.__name__ = "attention_rules"
    return attention_rules


def backend_for(spec: str, device: torch.device | str = "cpu") -> Backend | None:
    """The seam backend an ``--attention`` spec names, for a model on ``device`` (``None``: dense everywhere).
    Every backend is differentiable (finetuning trains through it): the PyTorch references by autograd, the Triton
    Monarch op (CUDA, T = 1, aligned tiling) through its backward kernels."""
    rules = parse_attention_rules(spec)
    if rules[0].everywhere:  # a single spec (or rules after an unconditional one, which never match)
        return _single_backend(rules[0].attention, device)
    return rules_backend(rules, device)


def _model_backend(model: nn.Module, spec: str) -> Backend | None:
    cfg = getattr(model, "cfg", None)
    check_attention(spec, num_layers=len(seams(model)), num_heads=getattr(cfg, "num_heads", None))
    return backend_for(spec, next(model.parameters()).device)


def set_attention(model: nn.Module, spec: str) -> None:
    """Every seam of ``model`` computes attention as ``spec`` says, from now on."""
    set_backend(model, _model_backend(model, spec))


@contextmanager
def use_attention(model: nn.Module, spec: str) -> Iterator[nn.Module]:
    """Every seam of ``model`` computes attention as ``spec`` says inside the block; as before after it."""
    with use_backend(model, _model_backend(model, spec)):
        yield model
