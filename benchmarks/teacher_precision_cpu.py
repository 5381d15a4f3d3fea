"""Teacher forward time in fp32 vs bf16 weights on this CPU (issue 20: is `train.teacher_precision: bf16` a speed
lever on CPU?). Alternating rounds in one process, one thread by default; writes
benchmarks/results/teacher_precision_cpu.json.

    python benchmarks/teacher_precision_cpu.py [--teacher shapes-teacher:demo] [--batch 128] [--rounds 4]

bf16 changes the teacher's numerics (not the same maths as fp32), so this is an opt-in, reported apart from the
fp32 comparison with open_clip_train.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from clipslim.models import load_model

OUT = Path(__file__).resolve().parent / "results" / "teacher_precision_cpu.json"


def forward_s(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, repeats: int) -> float:
    """Median seconds of one image + text forward of the batch (no grad, eval mode)."""
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            model.encode_image(images)
            model.encode_text(tokens)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="shapes-teacher:demo")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4, help="alternating fp32 / bf16 rounds (default 4)")
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards per round and dtype (default 3)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_model(args.teacher)
    model = bundle.model.eval()
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(args.batch, 3, size, size)
    tokens = torch.randint(1, 1000, (args.batch, model.context_length))
    rows = []
    for r in range(args.rounds):
        row = {}
        for dtype in (torch.float32, torch.bfloat16) if r % 2 == 0 else (torch.bfloat16, torch.float32):
            model.to(dtype)
            row[str(dtype).removeprefix("torch.")] = forward_s(model, images.to(dtype), tokens, args.repeats)
        rows.append(row)
        print(f"round {r}: " + ", ".join(f"{k} {v:.4f} s" for k, v in row.items()), flush=True)
    ratios = [row["bfloat16"] / row["float32"] for row in rows]
    doc = {
        "teacher": args.teacher,
        "batch": args.batch,
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "median_s": {k: statistics.median(row[k] for row in rows) for k in ("float32", "bfloat16")},
        "bf16_over_fp32": statistics.median(ratios),
        "ratio_spread": [min(ratios), max(ratios)],
        "rounds": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: doc[k] for k in ("median_s", "bf16_over_fp32", "ratio_spread")}))


if __name__ == "__main__":
    main()
