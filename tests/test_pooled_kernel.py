"""The fused pooled-views kernel (toolkit.kernels.pooled) vs the float64 torch reference, on the CPU through the
Triton interpreter: row LSE against ``exact.logsumexp`` and the packed sums against ``pooled_sums``.

TRITON_INTERPRET is set by tests/conftest.py before toolkit.kernels is first imported (Triton reads it when a
kernel is decorated).
Grids are tiny and awkward (widths/heights not powers of two), queries are a random subset of the chunk, keys a
partial range of frames as in a KV cache, and the key frames are split over several programs so the partial
LSE combination and the atomic accumulation across programs both run. Outputs and scratch are NaN-poisoned.
"""

import pytest
import toolkit.kernels._common as kcommon
import toolkit.kernels.pooled as kpooled
import torch
from conftest import tiny_wan

from toolkit.attention import exact
from toolkit.capture.pooled import accumulate_pooled, packed_bins, pooled_sums, unpack


@pytest.fixture(autouse=True)
def poison_scratch(monkeypatch):
    monkeypatch.setattr(kcommon, "POISON_SCRATCH", True)


def _case(grid, query_frames, key_frames, n_queries, heads=2, dim=16, dtype=torch.float32, seed=0):
    """q ``h i d`` of ``n_queries`` random tokens of ``query_frames``, k ``h j d`` of ``key_frames`` (float64
    copies of exactly the kernel's inputs), the query tokens, sorted like a capture's."""
    g = torch.Generator().manual_seed(seed)
    tpf = grid[1] * grid[2]
    chunk = torch.arange(query_frames[0] * tpf, query_frames[1] * tpf)
    tokens = chunk[torch.randperm(len(chunk), generator=g)[:n_queries]].sort().values
    n_k = (key_frames[1] - key_frames[0]) * tpf
    q = (2 * torch.randn(heads, n_queries, dim, generator=g, dtype=torch.float64)).to(dtype)
    k = (2 * torch.randn(heads, n_k, dim, generator=g, dtype=torch.float64)).to(dtype)
    return q, k, tokens


def _reference(q, k, scale, tokens, key_frames, grid):
    q64, k64 = q.double(), k.double()
    lse = exact.logsumexp(q64, k64, scale)
    sums = pooled_sums(q64, k64, lse, scale, tokens, key_frames, grid, query_chunk=7)  # several query blocks
    return lse, sums


# grid, query frames (the chunk), key frames (cache start .. chunk end), queries, heads, dim, dtype
CASES = {
    "4x3x5-cache-from-1": ((4, 3, 5), (2, 4), (1, 4), 11, 2, 16, torch.float32),
    "4x3x5-first-chunk": ((4, 3, 5), (0, 2), (0, 2), 30, 3, 24, torch.float32),  # d 24 padded to 32
    "5x2x7-full-cache": ((5, 2, 7), (4, 5), (0, 5), 9, 2, 16, torch.float32),
    "3x4x3-bf16": ((3, 4, 3), (1, 3), (0, 3), 17, 2, 32, torch.bfloat16),  # 17 rows: two query blocks of 16
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_lse_and_sums_equal_float64_reference(name, monkeypatch):
    grid, qf, kf, n, heads, dim, dtype = CASES[name]
    monkeypatch.setattr(kpooled, "TARGET_PROGRAMS", 4 * heads)  # several key splits per head
    q, k, tokens = _case(grid, qf, kf, n, heads, dim, dtype, seed=len(name))
    scale = dim**-0.5
    cfg = kpooled.launch_config(n, heads, kf[1] - kf[0])
    assert cfg["n_splits"] > 1 or kf[1] - kf[0] == 1
    lse_out = torch.full((heads, n), float("nan"))
    lse, bins = kpooled.pooled_lse_and_sums(q, k, scale, tokens, kf, grid, lse_out=lse_out)
    assert lse is lse_out and torch.isfinite(lse).all()
    ref_lse, ref = _reference(q, k, scale, tokens, kf, grid)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-5)
    fm, off_t, off_h, off_w = unpack(bins, grid)
    for got, want in ((fm, ref.frame_mass), (off_t, ref.offset_t), (off_h, ref.offset_h), (off_w, ref.offset_w)):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6)
    # the marginals each hold all the mass: one per query row and head
    for part in (fm, off_t, off_h, off_w):
        torch.testing.assert_close(part.double().flatten(1).sum(1), torch.full((heads,), float(n), dtype=torch.float64),
                                   rtol=1e-5, atol=0)


def test_kernel_adds_into_given_bins_and_leaves_other_entries(monkeypatch):
    """Accumulation into a strided row of a larger buffer (the recorder's per-(step, chunk) accumulator)."""
    monkeypatch.setattr(kpooled, "TARGET_PROGRAMS", 8)
    grid, kf = (4, 3, 5), (1, 3)
    q, k, tokens = _case(grid, (2, 3), kf, 7, heads=2, dim=16, seed=3)
    g = torch.Generator().manual_seed(4)
    buffer = torch.rand(3, 2, packed_bins(grid), generator=g)  # layers × heads × bins
    before = buffer.clone()
    kpooled.pooled_lse_and_sums(q, k, 0.3, tokens, kf, grid, bins=buffer[1])
    _, ref = _reference(q, k, 0.3, tokens, kf, grid)
    ref_packed = torch.cat([ref.frame_mass.flatten(1), ref.offset_t, ref.offset_h, ref.offset_w], 1).double()
    torch.testing.assert_close(buffer[1].double(), before[1].double() + ref_packed, rtol=1e-5, atol=1e-6)
    assert torch.equal(buffer[0], before[0]) and torch.equal(buffer[2], before[2])
    # frame_mass rows of frames without queries and columns of frames outside the keys stay as they were
    fm_now, fm_before = unpack(buffer[1], grid)[0], unpack(before[1], grid)[0]
    untouched = torch.ones(4, 4, dtype=torch.bool)
    untouched[2, 1:3] = False
    assert torch.equal(fm_now[:, untouched], fm_before[:, untouched])


