#!/usr/bin/env bash
# The shipped bundled model on one GPU, as two processes (a command on the lent GPU machine may run 10 minutes):
#     PART=teacher bash benchmarks/train_bundled.sh      # probe the stages, then stage (a)
#     PART=student bash benchmarks/train_bundled.sh      # stages (b) and (c), evaluation, artifacts
# with DEST (default ${OUT:-data}/bundled) carried from the first call to the second. On one machine without
# that limit, `toolkit train --out DIR` runs everything in one go. Step counts: TEACHER_STEPS, ODE_STEPS, SF_STEPS.
set -euo pipefail
DEST="${DEST:-${OUT:-data}/bundled}"
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
cli=(python3 -m toolkit.commands.train --out "$DEST" --seed "${SEED:-0}")
if [[ "${PART:-teacher}" == teacher ]]; then
  python3 benchmarks/bench_train_stages.py --out "$DEST/train_stages.json" --budget teacher=330,ode=150,sf=200
  steps="${TEACHER_STEPS:-$(python3 -c "import json;print(json.load(open('$DEST/train_stages.json'))['steps_in_budget']['teacher'])")}"
  "${cli[@]}" --stages teacher --teacher-steps "$steps" 2>&1 | tee "$DEST/train_teacher.log"
else
  "${cli[@]}" --stages ode_init,self_forcing --ode-pairs "${ODE_PAIRS:-1024}" --ode-steps "${ODE_STEPS:-600}" \
    --sf-steps "${SF_STEPS:-100}" \
    2>&1 | tee "$DEST/train_student.log"
fi
