"""`toolkit capture --diffusers PATH`: a tiny random CogVideoX pipeline (transformer, its DDIM scheduler, a one-layer
T5 text encoder and a word-level tokenizer; no VAE: the capture stops at latents) saved to disk and captured
offline through the CLI."""

from __future__ import annotations

import pytest
import torch

from toolkit.capture import open_capture
from toolkit.cli import main

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (the [dev] extra installs it)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (the [dev] extra)")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def save_tiny_cogvideox(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    words = ["<pad>", "</s>", "<unk>"] + "a red circle blue square moves left right".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>")
    text_encoder = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(words), d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
    transformer = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=8, num_layers=2, sample_frames=9, sample_height=4, sample_width=6, patch_size=2,
        max_text_seq_length=7)
    diffusers.CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, transformer=transformer,
                                scheduler=diffusers.CogVideoXDDIMScheduler()).save_pretrained(path)


def test_capture_a_saved_pipeline_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, out = tmp_path / "pipe", tmp_path / "run.h5"
    save_tiny_cogvideox(folder)
    args = ["capture", "--diffusers", str(folder), "--prompt", "a red circle moves left", "--device", "cpu",
            "--quiet", "--store", "q,k,v,lse,text_mass", "--out", str(out)]
    # 13 frames -> 4 latent frames; 48 x 80 px -> 6 x 10 latents -> grid 4 x 3 x 5; guidance on (default 6)
    pipe_args = ["num_inference_steps=3", "num_frames=13", "height=48", "width=80", "max_sequence_length=7"]
    assert main(args + [a for p in pipe_args for a in ("--pipeline-arg", p)]) == 0
    scheduler = diffusers.CogVideoXDDIMScheduler.from_pretrained(folder / "scheduler")
    scheduler.set_timesteps(3)
    with open_capture(out) as cap:
        assert cap.complete and cap.grid == (4, 3, 5) and len(cap.records) == 3 * 2
        assert cap.layout.timesteps == tuple(float(t) for t in scheduler.timesteps)
        a = cap.attrs
        assert a["model_class"] == "diffusers.CogVideoXTransformer3DModel" and a["sampler"] == "CogVideoXDDIMScheduler"
        assert a["pipeline_args"]["num_inference_steps"] == 3 and a["diffusers_version"] == diffusers.__version__
        assert a["pipeline_batch_index"] == 1  # guidance on: batch [unconditional, conditional], conditional kept
        rec = cap.record(step=2, chunk=0, layer=1)
        rows = torch.from_numpy(cap.rows(rec, 1).values).double()
        mass = rec.text_mass()[1].double()
        assert 0.01 < float(mass.min()) and float(mass.max()) < 0.99  # text takes part of every row
        torch.testing.assert_close(rows.sum(-1) + mass, torch.ones(60, dtype=torch.float64), rtol=0, atol=1e-5)
        assert "verify: ok" in cap.verify(0, 0)
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "diffusers.CogVideoXTransformer3DModel" in capsys.readouterr().out

    assert main(args[:2] + [str(tmp_path / "nowhere")] + args[3:] + ["--out", str(tmp_path / "x.h5")]) == 2
    assert "no model_index.json" in capsys.readouterr().err
