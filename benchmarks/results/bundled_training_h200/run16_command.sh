#!/usr/bin/env bash
# Run 16 (docs/bundled-model.md), one device call: the kept teacher trained further for S seconds on crowded scenes
# only (3+ sprites, runs/t3) and, at the same time on the same GPU, on every sprite count (runs/t1, the control);
# the kept teacher scored meanwhile, both new teachers after; everything returned under $OUT.
set -u
S=${S:-270}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_INTERPRET=0
ln -sfn ../kernels toolkit/kernels; ln -sfn ../paper_figures toolkit/paper_figures
nvidia-smi --query-gpu=name,driver_version --format=csv > runs_gpu.txt 2>&1
mkdir -p runs/eval
for t in t1 t3; do PART=kept_teacher DEST=runs/$t bash benchmarks/train_bundled.sh; done
score() {  # weights name seconds
  timeout "$3" python3 benchmarks/bundled_failures.py --prompts 64 --batch 16 --weights "$1" --teacher-cfg 2 \
    --device cuda --name "$2" --out runs/eval --strip 4 > "runs/eval/$2.log" 2>&1
}
TEACHER_MIN_SPRITES=3 TEACHER_MORE_SECONDS=$S PART=teacher_more DEST=runs/t3 bash benchmarks/train_bundled.sh \
  > runs/t3.out 2>&1 &
TEACHER_MORE_SECONDS=$S PART=teacher_more DEST=runs/t1 bash benchmarks/train_bundled.sh > runs/t1.out 2>&1 &
score data/teacher/teacher.safetensors h200_teacher_kept 240 &
wait
score runs/t1/stages/teacher.safetensors h200_teacher_t1 150 &
score runs/t3/stages/teacher.safetensors h200_teacher_t3 150 &
wait
python3 - <<'PY'
import glob, os
from PIL import Image
for f in glob.glob("runs/eval/*.png"):
    Image.open(f).convert("RGB").save(f[:-4] + ".jpg", quality=85)
    os.remove(f)
PY
tar czf "$OUT/meta.tgz" runs_gpu.txt runs/t1.out runs/t3.out runs/eval runs/t1/stages/log.json runs/t3/stages/log.json
for t in t1 t3; do split -b 15m runs/$t/stages/teacher.safetensors "$OUT/teacher_$t.part_"; done
ls -la "$OUT"
