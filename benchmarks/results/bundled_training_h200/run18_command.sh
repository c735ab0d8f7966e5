#!/usr/bin/env bash
# Run 18 (docs/bundled-model.md; results in run18/). Ran on one warm NVIDIA H100 as CALL=1 (S=380; 573 s) and then
# CALL=3 (521 s); CALL=2 was skipped: failed starts had left 641 s of the session's device time after call 1.
# The question: does more capacity let the teacher draw three and four sprites? The kept
# teacher (8 x 320) grown into two copies that compute its function, 2x as wide (8 x 640, runs/w) and 2x as deep
# (16 x 320, runs/d), both trained on side by side on the one GPU over two calls, then scored with the kept teacher
# and the shipped student. Three calls back to back on one warm machine (runs/ stays there between them):
#   CALL=1  grow both, train S seconds each (same data seed)       ~9 min
#   CALL=2  train both S seconds more (a new data seed)                                  ~9 min
#   CALL=3  score kept / wide / deep teachers (CFG 2, 128 clips: 2 noise seeds x 64 held-out prompts, batches of
#           32; the kept one on 256), each with its Euler ODE and with the ancestral sampler at eta = 1 (run 19: 98
#           against 88 for the kept teacher), and the shipped student (256 clips), strips; the grown teachers come back in int8, split
#           ~8 min
# Batch 16 (BATCH): two grown teachers at batch 32 would need about 50 GB each (estimated from the tensors a CPU
# forward keeps for backward), over an H100's 80 GB together; at 16 they fit either card.
set -u
CALL=${CALL:?CALL=1, 2 or 3}
S=${S:-380}  # training seconds per call, after compiling (~90 s) and the held-out losses: the call stays < 600 s
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_INTERPRET=0
ln -sfn ../kernels toolkit/kernels; ln -sfn ../paper_figures toolkit/paper_figures
mkdir -p runs/eval
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "runs/gpu_call$CALL.txt" 2>&1
batch=${BATCH:-16}
device=${DEVICE:-cuda}  # DEVICE=cpu PROMPTS=4 with a tiny data/teacher: a dry run of the plumbing
train() {  # dest, then extra environment
  dest=$1; shift
  env "$@" TEACHER_MORE_BATCH=$batch TEACHER_MORE_SECONDS=$S PART=teacher_more DEST=runs/$dest \
    bash benchmarks/train_bundled.sh > "runs/${dest}_call$CALL.out" 2>&1
}
score() {  # name, then bundled_failures.py options; 128 or 256 clips in batches of 32, the JSON after each seed
  name=$1; shift
  timeout 540 python3 benchmarks/bundled_failures.py --prompts "${PROMPTS:-64}" --batch 32 --device "$device" \
    --name "$name" --out runs/eval "$@" > "runs/eval/$name.log" 2>&1
}
kept=(--weights data/teacher/teacher.safetensors --seeds 2 --strip 4)
case $CALL in
  1) for d in w d; do PART=kept_teacher DEST=runs/$d bash benchmarks/train_bundled.sh; done
     train w TEACHER_WIDEN=2 TEACHER_MORE_SEED=18 &
     train d TEACHER_DEEPEN=2 TEACHER_MORE_SEED=18 &
     wait ;;
  2) train w TEACHER_MORE_SEED=19 &
     train d TEACHER_MORE_SEED=19 &
     wait ;;
  3) for eta in "" 1; do  # the Euler ODE, then the ancestral sampler (eta = 1)
       # the kept teacher on 256 clips: the first 128 are run 19's, the other 128 new for the two samplers' pairing
       score "teacher_kept${eta:+_eta$eta}" "${kept[@]}" --seeds 4 --teacher-cfg 2 ${eta:+--teacher-eta $eta} &
       for d in wide deep; do
         [ -f "runs/${d:0:1}/stages/teacher.safetensors" ] || continue  # CALL=3 alone: the kept teacher and student
         score "teacher_$d${eta:+_eta$eta}" --weights "runs/${d:0:1}/stages/teacher.safetensors" --teacher-cfg 2 \
           --seeds 2 --strip 4 ${eta:+--teacher-eta $eta} &
       done
     done
     score student --seeds 4 --strip 4 &
     wait
     python3 - <<'PY'
from toolkit.models.bundled.model import load_weights, save_weights
import os
for d in ("w", "d"):
    if os.path.exists(f"runs/{d}/stages/teacher.safetensors"):
        save_weights(load_weights(f"runs/{d}/stages/teacher.safetensors"), f"runs/{d}/teacher_int8.safetensors",
                     int8=True, stage="teacher")
PY
     for d in w d; do
       [ -f "runs/$d/teacher_int8.safetensors" ] && split -b 15m "runs/$d/teacher_int8.safetensors" "$OUT/teacher_$d.int8.part_"
     done ;;
esac
python3 - <<'PY'
import glob, os
from PIL import Image
for f in glob.glob("runs/eval/*.png"):  # strips at half size, as jpg: the returned files stay small
    im = Image.open(f).convert("RGB")
    im.resize((im.width // 2, im.height // 2), Image.LANCZOS).save(f[:-4] + ".jpg", quality=85)
    os.remove(f)
PY
tar czf "$OUT/run18_call$CALL.tgz" runs/gpu_call*.txt runs/*_call*.out runs/eval runs/w/stages/log.json \
  runs/d/stages/log.json 2>/dev/null
tail -n 4 runs/*_call$CALL.out runs/eval/*.log 2>/dev/null | cut -c1-300
ls -la "$OUT"
