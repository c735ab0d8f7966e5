"""The procedural sprite-video generator: determinism, prompt fidelity, prompt text/tensor round trips, motion."""

from __future__ import annotations

import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.models.bundled import data as P
from toolkit.models.bundled import evaluate as E

CLIP = dict(frames=12, height=48, width=80)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_render_is_deterministic_per_seed():
    prompts = P.random_prompts(6, _gen(1))
    a = P.render(prompts, _gen(7), frames=5, height=30, width=52)
    b = P.render(prompts, _gen(7), frames=5, height=30, width=52)
    c = P.render(prompts, _gen(8), frames=5, height=30, width=52)
    assert a.shape == (6, 3, 5, 30, 52)
    assert torch.equal(a, b)
    assert (a - c).abs().amax() > 0.1
    # the batch is not one clip repeated
    assert (a[0] - a[1]).abs().amax() > 0.1
    v1, ctx1, p1 = P.sample_batch(4, _gen(3), frames=4, height=48, width=80)
    v2, ctx2, p2 = P.sample_batch(4, _gen(3), frames=4, height=48, width=80)
    assert p1 == p2 and torch.equal(v1, v2) and torch.equal(ctx1, ctx2)


@pytest.mark.parametrize("size", [(48, 80), (30, 52)])
def test_clip_shows_exactly_the_prompted_colours(size):
    height, width = size
    prompts = P.random_prompts(48, _gen(11))
    assert {len(p.sprites) for p in prompts} == set(range(1, P.MAX_SPRITES + 1))  # every count is exercised
    video = P.render(prompts, _gen(12), frames=12, height=height, width=width)
    assert 0.0 <= float(video.min()) and float(video.max()) <= 1.0
    # every prompted colour shows up in some frame (a sprite may hide behind another for a while), no other does
    for p, det in zip(prompts, E.detect_sprites(video)):
        seen = {c for c in P.COLOUR_NAMES if det.visible(c).any()}
        assert seen == {s.colour for s in p.sprites}, str(p)
        assert set(det.colours) <= seen


def test_detector_rejects_background_and_finds_a_painted_colour():
    prompts = [P.parse_prompt("1 sprite: red circle")]
    video = P.render(prompts, _gen(0), **CLIP)
    red = E.colour_masks(video)[0, P.COLOUR_NAMES.index("red")]
    # the red sprite covers roughly its area (r in [6, 10] px) in every frame, nothing else is red
    area = red.flatten(1).sum(1).float()
    assert bool((area > 0.8 * 3.14 * 5.5**2).all()) and bool((area < 3.15 * 10.5**2).all())
    background_only = P.render(prompts, _gen(0), **CLIP) * 0 + video[:, :, :, :4, :4].mean()
    assert E.detect_colours(background_only) == [set()]


def test_sprites_bounce_inside_the_frame_at_constant_speed():
    low, high = torch.tensor(5.0), torch.tensor(40.0)
    t = torch.arange(200.0)
    for start, velocity in [(10.0, 2.3), (39.0, -1.7), (5.0, 0.9)]:
        pos = P._bounce(torch.tensor(start), torch.tensor(velocity), low, high, t)
        assert float(pos.min()) >= 5.0 - 1e-4 and float(pos.max()) <= 40.0 + 1e-4
        step = pos.diff().abs()
        # constant speed except across a wall, where the path folds back (|step| <= speed)
        assert float(step.max()) <= abs(velocity) + 1e-4
        assert float((step - abs(velocity)).abs().lt(1e-3).float().mean()) > 0.7
        assert float(pos.max()) > 39.0 and float(pos.min()) < 6.0  # it reaches both walls


def _column_shift(a: torch.Tensor, b: torch.Tensor, max_shift: int = 12) -> int:
    """Horizontal shift s (pixels) that best maps frame a onto frame b: b[:, x] ≈ a[:, x - s].

    Median error, so that the moving sprite (a minority of pixels) does not decide it."""
    errs = {s: float((b[..., max_shift:-max_shift] - a.roll(s, -1)[..., max_shift:-max_shift]).abs().median())
            for s in range(-max_shift, max_shift + 1)}
    return min(errs, key=errs.get)


def test_pan_scrolls_the_background():
    # one small sprite so the background dominates the frame
    shifts = {}
    for pan in ("none", "left", "right"):
        p = P.parse_prompt(f"1 sprite: white square; pan {pan}" if pan != "none" else "white square")
        video = P.render([p], _gen(5), frames=6, height=48, width=80)[0]
        shifts[pan] = _column_shift(video[:, 0], video[:, 5])
    assert shifts["none"] == 0
    assert shifts["left"] >= 4  # camera pans left -> the scene slides right (1..2 px per frame)
    assert shifts["right"] <= -4


