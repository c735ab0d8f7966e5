#!/usr/bin/env bash
# Train the shipped bundled model on one GPU (about 6 minutes on an H100) and leave its 8 artifacts in
# ${OUT:-data}/bundled: model.safetensors (< 16 MiB), config.json, train_log.json, loss.png, rollout.png,
# rollout.gif, MODEL_CARD.md, train_stdout.log. On the device machine:
#     bash benchmarks/train_bundled.sh            # then copy $OUT/bundled/* into data/bundled/ and commit
# Reproduce a finished run exactly: STEPS=<steps from its MODEL_CARD.md> bash benchmarks/train_bundled.sh
set -euo pipefail
DEST="${OUT:-data}/bundled"
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1
if [[ -n "${STEPS:-}" ]]; then budget=(--steps "$STEPS"); else budget=(--minutes "${MINUTES:-6}"); fi
python3 -m toolkit.train --out "$DEST" "${budget[@]}" --seed "${SEED:-0}" 2>&1 | tee "$DEST/train_stdout.log"
