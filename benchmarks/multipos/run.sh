#!/usr/bin/env bash
# Issue 21 measurement on the demo data (shapes v3) with the shipped teacher: every recipe at 3 seeds, resumable.
# Baselines are the packaged demo_distill / demo_scratch / clipkd recipes (their runs are reused by
# benchmarks/recipes_run.sh); runs/compare-demo's finished baseline runs are reused when present (same recipe).
set -euo pipefail
O=${1:-runs/issue21}
S=(--seeds 3 --set train.eval_every=0)
M=benchmarks/multipos
mkdir -p "$O/distill/runs" "$O/scratch/runs"
for r in distill scratch; do
  [ -d "$O/$r/runs/demo_$r" ] || [ ! -d runs/compare-demo/runs/demo_$r ] || cp -r runs/compare-demo/runs/demo_$r "$O/$r/runs/"
done
for t in 0.995 0.99 0.97; do
  [ -f "$O/keep-$t.txt" ] || clipslim dedup --teacher shapes-teacher:demo --data .data/shapes/train --threshold $t \
    --out "$O/keep-$t.txt"
done
clipslim compare demo_distill $M/distill_mp_captions.yaml $M/distill_mp_text.yaml $M/distill_mp_cascade.yaml \
  $M/distill_dedup995.yaml $M/distill_dedup99.yaml $M/distill_dedup97.yaml --out "$O/distill" "${S[@]}"
clipslim compare demo_scratch $M/scratch_mp_captions.yaml $M/scratch_mp_cascade.yaml --out "$O/scratch" "${S[@]}"
clipslim compare clipkd $M/clipkd_cross.yaml --out "$O/clipkd" "${S[@]}"
python benchmarks/multipos/mining_recall.py "$O"
# Prepared, not yet run (time): $M/clipkd_mp.yaml (multi-positive task + CRD), an extra recipe for the clipkd compare.
