"""toolkit.attention.exact against float64 brute force (softmax of the full logit matrix)."""

from __future__ import annotations

import pytest
import torch
from conftest import dense_attention

from toolkit.attention import exact


def brute_force(q, k, v, scale):
    ref = dense_attention(q, k, v, scale)
    return ref.lse, ref.probs, ref.out


def random_qkv(heads, n_q, n_k, d, seed, dtype=torch.float32, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, n_q, d, generator=g, dtype=dtype) * spread
    k = torch.randn(heads, n_k, d, generator=g, dtype=dtype)
    v = torch.randn(heads, n_k, d, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("key_chunk", [7, 52, 1000])
def test_logsumexp_streaming_matches_brute_force(key_chunk, monkeypatch):
    # 52 keys: chunk 7 leaves a remainder, 52 is exactly one chunk, 1000 is larger than the sequence.
    monkeypatch.setattr(exact, "_cpu_flash_logsumexp", lambda *a: None)  # the streaming loop itself
    q, k, _ = random_qkv(3, 30, 52, 16, seed=0)
    lse = exact.logsumexp(q, k, 0.25, key_chunk=key_chunk)
    ref, _, _ = brute_force(q, k, k, 0.25)
    assert lse.dtype == torch.float32 and lse.shape == (3, 30)
    torch.testing.assert_close(lse.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 30, 1037, 40), (2, 3, 7, 300, 24)])
def test_cpu_flash_logsumexp_equals_the_float64_brute_force(shape):
    """Float32 CPU inputs take PyTorch's flash kernel: the same LSE, awkward key counts and leading dims."""
    *lead, n_q, n_k, d = shape
    g = torch.Generator().manual_seed(7)
    q = torch.randn(*lead, n_q, d, generator=g) * 3
    k = torch.randn(*lead, n_k, d, generator=g)
    assert exact._cpu_flash_logsumexp(q, k, 0.2) is not None  # the fast path is taken
    lse = exact.logsumexp(q, k, 0.2)
    ref = torch.logsumexp(0.2 * q.double() @ k.double().transpose(-1, -2), dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == tuple(lead) + (n_q,)
    torch.testing.assert_close(lse.double(), ref, rtol=1e-5, atol=1e-5)
    # broadcast leading dims are not its case: the streaming loop answers
    assert exact._cpu_flash_logsumexp(q, k[..., :1, :, :] if len(lead) > 1 else k[:1], 0.2) is None


def test_float64_inputs_stay_float64():
    q, k, v = random_qkv(2, 30, 52, 8, seed=1, dtype=torch.float64)
    lse = exact.logsumexp(q, k, 0.3, key_chunk=11)
    ref_lse, ref_p, ref_out = brute_force(q, k, v, 0.3)
    assert lse.dtype == torch.float64
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(exact.probs(q, k, lse, 0.3), ref_p, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(exact.attention_output(q, k, v, 0.3, key_chunk=9), ref_out, rtol=1e-11, atol=1e-12)


def test_probs_tile_and_key_subset():
    q, k, v = random_qkv(2, 30, 52, 16, seed=2)
    lse = exact.logsumexp(q, k, 0.25)
    _, ref_p, _ = brute_force(q, k, v, 0.25)
    p = exact.probs(q, k, lse, 0.25)
    torch.testing.assert_close(p.double(), ref_p, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(p.double().sum(-1), torch.ones(2, 30, dtype=torch.float64), rtol=0, atol=1e-5)
    # A key subset gives the same entries (not renormalised).
    sub = exact.probs(q[:, 5:9], k[:, 13:40], lse[:, 5:9], 0.25)
    torch.testing.assert_close(sub.double(), ref_p[:, 5:9, 13:40], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("query_chunk", [1, 7, 30, 64, None])
def test_iter_query_blocks_covers_all_rows_exactly(query_chunk):
    q, k, v = random_qkv(3, 30, 52, 16, seed=3)
    _, ref_p, _ = brute_force(q, k, v, 0.2)
    seen = torch.zeros(30, dtype=torch.int64)
    for rows, block in exact.iter_query_blocks(q, k, 0.2, query_chunk=query_chunk):
        assert block.shape == (3, rows.stop - rows.start, 52)
        if query_chunk is not None:
            assert rows.stop - rows.start <= query_chunk
        torch.testing.assert_close(block.double(), ref_p[:, rows], rtol=1e-4, atol=1e-7)
        seen[rows] += 1
    assert torch.equal(seen, torch.ones(30, dtype=torch.int64))


def test_iter_query_blocks_uses_given_lse():
    q, k, _ = random_qkv(1, 10, 20, 8, seed=4)
    lse = exact.logsumexp(q, k, 0.5) + 1.0  # a shifted lse scales every row by e^-1
    (_, block), = list(exact.iter_query_blocks(q, k, 0.5, lse, query_chunk=100))
    torch.testing.assert_close(block.sum(-1), torch.full((1, 10), torch.e**-1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("key_chunk", [5, 52, 64])
def test_attention_output_streaming(key_chunk):
    q, k, v = random_qkv(4, 30, 52, 16, seed=5)
    v = v[..., :12]  # value dim differs from head dim
    ref_lse, _, ref_out = brute_force(q, k, v, 0.3)
    out, lse = exact.attention_output(q, k, v, 0.3, key_chunk=key_chunk, return_lse=True)
    assert out.shape == (4, 30, 12) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_accumulate_in_float32():
    q, k, v = random_qkv(2, 30, 52, 16, seed=6)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out = exact.attention_output(qb, kb, vb, 0.25, key_chunk=13)
    _, _, ref = brute_force(qb.double(), kb.double(), vb.double(), 0.25)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_leading_dims_broadcast():
    # batch x heads leading dims, keys shared across the batch (broadcast)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 3, 30, 8, generator=g)
    k = torch.randn(1, 3, 52, 8, generator=g)
    v = torch.randn(1, 3, 52, 8, generator=g)
    ref_lse, ref_p, ref_out = brute_force(q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), 0.4)
    lse = exact.logsumexp(q, k, 0.4, key_chunk=10)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    blocks = [b for _, b in exact.iter_query_blocks(q, k, 0.4, query_chunk=8)]
    torch.testing.assert_close(torch.cat(blocks, dim=-2).double(), ref_p, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(exact.attention_output(q, k, v, 0.4, key_chunk=10).double(), ref_out,
                               rtol=1e-4, atol=1e-5)


def test_bad_chunks_raise():
    q, k, v = random_qkv(1, 4, 4, 4, seed=8)
    with pytest.raises(ValueError):
        exact.logsumexp(q, k, 1.0, key_chunk=0)
    with pytest.raises(ValueError):
        next(exact.iter_query_blocks(q, k, 1.0, query_chunk=0))
