"""Procedural sprite videos: the training data, the prompt space and the ground truth of the bundled model.

A clip shows up to ``MAX_SPRITES`` textured sprites of distinct colours (shapes: circle, square, triangle, diamond,
ring) moving with constant velocity and bouncing off the frame edges, drawn in prompt order (later sprites occlude
earlier ones), over a textured background. An optional camera pan scrolls the background by a constant
velocity (the sprites live in screen coordinates, so they keep bouncing inside the frame while the world slides).

The "prompt" is what a caption would say: which sprites (colour + shape, in z-order) and which pan, and optionally
where each sprite starts, as one cell of a 3 x 3 grid over the frame (``PLACES``: "red circle top-left"). Exact
positions, velocities, sizes and textures are *not* in the prompt: the model has to invent them in the first chunk
(inside the named cell, where one is named) and keep them consistent afterwards, which is exactly the job of its
causal self-attention.

    Prompt  <->  "2 sprites: red circle, blue square; pan left"   (``parse_prompt`` / ``str(prompt)``)
    Prompt  <->  "2 sprites: red circle top-left, blue square centre"
    Prompt  -->  context [L_txt = 1 + MAX_SPRITES, TEXT_DIM]      (``encode_prompts``: one global token, one token
                                                                     per sprite slot, empty slots all zero)
    Prompt  -->  video [3, frames, height, width] in [0, 1]        (``render``; ``with_truth=True`` also gives each
                                                                     sprite's visible mask and centre per frame)

Everything random is drawn from a CPU ``torch.Generator`` as a few small parameter tensors; rendering is then
deterministic tensor math on any device, so a seed gives the same clip on CPU and GPU (up to float rounding) and a
batch of 64 clips renders in milliseconds on a GPU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from toolkit.errors import ToolkitError

# Saturated, bright colours; backgrounds stay dark and desaturated (channels in [0.1, 0.5]) so that the sprite
# evaluator (``evaluate.py``) can tell sprites from background. Values are RGB in [0, 1].
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.20, 0.20),
    "green": (0.20, 0.85, 0.25),
    "blue": (0.25, 0.45, 1.00),
    "yellow": (0.95, 0.90, 0.20),
    "magenta": (0.90, 0.25, 0.90),
    "cyan": (0.20, 0.90, 0.95),
    "orange": (1.00, 0.55, 0.10),
    "white": (0.95, 0.95, 0.95),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle", "diamond", "ring")
PANS = ("none", "left", "right", "up", "down")
# Where a sprite starts (its centre in the first frame): a cell of the 3 x 3 grid over the frame, row-major.
PLACES = ("top-left", "top", "top-right", "left", "centre", "right", "bottom-left", "bottom", "bottom-right")
MAX_SPRITES = 4
TEXT_DIM = 32
TEXT_LEN = 1 + MAX_SPRITES

# Sprite brightness is colour * (SHADE_MIN + (1 - SHADE_MIN) * texture), texture in [0, 1].
SHADE_MIN = 0.8

# Layout of the prompt tokens (TEXT_DIM channels). Global token: flag, sprite count one-hot, pan one-hot.
_G_FLAG, _G_COUNT, _G_PAN = 0, 1, 1 + MAX_SPRITES
# Sprite token: flag, colour one-hot, shape one-hot, z-order one-hot, then the start cell: a flag and its
# (row, column) in {-1, 0, 1} (all zero for a sprite without a place, which models trained before places existed
# read as before).
_S_FLAG = _G_PAN + len(PANS)
_S_COLOUR = _S_FLAG + 1
_S_SHAPE = _S_COLOUR + len(COLOURS)
_S_Z = _S_SHAPE + len(SHAPES)
_S_PLACE = _S_Z + MAX_SPRITES
assert _S_PLACE + 3 <= TEXT_DIM


@dataclass(frozen=True)
class Sprite:
    colour: str
    shape: str
    place: str | None = None  # start cell (one of PLACES), or None: anywhere

    def __str__(self) -> str:
        return f"{self.colour} {self.shape}" + (f" {self.place}" if self.place else "")


@dataclass(frozen=True)
class Prompt:
    """Sprites in z-order (the last one is drawn on top) and the camera pan."""

    sprites: tuple[Sprite, ...]
    pan: str = "none"

    def __post_init__(self) -> None:
        if not 1 <= len(self.sprites) <= MAX_SPRITES:
            raise ToolkitError(f"a prompt has 1..{MAX_SPRITES} sprites, got {len(self.sprites)}")
        colours = [s.colour for s in self.sprites]
        if len(set(colours)) != len(colours):
            raise ToolkitError(f"sprite colours must be distinct, got {', '.join(colours)}")
        for s in self.sprites:
            if s.colour not in COLOURS:
                raise ToolkitError(f"unknown colour {s.colour!r}; choose from {', '.join(COLOURS)}")
            if s.shape not in SHAPES:
                raise ToolkitError(f"unknown shape {s.shape!r}; choose from {', '.join(SHAPES)}")
            if s.place is not None and s.place not in PLACES:
                raise ToolkitError(f"unknown place {s.place!r}; choose from {', '.join(PLACES)}")
        if self.pan not in PANS:
            raise ToolkitError(f"unknown pan {self.pan!r}; choose from {', '.join(PANS)}")

    def __str__(self) -> str:
        n = len(self.sprites)
        text = f"{n} sprite{'s' if n > 1 else ''}: " + ", ".join(str(s) for s in self.sprites)
        return text + ("" if self.pan == "none" else f"; pan {self.pan}")


def parse_prompt(text: str) -> Prompt:
    """Parse e.g. ``"2 sprites: red circle, blue square; pan left"`` or ``"red circle top-left, blue square
    centre"`` (count, places and pan optional, case-insensitive; "center" is read as "centre")."""
    usage = (
        f"expected e.g. '2 sprites: red circle top-left, blue square; pan left' (colours: {', '.join(COLOURS)}; "
        f"shapes: {', '.join(SHAPES)}; optional start place: {', '.join(PLACES)}; pan: {', '.join(PANS[1:])})"
    )
    parts = [p.strip() for p in text.lower().split(";")]
    body, pans = parts[0], []
    for extra in parts[1:]:
        m = re.fullmatch(r"(?:pan\s+(\w+)|no pan|static)", extra)
        if not m:
            raise ToolkitError(f"cannot parse {extra!r} in prompt {text!r}; {usage}")
        pans.append(m.group(1) or "none")
    if len(pans) > 1:
        raise ToolkitError(f"prompt {text!r} gives {len(pans)} camera motions ({'; '.join(parts[1:])}): one per prompt")
    pan = pans[0] if pans else "none"
    count = None
    m = re.fullmatch(r"(\d+)\s+sprites?\s*:\s*(.*)", body)
    if m:
        count, body = int(m.group(1)), m.group(2)
    sprites = []
    for item in filter(None, (s.strip() for s in body.split(","))):
        words = item.replace("center", "centre").split()
        known = len(words) == 3 and words[0] in COLOURS and words[1] in SHAPES  # a sprite, then maybe a place
        if len(words) not in (2, 3) or (len(words) == 3 and not known):
            raise ToolkitError(f"cannot parse sprite {item!r} in prompt {text!r}; {usage}")
        sprites.append(Sprite(colour=words[0], shape=words[1], place=words[2] if len(words) == 3 else None))
    if count is not None and count != len(sprites):
        raise ToolkitError(f"prompt {text!r} announces {count} sprites but lists {len(sprites)}")
    return Prompt(tuple(sprites), pan)


