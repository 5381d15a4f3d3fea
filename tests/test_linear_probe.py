"""Linear probe: the L-BFGS solver against a hand-solved problem, few-shot selection, CLIP_benchmark's metrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipslim.eval.linear_probe import (
    WEIGHT_DECAYS,
    fewshot_indices,
    fit_logreg,
    linear_probe,
    logreg_objective,
    lp_metrics,
    search_weight_decay,
)


def _bisect(f, lo: float, hi: float) -> float:
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def test_fit_logreg_matches_hand_solved_problem():
    # x=+1 -> class 1, x=-1 -> class 0. By symmetry W = [-a, a], b0 = b1, and the objective is
    # log(1 + exp(-2a)) + wd * a^2, minimised where 1 / (1 + exp(2a)) = wd * a.
    wd = 0.1
    a = _bisect(lambda a: wd * a - 1 / (1 + math.exp(2 * a)), 0.0, 10.0)
    probe = fit_logreg(torch.tensor([[1.0], [-1.0]]), torch.tensor([1, 0]), 2, wd)
    torch.testing.assert_close(probe.weight, torch.tensor([[-a], [a]]), atol=1e-5, rtol=0)
    assert probe.bias[0].item() == pytest.approx(probe.bias[1].item(), abs=1e-6)


def test_fit_logreg_reaches_the_optimum_on_random_data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 8, generator=g), torch.randint(0, 4, (60,), generator=g)
    probe = fit_logreg(x, y, 4, 1e-2).requires_grad_(True)
    logreg_objective(probe, x, y, 1e-2).backward()
    assert probe.weight.grad.abs().max() < 1e-4 and probe.bias.grad.abs().max() < 1e-4


def test_fewshot_indices_keep_k_per_class_in_permutation_order():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    idx = fewshot_indices(labels, 2, seed=3)
    assert torch.bincount(labels[idx]).tolist() == [2, 2, 2]
    # CLIP_benchmark's rule: walk randperm, keep a row while its class has fewer than k -> the first k per class
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    expected = [p for i, p in enumerate(perm) if sum(labels[q] == labels[p] for q in perm[:i]) < 2]
    assert idx.tolist() == expected
    assert torch.equal(fewshot_indices(labels, 2, seed=3), idx)
    assert sorted(fewshot_indices(labels, -1).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="class 1 has only 3"):
        fewshot_indices(labels, 4)


def test_lp_metrics_hand_computed():
    logits = torch.eye(6)[[0, 1, 2, 3, 4, 5, 0]] + torch.linspace(0, 0.1, 6)  # argmax = row's one-hot column
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    m = lp_metrics(logits, labels)
    assert m["lp_acc1"] == pytest.approx(5 / 7)
    # recall per class: 0 -> 1/2, 1 -> 1/2, 2, 3, 4 -> 1; the 5 largest logits of every row exclude column 0 or 1
    assert m["lp_mean_per_class_recall"] == pytest.approx((0.5 + 0.5 + 3) / 5)
    assert math.isnan(m["lp_acc5"])  # largest label is 4 < 5: CLIP_benchmark reports no top-5


def clip_benchmark_accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...]) -> list[float]:
    """CLIP_benchmark 1.6.2's ``accuracy`` with one fix: it calls ``float()`` on a 1-element array, which numpy >= 2.4
    rejects (TypeError), so the sum is taken as a 0-d tensor here. The ranking and hit rule are verbatim."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum(0).item()) / len(target) for k in topk]


def test_lp_metrics_match_clip_benchmark():
    pytest.importorskip("sklearn")
    from sklearn.metrics import balanced_accuracy_score

    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(50, 9, generator=g), torch.randint(0, 9, (50,), generator=g)
    ours = lp_metrics(logits, labels)
    acc1, acc5 = clip_benchmark_accuracy(logits.float(), labels.float(), topk=(1, 5))
    assert ours["lp_acc1"] == pytest.approx(acc1, abs=1e-12) and ours["lp_acc5"] == pytest.approx(acc5, abs=1e-12)
    ref = balanced_accuracy_score(labels, logits.argmax(1))
    assert ours["lp_mean_per_class_recall"] == pytest.approx(ref, abs=1e-12)


def _clusters(n_per_class: int, n_classes: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight clusters around fixed class centres; ``seed`` only changes the noise."""
    centres = F.normalize(torch.randn(n_classes, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    return centres[labels] + 0.05 * torch.randn(len(labels), 16, generator=g), labels


def test_linear_probe_separable_clusters_full_and_fewshot():
    x_train, y_train = _clusters(10)
    x_test, y_test = _clusters(5, seed=1)
    full = linear_probe(x_train, y_train, x_test, y_test)
    assert full["lp_acc1"] == 1.0 and full["lp_acc5"] == 1.0 and full["lp_mean_per_class_recall"] == 1.0
    assert full["n_train"] == 60 and full["n"] == 30 and full["weight_decay"] in WEIGHT_DECAYS
    assert set(full["val_acc1"]) == set(WEIGHT_DECAYS) and full["fewshot_k"] == -1
    few = linear_probe(x_train, y_train, x_test, y_test, fewshot_k=2, seed=5)
    assert few["n_train"] == 12 and few["fewshot_k"] == 2 and few["lp_acc1"] == 1.0


def test_search_weight_decay_takes_first_of_ties_and_best_otherwise():
    x, y = _clusters(6)
    wd, scores = search_weight_decay((x, y), (x, y), 6, weight_decays=(1e-4, 1e-2))
    assert scores == {1e-4: 1.0, 1e-2: 1.0} and wd == 1e-4
    # 3:1 imbalance: a huge weight decay leaves only the bias, i.e. the majority class, which scores 1/2 on a
    # balanced val split; a small one separates the clusters. The better one wins even when listed second.
    x2, y2 = _clusters(12, n_classes=2)
    train = torch.cat([torch.arange(0, 9), torch.arange(12, 15)])
    val = torch.cat([torch.arange(9, 12), torch.arange(15, 18)])
    wd, scores = search_weight_decay((x2[train], y2[train]), (x2[val], y2[val]), 2, weight_decays=(100.0, 1e-4))
    assert scores == {100.0: 0.5, 1e-4: 1.0} and wd == 1e-4


def test_linear_probe_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="one label per feature"):
        linear_probe(torch.randn(4, 3), torch.tensor([0, 1]), torch.randn(2, 3), torch.tensor([0, 1]))
