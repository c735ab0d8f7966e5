#!/usr/bin/env bash
# Run 20 (docs/bundled-model.md; ran 2026-12-05 on one warm H100, 525 s and 511 s): is stage (c)'s learning rate what holds the student at 55 %? Stage (c) has
# run at lr 2e-5 (student and critic, AdamW with β1 = 0, constant) in every run so far, and more updates at that rate
# did not move the student (run 19: 55 -> 55 -> 52 % over 172 updates). Three runs of stage (c) side by side on one
# GPU, each from the shipped student with a fresh critic from the kept teacher (PART=kept_student, SEED=30, CFG 2, as
# run 19), at lr 2e-5 (the control), 6e-5 and 2e-4 for both the student and the critic (the critic keeps its pace
# relative to the student), over two calls back to back on one warm machine:
#   CALL=1  the three runs, S seconds each (default 400), then each evaluated against its start on 128 clips
#   CALL=2  each resumed exactly (SF_RESUME=1: critic, optimisers, EMA, random streams) for S seconds more
# Each call returns the three cards, records, rollout strips and curves (one tar) and the three students' weights.
# Checked on the CPU with train_bundled.sh replaced by a stub that records its environment: both calls pass each run
# its rate, SEED=30, EVAL_SEEDS=2 and (call 2 only) SF_RESUME=1, and return the files above. A real stage (c) on the
# CPU does at least 20 timed updates before its budget applies, too slow for a dry run of the training itself.
set -u
CALL=${CALL:?CALL=1 or 2}
S=${S:-400}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_INTERPRET=0
ln -sfn ../kernels toolkit/kernels; ln -sfn ../paper_figures toolkit/paper_figures
mkdir -p runs
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "runs/gpu_call$CALL.txt" 2>&1
variants=(lr2e-5:2e-5 lr6e-5:6e-5 lr2e-4:2e-4)
stage_c() {  # name, learning rate
  dest=runs/$1
  [ "$CALL" = 1 ] && PART=kept_student DEST=$dest bash benchmarks/train_bundled.sh
  SEED=30 GUIDANCE=2 EVAL_SEEDS=2 SF_SECONDS=$S SF_START=self_forcing SF_RESUME=$([ "$CALL" = 2 ] && echo 1) \
    SF_LR=$2 SF_CRITIC_LR=$2 PART=self_forcing DEST=$dest bash benchmarks/train_bundled.sh > /dev/null 2>&1
  cp "$dest/train_self_forcing.log" "runs/$1_call$CALL.log"
  python3 -c "from PIL import Image; Image.open('$dest/rollout.png').convert('RGB').save('$dest/rollout.jpg', quality=85)"
}
for v in "${variants[@]}"; do stage_c "${v%%:*}" "${v#*:}" & done
wait
files=(runs/gpu_call*.txt runs/*_call*.log)
for v in "${variants[@]}"; do
  d=runs/${v%%:*}
  files+=("$d/MODEL_CARD.md" "$d/train_log.json" "$d/rollout.jpg" "$d/curves.png" "$d/stages/log.json")
  cp "$d/model.safetensors" "$OUT/model_${v%%:*}_call$CALL.safetensors"
done
tar czf "$OUT/run20_call$CALL.tgz" "${files[@]}" 2>/dev/null
for v in "${variants[@]}"; do echo "== ${v%%:*}"; tail -n 6 "runs/${v%%:*}_call$CALL.log" | cut -c1-300; done
ls -la "$OUT"
