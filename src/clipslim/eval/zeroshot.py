"""Zero-shot classification, with the same classifier and metrics as CLIP_benchmark / open_clip.

Numbers are only comparable with published ones if every detail matches: each template embedding is normalised
before the per-class average, logits are ``100 * img @ W``, ``acc5`` is NaN below 5 classes, and
``mean_per_class_recall`` is sklearn's ``balanced_accuracy_score`` (mean recall over the classes in the labels).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Template = str | Callable[[str], str]


def fill_template(template: Template, classname: str) -> str:
    """Fill a CLIP_benchmark ("{c}") or open_clip ("{}" or callable) template with a class name."""
    if callable(template):
        return template(classname)
    return template.format(classname, c=classname)


def autocast_ctx(device: str | torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """Mixed precision only on CUDA (as CLIP_benchmark does); elsewhere a no-op so CPU results stay fp32."""
    if amp and torch.device(device).type == "cuda":
        return torch.autocast(device_type="cuda")
    return contextlib.nullcontext()


@torch.no_grad()
def build_classifier(
    model: nn.Module,
    tokenizer: Any,
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: str | torch.device = "cpu",
    amp: bool = False,
    batch_size: int = 256,
) -> torch.Tensor:
    """Zero-shot weights ``[d, C]``: per class, the re-normalised mean of its normalised template embeddings."""
    if not classnames or not templates:
        raise ValueError("build_classifier needs at least one class name and one template")
    texts = [fill_template(t, c) for c in classnames for t in templates]
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[start : start + batch_size]).to(device)
            with autocast_ctx(device, amp):
                emb = model.encode_text(tokens)
            chunks.append(F.normalize(emb.float(), dim=-1))
    finally:
        model.train(was_training)
    per_template = torch.cat(chunks).view(len(classnames), len(templates), -1)
    return F.normalize(per_template.mean(dim=1), dim=-1).t().contiguous()


def _select(image_features: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None):
    labels = torch.as_tensor(labels, device=image_features.device).long()
    if mask is not None:
        mask = torch.as_tensor(mask, device=image_features.device).bool()
        image_features, labels = image_features[mask], labels[mask]
    return image_features, labels


def mean_per_class_recall(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Balanced accuracy: recall averaged over the classes that occur in ``labels`` (sklearn's definition)."""
    if labels.numel() == 0:
        return math.nan
    recalls = [(pred[labels == c] == c).double().mean() for c in labels.unique()]
    return torch.stack(recalls).mean().item()


def _topk_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(acc1, acc5) from one ``topk`` call, as CLIP_benchmark's ``accuracy`` does (so ties break the same way)."""
    kmax = 5 if logits.shape[1] >= 5 else 1
    correct = logits.topk(kmax, dim=1, largest=True, sorted=True).indices == labels[:, None]
    acc1 = correct[:, :1].any(dim=1).double().mean().item()
    return acc1, (correct.any(dim=1).double().mean().item() if kmax == 5 else math.nan)


def zeroshot_metrics(
    image_features: torch.Tensor,
    labels: torch.Tensor,
    classifier: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> dict[str, float | int]:
    """``acc1``, ``acc5``, ``mean_per_class_recall`` and ``n`` over the rows where ``mask`` is True."""
    feats, labels = _select(image_features, labels, mask)
    n = int(labels.numel())
    if n == 0:
        return {"acc1": math.nan, "acc5": math.nan, "mean_per_class_recall": math.nan, "n": 0}
    n_classes = classifier.shape[1]
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes}) for the rows evaluated")
    logits = 100.0 * feats.float() @ classifier.to(feats.device).float()
    acc1, acc5 = _topk_accuracy(logits, labels)
    return {
        "acc1": acc1,
        "acc5": acc5,
        "mean_per_class_recall": mean_per_class_recall(logits.argmax(dim=1), labels),
        "n": n,
    }
