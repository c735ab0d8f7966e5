"""toolkit.analysis.periodic against float64 brute force, and recovery of a planted separable kernel + spikes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from toolkit.analysis import periodic
from toolkit.analysis.records import RecordTensors
from toolkit.errors import ToolkitError
from toolkit.grid import TokenGrid

GRID = (3, 4, 5)  # 60 tokens; 4 and 5 rows/cols so no axis is confused with another


def brute_force(a, query_tokens, key_tokens, grid):
    """Loops over numpy arrays of the full float64 map ``h i j``."""
    a = a.numpy()
    h, n_q, n_k = a.shape
    tg = TokenGrid(*grid)
    f, hh, ww = grid
    dt, dh, dw = (x.numpy() for x in tg.offsets(query_tokens, key_tokens))
    total = np.zeros((h, 2 * f - 1, 2 * hh - 1, 2 * ww - 1))
    count = np.zeros((2 * f - 1, 2 * hh - 1, 2 * ww - 1))
    for i in range(n_q):
        for j in range(n_k):
            o = (dt[i, j] + f - 1, dh[i, j] + hh - 1, dw[i, j] + ww - 1)
            total[(slice(None),) + o] += a[:, i, j]
            count[o] += 1
    with np.errstate(invalid="ignore"):
        profile = total / count
    qf, qh, qw = (x.numpy() for x in tg.coords(query_tokens))
    kf, kh, kw = (x.numpy() for x in tg.coords(key_tokens))
    frame_mass = np.full((h, f, f), np.nan)  # NaN: no stored query in the frame
    for fq in range(f):
        rows = qf == fq
        for fk in range(f):
            if rows.any():
                frame_mass[:, fq, fk] = a[:, rows][:, :, kf == fk].sum(-1).mean(-1)
    same_frame = qf[:, None] == kf[None, :]
    same_pixel = (qh[:, None] == kh[None, :]) & (qw[:, None] == kw[None, :]) & ~same_frame
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(a > 0, a * np.log(a), 0).sum(-1) / math.log(n_k)
    power = (np.abs(np.fft.rfft(a, axis=-1)) ** 2).mean(1)
    return {"profile": profile, "pair_count": count, "frame_mass": frame_mass, "spatial_mass": (a * same_frame).sum(-1),
            "temporal_mass": (a * same_pixel).sum(-1), "entropy": ent, "power": power, "dt": dt, "dh": dh, "dw": dw}


def random_case(seed, n_q=30, heads=3, d=16):
    g = torch.Generator().manual_seed(seed)
    n = math.prod(GRID)
    query_tokens = torch.sort(torch.randperm(n, generator=g)[:n_q]).values
    q = torch.randn(heads, n_q, d, generator=g, dtype=torch.float64) * 2
    k = torch.randn(heads, n, d, generator=g, dtype=torch.float64)
    return q, k, query_tokens, torch.arange(n)


@pytest.mark.parametrize("query_chunk", [7, None])
def test_statistics_equal_brute_force(query_chunk):
    q, k, qt, kt = random_case(0)
    got = periodic.periodic_tensors(q, k, 0.3, None, qt, kt, GRID, query_chunk=query_chunk)
    a = torch.softmax(q @ k.transpose(-1, -2) * 0.3, dim=-1)
    ref = brute_force(a, qt, kt, GRID)
    np.testing.assert_allclose(got["profile"].numpy(), ref["profile"], rtol=1e-10, atol=1e-14)
    assert np.array_equal(got["pair_count"].numpy(), ref["pair_count"])
    for name in ("frame_mass", "spatial_mass", "temporal_mass", "entropy", "power"):
        np.testing.assert_allclose(got[name].numpy(), ref[name], rtol=1e-10, atol=1e-13, err_msg=name)
    # Map-level fit statistics from the returned factors, recomputed by brute force.
    f, h, w = GRID
    d = (got["d_f"][:, ref["dt"] + f - 1] * got["d_h"][:, ref["dh"] + h - 1] * got["d_w"][:, ref["dw"] + w - 1]).numpy()
    an = a.numpy()
    np.testing.assert_allclose(got["explained_mass"].numpy(), np.minimum(an, d).sum((1, 2)) / an.sum((1, 2)),
                               rtol=1e-10)
    np.testing.assert_allclose(got["map_r2"].numpy(), 1 - ((an - d) ** 2).sum((1, 2)) / (an**2).sum((1, 2)),
                               rtol=1e-10)
    spikes = an - d > got["spike_threshold"]
    assert np.array_equal(got["spike_count"].numpy(), spikes.sum(-1))
    np.testing.assert_allclose(got["spike_mass"].numpy(), (an * spikes).sum(-1), rtol=1e-10, atol=1e-15)


def test_float32_streaming_matches_float64():
    q, k, qt, kt = random_case(1)
    f32 = periodic.periodic_tensors(q.float(), k.float(), 0.3, None, qt, kt, GRID, query_chunk=4)
    f64 = periodic.periodic_tensors(q, k, 0.3, None, qt, kt, GRID, query_chunk=30)
    for name in ("profile", "frame_mass", "spatial_mass", "temporal_mass", "power", "d_f", "d_h", "d_w"):
        np.testing.assert_allclose(f32[name].numpy(), f64[name].numpy(), rtol=2e-4, atol=1e-6, err_msg=name)


def planted(seed, grid, n_spikes=6):
    """Logits of a circular separable kernel on the grid (so every row has the same normaliser and the
    linear-offset profile is exactly separable) plus planted spikes; q = logits, k = identity, scale 1."""
    g = torch.Generator().manual_seed(seed)
    f, h, w = grid
    tg = TokenGrid(*grid)
    n = tg.n_tokens
    k_f, k_h, k_w = (torch.rand(size, generator=g, dtype=torch.float64) + 0.05 for size in grid)
    k_h[0], k_w[0] = 3.0, 2.0  # a peak at zero offset
    tokens = torch.arange(n)
    dt, dh, dw = tg.offsets(tokens, tokens)
    kernel = k_f[dt % f] * k_h[dh % h] * k_w[dw % w]  # i j
    query_tokens = torch.arange(0, n, 2)
    a = kernel[query_tokens].clone()
    rows = torch.randperm(len(query_tokens), generator=g)[:n_spikes]
    cols = torch.randint(0, n, (n_spikes,), generator=g)
    a[rows, cols] += 0.25 * a[rows].sum(-1)  # each spike holds ~20% of its row's mass
    logits = a.log()
    q = torch.stack([logits, logits.flip(-1)])  # two heads: the second sees the keys reversed
    k = torch.eye(n, dtype=torch.float64).expand(2, -1, -1)
    return q, k, query_tokens, tokens, (k_f, k_h, k_w), (rows, cols)


def test_recovers_planted_kernel_and_spikes():
    grid = (4, 6, 8)  # 192 keys: spikes of 20% row mass stand far above the threshold 10/192
    q, k, qt, kt, (k_f, k_h, k_w), (rows, cols) = planted(2, grid)
    got = periodic.periodic_tensors(q[:1], k[:1], 1.0, None, qt, kt, grid, query_chunk=7)
    # Factors equal the circular kernel read at linear offsets, up to the scale each factor carries.
    offs = [torch.arange(-(s - 1), s) % s for s in grid]
    for fitted, true, off in zip((got["d_f"][0], got["d_h"][0], got["d_w"][0]), (k_f, k_h, k_w), offs):
        seen = fitted.isfinite()  # offsets some (query, key) pair has; queries sit on even tokens only
        assert seen.float().mean() > 0.8
        expect = true[off][seen] / true[off][seen].max()
        torch.testing.assert_close(fitted[seen] / fitted[seen].max(), expect, rtol=0.05, atol=0.01)
    assert got["explained_mass"][0] > 0.75
    # Spikes: exactly the planted entries, found as the top residual of their rows.
    expected = torch.zeros(len(qt), dtype=torch.int64)
    expected.index_add_(0, rows, torch.ones_like(rows))
    assert torch.equal(got["spike_count"][0], expected)
    for r, c in zip(rows.tolist(), cols.tolist()):
        assert int(kt[c]) in got["spike_key"][0, r].tolist()
    assert torch.all(got["spike_key"][0, expected == 0] == -1)


def test_exact_separable_kernel_is_fully_explained():
    q, k, qt, kt, _, _ = planted(3, GRID, n_spikes=0)
    got = periodic.periodic_tensors(q[:1], k[:1], 1.0, None, qt, kt, GRID, query_chunk=8)
    torch.testing.assert_close(got["explained_mass"], torch.ones(1, dtype=torch.float64), rtol=1e-8, atol=0)
    torch.testing.assert_close(got["profile_r2"], torch.ones(1, dtype=torch.float64), rtol=1e-8, atol=0)
    assert torch.all(got["spike_count"] == 0)


def test_head_types_and_periodicity():
    f, h, w = GRID
    tg = TokenGrid(*GRID)
    tokens = torch.arange(tg.n_tokens)
    dt, dh, dw = tg.offsets(tokens, tokens)
    temporal = torch.where((dh == 0) & (dw == 0), 0.0, -30.0)  # same pixel in every frame
    spatial = torch.where(dt == 0, 0.0, -30.0)  # own frame, uniform
    dense = torch.zeros_like(temporal)  # uniform over all keys
    q = torch.stack([temporal, spatial, dense]).double()
    k = torch.eye(tg.n_tokens, dtype=torch.float64).expand(3, -1, -1)
    got = periodic.periodic_tensors(q, k, 1.0, None, tokens, tokens, GRID)
    assert got["head_type"] == ["temporal", "spatial", "global"]
    torch.testing.assert_close(got["temporal_mass"][0], torch.full((60,), 2 / 3, dtype=torch.float64))
    torch.testing.assert_close(got["spatial_mass"][1], torch.ones(60, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(got["entropy"][2], torch.ones(60, dtype=torch.float64))
    # The temporal head repeats every h*w = 20 tokens: all its non-DC power sits on the 10 frame harmonics
    # (bins 3, 6, ..., 30 of 30 non-DC bins), an enrichment of 3 over a flat spectrum. The spatial head's row is
    # a box one frame wide, whose spectrum vanishes exactly at the frame harmonics.
    one = torch.tensor(1.0, dtype=torch.float64)
    torch.testing.assert_close(got["frame_power_share"][0], one)
    torch.testing.assert_close(got["frame_periodicity"][0], 3 * one)
    torch.testing.assert_close(got["frame_power_share"][1], 0 * one, rtol=0, atol=1e-12)
    assert got["row_periodicity"][0] > 1


def test_dataset_labels():
    q, k, qt, kt = random_case(4, heads=2)
    t = RecordTensors(q=q, k=k, scale=0.3, query_tokens=qt, key_tokens=kt, grid=GRID, heads=[3, 7])
    ds = periodic.analyze_record(t, periodic.PeriodicOptions(query_chunk=9))
    assert list(ds["head"].values) == [3, 7]
    assert ds["profile"].dims == ("head", "dt", "dh", "dw") and ds.sizes["dt"] == 5
    assert ds["profile"].sel(dt=0, dh=0, dw=0).notnull().all()
    np.testing.assert_array_equal(ds["query_token"].values, qt.numpy())
    assert ds["frame_mass"].attrs["units"] == "1" and "long_name" in ds["power"].attrs


def test_bad_tokens():
    q, k, qt, kt = random_case(5)
    with pytest.raises(ToolkitError, match="whole frames"):
        periodic.periodic_tensors(q, k[:, :50], 0.3, None, qt, kt[:50], GRID)
    with pytest.raises(ToolkitError, match="inside the attended key frames"):
        periodic.periodic_tensors(q, k[:, 20:], 0.3, None, qt, kt[20:], GRID)
