"""Inference token pruning on the demo teacher: zero-shot top-1 and image-encoder images/s at keep 100/80/60/40%,
for each ranking, with and without learnable tokens; plus the throughput trend on a ViT-S-16-like tower at 224 px.

    OMP_NUM_THREADS=1 python benchmarks/token_pruning.py

Writes benchmarks/results/token_pruning.json and docs/img/token_pruning.png. Speed is timed round-robin over all
variants in one process (one thread, medians) because the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.model import CLIP

from clipslim.eval.run import evaluate_shapes
from clipslim.io import atomic_write_json
from clipslim.models import load_model
from clipslim.plots import pyplot, save_figure
from clipslim.tokens.calibrate import cache_tokens, calibration_images, fit_extra_tokens, fit_pruner
from clipslim.tokens.options import FitOptions
from clipslim.tokens.prune import PruneConfig, TokenPruner, apply_token_pruning, remove_token_pruning

KEEPS = (1.0, 0.8, 0.6, 0.4)
RANKINGS = ("attention", "predictor", "random")


def accuracy(bundle: Any, data: Path) -> dict[str, float]:
    res = evaluate_shapes(bundle, data, progress=False)
    return {k: 100 * res[f"zeroshot_{k}"]["acc1"] for k in ("heldout", "seen", "all")}


def throughput(model: torch.nn.Module, variants: dict[str, TokenPruner | None], images: torch.Tensor, repeats: int):
    """Images/s per variant: one call of each per round, round-robin (first round warm-up), medians."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for r in range(repeats + 1):
            for name, pruner in variants.items():
                remove_token_pruning(model)
                if pruner is not None:
                    apply_token_pruning(model, pruner.cfg, pruner)
                start = time.perf_counter()
                model.encode_image(images)
                if r:
                    times[name].append(time.perf_counter() - start)
    remove_token_pruning(model)
    return {k: len(images) / statistics.median(v) for k, v in times.items()}


