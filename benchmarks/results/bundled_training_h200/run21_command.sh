#!/usr/bin/env bash
# Run 21 (docs/bundled-model.md): does stronger guidance in DMD's real score move the student's colour match? Two
# stage (c)s side by side from the shipped student (PART=kept_student, SEED=30, as run 20) at lr 6e-5 (student and
# critic), real score at CFG 4 and CFG 8, S seconds each (default 280), each evaluated against its start on 128 clips
# (the teacher's row in each card is then sampled at that CFG). Returns one tar and the two students' weights.
# Ran on 2026-12-05 (379 s on an H100), then the CFG 4 arm resumed exactly for 110 s more on the same warm machine:
#   SEED=30 GUIDANCE=4 EVAL_SEEDS=2 SF_SECONDS=110 SF_START=self_forcing SF_RESUME=1 SF_LR=6e-5 SF_CRITIC_LR=6e-5 \
#     PART=self_forcing DEST=runs/cfg4 bash benchmarks/train_bundled.sh
set -u
S=${S:-280}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_INTERPRET=0
ln -sfn ../kernels toolkit/kernels; ln -sfn ../paper_figures toolkit/paper_figures
mkdir -p runs
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > runs/gpu_run21.txt 2>&1
stage_c() {  # name, guidance
  dest=runs/$1
  PART=kept_student DEST=$dest bash benchmarks/train_bundled.sh
  SEED=30 GUIDANCE=$2 EVAL_SEEDS=2 SF_SECONDS=$S SF_START=self_forcing SF_LR=6e-5 SF_CRITIC_LR=6e-5 \
    PART=self_forcing DEST=$dest bash benchmarks/train_bundled.sh > /dev/null 2>&1
  cp "$dest/train_self_forcing.log" "runs/$1_run21.log"
  python3 -c "from PIL import Image; Image.open('$dest/rollout.png').convert('RGB').save('$dest/rollout.jpg', quality=85)"
}
variants=(cfg4:4 cfg8:8)
for v in "${variants[@]}"; do stage_c "${v%%:*}" "${v#*:}" & done
wait
files=(runs/gpu_run21.txt runs/*_run21.log)
for v in "${variants[@]}"; do
  d=runs/${v%%:*}
  files+=("$d/MODEL_CARD.md" "$d/train_log.json" "$d/rollout.jpg" "$d/curves.png" "$d/stages/log.json")
  cp "$d/model.safetensors" "$OUT/model_${v%%:*}_run21.safetensors"
done
tar czf "$OUT/run21.tgz" "${files[@]}" 2>/dev/null
for v in "${variants[@]}"; do echo "== ${v%%:*}"; grep -h "updates in\|evaluation, \|paired" "runs/${v%%:*}_run21.log" | cut -c1-200; done