def random_prompts(
    n: int, generator: torch.Generator, pan_prob: float = 0.3, min_sprites: int = 1, placed: float = 0.0
) -> list[Prompt]:
    """``n`` prompts: ``min_sprites``..MAX_SPRITES sprites of distinct colours, random shapes, a pan with probability
    ``pan_prob``; with probability ``placed`` a prompt names a distinct start cell for each sprite (``with_places``).
    ``min_sprites`` 1 and ``placed`` 0 make the draws every held-out prompt set was made with (a prompt without
    places draws nothing more)."""
    if not 1 <= min_sprites <= MAX_SPRITES:
        raise ValueError(f"min_sprites must be in 1..{MAX_SPRITES}, not {min_sprites}")
    if not 0.0 <= placed <= 1.0:
        raise ValueError(f"placed is a probability, not {placed}")
    prompts = []
    for _ in range(n):
        count = int(torch.randint(min_sprites, MAX_SPRITES + 1, (), generator=generator))
        colours = torch.randperm(len(COLOURS), generator=generator)[:count].tolist()
        shapes = torch.randint(len(SHAPES), (count,), generator=generator).tolist()
        pan = "none"
        if float(torch.rand((), generator=generator)) < pan_prob:
            pan = PANS[1 + int(torch.randint(len(PANS) - 1, (), generator=generator))]
        prompt = Prompt(tuple(Sprite(COLOUR_NAMES[c], SHAPES[s]) for c, s in zip(colours, shapes)), pan)
        if placed > 0 and float(torch.rand((), generator=generator)) < placed:
            prompt = with_places(prompt, generator)
        prompts.append(prompt)
    return prompts


