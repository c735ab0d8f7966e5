"""The xarray views of a capture give the numbers the model used: bf16 / float16 tensors decoded to float32 (through
``Capture.dataset`` and ``xarray.open_dataset(engine="toolkit")``), and a causal record's attended keys
(``Capture.attended``) whose softmax rows equal the model's attention (issue 14, items 1 and 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import dense_attention
from test_capture import make_model, run

from toolkit.capture import Selection, open_capture

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TENSORS = ("q", "k", "v")


@pytest.fixture(scope="module")
def bf16_capture(tmp_path_factory):
    ref: dict = {}
    path = tmp_path_factory.mktemp("views") / "bf16.h5"
    run(make_model(4, torch.bfloat16), Selection(layers="1", store=("q", "k", "v", "lse")), path, reference=ref)
    return path, ref


@pytest.fixture(scope="module")
def f16_capture(tmp_path_factory):
    path = tmp_path_factory.mktemp("views") / "f16.h5"
    run(make_model(5), Selection(layers="2", steps="0,4", dtype="float16"), path)
    return path


@pytest.fixture(scope="module")
def f32_capture(tmp_path_factory):
    ref: dict = {}
    path = tmp_path_factory.mktemp("views") / "f32.h5"
    run(make_model(11), Selection(layers="0", store=("q", "k", "v", "lse")), path, reference=ref)
    return path, ref


def _assert_decoded_like_records(ds: xr.Dataset, cap) -> None:
    """Every tensor of every record, read through ``ds`` (indexed by the step that wrote it), equals the reader's."""
    for name in TENSORS:
        assert ds[name].dtype == np.float32, name
        assert "decode" not in ds[name].attrs
    for key in cap.records:
        rec = cap.record(*key)
        qa, qb = cap.chunk_queries(key.chunk)
        q = ds.q.sel(step=key.step, layer=key.layer).isel(query=slice(qa, qb)).values
        np.testing.assert_array_equal(q, rec.q().numpy())
        f0, f1 = rec.query_frames
        tpf = cap.layout.tokens_per_frame
        for name in ("k", "v"):
            own = ds[name].sel(step=key.step, layer=key.layer).isel(key=slice(f0 * tpf, f1 * tpf)).values
            np.testing.assert_array_equal(own, getattr(rec, name)()[:, -(f1 - f0) * tpf:].numpy())


@pytest.mark.parametrize("which", ["bfloat16", "float16"])
def test_dataset_decodes_stored_tensors_to_the_readers_floats(which, bf16_capture, f16_capture):
    path = bf16_capture[0] if which == "bfloat16" else f16_capture
    with open_capture(path) as cap:
        assert cap.file["q"].attrs["dtype_logical"] == which
        assert cap.file["q"].dtype == (np.uint16 if which == "bfloat16" else np.float16)
        ds = cap.dataset
        assert ds.q.chunks is not None  # still lazy (dask)
        _assert_decoded_like_records(ds, cap)


@pytest.mark.parametrize("which", ["bfloat16", "float16"])
def test_open_dataset_engine_toolkit_decodes(which, bf16_capture, f16_capture):
    path = bf16_capture[0] if which == "bfloat16" else f16_capture
    with open_capture(path) as cap:
        with xr.open_dataset(path, engine="toolkit") as ds:  # the registered entry point
            _assert_decoded_like_records(ds, cap)
        with xr.open_dataset(path, engine="toolkit", chunks={}) as ds:
            assert ds.k.chunks is not None
            _assert_decoded_like_records(ds, cap)
        with xr.open_dataset(path, engine="toolkit", decode_bits=False) as raw:
            assert raw.q.dtype == cap.file["q"].dtype  # the stored representation on request


def test_engine_toolkit_refuses_what_open_capture_refuses(f16_capture, tmp_path):
    import shutil

    import h5py

    from toolkit.errors import ToolkitError

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["format"] = "something"
        f["x"] = np.arange(3)
    newer = tmp_path / "newer.h5"
    shutil.copy(f16_capture, newer)
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = 99
    for path, message in ((other, "is not a toolkit capture file"), (newer, "format version 99")):
        with pytest.raises(ToolkitError, match=message):
            xr.open_dataset(path, engine="toolkit")
        with pytest.raises(ToolkitError, match=message):
            open_capture(path)


