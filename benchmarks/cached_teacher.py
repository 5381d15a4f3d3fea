"""Cached vs online teacher: step time, cache size, one-time caching cost, and accuracy at equal steps.

    python benchmarks/cached_teacher.py            # ~11 min on one CPU thread

1. Cache ``shapes-teacher:demo`` on the first --shards train shards (K stored augmentations per image).
2. Step time, interleaved in one process (rounds of A B C A B C ..., medians), same student (shapes-student-50
   inherited from the teacher), batch, data and data pipeline cost (each variant loads and augments its own batches):
   plain student CLIP training; online-teacher affinity distillation (the anchors' cost); cached-teacher affinity.
3. Accuracy after --steps steps from the same inherited init: cached vs online distillation (each for every seed),
   and, for the first seed, the online teacher run on the cache's replayed pixels (isolates what caching itself
   changes: fp16 storage of the teacher's embeddings; the augmentations are the same).
Writes benchmarks/results/cached_teacher.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from clipslim.data.teacher_cache import CacheOptions, cache_teacher
from clipslim.distiller import OnlineTeacher
from clipslim.io import atomic_write_json
from clipslim.models import load_model
from clipslim.recipe import Recipe, recipe_from_dict
from clipslim.train import Trainer

TEACHER = "shapes-teacher:demo"
STUDENT = "shapes-student-50"


def make_recipe(args: argparse.Namespace, variant: str, steps: int, seed: int = 0) -> Recipe:
    """plain: CLIP loss only; online / cached: affinity at teacher scale 50 (the demo's distillation)."""
    data: dict[str, Any] = {"train": args.train, "eval": str(args.data), "num_workers": 0}
    objectives: dict[str, Any] = {"clip": 1.0} if variant == "plain" else {"affinity": {"teacher_scale": 50.0}}
    if variant == "cached":
        data["teacher_cache"] = str(args.cache)
    else:
        data["augment"] = True  # open_clip's random-crop training transform: a comparable per-sample data cost
    return recipe_from_dict(
        {
            "name": f"bench-{variant}",
            "teacher": TEACHER,
            "student": {"arch": STUDENT, "init": "inherit"},
            "data": data,
            "objectives": objectives,
            "train": {"steps": steps, "batch_size": args.batch_size, "lr": 1e-3, "warmup": 30, "seed": seed},
        }
    )


def run_cache(args: argparse.Namespace) -> dict[str, Any]:
    opts = CacheOptions(augmentations=args.k, batch_size=256)
    return cache_teacher(TEACHER, args.train, args.cache, opts, progress=True)


def time_steps(args: argparse.Namespace) -> dict[str, Any]:
    trainers = {v: Trainer(make_recipe(args, v, 10_000), args.out / "speed" / v, progress=False) for v in VARIANTS}
    times: dict[str, dict[str, list[float]]] = {v: {"data": [], "compute": []} for v in VARIANTS}
    for t in trainers.values():  # warm-up: first batches, allocator, lazy init
        for _ in range(3):
            t.train_step(t.stream.next())
    for r in range(args.rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for v in order:
            t = trainers[v]
            for _ in range(args.round_steps):
                tick = time.perf_counter()
                batch = t.stream.next()
                mid = time.perf_counter()
                t.train_step(batch)
                times[v]["data"].append(mid - tick)
                times[v]["compute"].append(time.perf_counter() - mid)
    out: dict[str, Any] = {}
    for v in VARIANTS:
        step = [d + c for d, c in zip(times[v]["data"], times[v]["compute"], strict=True)]
        out[v] = {
            "median_step_s": round(statistics.median(step), 4),
            "median_compute_s": round(statistics.median(times[v]["compute"]), 4),
            "median_data_s": round(statistics.median(times[v]["data"]), 4),
            "steps_timed": len(step),
        }
    for v in ("online", "cached"):
        out[f"{v}_over_plain"] = round(out[v]["median_step_s"] / out["plain"]["median_step_s"], 3)
        out[f"{v}_over_plain_compute"] = round(out[v]["median_compute_s"] / out["plain"]["median_compute_s"], 3)
    out["target_cached_le_1.10x_plain"] = out["cached_over_plain"] <= 1.10
    return out


def accuracy(args: argparse.Namespace, variant: str, seed: int) -> dict[str, Any]:
    name = "online" if variant == "online_replayed" else variant
    recipe = make_recipe(args, "cached" if variant == "online_replayed" else name, args.steps, seed)
    run_dir = args.out / "acc" / f"{variant}-seed{seed}"
    trainer = Trainer(recipe, run_dir, progress=True)
    if variant == "online_replayed":  # the cache's replayed pixels, but the teacher runs on them every step
        trainer.teacher = OnlineTeacher(load_model(TEACHER).model)
    tick = time.perf_counter()
    results = trainer.run()
    ev = results["eval"]
    return {
        "variant": variant, "seed": seed, "steps": results["steps"], "wall_s": round(time.perf_counter() - tick, 1),
        "heldout_acc1": round(100 * ev["zeroshot_heldout"]["acc1"], 2),
        "seen_acc1": round(100 * ev["zeroshot_seen"]["acc1"], 2),
    }  # fmt: skip


VARIANTS = ("plain", "online", "cached")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(".data/shapes"))
    p.add_argument("--shards", type=int, default=6, help="train shards to cache and train on (2000 samples each)")
    p.add_argument("--k", type=int, default=4, help="stored augmentations per image")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=300, help="training steps of each accuracy run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--round-steps", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("runs/bench_cached_teacher"))
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/cached_teacher.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    args.train = str(args.data / "train" / f"shapes-train-{{000000..{args.shards - 1:06d}}}.tar")
    args.cache = args.out / "cache"
    shutil.rmtree(args.out, ignore_errors=True)  # measure the caching cost from scratch every time

    caching = run_cache(args)
    speed = time_steps(args)
    print(speed)
    plan = [(v, s) for s in args.seeds for v in ("online", "cached")] + [("online_replayed", args.seeds[0])]
    runs = [accuracy(args, v, s) for v, s in plan]
    acc: dict[str, Any] = {"runs": runs}
    for v in ("online", "cached", "online_replayed"):
        mine = [r for r in runs if r["variant"] == v]
        acc[v] = {k: round(statistics.mean(r[k] for r in mine), 2) for k in ("heldout_acc1", "seen_acc1", "wall_s")}
    plain_step = speed["plain"]["median_step_s"]
    caching["equivalent_plain_steps"] = round(caching["seconds"] / plain_step, 1)
    result = {
        "machine": "shared CPU (2 cores, 5 agents at once), torch.set_num_threads(1); ratios are interleaved medians",
        "command": "python benchmarks/cached_teacher.py " + " ".join(f"--{k} {v}" for k, v in _cli(args).items()),
        "teacher": TEACHER, "student": f"{STUDENT} (init: inherit)", "batch_size": args.batch_size,
        "data": args.train, "augmentations": args.k,
        "caching": caching, "speed": speed, "accuracy": acc,
    }  # fmt: skip
    atomic_write_json(args.json, result)
    print(f"wrote {args.json}")


def _cli(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("shards", "k", "batch_size", "steps", "seeds", "rounds", "round_steps")
    return {
        k.replace("_", "-"): " ".join(map(str, v)) if isinstance(v, list) else v
        for k in keys
        for v in [getattr(args, k)]
    }


if __name__ == "__main__":
    main()
