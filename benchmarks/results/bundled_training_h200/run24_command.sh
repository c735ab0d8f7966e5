#!/usr/bin/env bash
# Run 24 (docs/bundled-model.md, prepared in the seventeenth session): the student distilled from the teacher that
# reads start places (run 23, now data/teacher), with three in four prompts naming places in every stage, over calls
# back to back on one warm machine (DEST stays on it between calls):
#   CALL=1  PART=kept_student (base, the teacher, the shipped student), then stage (b) from the shipped student on
#           1024 new ODE pairs of the teacher (CFG 2; about 0.1 s each on an H200), S seconds of regression (default
#           280: the call must also evaluate the teacher's 40-step samples), evaluated on 2 seeds x 64
#           held-out prompts with places (the recipe's bf16 evaluation), and the shipped student, which never saw
#           places, scored on the same clips in float32 as the baseline
#   CALL=1b (if call 1's student does not yet start its sprites in place) stage (b) continued on PAIRS (default
#           1024) new pairs (ODE_START=ode_init, SEED, default 25; a new SEED for each call), S seconds more;
#           the teacher took 3,000-6,000 steps to learn places (run 23)
#   CALL=1c call 1b on a fresh machine: the folder a call left is rebuilt from what it returned, committed in run24/
#           (FROM, default call1f: the stage-(b) student FROM_ode_init.safetensors and its record FROM_train_log.json;
#           only the latest student's weights stay in the tree), then stage (b) on PAIRS new pairs (SEED, default 25)
#   CALL=2  stage (c) from that stage-(b) student, S seconds (default 420), evaluated the same way
#   CALL=2c call 2 on a fresh machine, from the committed stage-(b) student FROM (default call1f), rebuilt as in 1c
#   CALL=3  stage (c) resumed exactly (SF_RESUME), S seconds more
# Calls after the first keep call 1's scores of the teacher (same weights, guidance, prompts and noise: recipe.py
# no longer samples them again; call 1's whole evaluation took 24 s on an H100).
# TOOLKIT_COMMIT must name the commit of the tree sent: the machine's copy of .git can be older than the tree (call 1
# recorded 196ff9b while the tree was f8d2720), and the record keeps what git_commit returns.
# After each call the new student is also scored in float32 (bundled_failures.py --placed, the same 128 clips),
# paired clip by clip with the shipped student's row. Each call returns the card, record, strip, curves and those
# scores (one tar) and the student's weights (float16, 5.5 MB).
# Checked on the CPU with train_bundled.sh replaced by a stub that records its environment (each call passes PART,
# PLACED=0.75, GUIDANCE=2, EVAL_SEEDS=2 and its starts).
set -u
CALL=${CALL:?CALL=1, 1b, 1c, 2, 2c or 3}
export TOOLKIT_COMMIT=${TOOLKIT_COMMIT:?the commit of the tree sent, e.g. TOOLKIT_COMMIT=abc1234 CALL=1 bash ...}
dest=runs/s24
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_INTERPRET=0
ln -sfn ../kernels toolkit/kernels; ln -sfn ../paper_figures toolkit/paper_figures
mkdir -p runs
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "runs/gpu24_call$CALL.txt" 2>&1
common=(GUIDANCE=2 PLACED=0.75 EVAL_SEEDS=2 DEST=$dest)
rebuild() {  # a fresh machine: base, the teacher and the stage-(b) student FROM, with its record, into $dest
  env PART=kept_student DEST=$dest bash benchmarks/train_bundled.sh
  local kept=benchmarks/results/bundled_training_h200/run24
  cp "$kept/${FROM:-call1f}_ode_init.safetensors" "$dest/stages/ode_init.safetensors"
  cp "$kept/${FROM:-call1f}_train_log.json" "$dest/stages/log.json"
}
case "$CALL" in
  1) env PART=kept_student DEST=$dest bash benchmarks/train_bundled.sh
     env "${common[@]}" SEED=24 ODE_START=self_forcing ODE_PAIRS=1024 ODE_SECONDS="${S:-280}" PART=ode_init \
       bash benchmarks/train_bundled.sh > "runs/call24_$CALL.log" 2>&1 ;;
  1c) rebuild
      env "${common[@]}" SEED="${SEED:-25}" ODE_START=ode_init ODE_PAIRS="${PAIRS:-1024}" ODE_SECONDS="${S:-280}" PART=ode_init \
       bash benchmarks/train_bundled.sh > "runs/call24_$CALL.log" 2>&1 ;;
  1b) env "${common[@]}" SEED="${SEED:-25}" ODE_START=ode_init ODE_PAIRS="${PAIRS:-1024}" ODE_SECONDS="${S:-280}" PART=ode_init \
       bash benchmarks/train_bundled.sh > "runs/call24_$CALL.log" 2>&1 ;;
  2) env "${common[@]}" SEED=24 SF_SECONDS="${S:-420}" PART=self_forcing \
       bash benchmarks/train_bundled.sh > "runs/call24_$CALL.log" 2>&1 ;;
  2c) rebuild
      env "${common[@]}" SEED=24 SF_SECONDS="${S:-420}" PART=self_forcing \
       bash benchmarks/train_bundled.sh > "runs/call24_$CALL.log" 2>&1 ;;
  3) env "${common[@]}" SEED=24 SF_START=self_forcing SF_RESUME=1 SF_SECONDS="${S:-420}" PART=self_forcing \
       bash benchmarks/train_bundled.sh > "runs/call24_$CALL.log" 2>&1 ;;
esac
score() {  # name, then bundled_failures.py options
  timeout 120 python3 benchmarks/bundled_failures.py --prompts 64 --seeds 2 --batch 32 --device cuda --placed \
    --strip 4 --name "$1" --out runs/eval24 "${@:2}" > "runs/eval24/$1.log" 2>&1
}
mkdir -p runs/eval24
[ "$CALL" = 1 ] && score shipped_placed
score "student_call$CALL" --weights "$dest/model.safetensors"
python3 -c "from PIL import Image; Image.open('$dest/rollout.png').convert('RGB').save('$dest/rollout.jpg', quality=85)" \
  2>/dev/null
cp "$dest/model.safetensors" "$OUT/model_call$CALL.safetensors" 2>/dev/null
# everything a shipped folder holds but its weights (those come as their own file): config.json, the card, the record,
# the strip as the recipe drew it (png + gif, about 4.5 MB) and a jpg of it to look at
tar czf "$OUT/run24_call$CALL.tgz" runs/gpu24_call*.txt runs/call24_*.log runs/eval24 "$dest/MODEL_CARD.md" "$dest/train_log.json" \
  "$dest/config.json" "$dest/rollout.png" "$dest/rollout.gif" "$dest/rollout.jpg" "$dest/curves.png" \
  "$dest/stages/log.json" 2>/dev/null
tail -n 12 "runs/call24_$CALL.log" | cut -c1-300
tail -n 2 runs/eval24/*.log | cut -c1-200
ls -la "$OUT"