def test_accumulate_pooled_cpu_path_matches_kernel():
    """The recorder's entry point on the CPU (torch reference) and the kernel give the same packed sums."""
    grid, kf = (4, 3, 5), (0, 3)
    q, k, tokens = _case(grid, (2, 3), kf, 6, heads=2, dim=16, seed=5)
    bins_cpu = torch.zeros(2, packed_bins(grid))
    lse_cpu = accumulate_pooled(q, k, 0.25, tokens, kf, grid, bins_cpu)
    lse_kernel, bins_kernel = kpooled.pooled_lse_and_sums(q, k, 0.25, tokens, kf, grid)
    torch.testing.assert_close(lse_kernel, lse_cpu, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(bins_kernel, bins_cpu, rtol=1e-5, atol=1e-6)


def test_kernel_refuses_keys_that_are_not_whole_frames():
    grid = (4, 3, 5)
    q, k, tokens = _case(grid, (1, 2), (0, 2), 4)
    with pytest.raises(Exception, match="do not cover frames"):
        kpooled.pooled_lse_and_sums(q, k[:, :-1], 0.25, tokens, (0, 2), grid)


def test_recorder_kernel_path_writes_the_same_capture_as_the_torch_path(tmp_path, monkeypatch):
    """A tiny causal rollout captured twice: pooled views and LSE through the kernel (forced on the CPU) equal the
    torch reference path's, record for record (several chunks, a head and layer subset, random queries)."""
    import toolkit.capture.pooled as cpooled
    from toolkit.capture import RunLayout, Selection, capture, open_capture
    from toolkit.models.sampling import self_forcing_rollout, self_forcing_timesteps

    model = tiny_wan()
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    noise, context = torch.randn(1, 16, 6, 6, 10, generator=g), torch.randn(1, 4, 16, generator=g)  # grid 6×3×5
    layout = RunLayout.self_forcing(cfg, model.grid_size(noise), self_forcing_timesteps(), 2)
    select = Selection(layers="0,2", heads="0,2", steps="1,3", queries="random:3", store=("lse", "pooled"))
    launches = []
    real = kpooled.pooled_lse_and_sums
    monkeypatch.setattr(kpooled, "pooled_lse_and_sums", lambda *a, **kw: launches.append(1) or real(*a, **kw))
    paths = {}
    for mode in ("auto", "always"):
        monkeypatch.setattr(cpooled, "KERNEL", mode)
        paths[mode] = tmp_path / f"{mode}.h5"
        with capture(model, select, paths[mode], layout=layout, progress=False) as rec:
            self_forcing_rollout(model, noise, context, frames_per_chunk=2, generator=torch.Generator().manual_seed(2))
        assert rec.records_written == 2 * 2 * 3
        assert len(launches) == (12 if mode == "always" else 0)  # one kernel call per record, CUDA or forced
    with open_capture(paths["auto"]) as ref, open_capture(paths["always"]) as cap:
        assert cap.complete and cap.records == ref.records and len(cap.records) == 12
        for key in cap.records:
            a, b = cap.record(*key), ref.record(*key)
            torch.testing.assert_close(a.lse(), b.lse(), rtol=1e-6, atol=1e-5)
            pa, pb = cap.pooled(a, source="stored"), ref.pooled(b, source="stored")
            for name in ("frame_mass", "offset_t", "offset_h", "offset_w"):
                torch.testing.assert_close(torch.from_numpy(pa[name].values), torch.from_numpy(pb[name].values),
                                           rtol=1e-5, atol=1e-6)
            assert float(pa["offset_w"].sum()) > 0.99 * len(pa["head"])  # written (means sum to 1 per head)


def test_kernel_with_no_query_rows_adds_nothing():
    grid = (4, 3, 5)
    q, k, tokens = _case(grid, (1, 2), (0, 2), 0)
    bins = torch.rand(2, packed_bins(grid))
    before = bins.clone()
    lse, out = kpooled.pooled_lse_and_sums(q, k, 0.25, tokens, (0, 2), grid, bins=bins)
    assert lse.shape == (2, 0) and out is bins and torch.equal(bins, before)


def test_capture_on_the_cpu_loads_no_kernel_module():
    """Kernels sit below capture, and capture imports the fused kernel only when a CUDA record needs it: on the CPU
    a capture's pooled accumulation never loads ``toolkit.kernels`` (Triton stays an optional dependency), and
    the kernel shares the bin layout of ``toolkit.attention.pooled`` rather than importing capture."""
    import subprocess
    import sys

    probe = ("import sys, torch; import toolkit.capture, toolkit.capture.pooled as p; "
             "q, k, grid = torch.randn(2, 3, 16), torch.randn(2, 30, 16), (4, 3, 5); "
             "p.accumulate_pooled(q, k, 0.25, torch.arange(3), (0, 2), grid, torch.zeros(2, p.packed_bins(grid))); "
             "assert not [m for m in sys.modules if m.startswith(('toolkit.kernels', 'triton'))]")
    subprocess.run([sys.executable, "-c", probe], check=True)
    assert not [m for m in vars(kpooled).values() if getattr(m, "__name__", "").startswith("toolkit.capture")]
