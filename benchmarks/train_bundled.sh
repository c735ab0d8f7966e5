#!/usr/bin/env bash
# The shipped bundled model (run 6 of docs/bundled-model.md) on one GPU, as separate processes (a command on the lent
# GPU machine may run 10 minutes), each stage continuing from the earlier ones' weights in DEST/stages/:
#     PART=base bash benchmarks/train_bundled.sh          # the student's architecture, flow matching, in a time budget
#     PART=teacher bash benchmarks/train_bundled.sh       # stage (a): the larger teacher, then its CFG scale
#     PART=base_more bash benchmarks/train_bundled.sh     # the base in DEST trained further (continue_teacher.py):
#                                                         # a base split over calls shorter than one device call
#     PART=teacher_more bash benchmarks/train_bundled.sh  # the same teacher trained further (continue_teacher.py)
#     PART=kept_teacher bash benchmarks/train_bundled.sh  # instead of the three above: base from data/bundled/stages
#                                                         # (or the one PART=base left in DEST, e.g. of another
#                                                         # STUDENT size), the teacher kept in data/teacher (int8),
#                                                         # their records
#     PART=kept_student bash benchmarks/train_bundled.sh  # as kept_teacher, plus the shipped student (as the stage
#                                                         # file it is) and its record, e.g. for SF_START=self_forcing
#                                                         # PART=self_forcing or ODE_START=ode_init PART=ode_init
#     PART=widen bash benchmarks/train_bundled.sh         # the student stages in DEST, WIDEN (default 2) x as wide,
#                                                         # the same function (toolkit train --widen), for a continued
#                                                         # (b) or (c) with more capacity
#     PART=ode_init bash benchmarks/train_bundled.sh      # stage (b): ODE pool + regression, evaluation, artifacts
#     PART=self_forcing bash benchmarks/train_bundled.sh  # stage (c), evaluation of (b) and (b)+(c), artifacts
# with DEST (default ${OUT:-data}/bundled) kept from one call to the next. On one machine without that limit,
# `toolkit train --out DIR` runs the four stages in one go (one teacher run instead of two).
# Knobs: TEACHER_MIN_SPRITES (teacher_more: clips of at least that many sprites only), TEACHER_WIDEN and
# TEACHER_DEEPEN (teacher_more: first grow the teacher K x as wide / deep, the same function), TEACHER_MORE_BATCH,
# WIDEN, BASE_SECONDS, BASE_MORE_SECONDS, BASE_MORE_SEED, TEACHER_SECONDS, TEACHER_MORE_SECONDS, ODE_SECONDS,
# SF_SECONDS (time budgets), ODE_PAIRS, GUIDANCE, GUIDANCE_INTERVAL ("LO HI": guide only there), SEED,
# TEACHER_PREDICTION (flow or x0), TEACHER_MORE_SEED, STUDENT
# (PART=base: the student's size, LAYERSxWIDTH[/HEADS], e.g. 6x256), EVAL_SEEDS (noise seeds per held-out prompt),
# ODE_START (ode_init: stage (b) trains its own earlier student further, on new pairs when SEED differs;
# self_forcing: a second round of (b) from the stage-(c) student), SF_START (self_forcing: stage (c) trains its own
# earlier student further, against the teacher now in DEST/stages, with a fresh critic), SF_RESUME (set, with
# SF_START=self_forcing: continue the last stage-(c) run exactly, from DEST/stages/self_forcing_state.pt, which stays
# on the machine only while it is warm: about 215 MB at the shipped size, over the limit of a returned file),
# SF_LR, SF_CRITIC_LR, SF_CRITIC_RATIO, SF_BATCH (stage (c)'s learning rates, critic updates per generator update,
# clips per update), SF_MIN_SPRITES (stage (c)'s rollouts from prompts of at least that many sprites), EVAL_PROMPTS (held-out prompts of the evaluation; fewer for a dry run on the CPU), PLACED (the
# fraction of training prompts that name each sprite's start place, in every part that trains; the teacher's guidance
# choice and the student stages' evaluation then use held-out prompts that name places).
set -euo pipefail
DEST="${DEST:-${OUT:-data}/bundled}"
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
cli=(python3 -m toolkit.commands.train --out "$DEST" --seed "${SEED:-0}")
# --force: stage (b) wrote a model that stage (c) replaces
student=(--guidance "${GUIDANCE:-3}" ${GUIDANCE_INTERVAL:+--guidance-interval $GUIDANCE_INTERVAL}
         --eval-seeds "${EVAL_SEEDS:-1}" ${EVAL_PROMPTS:+--eval-prompts "$EVAL_PROMPTS"} ${PLACED:+--placed "$PLACED"}
         --force)
