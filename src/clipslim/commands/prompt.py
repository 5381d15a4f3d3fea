"""``clipslim prompt-tune``: CoOp context vectors for a frozen model, optionally on noisy or pseudo labels."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prompt-tune",
        help="learn CoOp prompt context for a frozen model (few-shot, noisy or pseudo labels)",
        description="Learn '[V1]..[Vm] {classname}.' context vectors with both towers frozen, on a few shots per "
        "class from a labelled set (shapes folder, ImageFolder with train/ and test/, or a filepath,label CSV), "
        "then score them against zero-shot (and a linear probe on the same features with --linear-probe).",
    )
    p.add_argument("--model", required=True, help="model spec (clipslim student, hub folder, open_clip arch:tag)")
    p.add_argument("--data", required=True, help="labelled training data")
    p.add_argument("--test", help="labelled test data (default: the eval/test split of --data)")
    p.add_argument("--out", required=True, help="where to write the prompts (.safetensors)")
    p.add_argument("--results", help="also write the metrics as JSON here")
    p.add_argument("--shots", type=int, default=16, help="labelled images per class (-1: all)")
    p.add_argument("--noise", type=float, default=0.0, help="fraction of training labels flipped (symmetric noise)")
    p.add_argument("--unsupervised", action="store_true", help="ignore labels: zero-shot pseudo-labels, top-k/class")
    p.add_argument("--min-confidence", type=float, default=0.0, help="unsupervised: minimum zero-shot probability")
    p.add_argument("--n-ctx", type=int, default=4, help="number of context vectors")
    p.add_argument("--init", default="a photo of a", help="words that initialise the context ('' for random)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-images", type=int, default=4096, help="training images read from --data")
    p.add_argument("--linear-probe", action="store_true", help="also fit a linear probe on the same rows/labels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=run_prompt_tune)


def run_prompt_tune(args: argparse.Namespace) -> None:
    from ..models import load_model
    from ..prompt import TuneConfig, labelled_features, save_prompts

    cfg = TuneConfig(args.n_ctx, args.init or None, args.steps, args.lr, args.batch_size, seed=args.seed)
    cfg.validate("--")
    if not 0.0 <= args.noise <= 1.0:
        raise ValueError(f"--noise: expected a fraction in [0, 1], got {args.noise}")
    if args.shots == 0 or args.shots < -1:
        raise ValueError(f"--shots: expected a count >= 1 or -1 (all), got {args.shots}")
    for path in (args.data, args.test):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"data not found: {path}")
    bundle = load_model(args.model, device=args.device)
    read = dict(device=args.device, progress=not args.quiet)
    train = labelled_features(bundle, args.data, "train", max_images=args.max_images, **read)
    test = labelled_features(bundle, args.test or args.data, "eval", **read)
    if train.classnames != test.classnames:
        raise ValueError("--test: its class names differ from the training data's")
    from ..workflows.prompt_tune import tune_and_score

    results = tune_and_score(bundle, train, test, cfg, args)
    save_prompts(results.pop("learner"), args.out, extra={"model": args.model, **results["setup"]})
    results["prompts"] = str(args.out)
    if args.results:
        from ..io import atomic_write_json

        atomic_write_json(args.results, results)
    print(json.dumps({k: v for k, v in results.items() if k != "setup"}, indent=2))
