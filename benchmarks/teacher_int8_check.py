"""What int8 storage costs the teacher: held-out flow loss of the float16 weights and of the same weights after
``save_weights(int8=True)`` / ``load_weights``, on the CPU, same clips and noise.

    python benchmarks/teacher_int8_check.py --float16 runs/t7/stages/teacher.safetensors --out benchmarks/results/

(Measured on run 7's teacher, which ``data/teacher`` held until run 8 of ``docs/bundled-model.md`` replaced it.)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from timing import write_result

from toolkit.models.bundled.model import load_weights, save_weights
from toolkit.models.bundled.teacher import ClipSetup, heldout_loss, heldout_set
from toolkit.models.seam import use_backend


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--float16", type=Path, required=True, help="the teacher's float16 stage weights")
    p.add_argument("--clips", type=int, default=16, help="held-out clips")
    p.add_argument("--out", type=Path, default=Path("results"))
    args = p.parse_args()
    torch.set_num_threads(2)
    half = load_weights(args.float16)
    with tempfile.TemporaryDirectory() as tmp:
        int8_file = save_weights(half, Path(tmp) / "teacher.safetensors", int8=True, stage="teacher")
        size = int8_file.stat().st_size
        int8 = load_weights(int8_file)
    heldout = heldout_set(args.clips, half.cfg)
    result = dict(float16_file=str(args.float16), float16_bytes=args.float16.stat().st_size, int8_bytes=size,
                  clips=args.clips, device="cpu", torch=torch.__version__)
    for name, model in (("float16", half), ("int8", int8)):
        start = time.perf_counter()
        with use_backend(model, ClipSetup.of(model.cfg, "cpu").backend):
            result[f"heldout_loss_{name}"] = round(heldout_loss(model, heldout), 6)
        print(f"{name}: held-out flow loss {result[f'heldout_loss_{name}']:.5f} ({time.perf_counter() - start:.0f} s)")
    write_result(args.out, "teacher_int8_check.json", result)


if __name__ == "__main__":
    main()
