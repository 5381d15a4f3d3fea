"""Linear probe (and few-shot linear probe) on cached image features, with CLIP_benchmark's metric names.

CLIP_benchmark trains a ``nn.Linear`` with minibatch AdamW on CUDA only; the CLIP paper used sklearn's L-BFGS
logistic regression. Here the probe is that convex problem solved full-batch with ``torch.optim.LBFGS``, which is
deterministic, needs no learning rate and runs in seconds on a CPU: minimise
``mean cross-entropy + weight_decay / 2 * ||W||^2`` (bias not penalised), ``weight_decay`` picked on a validation
split from a small log grid. What matches CLIP_benchmark exactly is everything around the solver:

- metrics ``lp_acc1``, ``lp_acc5`` (NaN unless the largest test label is >= 5, as there) and
  ``lp_mean_per_class_recall`` (sklearn's balanced accuracy);
- few-shot selection: walk a ``randperm`` of the training rows and keep each row while its class has < k;
- with a validation split, the full probe is refit on train + val and the few-shot probe on its k-shot rows only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipslim.eval.zeroshot import mean_per_class_recall

WEIGHT_DECAYS: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
VAL_FRACTION = 0.2


def fewshot_indices(labels: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Rows of a k-shot subset, chosen as CLIP_benchmark chooses them; ``k < 0`` keeps every row (in perm order).

    Raises when a class has fewer than ``k`` rows (CLIP_benchmark prints "insufficient data" and returns None).
    """
    labels = torch.as_tensor(labels).long().cpu()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    counts: dict[int, int] = {}
    keep = []
    for p in perm.tolist():
        c = int(labels[p])
        counts[c] = counts.get(c, 0)
        if k < 0 or counts[c] < k:
            counts[c] += 1
            keep.append(p)
    short = sorted(c for c, n in counts.items() if k > 0 and n != k)
    if short:
        raise ValueError(f"few-shot k={k}: class {short[0]} has only {counts[short[0]]} training samples")
    return torch.tensor(keep, dtype=torch.long)


def fit_logreg(
    features: torch.Tensor, labels: torch.Tensor, n_classes: int, weight_decay: float, max_iter: int = 100
) -> nn.Linear:
    """Multinomial logistic regression by full-batch L-BFGS from zero weights (convex, so zero init is exact).

    Solved in float64: in float32 the flat objective near the optimum stops L-BFGS ~1e-4 short of it.
    """
    x = features.double().cpu()
    y = torch.as_tensor(labels).long().cpu()
    probe = nn.Linear(x.shape[1], n_classes, dtype=torch.float64)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    opt = torch.optim.LBFGS(
        probe.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = logreg_objective(probe, x, y, weight_decay)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return probe.float().requires_grad_(False)


def logreg_objective(probe: nn.Linear, x: torch.Tensor, y: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """What ``fit_logreg`` minimises: mean cross-entropy plus ``weight_decay / 2 * ||W||^2``."""
    return F.cross_entropy(probe(x), y) + 0.5 * weight_decay * probe.weight.square().sum()


def lp_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``lp_acc1``, ``lp_acc5``, ``lp_mean_per_class_recall`` exactly as CLIP_benchmark's linear_probe computes them."""
    labels = torch.as_tensor(labels).long()
    if labels.numel() == 0:
        return {"lp_acc1": math.nan, "lp_acc5": math.nan, "lp_mean_per_class_recall": math.nan}
    with_top5 = int(labels.max()) >= 5  # CLIP_benchmark's rule (`target.max() >= 5`), not the number of classes
    top = logits.float().topk(5 if with_top5 else 1, dim=1, largest=True, sorted=True).indices
    correct = top == labels[:, None]
    return {
        "lp_acc1": correct[:, :1].any(dim=1).double().mean().item(),
        "lp_acc5": correct.any(dim=1).double().mean().item() if with_top5 else math.nan,
        "lp_mean_per_class_recall": mean_per_class_recall(logits.argmax(dim=1), labels),
    }


def _accuracy(probe: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    return (probe(x.float()).argmax(dim=1) == y).double().mean().item()


def search_weight_decay(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    n_classes: int,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
) -> tuple[float, dict[float, float]]:
    """The weight decay with the best validation top-1 (first one on ties, as CLIP_benchmark's ``find_peak``)."""
    scores = {wd: _accuracy(fit_logreg(*train, n_classes, wd), *val) for wd in weight_decays}
    best = max(scores.values())
    return next(wd for wd in weight_decays if scores[wd] == best), scores


def _split_val(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, val rows): a seeded random ``fraction`` of ``n`` rows held out for the weight-decay search."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    n_val = int(round(n * fraction)) if n > 1 else 0
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    fewshot_k: int = -1,
    seed: int = 0,
    val_fraction: float = VAL_FRACTION,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
    normalize: bool = True,
) -> dict[str, Any]:
    """Fit a probe on (a k-shot subset of) the training features and score it on the test features.

    A seeded ``val_fraction`` of the training rows plays CLIP_benchmark's validation split: few-shot rows are drawn
    from the rest, the weight decay is searched on it, then the full probe is refit on all training rows and the
    few-shot probe on its k-shot rows only. Without validation rows the smallest weight decay is used.
    """
    train_labels = torch.as_tensor(train_labels).long().cpu()
    test_labels = torch.as_tensor(test_labels).long().cpu()
    if len(train_labels) == 0 or len(train_features) != len(train_labels) or len(test_features) != len(test_labels):
        raise ValueError("linear probe needs training rows and one label per feature row")
    x_train, x_test = train_features.float().cpu(), test_features.float().cpu()
    if normalize:
        x_train, x_test = F.normalize(x_train, dim=-1), F.normalize(x_test, dim=-1)
    n_classes = int(max(train_labels.max(), test_labels.max() if len(test_labels) else 0)) + 1
    fit_rows, val_rows = _split_val(len(train_labels), val_fraction, seed)
    if fewshot_k > 0:
        fit_rows = fit_rows[fewshot_indices(train_labels[fit_rows], fewshot_k, seed)]
    if len(val_rows):
        train = (x_train[fit_rows], train_labels[fit_rows])
        wd, scores = search_weight_decay(train, (x_train[val_rows], train_labels[val_rows]), n_classes, weight_decays)
    else:
        wd, scores = min(weight_decays), {}
    final_rows = torch.arange(len(train_labels)) if fewshot_k < 0 else fit_rows
    probe = fit_logreg(x_train[final_rows], train_labels[final_rows], n_classes, wd)
    metrics: dict[str, Any] = lp_metrics(probe(x_test), test_labels)
    metrics.update({"weight_decay": wd, "fewshot_k": fewshot_k, "seed": seed, "normalized": normalize})
    metrics.update({"n_train": len(final_rows), "n": len(test_labels), "val_acc1": scores})
    return metrics
