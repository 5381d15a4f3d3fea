"""Peak training memory and step time of the one-GPU memory options at real size (issue 22, part 3).

    python benchmarks/memory_options.py --train .data/shapes3/train --batch 16

ViT-B-32 (random weights, 224 px) teaching ViT-B-32-half (inherited), clip + affinity + feature, one measured step
per variant after one warm-up step: plain, train.accum_freq 4, train.grad_checkpointing, both, and (GPU only) a
bf16 teacher. Peak memory is bench.peak_memory (CPU: live tensor bytes created by the step; CUDA: allocator peak);
the models' own weights and optimizer state are not counted. Writes benchmarks/results/memory_options.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import torch

from clipslim.eval.bench import peak_memory
from clipslim.io import atomic_write_json
from clipslim.recipe import recipe_from_dict
from clipslim.train import Trainer

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "accum_freq 4": {"accum_freq": 4},
    "grad_checkpointing": {"grad_checkpointing": True},
    "accum_freq 4 + checkpointing": {"accum_freq": 4, "grad_checkpointing": True},
}


def measure(args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    recipe = recipe_from_dict({
        "name": "memory", "teacher": args.teacher, "student": {"arch": args.student, "init": "inherit"},
        "data": {"train": args.train, "num_workers": 0},
        "objectives": {"clip": 1.0, "affinity": 1.0, "feature": 1.0},
        "train": {"steps": 2, "batch_size": args.batch, "warmup": 1, "device": args.device, **extra},
    })  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(recipe, tmp, progress=False)
        trainer.train_step(trainer.stream.next())  # warm-up: optimizer state, allocator pools
        batch = trainer.stream.next()
        start = time.perf_counter()
        out: dict[str, Any] = {}
        peak, method = peak_memory(lambda: out.update(trainer.train_step(batch)), trainer.device)
        seconds = time.perf_counter() - start
        trainer.stream.close()
    return {**extra, "peak_mib": round(peak / 2**20, 1) if peak else None, "method": method,
            "s_per_step": round(seconds, 2), "loss": round(float(out["loss"].detach()), 5)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--teacher", default="ViT-B-32")
    parser.add_argument("--student", default="ViT-B-32-half")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="names from VARIANTS")
    parser.add_argument("--out", default="benchmarks/results/memory_options.json")
    args = parser.parse_args()
    variants = {name: VARIANTS[name] for name in args.variants}
    if args.device.startswith("cuda"):
        variants["bf16 teacher + accum 4 + checkpointing"] = {**VARIANTS["accum_freq 4 + checkpointing"],
                                                               "teacher_precision": "bf16"}  # fmt: skip
    rows = {}
    for name, extra in variants.items():
        rows[name] = measure(args, extra)
        print(f"{name:40s} {rows[name]}", flush=True)
    atomic_write_json(args.out, {"args": vars(args), "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
