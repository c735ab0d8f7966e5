"""The sprite evaluator: near-perfect on procedural ground truth, and it catches what a bad rollout does (no sprites,
wrong count, a sprite forgotten by later chunks, a sprite teleporting at a chunk boundary)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from toolkit.models.bundled import data as D
from toolkit.models.bundled import evaluate as E
from toolkit.models.bundled.config import FRAMES, FRAMES_PER_CHUNK, HEIGHT, WIDTH

CLIP = dict(frames=FRAMES, height=HEIGHT, width=WIDTH)  # 12 x 80 x 128, 4 chunks of 3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def ground_truth():
    """128 bundled-size clips from seeds no other test uses: (prompts, video, truth)."""
    g = _gen(90_001)
    prompts = D.random_prompts(128, g)
    video, truth = D.render(prompts, g, with_truth=True, **CLIP)
    return prompts, video, truth


def _subset(truth: D.Truth, idx) -> D.Truth:
    return D.Truth(masks=truth.masks[idx], centres=truth.centres[idx], present=truth.present[idx])


def test_ground_truth_scores_near_one(ground_truth):
    prompts, video, truth = ground_truth
    s = E.summarise(E.evaluate_clips(video, prompts, truth, frames_per_chunk=FRAMES_PER_CHUNK))
    assert s.clips == 128
    assert s.score >= 0.98 and s.colour_match >= 0.98 and s.count_match >= 0.98
    assert s.persistence >= 0.98 and s.boundary_persistence >= 0.98 and s.teleports == 0.0
    # the tracks move like the truth, and no faster across chunk boundaries than inside chunks
    assert abs(s.jump - s.truth_jump) < 0.1 * s.truth_jump
    assert 0.8 < s.boundary_jump_ratio < 1.25
    assert s.track_error < 1.0
    # from pixels and prompts alone (what a model gets), only sprites hidden for most of a clip cost anything
    bare = E.summarise(E.evaluate_clips(video, prompts))
    assert bare.colour_match >= 0.96 and bare.score >= 0.94
    assert bare.jump == pytest.approx(s.jump)
    # plain floats, ready for the model card
    json.loads(json.dumps(dataclasses.asdict(s), allow_nan=False))


def test_tracks_follow_the_true_centres_where_unoccluded(ground_truth):
    prompts, video, truth = ground_truth
    scale = min(HEIGHT, WIDTH) / 48
    dets = E.detect_sprites(video)
    errors = {"triangle": [], "other": []}
    centres = truth.centres.double().numpy()  # b k f 2
    reach = 12.5 * scale + 0.5  # no sprite pokes further from its centre (radius <= 10 * scale, triangle 1.25 r)
    for i, (p, det) in enumerate(zip(prompts, dets)):
        for z, s in enumerate(p.sprites):
            # fully visible: every sprite drawn on top of it is too far away to overlap
            later = centres[i, z + 1 : len(p.sprites)]
            free = (np.linalg.norm(later - centres[i, z], axis=-1) > 2 * reach).all(0)
            ok = free & det.visible(s.colour)
            err = np.linalg.norm(det.track(s.colour)[ok] - centres[i, z][ok], axis=-1)
            errors["triangle" if s.shape == "triangle" else "other"] += err.tolist()
    assert len(errors["other"]) > 500 and len(errors["triangle"]) > 100
    assert max(errors["other"]) < 1.0
    # a triangle's centroid sits 1/6 radius below the centre the renderer reports (radius <= 10 * scale)
    assert max(errors["triangle"]) < 10 * scale / 6 + 0.5


def test_noise_and_flat_grey_show_no_sprites(ground_truth):
    prompts = ground_truth[0][:8]
    noise = torch.rand(8, 3, FRAMES, HEIGHT, WIDTH, generator=_gen(3))
    grey = torch.full((8, 3, FRAMES, HEIGHT, WIDTH), 0.5)
    for video in (noise, grey):
        for m in E.evaluate_clips(video, prompts):
            assert m.colours == [] and m.count == 0
            assert not m.colour_match and not m.count_match and m.persistence == 0.0 and m.score == 0.0
        assert E.detect_colours(video) == [set()] * 8


def _paint_over(video: torch.Tensor, mask: torch.Tensor, first_frame: int) -> torch.Tensor:
    """Grey out ``mask`` [b f h w] (grown by its anti-aliased edge) from ``first_frame`` on."""
    m = mask[:, first_frame:].float().flatten(0, 1).unsqueeze(1)
    grown = torch.nn.functional.max_pool2d(m, 3, stride=1, padding=1).view(mask[:, first_frame:].shape) > 0
    out = video.clone()
    out[:, :, first_frame:] = torch.where(grown.unsqueeze(1), torch.tensor(0.3), video[:, :, first_frame:])
    return out


def test_a_sprite_forgotten_by_later_chunks_fails(ground_truth):
    prompts, video, truth = ground_truth
    idx = list(range(24))
    top = torch.tensor([len(prompts[i].sprites) - 1 for i in idx])  # the top sprite: fully visible until deleted
    mask = truth.masks[idx, top]  # b f h w
    sub = [prompts[i] for i in idx]
    for first_chunk in (2, 1):  # deleted from chunks 2-3, then from chunks 1-3
        edited = _paint_over(video[idx], mask, first_chunk * FRAMES_PER_CHUNK)
        for m, t in zip(E.evaluate_clips(edited, sub), E.evaluate_clips(edited, sub, _subset(truth, idx))):
            assert m.persistence <= 1 - 6 / 48 < E.PERSISTENCE_MIN and m.score == 0.0
            assert t.persistence < E.PERSISTENCE_MIN and t.score == 0.0
            assert m.boundary_persistence < 1.0  # it was there at the end of the chunk before, gone after
            if first_chunk == 1:  # seen in 3 of 12 frames: not in the clip at all
                assert not m.colour_match and not m.count_match


def test_a_sprite_teleporting_at_a_chunk_boundary_is_flagged():
    prompts = D.random_prompts(16, _gen(90_002))
    a, truth_a = D.render(prompts, _gen(90_003), with_truth=True, **CLIP)
    b, truth_b = D.render(prompts, _gen(90_004), with_truth=True, **CLIP)
    cut = 2 * FRAMES_PER_CHUNK  # chunks 0-1 from one render, chunks 2-3 from another of the same prompts
    spliced = torch.cat([a[:, :, :cut], b[:, :, cut:]], dim=2)
    metrics = E.evaluate_clips(spliced, prompts)
    limit = E.JUMP_LIMIT * min(HEIGHT, WIDTH)
    flagged = 0
    for i, (p, m) in enumerate(zip(prompts, metrics)):
        k = len(p.sprites)
        leap = (truth_a.centres[i, :k, cut - 1] - truth_b.centres[i, :k, cut]).norm(dim=-1).max()
        if leap > 1.5 * limit:  # positions are random: most sprites land far away, a few close by
            flagged += 1
            assert m.max_jump > limit and m.score == 0.0, (str(p), m)
            assert m.boundary_jump > 2 * m.within_jump
    assert flagged >= 8
    s, clean = E.summarise(metrics), E.summarise(E.evaluate_clips(a, prompts))
    assert s.boundary_jump_ratio > 3 and clean.boundary_jump_ratio < 1.5
    assert s.teleports >= flagged / 16 and clean.teleports == 0.0


def test_a_duplicated_sprite_is_counted_twice():
    prompts = [D.parse_prompt(f"{c} {s}") for c, s in zip(D.COLOUR_NAMES, D.SHAPES * 2)]
    video, truth = D.render(prompts, _gen(90_005), with_truth=True, **CLIP)
    shift = WIDTH // 2  # > the widest sprite: the copy is its own blob
    mask = truth.masks[:, 0].roll(shift, -1).unsqueeze(1)
    doubled = torch.where(mask, video.roll(shift, -1), video)
    for m in E.evaluate_clips(doubled, prompts):
        assert m.colour_match and m.count == 2 and not m.count_match and m.score == 0.0
    assert all(m.count == 1 and m.score == 1.0 for m in E.evaluate_clips(video, prompts))


@pytest.mark.parametrize("clip", [(9, 40, 72), (10, 30, 52)])
def test_awkward_frame_sizes(clip):
    frames, height, width = clip
    g = _gen(90_006)
    prompts = D.random_prompts(64, g)
    video, truth = D.render(prompts, g, frames=frames, height=height, width=width, with_truth=True)
    metrics = E.evaluate_clips(video, prompts, truth)
    s = E.summarise(metrics)
    assert s.score >= 0.97 and s.colour_match >= 0.98 and s.teleports == 0.0
    assert metrics[0].jump_limit == E.JUMP_LIMIT * height
    assert all(d.tracks.shape == (len(D.COLOURS), frames, 2) for d in E.detect_sprites(video[:4]))


def test_evaluate_generator_scores_a_generator_against_ground_truth():
    prompts = E.heldout_prompts(12)
    assert prompts == E.heldout_prompts(12) and prompts != D.random_prompts(12, _gen(0))
    seeds = E.heldout_seeds(2)
    size = dict(frames=6, height=40, width=64)

    def perfect(p, seed):  # the renderer itself, same seeds as the reference
        return D.render(p, _gen(seed), **size)

    def colour_blind(p, seed):  # one sprite per clip, in the wrong colour
        shifted = [D.Prompt(tuple(D.Sprite(D.COLOUR_NAMES[(D.COLOUR_NAMES.index(s.colour) + 1) % 8], s.shape)
                                  for s in q.sprites[:1]), q.pan) for q in p]
        return D.render(shifted, _gen(seed), **size)

    good = E.evaluate_generator(perfect, prompts, seeds)
    assert good.clips == 24 and good.reference.clips == 24
    assert good.score == good.reference.score and good.jump == pytest.approx(good.reference.jump)
    assert good.reference.truth_jump > 0 and good.truth_jump is None
    bad = E.evaluate_generator(colour_blind, prompts, seeds, reference=False)
    assert bad.reference is None and bad.colour_match == 0.0 and bad.score == 0.0
    text = json.dumps(dataclasses.asdict(good), allow_nan=False)
    assert json.loads(text)["reference"]["clips"] == 24
    assert math.isfinite(good.persistence)
    # per clip, in prompts x seeds order: what ``paired`` compares
    for summary in (good, bad):
        assert set(summary.outcomes) == set(E.PAIRED)
        for key, flags in summary.outcomes.items():
            assert len(flags) == 24 and set(flags) <= {"0", "1"}
            assert flags.count("1") / 24 == pytest.approx(getattr(summary, key))
    split = E.paired(bad.outcomes["colour_match"], good.outcomes["colour_match"])
    assert split["lost"] == 0 and split["gained"] == good.outcomes["colour_match"].count("1") > 8
    assert split["p_value"] < 0.01


@pytest.mark.parametrize("clips", [1, 7, 64, 129])
def test_paired_sign_test_matches_scipy(clips):
    from scipy.stats import binomtest

    rng = np.random.default_rng(clips)
    for _ in range(20):
        before = "".join(rng.choice(["0", "1"], clips))
        flip = rng.random(clips) < rng.uniform(0, 0.5)
        after = "".join(str(int(b) ^ int(f)) if rng.random() < 0.7 else b for b, f in zip(before, flip))
        split = E.paired(before, after)
        gained = sum(b == "0" and a == "1" for b, a in zip(before, after))
        lost = sum(b == "1" and a == "0" for b, a in zip(before, after))
        assert (split["gained"], split["lost"]) == (gained, lost)
        expected = binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
        assert split["p_value"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError, match="same clips"):
        E.paired("0101", "010")


def test_heldout_prompts_are_distinct_and_keep_the_plain_draws():
    """A repeated draw is skipped, so any N held-out prompts are distinct (``toolkit compare --prompts heldout:N``
    refuses repeats) while the first 87, every evaluation's, are the plain draws."""
    from toolkit.models.bundled import data
    from toolkit.models.bundled.evaluate import HELDOUT_PROMPT_SEED, heldout_prompts

    plain = data.random_prompts(120, torch.Generator().manual_seed(HELDOUT_PROMPT_SEED), 0.3)
    prompts = heldout_prompts(120)
    assert len(set(prompts)) == 120 and len(set(plain)) < 120
    assert prompts[:87] == plain[:87]


