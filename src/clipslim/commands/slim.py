"""``clipslim slice``: cut one width out of a slimmable (Scala) checkpoint as a plain open_clip model folder."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "slice",
        help="extract one width of a slimmable model as a stock open_clip model folder",
        description="Cut the sub-network at --width out of a slimmable checkpoint (e.g. RUN/student) and write an "
        "open_clip hub folder (stock open_clip loads it with local-dir:). The slicing layout (widths, isolated "
        "activation, slimmed towers) is read from RUN/recipe.yaml next to the model folder unless given here.",
    )
    p.add_argument("--model", required=True, help="the slimmable model (a run's student folder or any model spec)")
    p.add_argument("--width", type=float, required=True, help="width ratio to extract, e.g. 0.5")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--recipe", help="recipe of the slimmable run (default: recipe.yaml next to the model folder)")
    p.add_argument("--widths", help="comma-separated trained widths, e.g. 0.25,0.5,0.75,1 (overrides the recipe)")
    p.add_argument("--no-isolated", action="store_true", help="the model was trained without isolated activation")
    p.add_argument("--text", action="store_true", help="the text tower was slimmed too")
    p.set_defaults(fn=run_slice)


def _slim_options(args: argparse.Namespace) -> dict[str, Any]:
    """Trained widths / isolation / towers: flags over the run's recipe over the recipe defaults."""
    from ..objectives.slimmable import SlimmableConfig
    from ..recipe import load_recipe

    cfg = SlimmableConfig()
    recipe = Path(args.recipe) if args.recipe else Path(args.model.removeprefix("local-dir:")).parent / "recipe.yaml"
    if args.recipe and not recipe.is_file():
        raise FileNotFoundError(f"--recipe: {recipe} not found")
    if recipe.is_file():
        spec = next((s for s in load_recipe(recipe).objective_specs() if s.name == "slimmable"), None)
        if spec is None and args.recipe:
            raise ValueError(f"--recipe: {recipe} has no slimmable objective")
        if spec is not None:
            cfg = spec.cfg  # type: ignore[assignment]
            log.info("slicing layout from %s", recipe)
    widths = cfg.widths
    if args.widths:
        try:
            widths = [float(w) for w in args.widths.split(",") if w.strip()]
        except ValueError as err:
            raise ValueError(f"--widths: expected comma-separated numbers, got '{args.widths}'") from err
    isolated = cfg.isolated and not args.no_isolated
    return {"widths": widths, "isolated": isolated, "text": cfg.text or args.text}


def run_slice(args: argparse.Namespace) -> None:
    from ..export import export_open_clip
    from ..models import count_params, load_model
    from ..slimmable import SlimmableCLIP
    from ..workflows.slice import slice_gap

    opts = _slim_options(args)
    bundle = load_model(args.model)
    towers = ("visual", "text") if opts["text"] else ("visual",)
    slim = SlimmableCLIP(bundle.model.eval(), [*opts["widths"], args.width], isolated=opts["isolated"], towers=towers)
    if not any(abs(args.width - w) < 1e-9 for w in opts["widths"]) and args.width != 1.0:
        log.warning("width %s was not among the trained widths %s", args.width, opts["widths"])
    small, cfg = slim.extract(args.width, bundle.model_cfg)
    gap = slice_gap(slim, small, args.width, bundle)
    extra = {"slimmable": {"source": args.model, "width": args.width, "layout": slim.layout(args.width), **opts}}
    extra["slimmable"]["max_abs_diff"] = gap
    out = export_open_clip(small, cfg, args.out, preprocess_cfg=bundle.preprocess_cfg, extra=extra)
    n = count_params(small)
    print(json.dumps({"out": str(out), "width": args.width, "layout": slim.layout(args.width), **n.as_dict(),
                      "max_abs_diff": gap}))  # fmt: skip
