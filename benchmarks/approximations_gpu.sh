#!/usr/bin/env bash
# The approximation question on Self-Forcing at full scale (21 x 30 x 52 latent tokens, 1.3B), on one GPU:
#   1. toolkit capture            q, k, v, lse of layers 0 and 8, all heads, last denoising step of the last chunk
#   2. toolkit analyze approximations  on that capture: every family at 95 / 90 / 85 % sparsity
#   3. toolkit compare            dense vs a few specs from the same noise (latent metrics: no VAE here)
# with random weights in the official Self-Forcing .pt layout and random prompt embeddings (no text encoder), so
# the costs are real and the errors are those of random weights. Prints each command's wall time; writes logs,
# approx.nc and compare/ into $OUT (default out/approximations_gpu). One H200 call: stays under 9 minutes.
#
#   bash benchmarks/approximations_gpu.sh            # on the GPU machine
#   TINY=1 bash benchmarks/approximations_gpu.sh     # the same commands on a CPU: a 2-layer toy-width model
#   CAPTURE_S / ANALYSE_S / COMPARE_S: each command's time limit in seconds (120 / 300 / 240)
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/approximations_gpu}
WORK=${WORK:-/tmp/approximations_gpu}
mkdir -p "$OUT" "$WORK"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$WORK/pip.log" 2>&1 || tail -3 "$WORK/pip.log"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name --format=csv,noheader || true

# random official-format weights (as benchmarks/bench_generate.py) and one prompt's random umT5 embeddings
t0=$SECONDS
python3 - "$WORK" "${TINY:-0}" <<'EOF'
import sys
from pathlib import Path

import torch

from toolkit.models.checkpoints import random_state_dict, save_self_forcing, save_wan_native
from toolkit.models.wan import WanConfig

work, tiny = Path(sys.argv[1]), sys.argv[2] == "1"
dev = "cuda" if torch.cuda.is_available() else "cpu"
if tiny:  # the Wan layout at toy width: the commands and files are the same, the cost is not
    cfg = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, freq_dim=32)
    save_wan_native(random_state_dict(cfg, seed=0), work / "sf_tiny", cfg)
elif not (work / "self_forcing_dmd.pt").is_file():
    save_self_forcing(random_state_dict(WanConfig(), seed=0, device=dev), work / "self_forcing_dmd.pt")
torch.save(torch.randn(24, 4096, generator=torch.Generator().manual_seed(0)), work / "prompt.pt")
EOF
echo "random checkpoint + embeddings: $((SECONDS - t0)) s"

if [ "${TINY:-0}" = 1 ]; then
  MODEL=(--model self-forcing --checkpoint "$WORK/sf_tiny")
  SEL=(--frames 6 --layers 0,1 --steps 3 --chunks 1)
  SLOW=10  # time limits x10: a 2-core CPU
  SPECS=(monarch:3,1,1 sta:4,2,4:1,4,4)  # the full clip at toy width: two specs keep the CPU check short
else
  MODEL=(--model self-forcing --checkpoint "$WORK/self_forcing_dmd.pt")
  SEL=(--layers 0,8 --steps 3 --chunks 6)
  SLOW=1
  read -r -a SPECS <<< "${SPECS:-monarch:1,1,1 monarch:3,1,1 blocktopk-pred:0.1:1,4,4 sta:4,2,4:1,4,4 radial:0,2 svg:16:0,2}"
fi
EMB=(--prompt-embeds "$WORK/prompt.pt")

step() {  # step NAME SECONDS CMD...: run with a time limit, print rc and wall time, keep the log
  local name=$1 secs=$2; shift 2
  echo "=== $name: $*"
  local t=$SECONDS rc=0
  timeout $((secs * SLOW)) "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  echo "rc=$rc, $name: $((SECONDS - t)) s wall"
  tail -n 25 "$OUT/$name.log"
}

step capture "${CAPTURE_S:-120}" python3 -m toolkit.cli capture "${MODEL[@]}" "${EMB[@]}" "${SEL[@]}" --out "$WORK/sf.h5" --force --quiet
step approximations "${ANALYSE_S:-300}" python3 -m toolkit.cli analyze approximations "$WORK/sf.h5" --out "$OUT/approx.nc" --force --quiet
step compare "${COMPARE_S:-240}" python3 -m toolkit.cli compare "${MODEL[@]}" --prompts "self-forcing, random embeddings" \
  --prompt-embeds "$WORK/prompt.pt" --seeds 0 --no-decode --out "$OUT/compare" --force \
  --attention "${SPECS[@]}"
