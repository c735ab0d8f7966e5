"""Capture on a tiny random causal Wan model (CPU, float32): maps, keys and LSE recomputed from the file equal what
the model computed at the seam; selections, pooled views, the xarray view, bf16 storage, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import dense_attention, tiny_config, tiny_wan

from toolkit.capture import RunLayout, Selection, capture, open_capture
from toolkit.capture.selection import query_tokens
from toolkit.errors import SelectionError, ToolkitError
from toolkit.grid import TokenGrid
from toolkit.models.sampling import self_forcing_rollout, self_forcing_timesteps
from toolkit.models.seam import seams
from toolkit.models.wan import WanConfig, WanModel

FPC = 2  # frames per chunk
CFG = tiny_config()
# 6 latent frames × 6 × 10 latent pixels -> token grid (6, 3, 5): 15 tokens per frame, 3 chunks of 30 tokens.
NOISE_SHAPE = (1, 16, 6, 6, 10)


def make_model(seed: int = 0, dtype=torch.float32) -> WanModel:
    return tiny_wan(CFG, seed=seed, dtype=dtype, sharpen=4.0)  # sharpened so maps are informative


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(NOISE_SHAPE, generator=g), torch.randn(1, 4, CFG.text_dim, generator=g)


def layout_for(model: WanModel) -> RunLayout:
    noise, _ = inputs()
    return RunLayout.self_forcing(model.cfg, model.grid_size(noise), self_forcing_timesteps(), FPC)


def run(model, select, out, *, reference=None, **kw):
    """Capture one rollout; ``reference`` (a dict) receives, per (step, chunk, layer), what the seam saw."""
    noise, context = inputs()

    def spy(q, k, v, out_, ctx):
        dense = dense_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), scale=ctx.scale)  # h i d, h j d
        reference[(ctx.step, ctx.chunk, ctx.layer)] = dict(
            q=q[0].clone(), k=k[0].clone(), v=v[0].clone(), probs=dense.probs,
            lse=dense.lse, key_offset=ctx.key_offset, query_offset=ctx.query_offset)

    found = seams(model)
    if reference is not None:
        for s in found:
            s.hooks.append(spy)
    try:
        with capture(model, select, out, layout=layout_for(model), progress=False, **kw) as rec:
            self_forcing_rollout(model, noise, context, frames_per_chunk=FPC,
                                 generator=torch.Generator().manual_seed(2))
    finally:
        for s in found:
            if spy in s.hooks:
                s.hooks.remove(spy)
    return rec


@pytest.fixture(scope="module")
def full_capture(tmp_path_factory):
    model = make_model()
    ref: dict = {}
    path = tmp_path_factory.mktemp("cap") / "run.h5"
    run(model, Selection(store=("q", "k", "v", "lse", "pooled")), path, reference=ref,
        provenance={"model": "tiny-random", "seed": 1, "prompt": "a test"})
    return path, ref


def test_every_record_is_written_and_file_complete(full_capture):
    path, ref = full_capture
    with open_capture(path) as cap:
        assert cap.complete
        assert set(cap.records) == set(ref)  # 5 steps × 3 chunks × 3 layers
        assert len(cap.records) == 5 * 3 * 3
        assert cap.grid == (6, 3, 5)


def test_keys_values_queries_and_lse_match_the_seam(full_capture):
    path, ref = full_capture
    with open_capture(path) as cap:
        for key in cap.records:
            rec, seen = cap.record(*key), ref[tuple(key)]
            n_keys = seen["k"].shape[0]
            assert torch.equal(rec.key_tokens, torch.arange(seen["key_offset"], seen["key_offset"] + n_keys))
            assert torch.equal(rec.k(), seen["k"].transpose(0, 1))  # position by position, bit exact
            assert torch.equal(rec.v(), seen["v"].transpose(0, 1))
            start = seen["query_offset"]
            assert torch.equal(rec.query_tokens, torch.arange(start, start + seen["q"].shape[0]))
            assert torch.equal(rec.q(), seen["q"].transpose(0, 1))
            torch.testing.assert_close(rec.lse().double(), seen["lse"], rtol=0, atol=2e-5)
            assert torch.equal(rec.k(heads=[2, 0]), seen["k"][:, [2, 0]].transpose(0, 1))  # any head order


def test_maps_recomputed_from_capture_equal_model_probabilities(full_capture):
    path, ref = full_capture
    with open_capture(path) as cap:
        last = cap.layout.num_chunks - 1
        for key in [(0, 0, 0), (3, 1, 2), (4, 1, 1), (2, last, 1), (4, last, 2)]:  # incl. last chunk, full cache
            rec = cap.record(*key)
            for head in rec.heads:
                rows = cap.rows(rec, head)
                expected = ref[key]["probs"][head]
                assert rows.dims == ("query", "key") and rows.shape == tuple(expected.shape)
                torch.testing.assert_close(torch.from_numpy(rows.values).double(), expected, rtol=1e-5, atol=1e-6)
        # the probabilities are not trivial (the test would pass for uniform maps otherwise)
        assert float(ref[(4, last, 2)]["probs"].max()) > 5 * 1 / ref[(4, last, 2)]["probs"].shape[-1]


def test_tile_and_rows_subsets(full_capture):
    path, ref = full_capture
    with open_capture(path) as cap:
        rec = cap.record(step=1, chunk=2, layer=0)
        expected = ref[(1, 2, 0)]["probs"][2]  # i j over the attended keys
        q0 = int(rec.query_tokens[0])
        tile = cap.tile(rec, 2, (q0 + 7, q0 + 19), (11, 52))
        assert list(tile["query"].values) == list(range(q0 + 7, q0 + 19))
        assert list(tile["key"].values) == list(range(11, 52))
        torch.testing.assert_close(torch.from_numpy(tile.values).double(), expected[7:19, 11:52], rtol=1e-5,
                                   atol=1e-6)
        some = rec.query_tokens[[3, 0, 29]]
        rows = cap.rows(rec, 2, some)
        torch.testing.assert_close(torch.from_numpy(rows.values).double(), expected[[3, 0, 29]], rtol=1e-5,
                                   atol=1e-6)
        assert list(rows.query_frame.values) == [int(t) // 15 for t in some]
        with pytest.raises(ToolkitError, match="not stored"):
            cap.rows(rec, 2, torch.tensor([0]))  # a query of chunk 0 is not a query of this record
        with pytest.raises(ToolkitError, match="not captured"):
            rec.q(heads=[7])


def pooled_reference(probs: torch.Tensor, q_tokens: torch.Tensor, k_tokens: torch.Tensor, grid) -> dict:
    """Brute force from a dense probability map h i j with explicit per-pair offsets."""
    tg = TokenGrid(*grid)
    f, hh, w = grid
    dt, dh, dw = tg.offsets(q_tokens, k_tokens)
    qf = tg.coords(q_tokens)[0]
    kf = tg.coords(k_tokens)[0]
    out = {}
    for name, off, size in (("offset_t", dt, f), ("offset_h", dh, hh), ("offset_w", dw, w)):
        prof = torch.zeros(probs.shape[0], 2 * size - 1, dtype=torch.float64)
        for d in range(-(size - 1), size):
            prof[:, d + size - 1] = (probs * (off == d)).sum((1, 2)) / len(q_tokens)
        out[name] = prof
    frames_q = sorted(set(qf.tolist()))
    fm = torch.zeros(probs.shape[0], len(frames_q), f, dtype=torch.float64)
    for a, fq in enumerate(frames_q):
        for fk in range(f):
            fm[:, a, fk] = probs[:, qf == fq][:, :, kf == fk].sum(-1).mean(-1)
    out["frame_mass"] = fm
    return out


def test_pooled_views_stored_recomputed_and_brute_force_agree(full_capture):
    path, ref = full_capture
    with open_capture(path) as cap:
        for key in [(0, 0, 1), (4, 2, 2), (2, 1, 0)]:
            rec = cap.record(*key)
            stored, recomputed = cap.pooled(rec, source="stored"), cap.pooled(rec, source="recompute")
            brute = pooled_reference(ref[key]["probs"], rec.query_tokens, rec.key_tokens, cap.grid)
            for name in ("frame_mass", "offset_t", "offset_h", "offset_w"):
                torch.testing.assert_close(torch.from_numpy(stored[name].values).double(), brute[name],
                                           rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(torch.from_numpy(recomputed[name].values).double(), brute[name],
                                           rtol=1e-5, atol=1e-6)
            assert np.allclose(stored.frame_mass.sum("to_frame"), 1, atol=1e-5)
            assert stored.frame_mass.dims == ("head", "from_frame", "to_frame")


def test_xarray_view_has_named_dims_coordinates_and_attributes(full_capture):
    path, _ = full_capture
    ds = xr.open_dataset(path, engine="h5netcdf")
    try:
        assert ds.q.dims == ("step", "layer", "head", "query", "dim")
        assert ds.k.dims == ("step", "layer", "head", "key", "dim")
        assert ds.lse.dims == ("step", "layer", "head", "query")
        assert ds.record_complete.dims == ("step", "chunk", "layer")
        np.testing.assert_allclose(ds.timestep.values, list(self_forcing_timesteps().tolist()) + [0.0])
        assert list(ds["layer"].values) == [0, 1, 2] and list(ds["head"].values) == [0, 1, 2]
        tokens = np.arange(90)
        assert (ds.key_frame.values == tokens // 15).all() and (ds.key_row.values == (tokens // 5) % 3).all()
        assert (ds.query_col.values == tokens % 5).all() and (ds.query_chunk.values == tokens // 30).all()
        for name in ("q", "k", "v", "lse", "frame_mass"):
            assert ds[name].attrs["units"] == "1" and ds[name].attrs["long_name"]
        assert ds.q.attrs["post_rope"] == 1 and ds.v.attrs["post_rope"] == 0
        assert ds.attrs["format"] == "toolkit-capture" and ds.attrs["format_version"] == 1
        assert ds.attrs["model"] == "tiny-random" and ds.attrs["prompt"] == "a test" and ds.attrs["seed"] == 1
        assert ds.attrs["complete"] == 1 and "torch_version" in ds.attrs and "toolkit_version" in ds.attrs
        assert ds.attrs["attention_backend"] == "dense_attention" and ds.attrs["device"] == "cpu"
        # a lazily indexed record equals the reader's
        with open_capture(path) as cap:
            rec = cap.record(step=2, chunk=1, layer=1)
            sel = ds.q.sel(step=2, layer=1).isel(query=slice(30, 60)).values
            np.testing.assert_array_equal(sel, rec.q().numpy())
    finally:
        ds.close()


def test_partial_selection_stores_only_what_is_needed(tmp_path):
    model = make_model(3)
    ref: dict = {}
    path = tmp_path / "sub.h5"
    run(model, Selection(layers="1", heads="0,2", steps="3", chunks="2", queries="stride:4",
                         store=("q", "k", "v", "lse", "pooled")), path, reference=ref)
    with open_capture(path) as cap:
        assert cap.records == [(3, 2, 1)]
        assert cap.steps == [3, 4]  # step 3 records + the clean pass (context of chunk 2)
        assert cap.heads == [0, 2]
        rec = cap.record(step=3, chunk=2, layer=1)
        seen = ref[(3, 2, 1)]
        expected_q = query_tokens("stride:4", cap.grid, 0)
        assert torch.equal(rec.query_tokens, expected_q[(expected_q >= 60) & (expected_q < 90)])
        assert torch.equal(rec.k(), seen["k"][:, [0, 2]].transpose(0, 1))
        assert torch.equal(rec.q(heads=[2]), seen["q"][rec.query_tokens - 60][:, [2]].transpose(0, 1))
        rows = cap.rows(rec, 0)
        torch.testing.assert_close(torch.from_numpy(rows.values).double(),
                                   seen["probs"][0][rec.query_tokens - 60], rtol=1e-5, atol=1e-6)
        with pytest.raises(ToolkitError, match="not in"):
            cap.record(step=2, chunk=2, layer=1)
        # pooled views over the strided queries of the selected heads
        probs = seen["probs"][[0, 2]][:, rec.query_tokens - 60]
        brute = pooled_reference(probs, rec.query_tokens, rec.key_tokens, cap.grid)
        for source in ("stored", "recompute"):
            pooled = cap.pooled(rec, source=source)
            assert list(pooled["head"].values) == [0, 2]
            for name in ("frame_mass", "offset_t", "offset_h", "offset_w"):
                torch.testing.assert_close(torch.from_numpy(pooled[name].values).double(), brute[name], rtol=1e-5,
                                           atol=1e-6)
        assert list(cap.pooled(rec, heads=[2], source="stored")["head"].values) == [2]
        kv = cap.file["kv_complete"][...]
        assert kv.sum() == 3  # clean slices of chunks 0, 1 + step 3 of chunk 2, layer 1 only
        # the file stores no more than the plan estimated
        assert cap.file["k"].shape == (2, 1, 2, 90, CFG.head_dim)


def test_random_queries_are_per_frame_and_seeded():
    grid = (4, 3, 7)
    a, b, c = (query_tokens("random:5", grid, s) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.bincount(a // 21, minlength=4), torch.full((4,), 5))
    assert len(set(a.tolist())) == 20 and torch.equal(a, a.sort().values)
    s = query_tokens("stride:4", grid, 0)
    assert torch.equal(s, torch.tensor([f * 21 + x for f in range(4) for x in range(0, 21, 4)]))


def test_bfloat16_model_is_stored_losslessly_as_bits(tmp_path):
    model = make_model(4, torch.bfloat16)
    ref: dict = {}
    path = tmp_path / "bf16.h5"
    run(model, Selection(layers="0,2", chunks="1-2"), path, reference=ref)
    with open_capture(path) as cap:
        assert cap.file["q"].dtype == np.uint16 and cap.file["q"].attrs["dtype_logical"] == "bfloat16"
        assert cap.file.attrs["model_dtype"] == "bfloat16"
        for key in cap.records:
            rec, seen = cap.record(*key), ref[tuple(key)]
            assert torch.equal(rec.q(), seen["q"].float().transpose(0, 1))
            assert torch.equal(rec.k(), seen["k"].float().transpose(0, 1))
            torch.testing.assert_close(rec.lse().double(), seen["lse"], rtol=0, atol=1e-4)
            # decoding where the analysis runs (bits travel, the device widens them) gives the same floats
            device = "cuda" if torch.cuda.is_available() else "cpu"
            assert torch.equal(rec.v([1, 0], device=device).cpu(), seen["v"][:, [1, 0]].float().transpose(0, 1))


def test_float16_storage_option_records_original_dtype(tmp_path):
    model = make_model(5)
    path = tmp_path / "f16.h5"
    ref: dict = {}
    run(model, Selection(layers="2", steps="0", chunks="0", dtype="float16"), path, reference=ref)
    with open_capture(path) as cap:
        assert cap.file["q"].dtype == np.float16 and cap.file["q"].attrs["model_dtype"] == "float32"
        rec = cap.record(0, 0, 2)
        assert torch.equal(rec.q(), ref[(0, 0, 2)]["q"].half().float().transpose(0, 1))


@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
def test_narrower_storage_keeps_the_file_exact_about_itself(tmp_path, storage):
    """q/k rounded on disk: lse, maps and pooled views are computed from the rounded values, so exp(s·q·k − lse)
    rebuilt in float64 from the file gives rows that sum to 1 and equal its stored maps."""
    model = make_model(7)
    path = tmp_path / f"{storage}.h5"
    ref: dict = {}
    run(model, Selection(layers="1", steps="1,4", chunks="1-2", dtype=storage, store=("q", "k", "lse", "maps")),
        path, reference=ref)
    with open_capture(path) as cap:
        assert cap.file.attrs["lse_computed_from"] == "the stored q and k"
        cap.verify(records=0, rows=0)  # raises past its tolerance, 1e-3 for such a file (0.25 before)
        maps = cap.file["maps"]
        for key in cap.records:
            rec = cap.record(*key)
            q, k, lse = rec.q().double(), rec.k().double(), rec.lse().double()  # h i d, h j d, h i
            logits = cap.file.attrs["sm_scale"] * q @ k.transpose(-1, -2)
            torch.testing.assert_close(lse, torch.logsumexp(logits, -1), rtol=0, atol=2e-5)
            p = (logits - lse[..., None]).exp()
            torch.testing.assert_close(p.sum(-1), torch.ones_like(lse), rtol=0, atol=5e-5)
            s, l = cap.step_index[key.step], cap.layer_index[key.layer]
            qa, qb = cap.chunk_queries(key.chunk)
            stored = torch.from_numpy(maps[s, l, :, qa:qb, : p.shape[-1]]).double()
            torch.testing.assert_close(stored, p, rtol=1e-4, atol=1e-6)
            # and the rounding is real: the model's own q differ from the stored ones
            assert not torch.equal(rec.q(), ref[tuple(key)]["q"].float().transpose(0, 1))


def test_maps_are_stored_under_the_size_guard_and_equal_probabilities(tmp_path):
    model = make_model(6)
    ref: dict = {}
    path = tmp_path / "maps.h5"
    run(model, Selection(layers="1", steps="1,4", store=("lse", "maps"), queries="random:3"), path, reference=ref)
    with open_capture(path) as cap:
        maps = cap.file["maps"]
        for key in cap.records:
            rec = cap.record(*key)
            s, l = cap.step_index[key.step], cap.layer_index[key.layer]
            qa, qb = cap.chunk_queries(key.chunk)
            stored = torch.from_numpy(maps[s, l, :, qa:qb, :])
            seen = ref[tuple(key)]["probs"][:, rec.query_tokens - ref[tuple(key)]["query_offset"]]
            n = seen.shape[-1]
            torch.testing.assert_close(stored[..., :n].double(), seen, rtol=1e-5, atol=1e-6)
            assert (stored[..., n:] == 0).all()  # keys after the chunk were not attended


def test_refused_selections_name_the_valid_range():
    lay = layout_for(make_model())
    from toolkit.capture.selection import resolve

    with pytest.raises(SelectionError, match=r"layer 40 is out of range: this run has 3 layers \(valid: 0-2"):
        resolve(Selection(layers="0,40"), lay)
    with pytest.raises(SelectionError, match=r"step 5 .*valid: 0-4, clean"):
        resolve(Selection(steps="5"), lay)
    with pytest.raises(SelectionError, match="cannot parse step 'x'"):
        resolve(Selection(steps="x"), lay)
    with pytest.raises(SelectionError, match=r"chunk 3 .*valid: 0-2"):
        resolve(Selection(chunks="1-3"), lay)
    with pytest.raises(SelectionError, match=r"head 3 .*valid: 0-2"):
        resolve(Selection(heads="3"), lay)
    with pytest.raises(SelectionError, match="queries 'every:2' not understood"):
        resolve(Selection(queries="every:2"), lay)
    with pytest.raises(SelectionError, match="cannot store attn"):
        resolve(Selection(store=("q", "attn")), lay)
    bidi = RunLayout.bidirectional(CFG, (6, 3, 5), [1000.0, 500.0])
    with pytest.raises(SelectionError, match="'clean' does not exist"):
        resolve(Selection(steps="clean"), bidi)
    assert resolve(Selection(steps="clean"), lay).steps == [4]


def test_map_size_guard_refuses_and_explains():
    from toolkit.capture.selection import resolve

    big = RunLayout.self_forcing(WanConfig(), (21, 30, 52), self_forcing_timesteps(), 3)
    every = resolve(Selection(store=("maps",), max_map_bytes=1 << 62), big)
    # Σ over chunks c of 4680 queries × 4680·(c+1) keys, 5 passes, 30 layers, 12 heads, float32 (≈ 1.1e12 entries)
    assert every.map_bytes() == 4680 * 4680 * sum(range(1, 8)) * 5 * 30 * 12 * 4
    with pytest.raises(SelectionError, match=r"maps for this selection would take 4\.4 TB .*recompute") as err:
        resolve(Selection(store=("maps",)), big)
    assert "\n" not in str(err.value)
    plan = resolve(Selection(store=("maps",), layers="0", heads="0", steps="0", chunks="6", queries="random:2"), big)
    assert plan.map_bytes() == 6 * 32760 * 4  # 2 queries × 3 frames, every key of the clip, float32


def test_existing_file_is_never_overwritten(full_capture):
    path, _ = full_capture
    before = path.read_bytes()
    with pytest.raises(ToolkitError, match="exists; pass --resume"):
        run(make_model(), Selection(layers="0"), path)
    with pytest.raises(ToolkitError, match="different selection"):
        run(make_model(), Selection(layers="0"), path, resume=True)
    assert path.read_bytes() == before


def test_interrupted_capture_is_incomplete_then_resume_completes_it(tmp_path):
    model = make_model(7)
    path, fresh = tmp_path / "resume.h5", tmp_path / "fresh.h5"
    select = Selection(layers="0,2", steps="1,4", store=("q", "k", "lse"))
    noise, context = inputs()

    class Stop(Exception):
        pass

    def stop_after_first_chunk(chunk, x0):
        raise Stop

    with pytest.raises(Stop):
        with capture(model, select, path, layout=layout_for(model), progress=False,
                     provenance={"seed": 1}):
            self_forcing_rollout(model, noise, context, frames_per_chunk=FPC, on_chunk=stop_after_first_chunk,
                                 generator=torch.Generator().manual_seed(2))
    with open_capture(path) as cap:
        assert not cap.complete
        assert cap.records == [(s, 0, l) for s in (1, 4) for l in (0, 2)]
    run(model, select, path, resume=True, provenance={"seed": 1})
    run(model, select, fresh, provenance={"seed": 1})
    with open_capture(path) as a, open_capture(fresh) as b:
        assert a.complete and a.records == b.records and len(a.records) == 2 * 3 * 2
        assert a.attrs["history"].splitlines()[-1].endswith("resumed, complete=1")
        for key in a.records:
            ra, rb = a.record(*key), b.record(*key)
            assert torch.equal(ra.q(), rb.q()) and torch.equal(ra.k(), rb.k()) and torch.equal(ra.lse(), rb.lse())
    with pytest.raises(ToolkitError, match="different seed"):
        run(model, select, path, resume=True, provenance={"seed": 2})


def test_bidirectional_sampler_with_guidance_records_the_conditional_pass(tmp_path):
    from toolkit.models.sampling import shift_sigma, wan_sample

    model = make_model(8)
    noise, context = inputs(3)
    negative = torch.randn_like(context)
    steps = 2
    sig = shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), 5.0)
    layout = RunLayout.bidirectional(CFG, model.grid_size(noise), (sig[:-1] * 1000).tolist())
    first_calls: dict = {}

    def spy(q, k, v, out, ctx):  # the first call of each (step, layer) is the conditional half of CFG
        first_calls.setdefault((ctx.step, ctx.layer), (q[0].clone(), k[0].clone(), ctx))

    for s in seams(model):
        s.hooks.append(spy)
    path = tmp_path / "bidi.h5"
    with capture(model, Selection(layers="0,2"), path, layout=layout, progress=False):
        wan_sample(model, noise, context, negative_context=negative, steps=steps, guidance_scale=3.0)
    with open_capture(path) as cap:
        assert cap.complete and cap.records == [(s, 0, l) for s in range(steps) for l in (0, 2)]
        for key in cap.records:
            rec = cap.record(*key)
            q, k, ctx = first_calls[(key.step, key.layer)]
            assert rec.key_frames == (0, 6) and torch.equal(rec.key_tokens, torch.arange(90))
            assert rec.timestep == pytest.approx(ctx.timestep) and not rec.is_clean
            assert torch.equal(rec.q(), q.transpose(0, 1)) and torch.equal(rec.k(), k.transpose(0, 1))
            expected = dense_attention(q.transpose(0, 1), k.transpose(0, 1), scale=ctx.scale).probs
            torch.testing.assert_close(torch.from_numpy(cap.rows(rec, 1).values).double(), expected[1],
                                       rtol=1e-5, atol=1e-6)


def test_hooks_only_on_selected_layers_and_removed_on_exit(tmp_path):
    model = make_model(9)
    with capture(model, Selection(layers="1"), tmp_path / "h.h5", layout=layout_for(model), progress=False):
        assert [len(s.hooks) for s in seams(model)] == [0, 1, 0]
    assert [len(s.hooks) for s in seams(model)] == [0, 0, 0]
    with open_capture(tmp_path / "h.h5") as cap:
        assert not cap.complete and cap.records == []  # nothing ran inside the block


def test_gzip_and_lzf_compression_round_trip(tmp_path):
    model = make_model(10)
    for codec in ("gzip", "lzf"):
        ref: dict = {}
        path = tmp_path / f"{codec}.h5"
        run(model, Selection(layers="1", chunks="0,2", compression=codec), path, reference=ref)
        with open_capture(path) as cap:
            assert cap.file["k"].compression == codec and cap.file["k"].shuffle
            for key in cap.records:
                rec, seen = cap.record(*key), ref[tuple(key)]
                assert torch.equal(rec.q(), seen["q"].transpose(0, 1))
                assert torch.equal(rec.k(), seen["k"].transpose(0, 1))


def test_open_capture_is_reachable_from_the_package_root():
    import toolkit
    from toolkit.capture import open_capture

    assert toolkit.open_capture is open_capture
