#!/usr/bin/env bash
# Every 3-seed table of the README, in one resumable command (issue 16): run it again after an interruption, and
# after the shipped teacher changes (into a fresh OUT). ~4 h on 2 CPU cores; each step keeps finished runs.
#   bash benchmarks/all_tables.sh [OUT]      then copy OUT/*/compare.{json,md} under benchmarks/results/
set -euo pipefail
O=${1:-runs/tables}
B=$(dirname "$0")
mkdir -p "$O"
clipslim compare demo_scratch demo_distill --seeds 3 --out "$O/compare-demo" --set train.eval_every=0
mkdir -p "$O/compare-recipes/runs"
for r in demo_scratch demo_distill; do  # same recipe text, so compare reuses these runs
  [ -d "$O/compare-recipes/runs/$r" ] || cp -r "$O/compare-demo/runs/$r" "$O/compare-recipes/runs/"
done
bash "$B/recipes_run.sh" "$O/compare-recipes" "$O/no-issue21-runs"
python "$B/inheritance_compare.py" --steps 400 --seeds 3 --out "$O/inheritance-seeds"
bash "$B/protoclip/run.sh" "$O/compare-protoclip"
python "$B/slimmable_compare.py" --steps 200 --seeds 3 --out "$O/slimmable-seeds" --json "$O/slimmable-seeds/results" \
  --plot "$O/slimmable-seeds/slimmable.png"
