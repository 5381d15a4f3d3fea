"""Training-time token compression: step time at 0/25/50/75% patch dropout and at 2x patch size against the full
step, and accuracy at an equal compute budget against no compression on the demo data.

    OMP_NUM_THREADS=1 python benchmarks/token_compression.py

Step time is measured in two settings, round-robin over the variants in one process (one thread, medians, on a
shared machine): the demo student (shapes-student-50, 64 px: only 16 patches, so fixed costs dominate) in its real
distillation step (teacher forward, both towers, AdamW) and its image tower alone; and a ViT-B-16-like image
tower (width 768, 4 blocks, 224 px: 196 patches) alone and in a CLIP step with a small text tower.
Accuracy: the demo_distill recipe for --steps steps (the budget), then each schedule for as many steps as that
budget affords under the measured cost model, plus the schedule that `clipslim token-schedule` picks.
Writes benchmarks/results/token_compression.json.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.model import CLIP

from clipslim.config import to_dict
from clipslim.io import atomic_write_json
from clipslim.recipe import load_recipe, resolve_recipe
from clipslim.tokens import TokenCompression
from clipslim.train import train
from clipslim.workflows.token_search import candidates, search_schedule, step_costs, steps_for

SETTINGS = [(0.0, 1), (0.25, 1), (0.5, 1), (0.75, 1), (0.0, 2)]


def round_robin(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds per call, one call of each variant per round (the first round is warm-up)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _key(setting: tuple[float, int]) -> str:
    return f"dropout {setting[0]:.2f}" if setting[1] == 1 else f"patch x{setting[1]}"


def tower_step(model: CLIP, tc: TokenCompression, setting, images, texts=None) -> Callable[[], None]:
    """fwd+bwd of the image tower (texts None) or of a whole CLIP step with its contrastive loss."""
    direction = F.normalize(torch.randn(model.visual.output_dim, generator=torch.Generator().manual_seed(0)), dim=0)

    def fn() -> None:
        tc.set(*setting)
        model.zero_grad(set_to_none=True)
        img = F.normalize(model.encode_image(images), dim=-1)
        if texts is None:  # a real gradient: |img|² would be constant, its ~0 gradients denormal and slow on CPU
            loss = (img * direction).sum()
        else:
            txt = F.normalize(model.encode_text(texts), dim=-1)
            logits = 100 * img @ txt.t()
            y = torch.arange(len(img))
            loss = (F.cross_entropy(logits, y) + F.cross_entropy(logits.t(), y)) / 2
        loss.backward()

    return fn


def ratios(times: dict[str, float]) -> dict[str, dict[str, float]]:
    base = times[_key((0.0, 1))]
    return {k: {"s_per_step": v, "ratio": v / base} for k, v in times.items()}


def tower_timings(model: CLIP, images, texts, rounds: int) -> dict[str, Any]:
    model.train()
    tc = TokenCompression(model.visual)
    out = {}
    for name, txt in (("image_tower", None), ("clip_step", texts)):
        fns = {_key(s): tower_step(model, tc, s, images, txt) for s in SETTINGS}
        out[name] = ratios(round_robin(fns, rounds))
    tc.remove()
    return out


def demo_step_times(args, recipe) -> dict[str, Any]:
    from clipslim.models import load_model

    costs = step_costs(recipe, SETTINGS, args.out / "probe", rounds=args.rounds)
    full = {_key(s): {"ratio": c} for s, c in costs.items()}
    student = load_model(recipe.student.arch).model
    images = torch.randn(recipe.train.batch_size, 3, 64, 64)
    texts = torch.randint(0, 49408, (recipe.train.batch_size, 16))
    return {"distill_step": full, **tower_timings(student, images, texts, args.rounds)}


def large_step_times(args) -> dict[str, Any]:
    torch.manual_seed(0)
    vision = {"image_size": 224, "patch_size": 16, "width": 768, "layers": args.large_layers, "head_width": 64}
    text = {"context_length": 16, "width": 256, "heads": 4, "layers": 2}
    model = CLIP(512, vision, text)
    images = torch.randn(args.large_batch, 3, 224, 224)
    texts = torch.randint(0, 49408, (args.large_batch, 16))
    return tower_timings(model, images, texts, args.large_rounds)


def run_budget(args, recipe, name: str, section, steps: int) -> dict[str, Any]:
    r = copy.deepcopy(recipe)
    r.name, r.tokens = f"tokens-{name}", section
    r.train.steps, r.train.eval_every, r.train.save_every = steps, 0, steps
    run_dir = args.out / "budget" / name
    done = run_dir / "results.json"
    start = time.perf_counter()
    results = json.loads(done.read_text()) if done.is_file() else train(r, run_dir, progress=False)
    wall = time.perf_counter() - start
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    loop_s = sum(r.train.log_every * r.train.batch_size / float(row["pairs_per_s"]) for row in rows)
    ev = results["eval"]
    return {
        "schedule": name, "tokens": None if section is None else to_dict(section),
        "steps": steps, "train_loop_s": loop_s, "wall_s": wall,
        "heldout_acc1": 100 * ev["zeroshot_heldout"]["acc1"], "seen_acc1": 100 * ev["zeroshot_seen"]["acc1"],
        "all_acc1": 100 * ev["zeroshot_all"]["acc1"],
    }  # fmt: skip


def budget_runs(args, recipe, costs) -> dict[str, Any]:
    cands = candidates()
    runs = [run_budget(args, recipe, "none", None, args.steps)]
    for name in args.schedules:
        runs.append(run_budget(args, recipe, name, cands[name], steps_for(cands[name], costs, args.steps)))
    search = search_schedule(recipe, args.out / "search", budget=1.0, trial_fraction=args.trial_fraction,
                             progress=False)  # fmt: skip
    best = search["best"]
    if best not in ("none", *args.schedules):
        runs.append(run_budget(args, recipe, best, cands[best], steps_for(cands[best], costs, args.steps)))
    return {"runs": runs, "search": search}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default="demo_distill")
    p.add_argument("--steps", type=int, default=200, help="budget: steps of the uncompressed run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--large-layers", type=int, default=4)
    p.add_argument("--large-batch", type=int, default=8)
    p.add_argument("--large-rounds", type=int, default=5)
    p.add_argument("--schedules", nargs="*", default=["drop50", "drop75-50-0", "patch2-0"])
    p.add_argument("--trial-fraction", type=float, default=0.25)
    p.add_argument("--skip-budget", action="store_true")
    p.add_argument("--out", type=Path, default=Path("runs/token_compression"))
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/token_compression.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    overrides = [f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", "train.warmup=20",
                 "data.num_workers=1"]  # fmt: skip
    recipe = load_recipe(resolve_recipe(args.recipe), overrides)
    result: dict[str, Any] = {
        "machine": "shared 2-core CPU (5 agents), torch.set_num_threads(1); round-robin timing, medians",
        "recipe": args.recipe, "batch_size": args.batch_size, "budget_steps": args.steps,
    }  # fmt: skip
    result["demo_64px"] = demo_step_times(args, recipe)
    print(json.dumps(result["demo_64px"], indent=1), flush=True)
    config = f"ViT-B-16-like image tower: width 768, {args.large_layers} blocks, 224 px, batch {args.large_batch}"
    result["large_224px"] = {"config": config + "; text width 256, 2 blocks", **large_step_times(args)}
    print(json.dumps(result["large_224px"], indent=1), flush=True)
    atomic_write_json(args.json, result)
    if not args.skip_budget:  # every candidate schedule uses only SETTINGS, so the measured costs cover them
        costs = {s: v["ratio"] for s, v in zip(SETTINGS, result["demo_64px"]["distill_step"].values(), strict=True)}
        result["budget"] = budget_runs(args, recipe, costs)
        atomic_write_json(args.json, result)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
