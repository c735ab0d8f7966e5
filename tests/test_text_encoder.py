"""umT5 text conditioning: Wan-T5 -> transformers key conversion on a tiny random config, checked against an
independent float64 re-implementation of Wan's T5 encoder; tokenizer padding; prompt-embedding cache and files."""

from __future__ import annotations

import math

import pytest
import torch

from toolkit.errors import CheckpointError, ToolkitError
from toolkit.models import text_encoder as te

TINY = dict(vocab_size=37, d_model=24, d_kv=6, d_ff=40, num_layers=2, num_heads=4,
            relative_attention_num_buckets=10, relative_attention_max_distance=12)


def _random_hf_encoder(seed=0):
    transformers = pytest.importorskip("transformers", reason="transformers ([text] extra) not installed")
    UMT5EncoderModel = transformers.UMT5EncoderModel

    torch.manual_seed(seed)
    model = UMT5EncoderModel(te.umt5_config(**TINY)).double().eval()
    with torch.no_grad():  # HF init leaves norms at 1: perturb everything so a swapped name cannot hide
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def _buckets(rel, num_buckets, max_dist):
    """Wan's bidirectional T5 relative-position bucket (wan/modules/t5.py, T5RelativeEmbedding)."""
    half = num_buckets // 2
    out = (rel > 0).long() * half
    rel = rel.abs()
    max_exact = half // 2
    large = max_exact + (torch.log(rel.double() / max_exact) / math.log(max_dist / max_exact)
                         * (half - max_exact)).long()
    large = torch.clamp(large, max=half - 1)
    return out + torch.where(rel < max_exact, rel, large)


def _wan_t5_reference(sd, ids, mask, heads, num_buckets, max_dist, eps=1e-6):
    """Wan's T5Encoder forward from Wan-named weights, float64: pre-norm blocks, per-layer position bias,
    unscaled attention with key padding mask, FFN fc2(fc1(x) * gelu_tanh(gate(x))), final norm."""
    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    x = sd["token_embedding.weight"][ids]
    b, L, _ = x.shape
    pos = torch.arange(L)
    rel = pos[None, :] - pos[:, None]  # key - query
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for n in range(n_layers):
        p = f"blocks.{n}."
        bias = sd[p + "pos_embedding.embedding.weight"][_buckets(rel, num_buckets, max_dist)].permute(2, 0, 1)
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = (h @ sd[p + f"attn.{c}.weight"].T for c in "qkv")
        q, k, v = (t.view(b, L, heads, -1) for t in (q, k, v))
        logits = torch.einsum("bihd,bjhd->bhij", q, k) + bias
        logits = logits.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        att = torch.einsum("bhij,bjhd->bihd", logits.softmax(-1), v).reshape(b, L, -1)
        x = x + att @ sd[p + "attn.o.weight"].T
        h = rms(x, sd[p + "norm2.weight"])
        gate = torch.nn.functional.gelu(h @ sd[p + "ffn.gate.0.weight"].T, approximate="tanh")
        x = x + (gate * (h @ sd[p + "ffn.fc1.weight"].T)) @ sd[p + "ffn.fc2.weight"].T
    return rms(x, sd["norm.weight"])


