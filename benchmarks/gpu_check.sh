#!/usr/bin/env bash
# GPU paths that CI (CPU-only) cannot run: AMP training, NCCL under torchrun, CUDA bench. Run on a GPU machine from the
# repo root, with the wheels open_clip_torch, webdataset, braceexpand, ftfy, wcwidth, faiss-cpu in .whl/ when the
# machine's Python lacks them (see docs/LOG.md). Writes logs and JSON to ${OUT:-runs/gpu_check}.
set -euo pipefail
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src
fi
export PYTHONUNBUFFERED=1
cs() { python3 -m clipslim.cli "$@"; }
python3 -c "import torch, open_clip; print('torch', torch.__version__, torch.cuda.get_device_name(), 'open_clip', open_clip.__version__)"
[ -d .data/shapes/train ] || cs data shapes --out .data/shapes --workers 16 > /dev/null
echo "== demo distillation on cuda (bf16 autocast), the README's CPU recipe unchanged"
time python3 -m clipslim.cli train demo_distill --out /tmp/gpu_distill --quiet \
  --set train.device=cuda --set data.num_workers=8 2>&1 | tail -4
cp /tmp/gpu_distill/results.json "$OUT/gpu_distill_results.json"
tail -3 /tmp/gpu_distill/metrics.csv
echo "== torchrun, 1 process, NCCL"
torchrun --nproc_per_node 1 -m clipslim.cli train demo_distill --out /tmp/ddp --quiet \
  --set train.device=cuda --set train.steps=30 --set train.eval_every=0 --set data.eval=null 2>&1 | tail -3
echo "== fp16 with loss scaling"
cs train demo_distill --out /tmp/fp16 --quiet --set train.device=cuda --set train.precision=fp16 \
  --set train.steps=30 --set data.eval=null 2>&1 | tail -2
echo "== bench"
cs bench --model shapes-teacher:demo --model /tmp/gpu_distill/student --device cuda --batch-sizes 1 256 \
  --out "$OUT/bench_cuda.json" 2>&1 | tail -8