def with_places(prompt: Prompt, generator: torch.Generator) -> Prompt:
    """``prompt`` with a distinct random start cell (``PLACES``) for each sprite."""
    cells = torch.randperm(len(PLACES), generator=generator)[: len(prompt.sprites)].tolist()
    return placed_at(prompt, [PLACES[c] for c in cells])


def placed_at(prompt: Prompt, places: Sequence[str]) -> Prompt:
    """``prompt`` with sprite i starting at ``places[i]`` (one of ``PLACES`` per sprite)."""
    if len(places) != len(prompt.sprites):
        raise ValueError(f"{len(places)} places for {len(prompt.sprites)} sprites")
    return Prompt(tuple(Sprite(s.colour, s.shape, place) for s, place in zip(prompt.sprites, places)), prompt.pan)


def place_cell(place: str) -> tuple[int, int]:
    """(row, column) in 0..2 of a start place's cell in the 3 x 3 grid."""
    return divmod(PLACES.index(place), 3)


def _place_at(row: torch.Tensor, col: torch.Tensor) -> str:
    """The place whose cell an encoded sprite token names: (row, column) channels in {-1, 0, 1}."""
    return PLACES[3 * (round(float(row)) + 1) + round(float(col)) + 1]


def encode_prompts(prompts: list[Prompt]) -> torch.Tensor:
    """Prompts -> context [b, TEXT_LEN, TEXT_DIM] (float32): global token, then one token per sprite slot."""
    out = torch.zeros(len(prompts), TEXT_LEN, TEXT_DIM)
    for i, p in enumerate(prompts):
        out[i, 0, _G_FLAG] = 1
        out[i, 0, _G_COUNT + len(p.sprites) - 1] = 1
        out[i, 0, _G_PAN + PANS.index(p.pan)] = 1
        for z, s in enumerate(p.sprites):
            tok = out[i, 1 + z]
            tok[_S_FLAG] = 1
            tok[_S_COLOUR + COLOUR_NAMES.index(s.colour)] = 1
            tok[_S_SHAPE + SHAPES.index(s.shape)] = 1
            tok[_S_Z + z] = 1
            if s.place is not None:
                row, col = place_cell(s.place)
                tok[_S_PLACE : _S_PLACE + 3] = torch.tensor([1.0, row - 1.0, col - 1.0])
    return out


