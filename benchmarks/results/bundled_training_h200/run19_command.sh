#!/usr/bin/env bash
# Run 19 (docs/bundled-model.md): two calls back to back on one warm machine.
#   CALL=1  the resumable stage (c) from the shipped student (planned_sf_resume_command.sh CALL=1) and, beside it on
#           the same GPU, the kept teacher on 128 clips (2 noise seeds x 64 held-out prompts, float32, batches of 32)
#           at CFG 2 sampled three ways: the Euler ODE (the recipe's), and stochastically with DDIM's eta = 1 (the
#           DDPM posterior step) and eta = 0.5 (solver "ancestral"); the same initial noise for all three
#   CALL=2  stage (c) resumed exactly (planned_sf_resume_command.sh CALL=2 RESUME=1)
set -u
CALL=${CALL:?CALL=1 or 2}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_INTERPRET=0
ln -sfn ../kernels toolkit/kernels; ln -sfn ../paper_figures toolkit/paper_figures
here=benchmarks/results/bundled_training_h200
if [ "$CALL" = 2 ]; then
  CALL=2 RESUME=1 bash $here/planned_sf_resume_command.sh
  exit
fi
mkdir -p runs/eval
nvidia-smi --query-gpu=name,driver_version --format=csv > runs/eval/gpu.txt 2>&1
score() {  # name, then bundled_failures.py options
  name=$1; shift
  timeout 480 python3 benchmarks/bundled_failures.py --prompts 64 --batch 32 --device cuda --name "$name" \
    --out runs/eval --weights data/teacher/teacher.safetensors --seeds 2 --strip 4 --teacher-cfg 2 "$@" \
    > "runs/eval/$name.log" 2>&1
}
CALL=1 bash $here/planned_sf_resume_command.sh > runs/eval/sf_call1.out 2>&1 &
score teacher_cfg2 &
score teacher_cfg2_eta1 --teacher-eta 1 &
score teacher_cfg2_eta0.5 --teacher-eta 0.5 &
wait
python3 - <<'PY'
import glob, os
from PIL import Image
for f in glob.glob("runs/eval/*.png"):  # strips at half size, as jpg
    im = Image.open(f).convert("RGB")
    im.resize((im.width // 2, im.height // 2), Image.LANCZOS).save(f[:-4] + ".jpg", quality=85)
    os.remove(f)
PY
tar czf "$OUT/run19_eval.tgz" runs/eval
tail -n 7 runs/eval/*.log runs/eval/sf_call1.out | cut -c1-300