def test_key_conversion_round_trip_and_wan_semantics():
    hf = _random_hf_encoder()
    wan_sd = te.hf_to_wan_t5(hf.state_dict())
    assert "token_embedding.weight" in wan_sd and "blocks.1.pos_embedding.embedding.weight" in wan_sd
    assert "blocks.0.ffn.gate.0.weight" in wan_sd and not any(k.startswith("encoder.") for k in wan_sd)
    rebuilt = te.build_umt5_encoder(wan_sd, te.umt5_config(**TINY)).double()
    assert rebuilt.encoder.embed_tokens.weight is rebuilt.shared.weight
    torch.manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (3, 19))
    lengths = torch.tensor([19, 7, 1])
    mask = (torch.arange(19)[None] < lengths[:, None]).long()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = rebuilt(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(got, want)
    ref = _wan_t5_reference(wan_sd, ids, mask, TINY["num_heads"], TINY["relative_attention_num_buckets"],
                            TINY["relative_attention_max_distance"])
    valid = mask.bool()
    # UMT5LayerNorm takes the variance in float32 even for float64 inputs: agreement to ~1e-6, not 1e-15.
    # A swapped projection or bucket gives O(1) differences.
    torch.testing.assert_close(got[valid], ref[valid], rtol=1e-5, atol=1e-5)


def test_bad_t5_weights_are_named():
    wan_sd = te.hf_to_wan_t5(_random_hf_encoder().state_dict())
    extra = {**wan_sd, "blocks.0.attn.bogus.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="blocks.0.attn.bogus.weight"):
        te.build_umt5_encoder(extra, te.umt5_config(**TINY))
    missing = {k: v for k, v in wan_sd.items() if k != "blocks.1.ffn.fc2.weight"}
    with pytest.raises(CheckpointError, match=r"1 missing: encoder\.block\.1\.layer\.1\.DenseReluDense\.wo"):
        te.build_umt5_encoder(missing, te.umt5_config(**TINY))


def _tiny_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>"] + "a red fox jumps over the lazy dog in snow & blue".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture
def tiny_encoder(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    hf = _random_hf_encoder(seed=2)
    t5_file = tmp_path / "t5.pth"
    torch.save(te.hf_to_wan_t5(hf.state_dict()), t5_file)
    enc = te.TextEncoder(t5_file, _tiny_tokenizer(tmp_path / "tok"), dtype=torch.float64, text_len=11,
                         config=te.umt5_config(**TINY))
    return enc, hf


def test_text_encoder_pads_with_zeros_past_the_true_length(tiny_encoder):
    enc, hf = tiny_encoder
    prompts = ["a red fox   jumps\n over the lazy dog", "blue snow &amp;amp; dog"]
    context, lengths = enc.encode(prompts)
    assert context.shape == (2, 11, TINY["d_model"])
    # whitespace collapsed, HTML unescaped twice ("&amp;amp;" -> "&"), end token added
    assert lengths.tolist() == [9, 5]
    for row, n in enumerate(lengths.tolist()):
        assert torch.all(context[row, n:] == 0) and torch.all(context[row, :n].abs().sum(-1) > 0)
        ids = enc.tokenizer(te.clean_prompt(prompts[row]), return_tensors="pt").input_ids  # unpadded
        with torch.no_grad():
            alone = hf(input_ids=ids).last_hidden_state[0]
        torch.testing.assert_close(context[row, :n], alone, rtol=1e-10, atol=1e-10)


def test_prompt_cache_skips_the_encoder(tiny_encoder, tmp_path):
    enc, _ = tiny_encoder
    prompts = ["a red fox", "the lazy dog in snow"]
    first = te.encode_prompts(prompts, encoder=enc, text_len=11)
    assert len(list((tmp_path / "cache" / "prompt_embeds").glob("*.safetensors"))) == 2

    class Refuses:
        t5_path = enc.t5_path

        def encode(self, prompts):
            raise AssertionError(f"encoder called for cached prompts {prompts}")

    again = te.encode_prompts(prompts[::-1], encoder=Refuses(), text_len=11)
    assert torch.equal(again, first.flip(0))
    torch.testing.assert_close(first, enc(prompts).float())


def test_prompt_embeds_file(tmp_path):
    emb = torch.randn(2, 5, 8)
    path = te.save_prompt_embeds(tmp_path / "p.safetensors", emb)
    got = te.load_prompt_embeds(path, text_len=7)
    assert got.shape == (2, 7, 8) and torch.equal(got[:, :5], emb) and torch.all(got[:, 5:] == 0)
    torch.save(emb[0], tmp_path / "p.pt")
    assert torch.equal(te.load_prompt_embeds(tmp_path / "p.pt", text_len=5), emb[:1])
    with pytest.raises(ToolkitError, match="L <= 4"):
        te.load_prompt_embeds(path, text_len=4)
    with pytest.raises(ToolkitError, match="not found"):
        te.load_prompt_embeds(tmp_path / "nope.safetensors")