def test_place_match_on_ground_truth_and_on_wrong_places():
    """Ground truth of prompts that name places scores place_match >= 0.98 from pixels alone (1.0 with its Truth);
    the same clips judged against prompts with the places drawn again score near chance."""
    prompts = [D.with_places(p, _gen(90_010)) for p in D.random_prompts(128, _gen(90_011))]
    video, truth = D.render(prompts, _gen(90_012), with_truth=True, **CLIP)
    pixels = E.summarise(E.evaluate_clips(video, prompts, frames_per_chunk=FRAMES_PER_CHUNK))
    judged = E.summarise(E.evaluate_clips(video, prompts, truth, frames_per_chunk=FRAMES_PER_CHUNK))
    assert pixels.place_match >= 0.98 and judged.place_match == 1.0
    shuffled = [D.with_places(p, _gen(90_100 + i)) for i, p in enumerate(prompts)]
    wrong = E.summarise(E.evaluate_clips(video, shuffled, frames_per_chunk=FRAMES_PER_CHUNK))
    assert wrong.place_match < 0.3
    plain = E.evaluate_clips(video, [D.Prompt(tuple(D.Sprite(s.colour, s.shape) for s in p.sprites), p.pan)
                                     for p in prompts])
    assert all(m.place_match is None for m in plain) and E.summarise(plain).place_match is None


def test_placed_heldout_prompts_are_the_plain_ones_with_places():
    plain, placed = E.heldout_prompts(64), E.heldout_prompts(64, placed=True)
    assert [[(s.colour, s.shape) for s in p.sprites] for p in plain] == \
        [[(s.colour, s.shape) for s in p.sprites] for p in placed]
    assert all(s.place is not None for p in placed for s in p.sprites)
    assert all(len({s.place for s in p.sprites}) == len(p.sprites) for p in placed)
