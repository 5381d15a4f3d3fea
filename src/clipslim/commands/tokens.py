"""Token compression commands: ``prune-tokens`` (inference pruning) and ``token-schedule`` (training schedule
search)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..tokens.options import FitOptions


def cmd_prune_tokens(args: argparse.Namespace) -> None:
    from ..tokens.prune import PruneConfig
    from ..workflows.prune_tokens import prune_tokens

    cfg = PruneConfig(args.after_block, args.keep, args.ranking, args.extra_tokens)
    opts = FitOptions(args.calib_images, args.golden_images, args.predictor_steps, args.token_steps)
    report = prune_tokens(args.model, args.data, args.out, cfg, opts, progress=not args.quiet)
    print(json.dumps({k: report[k] for k in ("before", "after", "speed")}, indent=2))
    print(f"pruned model: {args.out} (loads pruned with clipslim; prune_tokens.json has the numbers)")


def cmd_token_schedule(args: argparse.Namespace) -> None:
    from ..recipe import load_recipe, resolve_recipe
    from ..workflows.token_search import search_schedule

    recipe = load_recipe(resolve_recipe(args.recipe), args.set)
    result = search_schedule(recipe, args.out, budget=args.budget, trial_fraction=args.trial_fraction,
                             progress=not args.quiet)  # fmt: skip
    print(json.dumps(result["trials"], indent=2))
    print(f"best: {result['best']}; recipe with it: {Path(args.out) / 'recipe.yaml'}")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune-tokens", help="learned token pruning for inference: fit, save a model that runs pruned")
    p.add_argument("--model", required=True, help="model spec (an open_clip ViT), e.g. shapes-teacher:demo")
    p.add_argument("--data", required=True, type=Path, help="shapes-style folder: calibration from train/, eval/")
    p.add_argument("--out", required=True, type=Path, help="output folder (open_clip weights + token_pruning.*)")
    p.add_argument("--keep", type=float, default=0.6, help="fraction of patch tokens kept (CLS always kept)")
    p.add_argument("--after-block", type=int, default=1, help="prune the output of this image block (0-based)")
    p.add_argument("--ranking", default="predictor", choices=["predictor", "attention", "random"])
    p.add_argument("--extra-tokens", type=int, default=0, help="learnable tokens appended after pruning")
    fit = FitOptions()
    p.add_argument("--calib-images", type=int, default=fit.calib_images, help="calibration images (from DATA/train)")
    p.add_argument("--golden-images", type=int, default=fit.golden_images, help="images ranked by greedy search")
    p.add_argument("--predictor-steps", type=int, default=fit.predictor_steps, help="ranking predictor steps")
    p.add_argument("--token-steps", type=int, default=fit.token_steps, help="distillation steps of learnable tokens")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_prune_tokens)

    s = sub.add_parser("token-schedule", help="pick a token dropout / patch scale schedule for a compute budget")
    s.add_argument("recipe", help="recipe to accelerate (its tokens: section is replaced by each candidate)")
    s.add_argument("--out", required=True, type=Path, help="folder: trials, search.json, recipe.yaml")
    s.add_argument("--budget", type=float, default=1.0, help="compute budget as a multiple of the recipe's steps")
    s.add_argument("--trial-fraction", type=float, default=0.25, help="trial runs use this fraction of the budget")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=cmd_token_schedule)
