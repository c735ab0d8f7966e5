#!/usr/bin/env bash
# Run 22 (docs/bundled-model.md): the teacher's samplers of the sixteenth session on 128 clips of an H100/H200 (the
# first 128 of runs 17-19: 2 noise seeds x 64 held-out prompts, batches of 32, float32), all side by side in one
# call, each paired with run 19's Euler and eta = 1 rows on the same clips by compare_failures.py:
#   guidance against each sprite left out (CFG 2, Euler and eta = 1; CFG 3, eta = 1),
#   and the eta = 1 row again, as this call's own control.
# (Autoguidance with eta = 1 is left out: on the CPU's 24 clips it matched eta = 1 alone, 18 and 18, +2 -2.)
# Checked on the CPU with tiny random weights (WEIGHTS=… DEVICE=cpu PROMPTS=4 SEEDS=1): every scorer runs and the
# tar holds its JSON, log and strip.
set -u
weights=${WEIGHTS:-data/teacher/teacher.safetensors}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_INTERPRET=0
ln -sfn ../kernels toolkit/kernels; ln -sfn ../paper_figures toolkit/paper_figures
mkdir -p runs/eval
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > runs/eval/gpu.txt 2>&1
score() {  # name, then bundled_failures.py options
  name=$1; shift
  timeout 560 python3 benchmarks/bundled_failures.py --prompts "${PROMPTS:-64}" --seeds "${SEEDS:-2}" --batch 32 \
    --device "${DEVICE:-cuda}" --strip 4 --weights "$weights" --name "$name" --out runs/eval "$@" \
    > "runs/eval/$name.log" 2>&1
}
score teacher_cfg2_loo --teacher-cfg 2 --leave-one-out &
score teacher_cfg2_loo_eta1 --teacher-cfg 2 --leave-one-out --teacher-eta 1 &
score teacher_cfg3_loo_eta1 --teacher-cfg 3 --leave-one-out --teacher-eta 1 &
score teacher_cfg2_eta1 --teacher-cfg 2 --teacher-eta 1 &
wait
python3 - <<'PY'
import glob, os
from PIL import Image
for f in glob.glob("runs/eval/*.png"):  # strips at half size, as jpg
    im = Image.open(f).convert("RGB")
    im.resize((im.width // 2, im.height // 2), Image.LANCZOS).save(f[:-4] + ".jpg", quality=85)
    os.remove(f)
PY
tar czf "$OUT/run22.tgz" runs/eval
tail -n 6 runs/eval/*.log | cut -c1-200
