"""The sprite evaluator: does a clip show the prompted sprites, the right number of them, moving coherently?

Detection (``detect_sprites``; model-agnostic, it reads only pixels in [0, 1]):

* **Colour test.** A pixel shows palette colour c if it equals c * shade within ``tol`` = 0.06 (max-abs over RGB)
  for a shade in [SHADE_MIN, 1], which is how ``data.render`` paints sprite interiors; backgrounds are dark and
  desaturated, so no background pixel passes. A pixel gets at most one colour (the closest).
* **Sprites.** Per colour and frame, 4-connected pieces (scipy ``ndimage.label``) are grouped into sprites: pieces
  that fit together inside one sprite's extent (``sprite_extent``: a radius-10 diamond, 2.4 radii across) are one
  sprite, cut up by an occluder; two separate blobs of one colour cannot fit in it unless they touch. A sprite
  counts if it has at least ``min_pixels`` pixels, by default ``12 * scale**2`` (scale = min(h, w) / 48, the
  renderer's size unit), a fifth of the smallest sprite (a radius-6 triangle, 63 * scale**2 pixels): a sprite
  mostly hidden behind another still counts, while the anti-aliased seams where two sprites meet (one pixel wide,
  their blend could pass for a third colour) and the stray matching pixels of noise never reach it.
* **Presence and count.** A colour is *present* in a clip if it is seen in at least half of the frames, so a sprite
  hidden behind another for a few frames is still there and a blob flashing up for a frame or two is not. The
  sprite count is the sum over present colours of the (low) median number of sprites over the frames where the
  colour is seen: a model that draws one red sprite as two blobs counts two.
* **Tracks.** Per colour and frame, the centroid (y, x) of its largest sprite (pixel centres at +0.5, as
  ``Truth.centres``), NaN where the colour is not seen.

Metrics per clip (``evaluate_clips``), against the prompt:

* ``colour_match``: the present colours are exactly the prompt's; ``count_match``: so is the count.
* ``persistence``: fraction of (prompted sprite, frame) pairs in which the sprite's colour is seen.
  ``boundary_persistence``: the same over the first frame of each chunk, for sprites seen on the last frame of the
  chunk before: a sprite the next chunk forgets shows up here.
* Jumps: per prompted sprite, the centroid displacement between consecutive frames where it is seen whole enough
  to trust its centroid (at least ``SOLID`` = half its median area: the centroid of a sliver wanders), divided by
  the frames in between (px per frame), so that vanishing and reappearing elsewhere also reads as a jump. ``jump``
  is their mean, ``max_jump`` the largest; ``boundary_jump`` averages those that cross a chunk boundary (last frame
  of a chunk to the first of the next), ``within_jump`` the others: a causal model that loses track of a sprite
  between chunks has boundary_jump >> within_jump (ratio ~1.0 on ground truth).
* ``place_match`` (prompts that name start places, else None): every placed sprite's centroid in the first frame of
  the first chunk where it is seen lies in its prompted cell of the 3 x 3 grid, widened by ``PLACE_MARGIN`` of the
  frame on each side (a sprite moves up to 0.052 * min(h, w) px per frame, and a partly hidden one's centroid
  wanders). Not part of ``score``, whose definition predates places.
* ``score`` in {0, 1}: 1 iff colour_match and count_match and persistence >= ``PERSISTENCE_MIN`` (0.9) and no jump
  exceeds ``JUMP_LIMIT`` (0.25) * min(h, w) px per frame. Sprites move at most 2.5 * scale = 0.052 * min(h, w) px per
  frame and occlusion moves the centroid of what is visible a little more: the largest ground-truth jump over 1024
  bundled clips was 0.17 * min(h, w) (0.18 over 512 clips of 9 x 40 x 72). A sprite re-drawn at a random place
  lands ~0.5 * min(h, w) away.

With a ``Truth`` (rendered ground truth), the metrics check the detector against what the renderer actually shows
rather than against the prompt: a (sprite, frame) pair whose visible interior (``Truth.masks`` less its blended
one-pixel outline) has fewer than ``min_pixels`` pixels is hidden and not expected; colour_match asks for every
prompted colour expected in half the frames and no unprompted colour, count_match for a count between those
bounds. ``truth_jump`` is the mean ground-truth centre displacement per frame (the speed a faithful clip shows)
and ``track_error`` the mean distance (px) of the detected centroid from ``Truth.centres`` where no sprite drawn
later comes near (a triangle's centroid sits 1/6 radius below its reported centre, up to 2.8 px at 80 px).

Measured on fresh ground-truth clips (12 x 80 x 128, 1024 clips): score 1.000 with the Truth; from pixels and
prompts alone 0.988 (colour_match 0.996: the rest are sprites the renderer hides for most of the clip, which is
the ceiling a model is held to); jump 2.88 px/frame vs truth_jump 2.87, boundary/within ratio 1.01, track_error
0.5 px. 64 bundled clips evaluate in ~0.7 s on 2 CPU cores (~0.9 s with a Truth).

``summarise`` aggregates clips into fractions and means (``Summary``: plain floats and, per clip, the outcomes
``paired`` compares between two models scored on the same clips; ``dataclasses.asdict`` is JSON-ready);
``evaluate_generator`` scores a ``(prompts, seed) -> video`` callable over prompts x seeds, with ground-truth
renders of the same prompts and seeds as its reference; ``heldout_prompts`` / ``heldout_seeds`` are the fixed
evaluation set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from toolkit.models.bundled import data
from toolkit.models.bundled.data import COLOUR_NAMES, COLOURS, SHADE_MIN, Prompt, Truth

PERSISTENCE_MIN = 0.9  # score: prompted sprites seen in >= 90 % of (sprite, frame) pairs
JUMP_LIMIT = 0.25  # score: no centroid jump above 0.25 * min(h, w) px per frame (~5x the fastest sprite)
SOLID = 0.5  # jumps: only frames where a sprite shows >= half its median area (a sliver's centroid wanders)
MIN_PIXELS_PER_SCALE2 = 12.0  # default min_pixels = 12 * scale**2: a fifth of the smallest sprite
PLACE_MARGIN = 0.08  # place_match: the prompted cell widened by this fraction of the frame on each side
HELDOUT_PROMPT_SEED = 1_000_103  # far from the small training seeds (and from the teacher's held-out 1_000_003)
HELDOUT_NOISE_SEED = 1_000_203
PAIRED = ("colour_match", "count_match", "score")  # the per-clip outcomes a Summary keeps for ``paired``

_PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # n 3
_STRUCT = np.zeros((3, 3, 3), dtype=bool)  # [f, h, w]: 4-connected within a frame, never across frames
_STRUCT[1] = ndimage.generate_binary_structure(2, 1)


def default_min_pixels(height: int, width: int) -> int:
    """Smallest component (pixels) that counts as a sprite in a ``height`` x ``width`` frame."""
    return max(4, round(MIN_PIXELS_PER_SCALE2 * (min(height, width) / 48.0) ** 2))


def sprite_extent(height: int, width: int) -> float:
    """Largest height or width (pixels) of one sprite: a radius-10 diamond (2.4 radii across), plus the AA edge."""
    return 2.4 * 10.0 * min(height, width) / 48.0 + 1.0


def _pixels(video: torch.Tensor) -> torch.Tensor:
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"expected video [b, 3, frames, h, w] in [0, 1], got shape {tuple(video.shape)}")
    return video.detach().to("cpu", torch.float32)


def colour_index(video: torch.Tensor, tol: float = 0.06) -> np.ndarray:
    """Palette colour of each pixel: int8 [b, frames, h, w], 1 + index into COLOUR_NAMES, 0 for none.

    ``video`` [b 3 f h w] in [0, 1]. Only bright pixels can match a palette colour, so the test runs on those alone
    (a few tens of % of a clip), which keeps a batch of 64 bundled clips well under a second."""
    v = _pixels(video).movedim(1, -1)  # b f h w 3
    bright = SHADE_MIN * float(_PALETTE.amax(1).min()) - tol  # dimmest channel-max any matching pixel can have
    cand = v.amax(-1) > bright
    pix = v[cand]  # N 3
    shade = ((pix @ _PALETTE.T) / (_PALETTE * _PALETTE).sum(1)).clamp(SHADE_MIN, 1.0)  # N n
    err = (pix[:, None, :] - shade[..., None] * _PALETTE).abs().amax(-1)  # N n
    best_err, best = err.min(1)
    out = torch.zeros(v.shape[:-1], dtype=torch.int8)
    out[cand] = torch.where(best_err < tol, best.to(torch.int8) + 1, 0)
    return out.numpy()


def colour_masks(video: torch.Tensor, tol: float = 0.06) -> torch.Tensor:
    """Pixels showing each palette colour: [b, n_colours, frames, h, w] bool, video [b 3 f h w] in [0, 1]."""
    idx = torch.from_numpy(colour_index(video, tol)).long()
    return idx.unsqueeze(1) == torch.arange(1, len(COLOURS) + 1).view(1, -1, 1, 1, 1)


@dataclass
class Detection:
    """What ``detect_sprites`` sees in one clip. Arrays cover every palette colour (rows in COLOUR_NAMES order).

    ``colours``: the present colours (seen in at least half of the frames), palette order; ``count``: the sprite
    count; ``frame_counts`` [n_colours, f] int: sprites (of >= min_pixels) per frame; ``tracks`` [n_colours, f, 2]
    float: (y, x) centroid of the largest one, NaN where none; ``areas`` [n_colours, f] int: its pixels."""

    colours: tuple[str, ...]
    count: int
    frame_counts: np.ndarray
    tracks: np.ndarray
    areas: np.ndarray

    def visible(self, colour: str) -> np.ndarray:
        """[f] bool: frames where ``colour`` is seen."""
        return self.frame_counts[COLOUR_NAMES.index(colour)] > 0

    def track(self, colour: str) -> np.ndarray:
        """[f, 2] (y, x) centroid track of ``colour``'s largest sprite, NaN where it is not seen."""
        return self.tracks[COLOUR_NAMES.index(colour)]


