"""Issue 15, items 2, 9, 11: every ordinary user error is one line on stderr and exit 2 (never a traceback), and no
command replaces existing output unless --force (or continues it with --resume, where it can)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toolkit.cli import main

BIG = str(2**70)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``toolkit ARGV`` in process (as ``python -m toolkit.cli``: argparse's exits become the exit code)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_refusal(argv: list[str], capsys, message: str = "") -> str:
    code, _, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    assert message in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    """A plain file, a folder holding each command's earlier output, and embeddings files that are wrong."""
    afile = tmp_path / "afile.txt"
    afile.write_text("not a folder\n")
    for folder, name in (("gen", "video.png"), ("figs", "manifest.json"), ("bench", "bench_kernels.json"),
                         ("model", "model.safetensors")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(b"earlier output " + name.encode())
    (tmp_path / "model" / "train_log.json").write_text("{}\n")  # a recipe's model: its record beside the weights
    (tmp_path / "empty").mkdir()
    from safetensors.torch import save_file

    save_file({"context": torch.zeros(5, 7)}, str(tmp_path / "narrow.safetensors"))
    torch.save({"context": [1.0, 2.0]}, tmp_path / "list.pt")
    return {"tmp": tmp_path, "file": afile}


# (argv with {tmp} and {file} placeholders, a fragment of the one line)
CASES = {
    "device tpu": (["capture", "--dry-run", "--device", "tpu"], "--device 'tpu'"),
    "device cpu:abc": (["capture", "--dry-run", "--device", "cpu:abc"], "--device 'cpu:abc'"),
    "device meta": (["capture", "--dry-run", "--device", "meta"], "--device 'meta'"),
    "generate device meta": (["generate", "--device", "meta", "--out", "{tmp}/g"], "--device 'meta'"),
    "figures device tpu": (["figures", "--figures", "semantic", "--device", "tpu", "--out", "{tmp}/f"], "--device"),
    "seed 2^70 dry run": (["capture", "--dry-run", "--seed", BIG], "--seed"),
    "query seed 2^70 dry run": (["capture", "--dry-run", "--queries", "random:4", "--query-seed", BIG],
                                "--query-seed"),
    "generate seed 2^70": (["generate", "--seed", BIG, "--out", "{tmp}/g"], "64 bits"),
    "figures seed 2^70": (["figures", "--figures", "semantic", "--seed", BIG, "--out", "{tmp}/f"], "--seed"),
    "train seed 2^70": (["train", "--tiny", "--seed", BIG, "--out", "{tmp}/t"], "--seed"),
    "max map bytes inf": (["capture", "--dry-run", "--store", "q,maps", "--max-map-bytes=inf"], "cannot read size"),
    "max map bytes nan": (["capture", "--dry-run", "--store", "q,maps", "--max-map-bytes=nan"], "cannot read size"),
    "prompt embeds too narrow": (["generate", "--model", "self-forcing", "--prompt-embeds", "{tmp}/narrow.safetensors",
                                  "--out", "{tmp}/g"], "[L, 4096]"),
    "prompt embeds not a tensor": (["generate", "--model", "self-forcing", "--prompt-embeds", "{tmp}/list.pt",
                                    "--out", "{tmp}/g"], "'context' is a list"),
    "capture out under a file": (["capture", "--out", "{file}/x.h5"], "is a file, not a folder"),
    "capture out uncreatable": (["capture", "--out", "/proc/toolkit-no-such/x.h5"], "cannot write"),
    "capture out is a folder": (["capture", "--dry-run", "--out", "{tmp}/empty"], "is a folder"),
    "generate out is a file": (["generate", "--out", "{file}"], "is a file; --out takes a folder"),
    "figures out is a file": (["figures", "--figures", "semantic", "--out", "{file}"], "is a file"),
    "figures out uncreatable": (["figures", "--figures", "semantic", "--out", "/proc/toolkit-no-such/f"],
                                "cannot write"),
    "analyze out is a folder": (["analyze", "topk", "{file}", "--out", "{tmp}/empty"], "takes a file name"),
    "analyze out unwritable": (["analyze", "topk", "{file}", "--out", "/proc/toolkit.nc"], "cannot write"),
    "bench out is a file": (["bench", "--tiny", "--out", "{file}"], "is a file"),
    "train out under a file": (["train", "--tiny", "--out", "{file}/t"], "is a file"),
    "train negative steps": (["train", "--stages", "base", "--base-steps", "-5", "--out", "{tmp}/t"],
                             "--base-steps -5: must be positive"),
    "train zero lr": (["train", "--stages", "ode_init", "--ode-lr", "0", "--out", "{tmp}/t"], "--ode-lr 0.0"),
    "train zero critic ratio": (["train", "--stages", "self_forcing", "--sf-critic-ratio", "0", "--out", "{tmp}/t"],
                                "--sf-critic-ratio 0: must be positive"),
    "train placed above one": (["train", "--tiny", "--placed", "2", "--out", "{tmp}/t"], "--placed"),
    "train tiny with a stage flag": (["train", "--tiny", "--sf-steps", "9", "--out", "{tmp}/t"],
                                     "--tiny fixes every stage's size and steps; leave out --sf-steps"),
    "finetune from nowhere": (["train", "--finetune", "--attention", "monarch", "--from", "{tmp}/none", "--out",
                               "{tmp}/t"], "no such model folder"),
    "finetune tiny from": (["train", "--finetune", "--tiny", "--attention", "monarch", "--from", "{tmp}/empty",
                            "--out", "{tmp}/t"], "leave out --from"),
    "empty prompt": (["generate", "--prompt", "", "--out", "{tmp}/g"], "--prompt is empty"),
    "empty prompt dry run": (["capture", "--dry-run", "--prompt", " "], "--prompt is empty"),
    "figures empty prompt": (["figures", "--figures", "semantic", "--prompt", "", "--out", "{tmp}/f"],
                             "--prompt is empty"),
    "bad argument": (["capture", "--steps"], "expected one argument"),
    # item 2: existing output is kept; the line says how to replace or continue it
    "capture over a file": (["capture", "--out", "{file}"], "exists; pass --resume to continue it, --force"),
    "capture force and resume": (["capture", "--out", "{file}", "--force", "--resume"], "pass one of them"),
    "generate over a video": (["generate", "--out", "{tmp}/gen"], "already holds output (video.png); pass --force"),
    "figures over figures": (["figures", "--figures", "semantic", "--out", "{tmp}/figs"],
                             "already holds output (manifest.json); pass --force"),
    "bench over results": (["bench", "--tiny", "--out", "{tmp}/bench"], "already holds output (bench_kernels.json)"),
    "train over a model": (["train", "--tiny", "--out", "{tmp}/model"], "pass --force to replace it"),
    "finetune over a recipe's model": (["train", "--finetune", "--tiny", "--attention", "monarch", "--force",
                                        "--out", "{tmp}/model"], "finetune into another --out"),
    "train one stage beside a model": (["train", "--tiny", "--stages", "teacher", "--out", "{tmp}/model"],
                                       "already holds a model (model.safetensors)"),
    "toy prompt the model cannot read": (["capture", "--dry-run", "--prompt", "2 sprites: red circle"],
                                         "announces 2 sprites but lists 1"),
    "prompt set with a bad line": (["capture", "--prompts", "{file}", "--out", "{tmp}/set"], "cannot parse"),
    "negative iterations": (["analyze", "monarch", "{file}", "--out", "{tmp}/m.nc", "--iters", "-1"],
                            "iters -1"),
    "pipeline arg without a pipeline": (["capture", "--dry-run", "--pipeline-arg", "num_frames=13"],
                                        "--pipeline-arg is for a --diffusers pipeline"),
    "inspect a folder": (["inspect", "{tmp}/empty"], "is a folder, not a capture file"),
    "scheduler for one run": (["analyze", "topk", "{file}", "--out", "{tmp}/x.nc", "--scheduler", "nonsense"],
                              "--scheduler maps several RUN files"),
}


def test_help_keeps_hyphenated_examples_and_flags_whole(capsys):
    """Wrapped help text breaks at spaces only, so an example rule or a flag copies out of it whole."""
    from toolkit.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    assert "@heads=0-3+monarch" in text and "--local-attn-size" in text
    assert not any(line.rstrip().endswith("-") and not line.rstrip().endswith("--") for line in text.splitlines())


def test_help_of_an_option_group_is_wrapped(capsys, monkeypatch):
    """A group's one-paragraph description wraps to the terminal, also under a parser whose own description is
    kept as written (toolkit train's stage table)."""
    from toolkit.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("finetuning with another attention (--finetune):")
    group = lines[start + 1:lines.index("", start + 2)]
    assert len(group) > 2 and all(len(line) <= 80 for line in group)
    assert "toolkit train --finetune --attention monarch:3,1,1 --out runs/ft_311" in " ".join(group)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (folders as None) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_line_exit_2_and_touches_nothing(case, places, capsys, monkeypatch):
    monkeypatch.chdir(places["tmp"])  # a default --out (capture.h5, figs/) lands in the test's folder
    argv, message = CASES[case]
    argv = [a.format(tmp=places["tmp"], file=places["file"]) for a in argv]
    before = snapshot(places["tmp"])
    assert_one_line_refusal(argv, capsys, message)
    assert snapshot(places["tmp"]) == before  # nothing written, replaced or created (no folders either)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("argv", [["figures", "--figures", "semantic"], ["generate"], ["capture"]])
def test_read_only_folder_is_refused_before_any_work(argv, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        out = ro / ("x.h5" if argv == ["capture"] else "out")
        assert_one_line_refusal([*argv, "--out", str(out)], capsys, "not writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_read_only_filesystem_probe(tmp_path, monkeypatch):
    """What root sees on a read-only mount: the probe file cannot be made -> OutputError, and no folder is left."""
    import tempfile

    from toolkit.errors import OutputError, prepare_output_dir

    def refuse(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(OutputError, match="cannot write .*: Read-only file system"):
        prepare_output_dir(tmp_path / "a" / "b", folder=True)
    assert list(tmp_path.iterdir()) == []


def test_check_output_policy(tmp_path):
    from toolkit.errors import OutputError, check_output

    f = tmp_path / "x.h5"
    assert check_output(f) is None  # nothing there: nothing to say
    f.write_bytes(b"x")
    with pytest.raises(OutputError, match="exists; pass --force to replace it or choose a new --out"):
        check_output(f)
    assert check_output(f, force=True) == f"replacing {f} (--force)"
    assert check_output(f, resume=True, can_resume=True) == f"resuming {f}"
    with pytest.raises(OutputError, match="pass --force to replace it"):
        check_output(f, resume=True)  # a command that cannot resume: --resume does not license an overwrite
    assert check_output(tmp_path, folder=True, outputs=("*.png",)) is None  # other files do not count
    with pytest.raises(OutputError, match=r"already holds output \(x.h5\)"):
        check_output(tmp_path, folder=True, outputs=("*.h5",))


# ---- the success paths of the policy, on a small random checkpoint of the bundled architecture -----------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from toolkit.models import checkpoints as ck
    from toolkit.models.bundled import bundled_config

    cfg = bundled_config(dim=32, ffn_dim=32, num_layers=2, num_heads=2)
    folder = tmp_path_factory.mktemp("ckpt")
    ck.save_wan_native(ck.random_state_dict(cfg, seed=3), folder, cfg)
    return folder


CAPTURE = ["--layers", "1", "--heads", "0", "--steps", "3", "--chunks", "0", "--queries", "random:2",
           "--store", "q,k,lse", "--quiet"]


def test_capture_force_replaces_and_resume_of_a_complete_capture_does_nothing(checkpoint, tmp_path, capsys,
                                                                             monkeypatch):
    out = tmp_path / "run.h5"
    out.write_text("an earlier result\n")
    code, _, err = run_cli(["capture", "--checkpoint", str(checkpoint), "--out", str(out), "--force", *CAPTURE],
                           capsys)
    assert code == 0 and f"replacing {out} (--force)" in err, err
    from toolkit.capture import open_capture

    with open_capture(out) as cap:
        assert cap.complete
    before = out.read_bytes()

    import toolkit.pipeline

    def no_work(*a, **k):
        raise AssertionError("a complete capture must not be sampled again")

    monkeypatch.setattr(toolkit.pipeline, "prepare_run", no_work)
    code, _, err = run_cli(["capture", "--checkpoint", str(checkpoint), "--out", str(out), "--resume", *CAPTURE],
                           capsys)
    assert code == 0 and "already complete (1 records of this run); nothing to do" in err, err
    assert out.read_bytes() == before


def test_generate_force_replaces_the_earlier_output(checkpoint, tmp_path, capsys):
    out = tmp_path / "gen"
    out.mkdir()
    (out / "video.mp4").write_bytes(b"an earlier run's video")
    code, _, err = run_cli(["generate", "--checkpoint", str(checkpoint), "--out", str(out), "--force", "--quiet"],
                           capsys)
    assert code == 0 and f"replacing {out} (--force)" in err
    assert not (out / "video.mp4").exists() and (out / "video.gif").stat().st_size > 0  # no mix of two runs


def test_subprocess_exit_code_and_single_line(tmp_path):
    """The real entry point: exit status 2 and one line, for an argparse error and a ToolkitError alike."""
    for argv in (["capture", "--dry-run", "--seed", BIG], ["capture", "--dry-run", "--device", "tpu"]):
        proc = subprocess.run([sys.executable, "-m", "toolkit.cli", *argv], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr


def test_every_help_example_parses():
    """The examples at the end of each command's --help use flags and values the command accepts."""
    import re
    import shlex

    from toolkit.cli import build_parser
    from toolkit.commands import analyze

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    examples = []
    for command in sub.choices.values():
        text = (command.epilog or "").replace("\\\n", " ")
        examples += [re.split(r"\s{2,}", line.strip())[0] for line in text.splitlines()
                     if line.strip().startswith("toolkit ")]
    assert len(examples) >= 15
    for example in examples:
        argv = shlex.split(example)[1:]
        args = parser.parse_args(argv)
        if argv[0] == "analyze":
            analyze.build_parser(args.analysis, analyze._load(args.analysis)).parse_args(args.rest)