def test_prompt_text_and_tensor_round_trip():
    prompts = P.random_prompts(40, _gen(2), pan_prob=0.5)
    assert any(p.pan != "none" for p in prompts)
    for p in prompts:
        assert P.parse_prompt(str(p)) == p
    ctx = P.encode_prompts(prompts)
    assert ctx.shape == (40, P.TEXT_LEN, P.TEXT_DIM)
    assert P.decode_prompts(ctx) == prompts
    # one token per sprite slot, empty slots are zero
    for p, c in zip(prompts, ctx):
        assert int((c.abs().sum(1) > 0).sum()) == 1 + len(p.sprites)


def test_parse_prompt_forms_and_errors():
    p = P.parse_prompt("  2 Sprites: Red circle,  blue square ; pan LEFT")
    assert p == P.Prompt((P.Sprite("red", "circle"), P.Sprite("blue", "square")), "left")
    assert P.parse_prompt("green ring").pan == "none"
    assert P.parse_prompt("green ring; static").pan == "none"
    for bad in ("3 sprites: red circle, blue square", "red circle, red square", "purple circle",
                "red hexagon", "red circle; pan sideways", "5 sprites: red circle, blue square, green ring, "
                "white diamond, cyan circle", "", "red big circle"):
        with pytest.raises(ToolkitError):
            P.parse_prompt(bad)
    with pytest.raises(ToolkitError, match="one per prompt"):  # two camera motions: never keep just the last
        P.parse_prompt("red circle; pan left; pan right")


def test_places_round_trip_and_parse():
    prompts = P.random_prompts(60, _gen(4), placed=0.5)
    placed = [p for p in prompts if p.sprites[0].place is not None]
    assert 10 < len(placed) < 50  # about half, each sprite of a placed prompt in its own cell
    for p in placed:
        assert all(s.place in P.PLACES for s in p.sprites) and len({s.place for s in p.sprites}) == len(p.sprites)
    for p in prompts:
        assert P.parse_prompt(str(p)) == p
    assert P.decode_prompts(P.encode_prompts(prompts)) == prompts
    p = P.parse_prompt("2 sprites: Red circle top-left, blue square center; pan up")
    assert [s.place for s in p.sprites] == ["top-left", "centre"]
    assert str(p) == "2 sprites: red circle top-left, blue square centre; pan up"
    with pytest.raises(ToolkitError, match="unknown place"):
        P.parse_prompt("red circle middle")
    with pytest.raises(ValueError, match="probability"):
        P.random_prompts(1, _gen(0), placed=1.5)
    assert P.placed_at(P.parse_prompt("red circle, blue ring"), ["top", "left"]) == \
        P.parse_prompt("red circle top, blue ring left")
    with pytest.raises(ValueError, match="1 places for 2 sprites"):
        P.placed_at(P.parse_prompt("red circle, blue ring"), ["top"])


def test_placed_sprites_start_in_their_cell_and_unplaced_draws_are_unchanged():
    """A named place puts the first-frame centre inside that third of each axis; a prompt without places draws
    and renders as before places existed: the same random stream, the centres of the same draws
    (radius + (size - 2 radius) u; the first frame's goes through the bounce's arithmetic, so to rounding)."""
    h, w = 48, 80
    prompts = P.random_prompts(48, _gen(5), placed=1.0)
    _, truth = P.render(prompts, _gen(6), with_truth=True, **CLIP)
    for i, p in enumerate(prompts):
        for z, s in enumerate(p.sprites):
            row, col = P.place_cell(s.place)
            y, x = truth.centres[i, z, 0].tolist()
            assert row * h / 3 <= y <= (row + 1) * h / 3 and col * w / 3 <= x <= (col + 1) * w / 3
    # unplaced: the prompt draws stop where they always stopped, and the centres follow the old formula
    g1, g2 = _gen(7), _gen(7)
    assert P.random_prompts(30, g1) == P.random_prompts(30, g2, placed=0.0)
    assert torch.equal(g1.get_state(), g2.get_state())
    plain = P.random_prompts(8, _gen(8))
    _, t = P.render(plain, _gen(9), with_truth=True, **CLIP)
    g = _gen(9)
    radius = (min(h, w) / 48.0) * (6.0 + 4.0 * torch.rand(8, P.MAX_SPRITES, generator=g))
    cy = radius + (h - 2 * radius) * torch.rand(8, P.MAX_SPRITES, generator=g)
    cx = radius + (w - 2 * radius) * torch.rand(8, P.MAX_SPRITES, generator=g)
    torch.testing.assert_close(t.centres[:, :, 0], torch.stack([cy, cx], -1), rtol=0, atol=1e-5)