def _pieces(mask: np.ndarray, small: int) -> tuple[np.ndarray, ...]:
    """4-connected pieces of ``mask`` [f, h, w] within frames, of >= ``small`` pixels: arrays (frame, size, sum of
    y, sum of x, y0, y1, x0, x1) with one entry per piece, bounding boxes half-open."""
    labels, k = ndimage.label(mask, _STRUCT)
    where = np.nonzero(labels)
    lab = labels[where]
    size = np.bincount(lab, minlength=k + 1)[1:]
    sy = np.bincount(lab, where[1], k + 1)[1:]
    sx = np.bincount(lab, where[2], k + 1)[1:]
    keep = np.flatnonzero(size >= small)
    boxes = ndimage.find_objects(labels)
    box = np.array([[boxes[j][0].start, boxes[j][1].start, boxes[j][1].stop, boxes[j][2].start, boxes[j][2].stop]
                    for j in keep], dtype=np.int64).reshape(-1, 5)
    return box[:, 0], size[keep], sy[keep], sx[keep], box[:, 1], box[:, 2], box[:, 3], box[:, 4]


def _detect_clip(idx: np.ndarray, min_pixels: int, extent: float) -> Detection:
    """idx [f, h, w] int8 colour index of one clip -> its Detection (pieces grouped into sprites, per frame)."""
    n, f = len(COLOURS), idx.shape[0]
    counts = np.zeros((n, f), dtype=np.int64)
    areas = np.zeros((n, f), dtype=np.int64)
    tracks = np.full((n, f, 2), np.nan)
    small = max(2, min_pixels // 8)  # fragments of a sprite cut up by occluders; lone noise pixels stay out
    for c in np.unique(idx[idx > 0]).tolist():
        frame, size, sy, sx, y0, y1, x0, x1 = _pieces(idx == c, small)
        for t in np.unique(frame).tolist():
            clusters: list[list[int]] = []  # [size, sum y, sum x, y0, y1, x0, x1]
            sel = np.flatnonzero(frame == t)
            for j in sel[np.argsort(-size[sel], kind="stable")].tolist():
                for cl in clusters:  # join the first cluster that still fits inside one sprite's extent
                    lo_y, hi_y, lo_x, hi_x = min(cl[3], y0[j]), max(cl[4], y1[j]), min(cl[5], x0[j]), max(cl[6], x1[j])
                    if hi_y - lo_y <= extent and hi_x - lo_x <= extent:
                        cl[:] = [cl[0] + size[j], cl[1] + sy[j], cl[2] + sx[j], lo_y, hi_y, lo_x, hi_x]
                        break
                else:
                    clusters.append([size[j], sy[j], sx[j], y0[j], y1[j], x0[j], x1[j]])
            clusters = [cl for cl in clusters if cl[0] >= min_pixels]
            if clusters:
                big = max(clusters, key=lambda cl: cl[0])
                counts[c - 1, t] = len(clusters)
                areas[c - 1, t] = big[0]
                tracks[c - 1, t] = (big[1] / big[0] + 0.5, big[2] / big[0] + 0.5)  # pixel centres, as Truth
    seen = counts > 0
    present = 2 * seen.sum(1) >= f
    count = sum(int(np.sort(counts[j][seen[j]])[(seen[j].sum() - 1) // 2]) for j in np.flatnonzero(present))
    colours = tuple(COLOUR_NAMES[j] for j in np.flatnonzero(present))
    return Detection(colours=colours, count=count, frame_counts=counts, tracks=tracks, areas=areas)


def detect_sprites(video: torch.Tensor, min_pixels: int | None = None, tol: float = 0.06) -> list[Detection]:
    """Sprites of each clip of ``video`` [b 3 f h w] in [0, 1]: present colours, count, per-colour tracks."""
    if min_pixels is None:
        min_pixels = default_min_pixels(*video.shape[-2:])
    extent = sprite_extent(*video.shape[-2:])
    return [_detect_clip(clip, min_pixels, extent) for clip in colour_index(video, tol)]


def detect_colours(video: torch.Tensor, min_pixels: int | None = None, tol: float = 0.06) -> list[set[str]]:
    """Present palette colours per clip of ``video`` [b 3 f h w] (``detect_sprites``' ``colours`` as sets)."""
    return [set(d.colours) for d in detect_sprites(video, min_pixels, tol)]


# ----------------------------------------------------------------------------------------------------------------
# Metrics


@dataclass
class ClipMetrics:
    """One clip against its prompt (see the module docstring). None where a number is undefined (e.g. no jumps)."""

    prompt: str
    colours: list[str]
    colour_match: bool
    count: int
    prompt_count: int
    count_match: bool
    persistence: float
    boundary_persistence: float | None
    jump: float | None
    max_jump: float | None
    within_jump: float | None
    boundary_jump: float | None
    truth_jump: float | None
    track_error: float | None
    jump_limit: float
    score: float
    place_match: bool | None = None


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _truth_jump(centres: np.ndarray) -> float:
    """Mean ground-truth centre displacement per frame (px), centres [sprites, f, 2]."""
    return float(np.linalg.norm(np.diff(centres, axis=1), axis=-1).mean())


def _interior_area(masks: torch.Tensor) -> torch.Tensor:
    """Visible pixels of each ground-truth sprite [b, k, f] that are not on its one-pixel outline (masks [b k f h w]).

    The outline is blended with whatever lies behind, so the colour test cannot see it; the interior is what a
    perfect detector finds (this matters for slivers peeking out from behind another sprite)."""
    m = torch.nn.functional.pad(masks.detach().cpu().bool(), (1, 1, 1, 1))  # b k f h+2 w+2
    inside = m[..., 1:-1, 1:-1] & m[..., :-2, 1:-1] & m[..., 2:, 1:-1] & m[..., 1:-1, :-2] & m[..., 1:-1, 2:]
    return inside.flatten(-2).sum(-1)


def _unoccluded(centres: np.ndarray, scale: float) -> np.ndarray:
    """[sprites, f] bool: no sprite drawn later (on top) comes near, from centres [sprites, f, 2] in z-order.

    No sprite reaches further than 1.25 radii (the triangle's base corners) + the AA edge from its centre, radii
    are <= 10 * scale: centres farther apart than twice that reach cannot overlap."""
    reach = 2 * (12.5 * scale + 0.5)
    gap = np.linalg.norm(centres[:, None] - centres[None, :], axis=-1)  # z z' f
    later = np.triu(np.ones((len(centres), len(centres)), dtype=bool), 1)[..., None]
    return ~((gap <= reach) & later).any(1)


def _clip_metrics(
    det: Detection,
    prompt: Prompt,
    truth_area: np.ndarray | None,
    truth_centres: np.ndarray | None,
    *,
    size: tuple[int, int],
    frames_per_chunk: int,
    min_pixels: int,
) -> ClipMetrics:
    """truth_area [sprites, f] visible interior pixels, truth_centres [sprites, f, 2]: this clip's prompted sprites."""
    frames = det.frame_counts.shape[1]
    colours = [s.colour for s in prompt.sprites]
    seen = np.stack([det.visible(c) for c in colours])  # sprites f
    tracks = np.stack([det.track(c) for c in colours])  # sprites f 2
    areas = np.stack([det.areas[COLOUR_NAMES.index(c)] for c in colours]).astype(np.float64)
    typical = np.array([np.median(a[s]) if s.any() else 0.0 for a, s in zip(areas, seen)])
    solid = seen & (areas >= SOLID * typical[:, None])  # centroid of a mostly hidden sprite wanders: no jumps there
    expected = np.ones_like(seen)
    if truth_area is not None:
        expected = truth_area >= min_pixels  # else the renderer hid it (nearly) behind another sprite

    # persistence: every expected (sprite, frame); at boundaries, chunk starts after a frame where it was seen
    persistence = float(seen[expected].mean()) if expected.any() else 1.0
    starts = np.arange(frames_per_chunk, frames, frames_per_chunk)
    carried = seen[:, starts - 1] & expected[:, starts]
    boundary_persistence = float(seen[:, starts][carried].mean()) if carried.any() else None

    # jumps between consecutive frames where the sprite is seen, per frame of gap; split at chunk boundaries
    within, boundary = [], []
    for z in range(len(colours)):
        ts = np.flatnonzero(solid[z])
        steps = np.linalg.norm(np.diff(tracks[z, ts], axis=0), axis=1) / np.diff(ts)
        crosses = ts[1:] // frames_per_chunk != ts[:-1] // frames_per_chunk
        within += steps[~crosses].tolist()
        boundary += steps[crosses].tolist()
    jumps = within + boundary
    max_jump = max(jumps) if jumps else None
    jump_limit = JUMP_LIMIT * min(size)

    found = set(det.colours)
    if truth_area is None:
        colour_match = found == set(colours)
        count_match = det.count == len(colours)
        truth_jump = track_error = None
    else:  # agree with what the renderer shows: every sprite visible in half the frames, nothing unprompted
        must = {c for c, e in zip(colours, expected) if 2 * e.sum() >= frames}
        colour_match = must <= found <= set(colours)
        count_match = len(must) <= det.count <= len(colours)
        truth_jump = _truth_jump(truth_centres)
        unoccluded = seen & _unoccluded(truth_centres, min(size) / 48.0)
        track_error = _mean(np.linalg.norm(tracks[unoccluded] - truth_centres[unoccluded], axis=-1).tolist())

    ok = colour_match and count_match and persistence >= PERSISTENCE_MIN and (max_jump or 0.0) <= jump_limit
    place_match = _place_match(prompt, seen, tracks, expected, size, frames_per_chunk)
    return ClipMetrics(
        prompt=str(prompt),
        colours=list(det.colours),
        colour_match=colour_match,
        count=det.count,
        prompt_count=len(colours),
        count_match=count_match,
        persistence=persistence,
        boundary_persistence=boundary_persistence,
        jump=_mean(jumps),
        max_jump=max_jump,
        within_jump=_mean(within),
        boundary_jump=_mean(boundary),
        truth_jump=truth_jump,
        track_error=track_error,
        jump_limit=jump_limit,
        score=float(ok),
        place_match=place_match,
    )


def _place_match(prompt: Prompt, seen: np.ndarray, tracks: np.ndarray, expected: np.ndarray,
                 size: tuple[int, int], frames_per_chunk: int) -> bool | None:
    """Every placed sprite starts in its cell (module docstring); seen, expected [sprites, f], tracks [sprites f 2].
    A sprite not expected in the first chunk (hidden there by the renderer) is not asked for; None: no places."""
    placed = [z for z, s in enumerate(prompt.sprites) if s.place is not None]
    if not placed:
        return None
    h, w = size
    for z in placed:
        if not expected[z, :frames_per_chunk].any():
            continue
        first = np.flatnonzero(seen[z, :frames_per_chunk])
        if not len(first):
            return False
        y, x = tracks[z, first[0]]
        row, col = data.place_cell(prompt.sprites[z].place)
        inside_y = (row / 3 - PLACE_MARGIN) * h <= y <= ((row + 1) / 3 + PLACE_MARGIN) * h
        inside_x = (col / 3 - PLACE_MARGIN) * w <= x <= ((col + 1) / 3 + PLACE_MARGIN) * w
        if not (inside_y and inside_x):
            return False
    return True


def evaluate_clips(
    video: torch.Tensor,
    prompts: Sequence[Prompt],
    truth: Truth | None = None,
    *,
    frames_per_chunk: int = 3,
    min_pixels: int | None = None,
    tol: float = 0.06,
) -> list[ClipMetrics]:
    """Score each clip of ``video`` [b 3 f h w] in [0, 1] against its prompt (and, for renders, its ``Truth``)."""
    if len(prompts) != video.shape[0]:
        raise ValueError(f"{video.shape[0]} clips but {len(prompts)} prompts")
    h, w = video.shape[-2:]
    if min_pixels is None:
        min_pixels = default_min_pixels(h, w)
    dets = detect_sprites(video, min_pixels, tol)
    areas = centres = None
    if truth is not None:
        areas = _interior_area(truth.masks).numpy()  # b k f
        centres = truth.centres.cpu().numpy().astype(np.float64)  # b k f 2
    out = []
    for i, (det, prompt) in enumerate(zip(dets, prompts)):
        k = len(prompt.sprites)
        t_area = None if areas is None else areas[i, :k]
        t_centres = None if centres is None else centres[i, :k]
        out.append(_clip_metrics(det, prompt, t_area, t_centres, size=(h, w), frames_per_chunk=frames_per_chunk,
                                 min_pixels=min_pixels))
    return out


@dataclass
class Summary:
    """Aggregate over clips: fractions of clips and means of the per-clip numbers (None where no clip defines it).

    ``boundary_jump_ratio`` = boundary_jump / within_jump (~1 for a coherent rollout); ``teleports``: fraction of
    clips with a jump above their limit; ``reference``: the same summary for ground-truth renders of the same
    prompts x seeds (``evaluate_generator``), the numbers a perfect model would get."""

    clips: int
    score: float
    colour_match: float
    count_match: float
    count_error: float
    persistence: float
    boundary_persistence: float | None
    jump: float | None
    within_jump: float | None
    boundary_jump: float | None
    boundary_jump_ratio: float | None
    teleports: float
    truth_jump: float | None
    track_error: float | None
    place_match: float | None = None  # over the clips whose prompts name places
    thresholds: dict = field(default_factory=dict)
    # per clip, in evaluation order (prompts x seeds), "1"/"0" per clip for each of PAIRED: what ``paired`` compares
    outcomes: dict = field(default_factory=dict)
    reference: Summary | None = None


def summarise(metrics: Sequence[ClipMetrics]) -> Summary:
    """Fractions and means over clips (``ClipMetrics`` from one or several ``evaluate_clips`` calls)."""
    if not metrics:
        raise ValueError("no clips to summarise")

    def mean(name: str) -> float | None:
        values = [float(getattr(m, name)) for m in metrics if getattr(m, name) is not None]
        return _mean(values)

    within, boundary = mean("within_jump"), mean("boundary_jump")
    return Summary(
        clips=len(metrics),
        score=mean("score"),
        colour_match=mean("colour_match"),
        count_match=mean("count_match"),
        count_error=_mean([abs(m.count - m.prompt_count) for m in metrics]),
        persistence=mean("persistence"),
        boundary_persistence=mean("boundary_persistence"),
        jump=mean("jump"),
        within_jump=within,
        boundary_jump=boundary,
        boundary_jump_ratio=boundary / within if within and boundary is not None else None,
        teleports=_mean([float(m.max_jump is not None and m.max_jump > m.jump_limit) for m in metrics]),
        truth_jump=mean("truth_jump"),
        track_error=mean("track_error"),
        place_match=mean("place_match"),
        thresholds=dict(persistence_min=PERSISTENCE_MIN, jump_limit_px=sorted({m.jump_limit for m in metrics}),
                        place_margin=PLACE_MARGIN),
        outcomes={name: "".join("1" if getattr(m, name) else "0" for m in metrics) for name in PAIRED},
    )


def paired(before: str, after: str) -> dict:
    """Two models scored on the same clips (``Summary.outcomes[name]`` of each): the clips ``after`` gets right and
    ``before`` wrong (``gained``), the reverse (``lost``), and the exact two-sided sign-test p-value of that split
    (binomial, p = 1/2, over the clips where they differ). On 64 clips a difference of 6 points in an unpaired
    fraction is one standard deviation; the paired split sees only the clips that changed."""
    if len(before) != len(after):
        raise ValueError(f"paired outcomes need the same clips: {len(before)} against {len(after)}")
    gained = sum(a == "1" and b == "0" for b, a in zip(before, after))
    lost = sum(a == "0" and b == "1" for b, a in zip(before, after))
    n, k = gained + lost, min(gained, lost)
    p_value = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return dict(gained=gained, lost=lost, p_value=p_value)


def heldout_prompts(
    n: int = 64, seed: int = HELDOUT_PROMPT_SEED, pan_prob: float = 0.3, placed: bool = False
) -> list[Prompt]:
    """Fixed evaluation prompts, drawn like the training prompts (``data.random_prompts``) from a held-out seed,
    distinct: a prompt drawn again is skipped (the first repeat comes at draw 88, so the first 87 are the plain
    draws). ``placed``: the same prompts, each sprite given a distinct start place (``data.with_places``, from a
    generator of its own), so placed and unplaced scores compare prompt by prompt."""
    generator = torch.Generator().manual_seed(seed)
    prompts: list[Prompt] = []
    while len(prompts) < n:
        prompt = data.random_prompts(1, generator, pan_prob)[0]  # the same draws as one call for n prompts
        if prompt not in prompts:
            prompts.append(prompt)
    if placed:
        places = torch.Generator().manual_seed(seed + 1)
        prompts = [data.with_places(p, places) for p in prompts]
    return prompts


def heldout_seeds(n: int = 2, seed: int = HELDOUT_NOISE_SEED) -> list[int]:
    """Fixed held-out rollout seeds (``seed``, ``seed + 1``, ...)."""
    return [seed + k for k in range(n)]


def evaluate_generator(
    generate_fn: Callable[[list[Prompt], int], torch.Tensor],
    prompts: Sequence[Prompt],
    seeds: Sequence[int],
    *,
    frames_per_chunk: int = 3,
    reference: bool = True,
    min_pixels: int | None = None,
    tol: float = 0.06,
) -> Summary:
    """Score ``generate_fn(prompts, seed)`` (video [b 3 f h w] in [0, 1]) over ``prompts`` x ``seeds``.

    With ``reference``, ground truth of the same prompts (``data.render`` seeded with each seed, at the generated
    clip size) is scored the same way, from its pixels and the prompts alone, into ``Summary.reference``: the
    ceiling a perfect model would reach (a sprite the renderer hides for most of a clip costs ground truth too),
    with ``truth_jump`` the speed a faithful clip shows. E.g.
    ``evaluate_generator(lambda p, s: bundled.generate(model, p, seed=s), heldout_prompts(), heldout_seeds())``."""
    prompts = list(prompts)
    kw = dict(frames_per_chunk=frames_per_chunk, min_pixels=min_pixels, tol=tol)
    ours, ref = [], []
    for seed in seeds:
        video = generate_fn(prompts, seed)
        ours += evaluate_clips(video, prompts, **kw)
        if reference:
            frames, h, w = video.shape[-3:]
            g = torch.Generator().manual_seed(seed)
            gt, truth = data.render(prompts, g, frames=frames, height=h, width=w, with_truth=True)
            metrics = evaluate_clips(gt, prompts, **kw)
            centres = truth.centres.numpy().astype(np.float64)
            for i, (m, p) in enumerate(zip(metrics, prompts)):
                m.truth_jump = _truth_jump(centres[i, : len(p.sprites)])
            ref += metrics
    summary = summarise(ours)
    summary.reference = summarise(ref) if ref else None
    return summary


__all__ = [
    "HELDOUT_NOISE_SEED", "HELDOUT_PROMPT_SEED", "JUMP_LIMIT", "PAIRED", "PERSISTENCE_MIN", "PLACE_MARGIN", "SOLID",
    "ClipMetrics", "Detection", "Summary", "colour_index", "colour_masks", "default_min_pixels", "detect_colours",
    "detect_sprites", "evaluate_clips", "evaluate_generator", "heldout_prompts", "heldout_seeds", "paired",
    "sprite_extent", "summarise",
]
