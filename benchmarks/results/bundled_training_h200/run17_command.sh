#!/usr/bin/env bash
# Run 17 (docs/bundled-model.md), one device call: how far apart the shipped student and the kept teacher are when
# each is scored on 256 clips (4 noise seeds x the 64 held-out prompts, float32, batches of 16), and the teacher at
# CFG 3 instead of 2 (128 clips; 100 Euler steps instead of 40 changed nothing on the CPU, docs/bundled-model.md).
# All three run side by side on the one GPU; their JSONs, logs and strips come back in $OUT/run17.tgz.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_INTERPRET=0
ln -sfn ../kernels toolkit/kernels; ln -sfn ../paper_figures toolkit/paper_figures
mkdir -p runs/eval
nvidia-smi --query-gpu=name,driver_version --format=csv > runs/eval/gpu.txt 2>&1
score() {  # name, then bundled_failures.py options
  name=$1; shift
  timeout 420 python3 benchmarks/bundled_failures.py --prompts 64 --batch 16 --device cuda --name "$name" \
    --out runs/eval "$@" > "runs/eval/$name.log" 2>&1
}
teacher=(--weights data/teacher/teacher.safetensors)
score student_4seeds --seeds 4 --strip 4 &
score teacher_cfg2_40steps_4seeds "${teacher[@]}" --teacher-cfg 2 --seeds 4 &
score teacher_cfg3_40steps "${teacher[@]}" --teacher-cfg 3 --seeds 2 --strip 4 &
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
