"""Zero-shot retrieval recall@k with CLIP_benchmark's names and definitions, computed in chunks of queries.

CLIP_benchmark builds the full texts x images score matrix; at COCO/Flickr scale with many captions that is large,
so here each chunk of queries is scored, ranked with ``torch.topk`` (exactly as CLIP_benchmark ranks, so ties break
the same way) and dropped. A query's row never depends on other rows, so the result is independent of ``chunk``.

One subtlety: an fp32 matrix product rounds differently for different shapes (a 1-row chunk vs a 1024-row one
differ in the last bit), which would break exactly tied scores (duplicate images or captions) differently per
chunk size. Scores are therefore accumulated in fp64 and rounded to fp32, which makes ties exact and the result
chunk-independent; away from ties this equals CLIP_benchmark's fp32 scores to within one fp32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _check(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor) -> None:
    if text_to_image.shape != (text_features.shape[0],):
        raise ValueError(f"text_to_image must have one entry per text ({text_features.shape[0]})")
    n_images = image_features.shape[0]
    if text_to_image.numel() and (text_to_image.min() < 0 or text_to_image.max() >= n_images):
        raise ValueError(f"text_to_image values must lie in [0, {n_images})")


def _recall(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    is_positive: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ks: Sequence[int],
    chunk: int,
) -> dict[int, float]:
    """Fraction of queries with a positive among their top-k; ``is_positive(rows, top_idx) -> bool[b, k]``."""
    hits = dict.fromkeys(ks, 0)
    n = queries.shape[0]
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n), device=queries.device)
        scores = (queries[rows].double() @ candidates.double().t()).float()
        for k in ks:
            top = scores.topk(min(k, scores.shape[1]), dim=1, largest=True, sorted=True).indices
            hits[k] += int(is_positive(rows, top).any(dim=1).sum())
    return {k: hits[k] / max(n, 1) for k in ks}


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """``image_retrieval_recall@k`` (text->image) and ``text_retrieval_recall@k`` (image->text, any caption hits).

    ``text_to_image[j]`` is the index of the image that text ``j`` describes; an image may have several texts.
    A k larger than the candidate pool counts as the whole pool (CLIP_benchmark would fail instead).
    """
    if any(k < 1 for k in ks):
        raise ValueError(f"recall k must be >= 1, got {list(ks)}")
    text_to_image = torch.as_tensor(text_to_image, device=text_features.device).long()
    _check(image_features, text_features, text_to_image)
    images, texts = image_features.float(), text_features.float().to(image_features.device)
    t2i = text_to_image.to(images.device)
    img_recall = _recall(texts, images, lambda rows, top: top == t2i[rows, None], ks, chunk)
    txt_recall = _recall(images, texts, lambda rows, top: t2i[top] == rows[:, None], ks, chunk)
    metrics = {f"image_retrieval_recall@{k}": img_recall[k] for k in ks}
    metrics.update({f"text_retrieval_recall@{k}": txt_recall[k] for k in ks})
    return metrics


def class_retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    image_labels: torch.Tensor,
    chunk: int = 1024,
) -> dict[str, float]:
    """Class-level R@1: a hit when the top-ranked item has the query's class, not only when it is the very item.

    Instance R@1 says little when captions repeat ("a red star" describes hundreds of images): any of the matching
    images is a correct answer, so this counts one. ``image_labels[i]`` is image i's class.
    """
    text_to_image = torch.as_tensor(text_to_image, device=text_features.device).long()
    _check(image_features, text_features, text_to_image)
    images, texts = image_features.float(), text_features.float().to(image_features.device)
    labels = torch.as_tensor(image_labels, device=images.device).long()
    if labels.shape != (images.shape[0],):
        raise ValueError(f"image_labels must have one entry per image ({images.shape[0]})")
    text_labels = labels[text_to_image.to(images.device)]
    img = _recall(texts, images, lambda rows, top: labels[top] == text_labels[rows, None], (1,), chunk)
    txt = _recall(images, texts, lambda rows, top: text_labels[top] == labels[rows, None], (1,), chunk)
    return {"image_retrieval_class_recall@1": img[1], "text_retrieval_class_recall@1": txt[1]}
