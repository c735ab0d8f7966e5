#!/usr/bin/env bash
# Run 17 (docs/bundled-model.md), one device call: the shipped student on 256 clips (4 noise seeds x the 64 held-out
# prompts) and the kept teacher on 128 (2 seeds) at CFG 2, at CFG 4 on every step and at CFG 4 for σ <= 0.8 only
# (the guidance interval measured on 24 CPU clips), float32, batches of 32, all side by side on the one GPU; JSONs
# (written after every seed), logs and strips come back in $OUT/run17.tgz.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_INTERPRET=0
ln -sfn ../kernels toolkit/kernels; ln -sfn ../paper_figures toolkit/paper_figures
mkdir -p runs/eval
nvidia-smi --query-gpu=name,driver_version --format=csv > runs/eval/gpu.txt 2>&1
score() {  # name, then bundled_failures.py options
  name=$1; shift
  timeout 480 python3 benchmarks/bundled_failures.py --prompts 64 --batch 32 --device cuda --name "$name" \
    --out runs/eval "$@" > "runs/eval/$name.log" 2>&1
}
kept=(--weights data/teacher/teacher.safetensors --seeds 2 --strip 4)
score student_4seeds --seeds 4 --strip 4 &
score teacher_cfg2 "${kept[@]}" --teacher-cfg 2 &
score teacher_cfg4 "${kept[@]}" --teacher-cfg 4 &
score teacher_cfg4_sigma_0_0.8 "${kept[@]}" --teacher-cfg 4 --cfg-interval 0 0.8 &
wait
python3 - <<'PY'
import glob, os
from PIL import Image
for f in glob.glob("runs/eval/*.png"):
    im = Image.open(f).convert("RGB")
    im.resize((im.width // 2, im.height // 2), Image.LANCZOS).save(f[:-4] + ".jpg", quality=85)
    os.remove(f)
PY
tar czf "$OUT/run17.tgz" runs/eval
tail -n 7 runs/eval/*.log