def test_plain_h5netcdf_shows_bf16_bits_as_documented(bf16_capture):
    path, _ = bf16_capture
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        assert ds.q.dtype == np.uint16 and ds.q.attrs["decode"] == "float32 bits = uint32(x) << 16"
        from toolkit.capture.xarray_backend import bf16_bits_to_float32

        with open_capture(path) as cap:
            rec = cap.record(*cap.records[0])
            qa, qb = cap.chunk_queries(rec.chunk)
            bits = ds.q.sel(step=rec.step, layer=rec.layer).isel(query=slice(qa, qb)).values
            np.testing.assert_array_equal(bf16_bits_to_float32(bits), rec.q().numpy())


def _check_attended(path, ref) -> int:
    """Rows built from ``attended`` sum to 1 and equal the model's attention; returns how many records were causal
    with earlier chunks (where ``dataset.k.sel(step=s)`` would be wrong)."""
    with open_capture(path) as cap:
        contrasted = 0
        for key in cap.records:
            rec, seen = cap.record(*key), ref[tuple(key)]
            att = cap.attended(rec)
            assert att.k.dims == ("head", "key", "dim") and att.q.dims == ("head", "query", "dim")
            assert att.k.chunks is not None  # lazy
            np.testing.assert_array_equal(att.key.values, rec.key_tokens.numpy())
            tpf, w = cap.layout.tokens_per_frame, cap.grid[2]
            np.testing.assert_array_equal(att.key_frame.values, rec.key_tokens.numpy() // tpf)
            np.testing.assert_array_equal(att.key_col.values, rec.key_tokens.numpy() % w)
            f0 = rec.query_frames[0]
            expect_step = np.where(rec.key_tokens.numpy() < f0 * tpf, cap.context_step, rec.step)
            np.testing.assert_array_equal(att.key_step.values, expect_step)
            q, k = torch.from_numpy(att.q.values), torch.from_numpy(att.k.values)
            assert torch.equal(k, rec.k()) and torch.equal(torch.from_numpy(att.v.values), rec.v())
            assert torch.equal(q, rec.q()) and torch.equal(torch.from_numpy(att.lse.values), rec.lse())
            dense = dense_attention(q, k, scale=att.attrs["sm_scale"])  # float64, from the attended view
            torch.testing.assert_close(dense.probs, seen["probs"], rtol=1e-5, atol=1e-6)  # the model's attention
            torch.testing.assert_close(dense.lse, seen["lse"], rtol=0, atol=1e-6)
            # with the stored lse: exp(scale·q·k − lse) rows sum to 1
            p = torch.exp(dense.logits - torch.from_numpy(att.lse.values).double()[..., None])
            torch.testing.assert_close(p.sum(-1), torch.ones_like(p[..., 0]), rtol=0, atol=1e-4)
            torch.testing.assert_close(p, seen["probs"], rtol=1e-4, atol=1e-5)
            # the documented xarray route gives the same rows, and groups by key frame (materialised coordinates)
            rows = np.exp(att.attrs["sm_scale"] * xr.dot(att.q, att.k, dim="dim") - att.lse)
            np.testing.assert_allclose(rows.sum("key").values, 1, rtol=0, atol=1e-4)
            per_frame = rows.groupby(att.key_frame).sum().values
            np.testing.assert_allclose(per_frame.sum(-1), 1, rtol=0, atol=1e-4)
            if f0 > 0 and not rec.is_clean:  # the naive view reads earlier frames at this step: not attended
                naive = cap.dataset.k.sel(step=rec.step, layer=rec.layer).isel(key=slice(0, len(rec.key_tokens)))
                bad = torch.exp(dense_attention(q, torch.from_numpy(naive.values), scale=rec.scale).logits
                                - torch.from_numpy(att.lse.values).double()[..., None]).sum(-1)
                assert (bad - 1).abs().max() > 1e-3
                contrasted += 1
        sub = cap.attended(cap.records[-1], heads=[2, 0])
        assert list(sub["head"].values) == [2, 0]
        assert torch.equal(torch.from_numpy(sub.k.values), cap.record(*cap.records[-1]).k(heads=[2, 0]))
        return contrasted


def test_attended_keys_give_the_models_attention(f32_capture):
    path, ref = f32_capture
    assert _check_attended(path, ref) > 0


def test_attended_keys_of_a_bf16_capture_are_decoded(bf16_capture):
    path, ref = bf16_capture
    assert _check_attended(path, ref) > 0
