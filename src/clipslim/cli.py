"""`clipslim <command>`: a thin layer that parses arguments and calls the library.

Every user error (bad recipe key, missing file, unknown model) ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError

RECIPES_DIR = Path(__file__).parent / "recipes"


def resolve_recipe(name: str) -> Path:
    """A recipe path, or the name of a recipe shipped with clipslim (``clipslim recipes`` lists them)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"recipe not found: {name} (neither a file nor one of: {', '.join(_recipe_names())})")


def _recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def cmd_data(args: argparse.Namespace) -> None:
    from .data.shapes import write_shapes

    info = write_shapes(args.out, n_train=args.train, n_eval=args.eval, seed=args.seed, workers=args.workers)
    print(json.dumps(info["splits"]))


def cmd_train(args: argparse.Namespace) -> None:
    from .recipe import load_recipe
    from .train import train

    recipe = load_recipe(resolve_recipe(args.recipe), args.set)
    out = args.out or Path("runs") / recipe.name
    results = train(recipe, out, resume=args.resume, progress=not args.quiet)
    print(json.dumps(results.get("eval") or results, indent=2, default=str))
    print(f"run dir: {out}")


def cmd_eval(args: argparse.Namespace) -> None:
    from .eval.run import evaluate_shapes, write_results
    from .models import load_model

    all_results = {}
    for spec in args.model:
        bundle = load_model(spec, device=args.device)
        results = evaluate_shapes(bundle, args.data, batch_size=args.batch_size, device=args.device)
        all_results[spec] = results
        if args.out:
            name = spec.replace("/", "_").replace(":", "_")
            write_results(Path(args.out) / f"{name}.json", results, spec, str(args.data))
    print(json.dumps(all_results, indent=2, default=str))


def cmd_export(args: argparse.Namespace) -> None:
    import torch

    from .export import export_open_clip
    from .models import load_model

    b = load_model(args.model)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    out = export_open_clip(
        b.model, b.model_cfg, args.out, preprocess_cfg=b.preprocess_cfg, arch=b.arch, dtype=dtype,
        extra={"source": args.model},
    )  # fmt: skip
    print(f"wrote {out}: load with open_clip.create_model_and_transforms('local-dir:{out}')")


def cmd_models(args: argparse.Namespace) -> None:
    import open_clip

    from .models import CONFIG_DIR

    ours = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    print("clipslim configs: " + ", ".join(ours))
    if args.all:
        print("open_clip configs: " + ", ".join(open_clip.list_models()))


def cmd_recipes(args: argparse.Namespace) -> None:
    for name in _recipe_names():
        print(f"{name:24s} {RECIPES_DIR / (name + '.yaml')}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), steps=args.steps, data_dir=Path(args.data))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipslim", description="Make CLIP models small and fast, with numbers.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="write an embedded dataset as webdataset shards")
    d.add_argument("dataset", choices=["shapes"], help="which dataset to generate")
    d.add_argument("--out", required=True, type=Path, help="output folder (train/, eval/, classnames.txt, ...)")
    d.add_argument("--train", type=int, default=40000, help="training pairs (default 40000)")
    d.add_argument("--eval", type=int, default=2048, help="evaluation images, balanced over 64 classes")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--workers", type=int, default=2, help="processes drawing shards in parallel")
    d.set_defaults(fn=cmd_data)

    t = sub.add_parser("train", help="train or distill a student from a recipe")
    t.add_argument("recipe", help="recipe YAML path, or a shipped recipe name (see `clipslim recipes`)")
    t.add_argument("--out", type=Path, help="run directory (default runs/<recipe name>)")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.steps=20")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="zero-shot (held-out / seen classes) and retrieval R@1/5/10")
    e.add_argument("--model", action="append", required=True, help="model spec; repeat to compare several")
    e.add_argument("--data", required=True, type=Path, help="shapes-style folder (eval/*.tar, classnames.txt)")
    e.add_argument("--out", type=Path, help="folder for one CLIP_benchmark-style JSON per model")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--device", default="cpu")
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export", help="save a model as an open_clip hub-format folder (loads in stock open_clip)")
    x.add_argument("--model", required=True, help="model spec, e.g. runs/demo/demo-distill/student")
    x.add_argument("--out", required=True, type=Path, help="output folder")
    x.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="weights dtype on disk")
    x.set_defaults(fn=cmd_export)

    m = sub.add_parser("models", help="list model configs clipslim registers with open_clip")
    m.add_argument("--all", action="store_true", help="also list open_clip's own configs")
    m.set_defaults(fn=cmd_models)

    r = sub.add_parser("recipes", help="list shipped recipes")
    r.set_defaults(fn=cmd_recipes)

    demo = sub.add_parser("demo", help="teacher → inherited+distilled student vs from-scratch student, ~10 min CPU")
    demo.add_argument("--out", default="runs/demo", help="where runs, table and plot go")
    demo.add_argument("--data", default=".data/shapes", help="where the shapes data is generated (cached)")
    demo.add_argument("--steps", type=int, default=None, help="training steps per student (default: recipe's)")
    demo.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    fn: Callable[[argparse.Namespace], None] = args.fn
    try:
        fn(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"clipslim {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
