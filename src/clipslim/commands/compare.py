"""``clipslim compare``: train and evaluate recipes at N seeds; means with t intervals and paired differences."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="train + evaluate recipes at N seeds; mean, 95%% t interval, paired differences vs the first recipe",
        description="Runs every recipe at seeds 0..N-1 (seed i sets train.seed, so the same seed means the same data "
        "order for every recipe), one run after another, into DIR/runs/<recipe>/seed<i>. Writes DIR/compare.json and "
        "DIR/compare.md. Re-running skips finished runs and resumes an interrupted one.",
    )
    p.add_argument("recipes", nargs="+", help="recipe paths or shipped names; the first is the baseline")
    p.add_argument("--seeds", type=int, default=3, help="seeds per recipe (default 3)")
    p.add_argument("--out", required=True, type=Path, help="output folder (runs/, compare.json, compare.md)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every recipe, e.g. train.steps=20"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> None:
    from ..recipe import resolve_recipe
    from ..workflows.compare import run_compare

    paths = [resolve_recipe(r) for r in args.recipes]
    run_compare(paths, args.out, seeds=args.seeds, overrides=args.set, progress=not args.quiet)
    print((args.out / "compare.md").read_text(encoding="utf-8"), end="")
    print(f"wrote {args.out / 'compare.json'}")
