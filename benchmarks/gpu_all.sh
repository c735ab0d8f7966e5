#!/usr/bin/env bash
# Run GPU benchmarks in one device call; logs + JSON land in $OUT/results.tgz.
#   bash benchmarks/gpu_all.sh kernels analysis monarch sweep capture generate gputests
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
R=/tmp/results
mkdir -p "$R" "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1 || { echo PIPFAIL; tail -5 /tmp/pip.log; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name"
  local t0=$SECONDS
  timeout "$secs" "$@" > "$R/$name.log" 2>&1
  echo "rc=$? (${name}: $((SECONDS - t0)) s)"
  tail -n 30 "$R/$name.log"
}
for what in "$@"; do
  case $what in
    kernels)  export TOOLKIT_KERNEL_CACHE=/tmp/kcache
              step kernels 330 python3 benchmarks/bench_kernels.py --out "$R/kernels" --analysis --low-memory
              # a second process: launch configs must now come from the on-disk tuning cache
              step kernels_cached 120 python3 benchmarks/bench_kernels.py --out "$R/kernels_cached" \
                --shapes full-111 ar-111 ;;
    analysis) step analysis 90 python3 benchmarks/bench_analysis.py --out "$R" ;;
    kernels_quick) export TOOLKIT_KERNEL_CACHE=/tmp/kcache
              step kernels 150 python3 benchmarks/bench_kernels.py --out "$R/kernels" \
                --shapes full-111 ar-111 full-121 ar-121 full-311 ;;
    monarch_generate)  # the --attention integration on a GPU: bundled model, dense vs Triton Monarch
              step generate_dense 60 python3 -m toolkit.cli generate --attention dense --out "$R/gen_dense" --quiet
              step generate_monarch 90 python3 -m toolkit.cli generate --attention monarch:1,1,1 --out "$R/gen_monarch" --quiet ;;
    pooled_kernel) step pooled_kernel 90 python3 benchmarks/bench_pooled_kernel.py --out "$R" ;;
    capture_pooled) step capture 170 python3 benchmarks/bench_capture.py --out "$R" --videos 2 \
                --pooled-queries random:16 ;;
    monarch)  step monarch_analysis 90 python3 benchmarks/bench_monarch_analysis.py --out "$R" ;;
    sweep)    step sweep 60 python3 benchmarks/bundled_sampler_sweep.py --out "$R" ;;
    capture)  step capture 200 python3 benchmarks/bench_capture.py --out "$R" ;;
    figpairs) step figures_pairs 220 python3 benchmarks/bench_figures.py --out "$R/figures_pairs" --parts pairs --workdir /tmp/figwork ;;
    figall)   step figures_all 200 python3 benchmarks/bench_figures.py --out "$R/figures_all" --parts all --workdir /tmp/figwork ;;
    generate) step generate 150 python3 benchmarks/bench_generate.py --out "$R" --workdir /tmp ;;
    gputests) step gputests 120 python3 -m pytest -q -x -m gpu tests/ ;;
  esac
  tar czf "$OUT/results.tgz" -C /tmp results
done
