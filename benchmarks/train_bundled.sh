#!/usr/bin/env bash
# The shipped bundled model on one GPU, as three processes (a command on the lent GPU machine may run 10 minutes):
#     PART=base bash benchmarks/train_bundled.sh       # the student's architecture, flow matching, in a time budget
#     PART=teacher bash benchmarks/train_bundled.sh    # stage (a): the larger teacher, then its CFG scale
#     PART=student bash benchmarks/train_bundled.sh    # stages (b) and (c), evaluation, artifacts
# with DEST (default ${OUT:-data}/bundled) kept from one call to the next. On one machine without that limit,
# `toolkit train --out DIR` runs everything in one go.
# Knobs: BASE_SECONDS, TEACHER_SECONDS (time budgets), ODE_PAIRS, ODE_STEPS, SF_STEPS, SEED.
set -euo pipefail
DEST="${DEST:-${OUT:-data}/bundled}"
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
cli=(python3 -m toolkit.commands.train --out "$DEST" --seed "${SEED:-0}")
case "${PART:-base}" in
  base) "${cli[@]}" --stages base --base-seconds "${BASE_SECONDS:-500}" --base-steps 20000 \
          2>&1 | tee "$DEST/train_base.log" ;;
  teacher) "${cli[@]}" --stages teacher --teacher-seconds "${TEACHER_SECONDS:-385}" --teacher-steps 20000 \
          2>&1 | tee "$DEST/train_teacher.log" ;;
  student) "${cli[@]}" --stages ode_init,self_forcing --ode-pairs "${ODE_PAIRS:-768}" --ode-steps "${ODE_STEPS:-350}" \
          --sf-steps "${SF_STEPS:-20}" 2>&1 | tee "$DEST/train_student.log" ;;
  *) echo "PART must be base, teacher or student" >&2; exit 2 ;;
esac
