#!/usr/bin/env bash
# Run 25 (docs/bundled-model.md): the shipped student (run 24's call 3, stage (c) after stage (b)) trained further in
# stage (c) on crowded prompts only, where it trails the teacher (four sprites: 31 / 44 against 40 / 44), and every
# model scored on 512 placed held-out clips (64 prompts x 8 noise seeds, float32) instead of 128; calls back to back
# on one warm machine (DEST stays on it between calls):
#   CALL=1  PART=kept_student (base, the teacher, the shipped student and its record), the shipped student scored on
#           the 512 clips, then stage (c) from it (SF_START=self_forcing: a fresh critic from the teacher) on prompts
#           of MIN (default 3) or more sprites for S seconds (default 400), the recipe's bf16 evaluation (128 clips,
#           paired with the shipped student), and the new student scored on the 512 clips
#   CALL=2  stage (c) resumed exactly (SF_RESUME), S seconds more, scored the same way
#   CALL=3  as call 1 from the shipped student again (the folder rebuilt), but DMD's real score at CFG G (default 3)
#           and prompts of MIN (default 1) or more sprites: more guidance traded count for colour in run 12
#   CALL=4  call 3's run resumed exactly (SF_RESUME), S seconds more
#   CALL=t  the teacher (40 Euler steps, CFG 2) scored on the same 512 clips: the ceiling the students are measured
#           against
# TOOLKIT_COMMIT must name the commit of the tree sent (the machine's copy of .git can be older than the tree).
# Each training call returns the card, record, strip, logs and scores (one tar) and the student's weights (float16).
set -u
CALL=${CALL:?CALL=1, 2, 3, 4 or t}
export TOOLKIT_COMMIT=${TOOLKIT_COMMIT:?the commit of the tree sent, e.g. TOOLKIT_COMMIT=abc1234 CALL=1 bash ...}
dest=runs/s25
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_INTERPRET=0
ln -sfn ../kernels toolkit/kernels; ln -sfn ../paper_figures toolkit/paper_figures
mkdir -p runs/eval25
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "runs/gpu25_call$CALL.txt" 2>&1
common=(GUIDANCE=2 PLACED=0.75 EVAL_SEEDS=2 DEST=$dest SF_MIN_SPRITES="${MIN:-3}")
score() {  # name, then bundled_failures.py options: the 512 placed clips (the first 128 are the recipe's)
  timeout 240 python3 benchmarks/bundled_failures.py --prompts 64 --seeds 8 --batch 32 --device cuda --placed \
    --strip 4 --name "$1" --out runs/eval25 "${@:2}" > "runs/eval25/$1.log" 2>&1
}
case "$CALL" in
  1) env PART=kept_student DEST=$dest bash benchmarks/train_bundled.sh
     score shipped_placed512
     env "${common[@]}" SEED=25 SF_START=self_forcing SF_SECONDS="${S:-400}" PART=self_forcing \
       bash benchmarks/train_bundled.sh > "runs/call25_$CALL.log" 2>&1 ;;
  2) env "${common[@]}" SEED=25 SF_START=self_forcing SF_RESUME=1 SF_SECONDS="${S:-400}" PART=self_forcing \
       bash benchmarks/train_bundled.sh > "runs/call25_$CALL.log" 2>&1 ;;
  3) env PART=kept_student DEST=$dest bash benchmarks/train_bundled.sh
     env "${common[@]}" GUIDANCE="${G:-3}" SF_MIN_SPRITES="${MIN:-1}" SEED=26 SF_START=self_forcing \
       SF_SECONDS="${S:-400}" PART=self_forcing bash benchmarks/train_bundled.sh > "runs/call25_$CALL.log" 2>&1 ;;
  4) env "${common[@]}" GUIDANCE="${G:-3}" SF_MIN_SPRITES="${MIN:-1}" SEED=26 SF_START=self_forcing SF_RESUME=1 \
       SF_SECONDS="${S:-400}" PART=self_forcing bash benchmarks/train_bundled.sh > "runs/call25_$CALL.log" 2>&1 ;;
  t) score teacher_placed512 --weights data/teacher/teacher.safetensors --teacher-cfg 2
     tar czf "$OUT/run25_call$CALL.tgz" runs/gpu25_call*.txt runs/eval25
     tail -n 2 runs/eval25/*.log | cut -c1-200
     exit 0 ;;
esac
score "student_call$CALL" --weights "$dest/model.safetensors"
python3 -c "from PIL import Image; Image.open('$dest/rollout.png').convert('RGB').save('$dest/rollout.jpg', quality=85)" \
  2>/dev/null
cp "$dest/model.safetensors" "$OUT/model_call$CALL.safetensors" 2>/dev/null
tar czf "$OUT/run25_call$CALL.tgz" runs/gpu25_call*.txt runs/call25_*.log runs/eval25 "$dest/MODEL_CARD.md" \
  "$dest/train_log.json" "$dest/config.json" "$dest/rollout.png" "$dest/rollout.gif" "$dest/rollout.jpg" \
  "$dest/curves.png" "$dest/stages/log.json" 2>/dev/null
tail -n 12 "runs/call25_$CALL.log" | cut -c1-300
tail -n 2 runs/eval25/*.log | cut -c1-200
ls -la "$OUT"
