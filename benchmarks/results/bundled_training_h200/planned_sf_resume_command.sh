#!/usr/bin/env bash
# Ran as run 19 (docs/bundled-model.md; run19_command.sh calls it with SF_SECONDS=380): one stage (c) of about 400
# updates with one critic, over two device calls back to back on one warm machine: CALL=1 starts from the shipped student (PART=kept_student), CALL=2 resumes
# it exactly (RESUME=1, from runs/x/stages/self_forcing_state.pt, which stays on the machine). Each call is evaluated
# against its start on the same 128 clips (2 noise seeds per held-out prompt); its files are returned under $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_INTERPRET=0
ln -sfn ../kernels toolkit/kernels; ln -sfn ../paper_figures toolkit/paper_figures
[ "$CALL" = 1 ] && PART=kept_student DEST=runs/x bash benchmarks/train_bundled.sh
SEED=30 GUIDANCE=2 EVAL_SEEDS=2 SF_SECONDS=${SF_SECONDS:-470} SF_START=self_forcing SF_RESUME=${RESUME:-} \
  PART=self_forcing DEST=runs/x bash benchmarks/train_bundled.sh > /dev/null 2>&1
python3 -c "from PIL import Image; Image.open('runs/x/rollout.png').convert('RGB').save('runs/x/rollout.jpg', quality=85)"
tar czf "$OUT/call$CALL.tgz" runs/x/MODEL_CARD.md runs/x/train_log.json runs/x/rollout.jpg runs/x/curves.png \
  runs/x/train_self_forcing.log runs/x/stages/log.json
cp runs/x/model.safetensors "$OUT/model_call$CALL.safetensors"
tail -12 runs/x/train_self_forcing.log | cut -c1-400