def leave_one_out_contexts(prompts: list[Prompt]) -> torch.Tensor:
    """Negative prompts for guidance that asks for every sprite (``generate(negatives="leave_one_out")``): context
    [slots, b, TEXT_LEN, TEXT_DIM], slots = the most sprites of any prompt; slot j of a prompt of n sprites is the
    prompt with sprite j left out (z-order of the others kept; for n = 1 the null prompt, all zeros), and for j ≥ n
    the prompt itself, whose guidance term v_c − v_j is then zero."""
    slots = max(len(p.sprites) for p in prompts)
    out = encode_prompts(prompts).unsqueeze(0).repeat(slots, 1, 1, 1)
    for i, p in enumerate(prompts):
        for j in range(len(p.sprites)):
            rest = p.sprites[:j] + p.sprites[j + 1 :]
            out[j, i] = encode_prompts([Prompt(rest, p.pan)])[0] if rest else 0
    return out


def decode_prompts(context: torch.Tensor) -> list[Prompt]:
    """Inverse of ``encode_prompts`` (context [b, TEXT_LEN, TEXT_DIM])."""
    prompts = []
    for c in context.float().cpu():
        pan = PANS[int(c[0, _G_PAN : _G_PAN + len(PANS)].argmax())]
        sprites = [
            Sprite(
                COLOUR_NAMES[int(tok[_S_COLOUR : _S_COLOUR + len(COLOURS)].argmax())],
                SHAPES[int(tok[_S_SHAPE : _S_SHAPE + len(SHAPES)].argmax())],
                _place_at(tok[_S_PLACE + 1], tok[_S_PLACE + 2]) if tok[_S_PLACE] > 0.5 else None,
            )
            for tok in c[1:]
            if tok[_S_FLAG] > 0.5
        ]
        prompts.append(Prompt(tuple(sprites), pan))
    return prompts


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def _shape_distance(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance (in radii; < 0 inside) of the sprite outline at offsets (u, v) = (dx, dy) / radius.

    shape [...] integer index into SHAPES, broadcast against u, v. The triangle points up (v grows downwards)."""
    u, v = torch.broadcast_tensors(u, v)
    r = torch.sqrt(u * u + v * v)
    triangle = torch.maximum(v - 0.75, (1.75 * u.abs() - (v + 1.0)) / math.hypot(1.75, 1.0))
    candidates = torch.stack(
        [
            r - 1.0,  # circle
            torch.maximum(u.abs(), v.abs()) - 0.85,  # square
            triangle,
            (u.abs() + v.abs() - 1.2) / math.sqrt(2.0),  # diamond
            (r - 0.68).abs() - 0.32,  # ring
        ]
    )
    index = shape.expand_as(u).unsqueeze(0)
    return candidates.gather(0, index).squeeze(0)


def _bounce(start: torch.Tensor, velocity: torch.Tensor, low: torch.Tensor, high: torch.Tensor, t: torch.Tensor):
    """Position at times t of a point moving at constant velocity between walls low..high (elastic reflection)."""
    span = (high - low).clamp_min(1e-6)
    y = torch.remainder(start - low + velocity * t, 2 * span)
    return low + span - (y - span).abs()


def _start(u: torch.Tensor, radius: torch.Tensor, cell: torch.Tensor, size: int) -> torch.Tensor:
    """First-frame centre along one axis from u ~ U(0, 1): anywhere the sprite fits (cell -1), or inside the
    named third of the axis (cell 0..2) where it fits; the same draw either way, so prompts without places render
    as they always have."""
    third = size / 3.0
    placed = cell >= 0
    low = torch.where(placed, torch.maximum(radius, cell * third), radius)
    high = torch.minimum(size - radius, (cell + 1) * third)
    span = torch.where(placed, high - low, size - 2 * radius)  # the unplaced span exactly as it was always computed
    return low + span * u


@dataclass
class Truth:
    """What the renderer knows about a batch of clips (sprite slots in prompt order, z-order).

    ``masks`` [b, MAX_SPRITES, frames, h, w] bool: the pixels where each sprite is *visible* (coverage > 1/2 after
    the sprites drawn over it); ``centres`` [b, MAX_SPRITES, frames, 2] float32 (y, x) in pixels, the sprite's
    geometric centre (also when occluded); ``present`` [b, MAX_SPRITES] bool: the slot holds a sprite."""

    masks: torch.Tensor
    centres: torch.Tensor
    present: torch.Tensor


def render(
    prompts: list[Prompt],
    generator: torch.Generator,
    *,
    frames: int,
    height: int,
    width: int,
    device: torch.device | str = "cpu",
    with_truth: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, Truth]:
    """Render one clip per prompt: [b, 3, frames, height, width] float32 in [0, 1] (and its ``Truth``).

    Scene parameters (positions, velocities, sizes, textures, background, pan speed) come from ``generator``
    (a CPU generator), so the result depends only on the prompts and the generator state."""
    b, k = len(prompts), MAX_SPRITES
    g = generator
    scale = min(height, width) / 48.0  # sizes and speeds are specified for a 48-pixel-high frame

    # --- sprite parameters, b k ---
    present = torch.zeros(b, k)
    colour = torch.zeros(b, k, 3)
    shape = torch.zeros(b, k, dtype=torch.long)
    cell = torch.full((b, k, 2), -1)  # start cell (row, column), -1: anywhere
    for i, p in enumerate(prompts):
        for z, s in enumerate(p.sprites):
            present[i, z] = 1
            colour[i, z] = torch.tensor(COLOURS[s.colour])
            shape[i, z] = SHAPES.index(s.shape)
            if s.place is not None:
                cell[i, z] = torch.tensor(place_cell(s.place))
    radius = scale * (6.0 + 4.0 * torch.rand(b, k, generator=g))  # 6-10 px: each sprite covers 3-8 % of a frame
    cy = _start(torch.rand(b, k, generator=g), radius, cell[..., 0], height)
    cx = _start(torch.rand(b, k, generator=g), radius, cell[..., 1], width)
    speed = scale * (1.0 + 1.5 * torch.rand(b, k, generator=g))  # pixels per frame
    angle = 2 * math.pi * torch.rand(b, k, generator=g)
    vy, vx = speed * torch.sin(angle), speed * torch.cos(angle)
    tex_angle = math.pi * torch.rand(b, k, generator=g)
    tex_freq = 2 * math.pi / (scale * (2.5 + 3.0 * torch.rand(b, k, generator=g)))  # stripe period 2.5-5.5 px
    tex_phase = 2 * math.pi * torch.rand(b, k, generator=g)
    tex_checker = torch.rand(b, k, generator=g) < 0.5  # stripes, or the product of two gratings (checks)

    # --- background: two dark desaturated colours mixed by two oriented gratings, scrolled by the pan ---
    grey = 0.15 + 0.2 * torch.rand(b, 1, generator=g)
    bg_a = (grey + 0.08 * (torch.rand(b, 3, generator=g) - 0.5)).clamp(0.1, 0.5)
    bg_b = (bg_a + 0.15 * (torch.rand(b, 3, generator=g) - 0.3)).clamp(0.1, 0.5)
    bg_angle = math.pi * torch.rand(b, 2, generator=g)
    bg_freq = 2 * math.pi / (scale * (6.0 + 14.0 * torch.rand(b, 2, generator=g)))
    bg_phase = 2 * math.pi * torch.rand(b, 2, generator=g)
    pan_speed = scale * (1.0 + 1.0 * torch.rand(b, generator=g))
    pan_dir = {"none": (0.0, 0.0), "left": (0.0, 1.0), "right": (0.0, -1.0), "up": (1.0, 0.0), "down": (-1.0, 0.0)}
    pan_v = torch.tensor([pan_dir[p.pan] for p in prompts]).view(b, 2) * pan_speed[:, None]  # (dy, dx) of the scene

    params = [present, colour, shape, radius, cy, cx, vy, vx, tex_angle, tex_freq, tex_phase, tex_checker,
              bg_a, bg_b, bg_angle, bg_freq, bg_phase, pan_v]
    (present, colour, shape, radius, cy, cx, vy, vx, tex_angle, tex_freq, tex_phase, tex_checker,
     bg_a, bg_b, bg_angle, bg_freq, bg_phase, pan_v) = (p.to(device) for p in params)  # fmt: skip

    t = torch.arange(frames, device=device, dtype=torch.float32)
    yy = torch.arange(height, device=device, dtype=torch.float32).view(1, 1, height, 1) + 0.5  # pixel centres
    xx = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, 1, width) + 0.5

    # background [b, 3, frames, h, w]
    wy = yy - pan_v[:, 0].view(b, 1, 1, 1) * t.view(1, frames, 1, 1)  # world coords seen by the camera: b f h w
    wx = xx - pan_v[:, 1].view(b, 1, 1, 1) * t.view(1, frames, 1, 1)
    mix = 0.0
    for j in range(2):
        c, s = torch.cos(bg_angle[:, j]).view(b, 1, 1, 1), torch.sin(bg_angle[:, j]).view(b, 1, 1, 1)
        freq, phase = bg_freq[:, j].view(b, 1, 1, 1), bg_phase[:, j].view(b, 1, 1, 1)
        mix = mix + 0.25 * (1 + torch.sin(freq * (c * wx + s * wy) + phase))
    video = bg_a.view(b, 3, 1, 1, 1) + (bg_b - bg_a).view(b, 3, 1, 1, 1) * mix.unsqueeze(1)

    # sprite centres over time: b k f
    tt = t.view(1, 1, frames)
    py = _bounce(cy[..., None], vy[..., None], radius[..., None], height - radius[..., None], tt)
    px = _bounce(cx[..., None], vx[..., None], radius[..., None], width - radius[..., None], tt)
    coverage = []
    for z in range(k):  # z-order: later sprites drawn over earlier ones
        dy = yy - py[:, z].view(b, frames, 1, 1)  # b f h w
        dx = xx - px[:, z].view(b, frames, 1, 1)
        r = radius[:, z].view(b, 1, 1, 1)
        dist = _shape_distance(shape[:, z].view(b, 1, 1, 1), dx / r, dy / r) * r  # in pixels
        alpha = (0.5 - dist).clamp(0, 1) * present[:, z].view(b, 1, 1, 1)  # one-pixel anti-aliased edge
        c, s = torch.cos(tex_angle[:, z]).view(b, 1, 1, 1), torch.sin(tex_angle[:, z]).view(b, 1, 1, 1)
        freq, phase = tex_freq[:, z].view(b, 1, 1, 1), tex_phase[:, z].view(b, 1, 1, 1)
        g1 = 0.5 + 0.5 * torch.sin(freq * (c * dx + s * dy) + phase)
        g2 = 0.5 + 0.5 * torch.sin(freq * (c * dy - s * dx) + phase)
        texture = torch.where(tex_checker[:, z].view(b, 1, 1, 1), g1 * g2, g1)
        shade = SHADE_MIN + (1 - SHADE_MIN) * texture
        sprite = colour[:, z].view(b, 3, 1, 1, 1) * shade.unsqueeze(1)
        alpha = alpha.unsqueeze(1)
        video = video * (1 - alpha) + sprite * alpha
        if with_truth:
            coverage = [c * (1 - alpha[:, 0]) for c in coverage] + [alpha[:, 0]]
    video = video.clamp(0, 1)
    if not with_truth:
        return video
    masks = torch.stack(coverage, dim=1) > 0.5  # b k f h w
    return video, Truth(masks=masks, centres=torch.stack([py, px], dim=-1), present=present.bool())


def sample_batch(
    batch: int,
    generator: torch.Generator,
    *,
    frames: int,
    height: int,
    width: int,
    device: torch.device | str = "cpu",
    pan_prob: float = 0.3,
    min_sprites: int = 1,
    placed: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, list[Prompt]]:
    """Random prompts and their clips: (video [b 3 f h w] in [0, 1], context [b TEXT_LEN TEXT_DIM], prompts)."""
    prompts = random_prompts(batch, generator, pan_prob, min_sprites, placed)
    video = render(prompts, generator, frames=frames, height=height, width=width, device=device)
    return video, encode_prompts(prompts).to(device), prompts