def speed_rows(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """Fill images/s and speedup into ``rows``; pruners are built fresh (weights do not change the cost)."""
    bundle = load_model(args.model)
    model = bundle.model.eval()
    width = model.visual.transformer.width
    variants: dict[str, TokenPruner | None] = {}
    for row in rows:
        key = f"{row['ranking']}/{row['extra_tokens']}/{row['keep']}"
        cfg = PruneConfig(args.after_block, row["keep"], row["ranking"], row["extra_tokens"])
        variants[key] = None if row["ranking"] == "none" else TokenPruner(cfg, width).eval()
    images = calibration_images(bundle, args.data / "train", args.batch)
    speed = throughput(model, variants, images, args.repeats)
    for row in rows:
        row["images_per_s"] = speed[f"{row['ranking']}/{row['extra_tokens']}/{row['keep']}"]
        row["speedup"] = row["images_per_s"] / speed["none/0/1.0"]


def demo(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    bundle = load_model(args.model)
    model = bundle.model.eval()
    width = model.visual.transformer.width
    images = calibration_images(bundle, args.data / "train", args.calib)
    cache = cache_tokens(model.visual, images, args.after_block)
    base = accuracy(bundle, args.data)
    rows, pruners, fits = [], {}, {}
    for ranking in RANKINGS:
        predictor = None
        if ranking == "predictor":  # one predictor per block: the ranking does not depend on the keep ratio
            cfg = PruneConfig(args.after_block, 0.6, ranking, 0)
            fitted, fits["predictor"] = fit_pruner(
                model, cfg, images, FitOptions(golden_images=args.golden, token_steps=300), progress=False
            )
            predictor = fitted.predictor
        for extra in (0, args.extra):
            for keep in KEEPS[1:]:
                cfg = PruneConfig(args.after_block, keep, ranking, extra)
                pruner = TokenPruner(cfg, width)
                if predictor is not None:
                    pruner.predictor = predictor
                if extra:
                    torch.manual_seed(0)
                    losses = fit_extra_tokens(pruner, model.visual, cache, args.token_steps, progress=False)
                    fits[f"{ranking}/{extra}/{keep}"] = {"first": losses[0], "last": sum(losses[-20:]) / 20}
                pruners[(ranking, extra, keep)] = pruner
                apply_token_pruning(model, cfg, pruner)
                rows.append({"ranking": ranking, "extra_tokens": extra, "keep": keep, **accuracy(bundle, args.data)})
                remove_token_pruning(model)
                print(rows[-1], flush=True)
    rows.append({"ranking": "none", "extra_tokens": 0, "keep": 1.0, **base})
    speed_rows(args, rows)
    return rows, fits


@torch.no_grad()
def golden_oracle(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Zero-shot top-1 when each eval image is pruned by its own greedy golden ranking (an oracle: the search runs
    N²/2 partial forwards per image, so it has no deployable throughput)."""
    from clipslim.data.loader import make_loader
    from clipslim.data.shapes import read_lines
    from clipslim.eval.run import Features, evaluate_features
    from clipslim.eval.zeroshot import build_classifier
    from clipslim.tokens.golden import golden_scores

    bundle = load_model(args.model)
    model = bundle.model.eval()
    classnames, templates = read_lines(args.data / "classnames.txt"), read_lines(args.data / "templates.txt")
    classifier = build_classifier(model, bundle.tokenizer, classnames, templates).cpu()
    batches = list(make_loader(str(args.data / "eval"), bundle.preprocess_val, bundle.tokenizer, 256, train=False))
    scores = [golden_scores(model.visual, b["image"], args.after_block) for b in batches]
    rows = []
    for keep in KEEPS[1:]:
        pruner = apply_token_pruning(model, PruneConfig(args.after_block, keep, "attention", 0))
        images = []
        for batch, sc in zip(batches, scores, strict=True):
            pruner.scores_override = sc
            images.append(F.normalize(model.encode_image(batch["image"]), dim=-1))
        remove_token_pruning(model)
        meta = [m for b in batches for m in b["meta"]]
        feats = Features(torch.cat(images), torch.cat(images), meta)
        res = evaluate_features(feats, classifier)
        rows.append({"ranking": "golden (oracle)", "extra_tokens": 0, "keep": keep,
                     **{k: 100 * res[f"zeroshot_{k}"]["acc1"] for k in ("heldout", "seen", "all")}})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def large_trend(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Random-init ViT-S-16-like image tower (width 384, 12 blocks, 196 patches): speed only, attention ranking."""
    torch.manual_seed(0)
    vision = {"image_size": 224, "patch_size": 16, "width": 384, "layers": 12, "head_width": 64}
    model = CLIP(256, vision, {"context_length": 16, "width": 64, "heads": 1, "layers": 1}).eval()
    images = torch.randn(args.large_batch, 3, 224, 224)
    variants = {"1.0": None}
    for keep in KEEPS[1:]:
        variants[str(keep)] = TokenPruner(PruneConfig(args.large_after_block, keep, "attention", 0), 384)
    speed = throughput(model, variants, images, args.large_repeats)
    return [{"keep": float(k), "images_per_s": v, "speedup": v / speed["1.0"]} for k, v in speed.items()]


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    full = next(r for r in rows if r["ranking"] == "none")
    for ranking, color in zip(RANKINGS, ("tab:blue", "tab:orange", "tab:gray"), strict=True):
        for extra, marker in ((0, "o"), (max(r["extra_tokens"] for r in rows), "^")):
            pts = [full] + [r for r in rows if r["ranking"] == ranking and r["extra_tokens"] == extra]
            label = f"{ranking}" + (f" + {extra} learnable tokens" if extra else "")
            ax.plot([p["images_per_s"] for p in pts], [p["all"] for p in pts], marker=marker, color=color,
                    linestyle="-" if not extra else "--", label=label)  # fmt: skip
    ax.set_xlabel("image encoder images/s (1 CPU thread, batch 128)")
    ax.set_ylabel("zero-shot top-1, all eval images (%)")
    ax.set_title("shapes teacher: prune after the 2nd of 6 blocks (keep 100/80/60/40%)")
    ax.legend(fontsize=7)
    save_figure(fig, out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="shapes-teacher:demo")
    p.add_argument("--data", type=Path, default=Path(".data/shapes"))
    p.add_argument("--after-block", type=int, default=1)
    p.add_argument("--extra", type=int, default=4)
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--golden", type=int, default=256)
    p.add_argument("--token-steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--large-batch", type=int, default=8)
    p.add_argument("--large-repeats", type=int, default=6)
    p.add_argument("--large-after-block", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/token_pruning.json"))
    p.add_argument("--plot", type=Path, default=Path("docs/img/token_pruning.png"))
    p.add_argument("--speed-only", action="store_true", help="re-time the variants of an existing --out")
    p.add_argument("--large-only", action="store_true", help="re-time the 224 px trend of an existing --out")
    p.add_argument("--golden-only", action="store_true", help="add the golden oracle rows to an existing --out")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.speed_only:
        result = json.loads(args.out.read_text())
        speed_rows(args, result["rows"])
        result["batch"], result["repeats"] = args.batch, args.repeats
        atomic_write_json(args.out, result)
        plot(result["rows"], args.plot)
        return
    if args.large_only:
        result = json.loads(args.out.read_text())
        result["large"]["rows"], result["large"]["repeats"] = large_trend(args), args.large_repeats
        atomic_write_json(args.out, result)
        return
    if args.golden_only:
        result = json.loads(args.out.read_text())
        result["golden_oracle"] = golden_oracle(args)
        atomic_write_json(args.out, result)
        return
    rows, fits = demo(args)
    large = large_trend(args)
    result = {
        "machine": "shared 2-core CPU (5 agents), torch.set_num_threads(1); speeds timed round-robin, medians",
        "model": args.model, "after_block": args.after_block, "calib_images": args.calib,
        "golden_images": args.golden, "token_steps": args.token_steps, "batch": args.batch, "repeats": args.repeats,
        "rows": rows, "fits": fits,
        "large": {"config": "ViT-S-16-like image tower, width 384, 12 blocks, 224 px (196 patches), random init",
                  "after_block": args.large_after_block, "batch": args.large_batch, "repeats": args.large_repeats,
                  "rows": large},
    }  # fmt: skip
    result["golden_oracle"] = golden_oracle(args)
    atomic_write_json(args.out, result)
    plot(rows, args.plot)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
