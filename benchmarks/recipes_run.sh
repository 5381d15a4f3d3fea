#!/usr/bin/env bash
# The anchors' objective mixes on the demo data at 3 seeds (issue 16): every packaged single-stage distillation
# recipe against the from-scratch student (the baseline of the paired differences). tinyclip's objectives are
# demo_distill's, so demo_distill stands for it. Runs already made by benchmarks/multipos/run.sh (same recipe, same
# --set) are copied, not retrained. Resumable: run it again after an interruption.
set -euo pipefail
O=${1:-runs/compare-recipes}
I=${2:-runs/issue21}
mkdir -p "$O/runs"
for pair in demo_scratch:scratch demo_distill:distill clipkd:clipkd; do
  r=${pair%%:*} src=$I/${pair##*:}/runs/${pair%%:*}
  [ -d "$O/runs/$r" ] || [ ! -d "$src" ] || cp -r "$src" "$O/runs/"
done
clipslim compare demo_scratch openclip_distill clipkd mobileclip demo_distill --out "$O" --seeds 3 \
  --set train.eval_every=0