case "${PART:-base}" in
  base) "${cli[@]}" --stages base --base-seconds "${BASE_SECONDS:-500}" --base-steps 20000 \
          ${STUDENT:+--student-size "$STUDENT"} ${PLACED:+--placed "$PLACED"} \
          2>&1 | tee "$DEST/train_base.log" ;;
  base_more) python3 benchmarks/continue_teacher.py --out "$DEST" --stage base --seconds "${BASE_MORE_SECONDS:-300}" \
          --batch 16 --lr 6e-4 --warmup 50 --seed "${BASE_MORE_SEED:-1}" ${PLACED:+--placed "$PLACED"} \
          2>&1 | tee -a "$DEST/train_base_more.log" ;;
  teacher) "${cli[@]}" --stages teacher --teacher-seconds "${TEACHER_SECONDS:-385}" --teacher-steps 20000 \
          --teacher-prediction "${TEACHER_PREDICTION:-flow}" ${PLACED:+--placed "$PLACED"} \
          2>&1 | tee "$DEST/train_teacher.log" ;;
  teacher_more) python3 benchmarks/continue_teacher.py --out "$DEST" --seconds "${TEACHER_MORE_SECONDS:-420}" \
          --batch "${TEACHER_MORE_BATCH:-32}" --lr 6e-4 --warmup 50 --seed "${TEACHER_MORE_SEED:-7}" \
          ${TEACHER_MIN_SPRITES:+--min-sprites "$TEACHER_MIN_SPRITES"} ${TEACHER_WIDEN:+--widen "$TEACHER_WIDEN"} \
          ${TEACHER_DEEPEN:+--deepen "$TEACHER_DEEPEN"} ${PLACED:+--placed "$PLACED"} 2>&1 | tee -a "$DEST/train_teacher_more.log" ;;
  kept_teacher) mkdir -p "$DEST/stages"
          from=data/bundled/stages
          if [ -f "$DEST/stages/base.safetensors" ]; then from="$DEST/stages"  # a base trained here: kept
          else cp "$from/base.safetensors" "$DEST/stages/"; fi
          cp data/teacher/teacher.safetensors "$DEST/stages/"
          python3 - "$DEST/stages/log.json" "$from/log.json" <<'PY'
import json, sys
base, teacher = (json.load(open(f)) for f in (sys.argv[2], "data/teacher/train_log.json"))
record = {**base, **{k: v for k, v in teacher.items() if k != "stages"}}
record["stages"] = {"base": base["stages"]["base"], "teacher": teacher["stages"]["teacher"]}
json.dump(record, open(sys.argv[1], "w"), indent=1)
PY
          ;;
  kept_student) mkdir -p "$DEST/stages"
          cp data/bundled/stages/base.safetensors data/teacher/teacher.safetensors "$DEST/stages/"
          stage=$(python3 -c 'from safetensors import safe_open
with safe_open("data/bundled/model.safetensors", "pt") as f: print(f.metadata()["stage"])')
          cp data/bundled/model.safetensors "$DEST/stages/$stage.safetensors"  # self_forcing or ode_init
          # and as the folder's model: after a stage-(c) run the evaluation dropped, a fresh one starts from it
          cp data/bundled/model.safetensors "$DEST/"
          python3 - "$DEST/stages/log.json" <<'PY'
import json, sys
shipped, teacher = (json.load(open(f)) for f in ("data/bundled/train_log.json", "data/teacher/train_log.json"))
record = {k: v for k, v in shipped.items() if k not in ("stages_note", "reproduce", "shipped")}
record["stages"] = {**shipped["stages"], "teacher": teacher["stages"]["teacher"]}
record["teacher_config"] = teacher["teacher_config"]
json.dump(record, open(sys.argv[1], "w"), indent=1)
PY
          ;;
  widen) "${cli[@]}" --widen "${WIDEN:-2}" --force 2>&1 | tee -a "$DEST/train_widen.log" ;;
  ode_init) "${cli[@]}" --stages ode_init "${student[@]}" --ode-pairs "${ODE_PAIRS:-3072}" --ode-pair-batch 256 \
          --ode-grid 20 --ode-steps 100000 --ode-lr 3e-4 --ode-seconds "${ODE_SECONDS:-300}" \
          --ode-start "${ODE_START:-base}" \
          2>&1 | tee "$DEST/train_ode_init.log" ;;
  self_forcing) "${cli[@]}" --stages self_forcing "${student[@]}" --sf-steps 100000 --sf-seconds "${SF_SECONDS:-440}" \
          ${SF_BATCH:+--sf-batch "$SF_BATCH"} ${SF_MIN_SPRITES:+--sf-min-sprites "$SF_MIN_SPRITES"} \
          --sf-start "${SF_START:-ode_init}" ${SF_RESUME:+--sf-resume} ${SF_LR:+--sf-lr "$SF_LR"} \
          ${SF_CRITIC_LR:+--sf-critic-lr "$SF_CRITIC_LR"} ${SF_CRITIC_RATIO:+--sf-critic-ratio "$SF_CRITIC_RATIO"} \
          2>&1 | tee "$DEST/train_self_forcing.log" ;;
  *) echo "PART must be base, base_more, teacher, teacher_more, kept_teacher, kept_student, widen, ode_init or" \
       "self_forcing" >&2
     exit 2 ;;
esac
