"""CoOp prompt tuning under label noise vs a linear probe, and unsupervised pseudo-label tuning (issue #9).

For each model (frozen towers), on the shapes demo data:

- few-shot: 16 labelled images per class from the training pool (52 seen classes); symmetric noise at 0/25/50% of
  the labels (the same rows and the same flipped labels for both methods). CoOp learns 4 context vectors (init
  "a photo of a"); the linear probe (``eval/linear_probe.py``: L-BFGS logistic regression, weight decay chosen on a
  20% split of the same noisy rows) sees the same image features. Scored on the eval set: seen classes (both
  methods) and held-out classes (prompts only: a probe has no weights for classes it never saw);
- unsupervised: no labels. Zero-shot predictions on an unlabelled pool, the 16 most confident images per predicted
  class become pseudo-labels, the prompt is tuned on them. Two pools: the first half of the eval set (the target
  distribution, all 64 classes; scored on the other half) and the training pool (seen classes only; scored on the
  second eval half too). Reported against plain zero-shot (template ensemble) on the same rows.

Writes ``benchmarks/results/prompt_noise.json``. Single seed; the machine is shared (no timings reported).

    python benchmarks/prompt_noise.py
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from clipslim.eval.linear_probe import fewshot_indices, linear_probe
from clipslim.eval.zeroshot import build_classifier
from clipslim.io import atomic_write_json
from clipslim.models import load_model
from clipslim.prompt import (
    LabelledFeatures,
    PromptLearner,
    TuneConfig,
    labelled_features,
    predict,
    pseudo_labels,
    symmetric_noise,
    tune_prompts,
)

log = logging.getLogger("prompt_noise")
DEFAULT_MODELS = (
    "shapes-teacher:demo",
    "runs/demo-final/demo-distill/student",
    "runs/slimmable_compare/slimmable/slices/w25",
)


def acc(pred: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if mask is not None:
        pred, labels = pred[mask], labels[mask]
    return round(100 * float((pred == labels).float().mean()), 2) if len(labels) else float("nan")


def split_scores(pred: torch.Tensor, test: LabelledFeatures) -> dict[str, float]:
    assert test.heldout is not None
    return {"all": acc(pred, test.labels), "seen": acc(pred, test.labels, ~test.heldout),
            "heldout": acc(pred, test.labels, test.heldout)}  # fmt: skip


def subset(feats: LabelledFeatures, rows: torch.Tensor | slice) -> LabelledFeatures:
    held = feats.heldout[rows] if feats.heldout is not None else None
    return LabelledFeatures(feats.features[rows], feats.labels[rows], feats.classnames, feats.templates, held)


def tuned(bundle: Any, names: list[str], x: torch.Tensor, y: torch.Tensor, cfg: TuneConfig) -> PromptLearner:
    learner = PromptLearner(bundle.model, bundle.tokenizer, names, cfg.n_ctx, cfg.init)
    tune_prompts(learner, x, y, cfg)
    return learner


def noisy_fewshot(bundle: Any, train: LabelledFeatures, test: LabelledFeatures, args: argparse.Namespace) -> dict:
    cfg = TuneConfig(steps=args.steps, seed=args.seed)
    rows = fewshot_indices(train.labels, args.shots, args.seed)
    x, y = train.features[rows], train.labels[rows]
    seen = ~test.heldout
    out = {}
    for rate in args.noise:
        noisy, flipped = symmetric_noise(y, rate, seed=args.seed)
        prompt = split_scores(predict(tuned(bundle, train.classnames, x, noisy, cfg), test.features), test)
        lp = linear_probe(x, noisy, test.features[seen], test.labels[seen], seed=args.seed)
        probe = {"seen": round(100 * lp["lp_acc1"], 2), "weight_decay": lp["weight_decay"]}
        out[str(rate)] = {"flipped": int(flipped.sum()), "n_train": len(y), "prompt": prompt, "linear_probe": probe}
        log.info("noise %.2f: prompt %s, linear probe %s", rate, prompt, out[str(rate)]["linear_probe"])
    return out


def unsupervised(bundle: Any, pool: LabelledFeatures, test: LabelledFeatures, clf: torch.Tensor, args) -> dict:
    cfg = TuneConfig(steps=args.steps, seed=args.seed)
    rows, labels = pseudo_labels(pool.features @ clf, args.pseudo_k, args.min_confidence)
    learner = tuned(bundle, pool.classnames, pool.features[rows], labels, cfg)
    return {
        "n_pseudo": len(rows),
        "pseudo_label_accuracy": acc(labels, pool.labels[rows]),
        "classes_with_pseudo_labels": len(labels.unique()),
        "zeroshot": split_scores((test.features @ clf).argmax(dim=1), test),
        "prompt": split_scores(predict(learner, test.features), test),
    }


def run_model(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    bundle = load_model(spec)
    train = labelled_features(bundle, args.data, "train", max_images=args.max_images)
    test = labelled_features(bundle, args.data, "eval")
    clf = build_classifier(bundle.model, bundle.tokenizer, test.classnames, test.templates).cpu()
    out: dict[str, Any] = {"zeroshot": split_scores((test.features @ clf).argmax(dim=1), test)}
    out["fewshot"] = noisy_fewshot(bundle, train, test, args)
    half = len(test.labels) // 2
    target_pool, target_test = subset(test, slice(0, half)), subset(test, slice(half, None))
    out["unsupervised_target_pool"] = unsupervised(bundle, target_pool, target_test, clf, args)
    out["unsupervised_train_pool"] = unsupervised(bundle, train, target_test, clf, args)
    log.info("%s unsupervised: %s", spec, json.dumps(out["unsupervised_target_pool"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="model specs (missing folders skipped)")
    p.add_argument("--data", default=".data/shapes")
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--max-images", type=int, default=6144, help="training pool read from data/train")
    p.add_argument("--pseudo-k", type=int, default=8, help="unsupervised: pseudo-labels per class")
    p.add_argument("--min-confidence", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="benchmarks/results/prompt_noise.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results: dict[str, Any] = {"models": {}}
    for spec in args.models:
        if "/" in spec and not Path(spec).exists():
            log.warning("skipping %s: not found", spec)
            continue
        results["models"][spec] = run_model(spec, args)
    keys = ("shots", "noise", "steps", "max_images", "pseudo_k", "min_confidence", "seed")
    results.update({k: getattr(args, k) for k in keys})
    results["command"] = "python " + " ".join(sys.argv)
    results["note"] = (
        "Frozen towers; 4 context vectors (init 'a photo of a'), AdamW lr 2e-3 cosine, batch 128. Few-shot rows "
        "and flipped labels identical for prompt and probe. Probe scored on seen classes only. Single seed; shared "
        "machine."
    )
    atomic_write_json(args.json, results)
    print(json.dumps(results["models"], indent=1))


if __name__ == "__main__":
    main()
