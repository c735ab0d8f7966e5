#!/usr/bin/env bash
# The shipped bundled model on one GPU, as two processes (a command on the lent GPU machine may run 10 minutes):
#     PART=teacher bash benchmarks/train_bundled.sh      # stage (a) in a time budget, then the CFG scale
#     PART=student bash benchmarks/train_bundled.sh      # stages (b) and (c), evaluation, artifacts
# with DEST (default ${OUT:-data}/bundled) kept from the first call to the second. On one machine without that
# limit, `toolkit train --out DIR` runs everything in one go.
# Knobs: TEACHER_SECONDS (budget of stage (a)), TEACHER_STEPS (its cap), ODE_PAIRS, ODE_STEPS, SF_STEPS, SEED.
set -euo pipefail
DEST="${DEST:-${OUT:-data}/bundled}"
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
cli=(python3 -m toolkit.commands.train --out "$DEST" --seed "${SEED:-0}")
if [[ "${PART:-teacher}" == teacher ]]; then
  "${cli[@]}" --stages teacher --teacher-seconds "${TEACHER_SECONDS:-460}" --teacher-steps "${TEACHER_STEPS:-6000}" \
    2>&1 | tee "$DEST/train_teacher.log"
else
  "${cli[@]}" --stages ode_init,self_forcing --ode-pairs "${ODE_PAIRS:-768}" --ode-steps "${ODE_STEPS:-400}" \
    --sf-steps "${SF_STEPS:-40}" 2>&1 | tee "$DEST/train_student.log"
fi
