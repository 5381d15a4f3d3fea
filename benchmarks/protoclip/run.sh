#!/usr/bin/env bash
# The ProtoCLIP ablation at 3 seeds (issue 16): every row from random init, 300 steps x 64, same data order per seed;
# the Δ are paired against InfoNCE alone. Resumable: run it again after an interruption. ~30 min on 2 cores.
set -euo pipefail
O=${1:-runs/compare-protoclip}
B=$(dirname "$0")
clipslim compare "$B"/proto_clip.yaml "$B"/proto_pbt.yaml "$B"/proto_pbt_minilm.yaml "$B"/proto_affinity.yaml \
  "$B"/proto_affinity_minilm.yaml --out "$O" --seeds 3 --set train.eval_every=0
