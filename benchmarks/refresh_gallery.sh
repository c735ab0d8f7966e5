#!/usr/bin/env bash
# Every gallery panel of the README from the bundled model now in data/bundled, on this machine's CPUs (2 cores of
# an AMD EPYC: capture about 20 s, the paper figures 19 min, the approximations 5 min, the semantic figure 11 s):
#   1. toolkit capture                       the README's first command (default prompt, seed and selection)
#   2. toolkit figures                       every paper figure of that capture, with fig1_mse_vs_sparsity.json
#                                            (Monarch against top-k at each tiling's budget: where they cross)
#   3. toolkit analyze approximations        every family on that capture, and its figure (panels L0H0, L1H2)
#   4. toolkit figures --figures semantic    a query on a sprite against the rendered ground truth (no capture)
# into WORK (default runs/gallery), each step timed. Then it prints what the README quotes: the crossing per pair and
# the semantic correspondence's line. With INSTALL=1 it copies the panels, the manifest and the crossing table into
# paper_figures/gallery and the analyses the README's numbers come from into benchmarks/results/gallery_cpu and
# benchmarks/results/approximations_cpu (look at every panel before committing them).
#
#   bash benchmarks/refresh_gallery.sh                 # into runs/gallery
#   INSTALL=1 bash benchmarks/refresh_gallery.sh       # ... and into the repository's gallery
set -euo pipefail
WORK=${WORK:-runs/gallery}
mkdir -p "$WORK"
log="$WORK/log.txt"
{ echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores"
  echo "weights: data/bundled/model.safetensors sha256 $(sha256sum data/bundled/model.safetensors | cut -c1-16)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"; } | tee "$log"
timed() {  # label, command...: run it, append its wall time to the log
  local start=$SECONDS
  "${@:2}"
  echo "$1: $((SECONDS - start)) s" | tee -a "$log"
}
timed capture toolkit capture --out "$WORK/bundled.h5" --force --quiet
timed figures toolkit figures "$WORK/bundled.h5" --out "$WORK/figs" --force --quiet
timed approximations toolkit analyze approximations "$WORK/bundled.h5" --out "$WORK/approx.nc" --force --quiet
python3 - "$WORK" <<'EOF'
import sys

from toolkit.analysis import open_results
from toolkit.paper_figures import approximations

approximations.plot(open_results(f"{sys.argv[1]}/approx.nc"), f"{sys.argv[1]}/figs", heads=[(0, 0), (1, 2)])
EOF
timed semantic toolkit figures --figures semantic --out "$WORK/sem" --force
python3 - "$WORK/figs/fig1_mse_vs_sparsity.json" <<'EOF' | tee -a "$log"
import json
import sys

table = json.load(open(sys.argv[1]))
print(f"Fig. 1 crossing (step {table['step']}, chunk {table['chunk']}; {table['metric']}, top-k {table['topk_variant']}):")
for pair, c in table["pairs"].items():
    lower = c["monarch_lower_from"]
    print(f"  {pair}: Monarch lower from " + ("nowhere" if lower is None else f"{lower:.1%}"))
    for t in c["tilings"]:
        print(f"    {t['tiling']} at {t['sparsity']:.1%}: Monarch {t['monarch_mse']:.3g}, top-k {t['topk_mse']:.3g}")
EOF
python3 -c "import json, sys; print('semantic:', json.load(open(sys.argv[1])))" "$WORK/sem/semantic_correspondence.json" \
  | cut -c1-400 | tee -a "$log"
if [ "${INSTALL:-0}" = 1 ]; then
  gallery=paper_figures/gallery
  cp "$WORK"/figs/*.png "$WORK/figs/manifest.json" "$WORK/figs/fig1_mse_vs_sparsity.json" "$gallery/"
  cp "$WORK/sem/semantic_correspondence.png" "$gallery/"
  cp "$WORK/figs/analysis_monarch.nc" "$WORK/figs/analysis_topk_pairs.nc" "$WORK/sem/semantic_correspondence.json" \
    "$log" benchmarks/results/gallery_cpu/
  cp "$WORK/approx.nc" benchmarks/results/approximations_cpu/bundled_last_chunk_step3.nc
  echo "copied into $gallery, benchmarks/results/gallery_cpu and approximations_cpu"
fi
