"""Training-step MFU for ``clipslim bench --train RECIPE``: the recipe's real step, counted once, then timed.

The step is the trainer's own (teacher forward if online, student forward and backward, clipping, AdamW), so
its FLOPs are what a run executes, attention included. It is timed twice: pulling each batch from the loader (what
the training log's ``mfu`` column sees), then on one preloaded batch (compute only). Not interleaved: the loader's
workers would prefetch during the compute-only steps and flatter the other. Both are divided by the matmul peak
measured in this process at this thread count.
"""

from __future__ import annotations

import dataclasses
import tempfile
from typing import Any

import torch

from ..eval.bench import percentile, time_calls
from ..eval.mfu import count_flops, matmul_peak, mfu
from ..recipe import Recipe
from .loop import Trainer


def bench_train_step(recipe: Recipe, device: str = "cpu", repeats: int = 5, warmup: int = 2) -> dict[str, Any]:
    """FLOPs per step, median step seconds with and without data loading, and the MFU of each."""
    train = dataclasses.replace(recipe.train, device=device, mfu=False, eval_every=0)
    quiet = dataclasses.replace(recipe, train=train)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(quiet, run_dir, progress=False)
        try:
            return _measure(trainer, repeats, warmup)
        finally:
            trainer.stream.close()


def _measure(trainer: Trainer, repeats: int, warmup: int) -> dict[str, Any]:
    batch = trainer.stream.next()
    flops = count_flops(lambda: trainer.train_step(batch))[1]
    device = trainer.device
    times = {"with_data": time_calls(lambda: trainer.train_step(trainer.stream.next()), repeats, warmup, device)}
    times["compute"] = time_calls(lambda: trainer.train_step(batch), repeats, warmup, device)
    peak = matmul_peak(trainer.device, trainer.precision.dtype, seconds=1.0)
    seconds = {name: percentile(t, 50) for name, t in times.items()}
    cfg = trainer.cfg
    return {
        "recipe": trainer.recipe.name,
        "batch_size": cfg.batch_size,
        "threads": torch.get_num_threads(),
        "teacher": trainer.summary.get("teacher_source"),
        "flops_per_step": flops,
        "matmul_peak_flops_per_s": peak,
        "peak_dtype": str(trainer.precision.dtype).removeprefix("torch."),
        "repeats": repeats,
        "step_s_p50": seconds["compute"],
        "step_s_p50_with_data": seconds["with_data"],
        "step_s_spread": {name: [min(t), max(t)] for name, t in times.items()},
        "mfu": mfu(flops, seconds["compute"], peak),
        "mfu_with_data": mfu(flops, seconds["with_data"], peak),
    }


def train_step_line(r: dict[str, Any]) -> str:
    """One line for the bench output."""
    return (
        f"train step ({r['recipe']}, batch {r['batch_size']}, {r['threads']} threads, teacher {r['teacher']}): "
        f"{r['flops_per_step'] / 1e9:.2f} GFLOP/step, {r['step_s_p50']:.3f} s/step -> MFU {100 * r['mfu']:.1f}% "
        f"of measured {r['peak_dtype']} matmul peak {r['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s "
        f"({100 * r['mfu_with_data']:.1f}% with data loading, {r['step_s_p50_with_data']:.3f} s/step)"
    )
