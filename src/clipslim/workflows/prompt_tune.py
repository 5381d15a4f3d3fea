"""`clipslim prompt-tune`: pick the training rows (few-shot, noisy or pseudo-labelled), tune CoOp prompts on frozen
towers, and score them against zero-shot (and a linear probe) on the test features."""

from __future__ import annotations

import argparse
from typing import Any

import torch


def tune_and_score(bundle: Any, train: Any, test: Any, cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Pick the training rows (few-shot / noisy / pseudo-labelled), tune, and score against zero-shot."""
    from ..eval.linear_probe import fewshot_indices, linear_probe
    from ..prompt import PromptLearner, pseudo_labels, symmetric_noise, tune_prompts

    zs_clf, zs = zero_shot(bundle, test)
    setup: dict[str, Any] = {"shots": args.shots, "noise": args.noise, "unsupervised": args.unsupervised, **vars(cfg)}
    if args.unsupervised:
        k = args.shots if args.shots > 0 else len(train.labels)
        logits = train.features @ zs_clf
        rows, labels = pseudo_labels(logits, k, args.min_confidence)
        setup["pseudo_label_accuracy"] = float((labels == train.labels[rows]).float().mean()) if len(rows) else 0.0
    else:
        rows = fewshot_indices(train.labels, args.shots, args.seed)
        labels, flipped = symmetric_noise(train.labels[rows], args.noise, seed=args.seed)
        setup["flipped"] = int(flipped.sum())
    if not len(rows):
        raise ValueError("no training rows (no pseudo-label passed --min-confidence?)")
    setup["n_train"] = len(rows)
    learner = PromptLearner(bundle.model, bundle.tokenizer, train.classnames, cfg.n_ctx, cfg.init).to(args.device)
    losses = tune_prompts(learner, train.features[rows], labels, cfg, progress=not args.quiet)
    out: dict[str, Any] = {"setup": setup, "zeroshot": zs, "prompt": score(learner, test), "final_loss": losses[-1]}
    if args.linear_probe:
        seen = torch.isin(test.labels, labels)
        lp = linear_probe(train.features[rows], labels, test.features[seen], test.labels[seen], seed=args.seed)
        out["linear_probe"] = {"acc1_seen_classes": lp["lp_acc1"], "n": lp["n"], "weight_decay": lp["weight_decay"]}
    out["learner"] = learner
    return out


@torch.no_grad()
def zero_shot(bundle: Any, test: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """The template-ensemble zero-shot classifier and its accuracies on ``test``."""
    from ..eval.zeroshot import build_classifier

    clf = build_classifier(bundle.model, bundle.tokenizer, test.classnames, test.templates).cpu()
    return clf, accuracies((test.features @ clf).argmax(dim=1), test)


@torch.no_grad()
def score(learner: Any, test: Any) -> dict[str, float]:
    from ..prompt import predict

    return accuracies(predict(learner, test.features), test)


def accuracies(pred: torch.Tensor, test: Any) -> dict[str, float]:
    """Top-1 over all test rows, and over seen / held-out classes when the set marks them."""
    out = {"acc1": float((pred == test.labels).float().mean()), "n": len(test.labels)}
    if test.heldout is not None:
        for name, mask in (("seen", ~test.heldout), ("heldout", test.heldout)):
            hits = (pred[mask] == test.labels[mask]).float()
            out[f"{name}_acc1"] = float(hits.mean()) if mask.any() else float("nan")
    return out
