"""Run a model over an eval split once, then score the cached features for every metric.

Encoding is the expensive part, so it happens once (``encode_batches``); everything after works on the
``Features`` it returns and is cheap and unit-testable without a data loader (``evaluate_features``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from clipslim.eval.retrieval import class_retrieval_metrics, retrieval_metrics
from clipslim.eval.zeroshot import autocast_ctx, build_classifier, zeroshot_metrics
from clipslim.io import atomic_write_json

RECALL_KS = (1, 5, 10)
DEFAULT_TASK = "zeroshot_classification+zeroshot_retrieval"
SHAPES_EVAL_SPLITS = ("eval", "ood")  # shapes splits scored by eval: in-distribution, then the held-out style


@dataclass
class Features:
    """L2-normalised embeddings of an eval split (row i of ``image`` and ``text`` come from sample i)."""

    image: torch.Tensor  # [N, d] float32, CPU
    text: torch.Tensor  # [N, d] float32, CPU
    meta: list[dict[str, Any]]
    skipped: dict[str, int] = field(default_factory=dict)
    key: list[str] = field(default_factory=list)


def _encode(model: nn.Module, batch: Mapping[str, Any], device: str | torch.device, amp: bool):
    images = batch["image"].to(device, non_blocking=True)
    tokens = batch["text"].to(device, non_blocking=True)
    with autocast_ctx(device, amp):
        img, txt = model.encode_image(images), model.encode_text(tokens)
    # Normalise in fp32: under autocast the raw features are fp16/bf16.
    return F.normalize(img.float(), dim=-1).cpu(), F.normalize(txt.float(), dim=-1).cpu()


@torch.no_grad()
def encode_batches(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    device: str | torch.device = "cpu",
    amp: bool = False,
    progress: bool = True,
) -> Features:
    """Encode every batch in eval mode (restoring the model's mode after), collecting meta/keys/skip counts.

    ``skipped`` is summed over batches, i.e. each batch is expected to report the samples it skipped itself.
    """
    was_training = model.training
    model.eval()
    images, texts, meta, keys, skipped = [], [], [], [], {}
    try:
        for batch in tqdm(batches, desc="eval", unit="batch", disable=not progress, leave=False):
            img, txt = _encode(model, batch, device, amp)
            images.append(img)
            texts.append(txt)
            meta.extend(batch.get("meta") or [{} for _ in range(len(img))])
            keys.extend(batch.get("key") or [])
            for name, count in (batch.get("skipped") or {}).items():
                skipped[name] = skipped.get(name, 0) + int(count)
    finally:
        model.train(was_training)
    if not images:
        return Features(torch.empty(0, 0), torch.empty(0, 0), [], skipped, [])
    return Features(torch.cat(images), torch.cat(texts), meta, skipped, keys)


def _meta_tensor(meta: list[dict[str, Any]], name: str, default: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([m.get(name, default) for m in meta], dtype=dtype)


def classification_masks(meta: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Rows that count for classification (a labelled single-object image): in-distribution ones (``all``) split by
    held-out class, and ``ood`` (shapes' ood split: a rendering style never trained on, all classes)."""
    labels = _meta_tensor(meta, "cls", -1, torch.long)
    single = _meta_tensor(meta, "n_objects", 1, torch.long) == 1
    heldout = _meta_tensor(meta, "heldout", False, torch.bool)
    ood = _meta_tensor(meta, "ood", False, torch.bool)
    valid = (labels >= 0) & single
    indist = valid & ~ood
    return {"heldout": indist & heldout, "seen": indist & ~heldout, "all": indist, "ood": valid & ood}


def evaluate_features(features: Features, classifier: torch.Tensor) -> dict[str, Any]:
    """Zero-shot classification (C-way over all classes; held-out / seen / ood groups) and retrieval over the
    in-distribution rows, with class-level R@1 (a hit when the top item has the query's class) beside instance R@1."""
    n = len(features.meta)
    if features.image.shape[0] != n or features.text.shape[0] != n:
        raise ValueError(f"features have {features.image.shape[0]} images, {features.text.shape[0]} texts, {n} metas")
    labels = _meta_tensor(features.meta, "cls", -1, torch.long)
    results: dict[str, Any] = {}
    for split, mask in classification_masks(features.meta).items():
        results[f"zeroshot_{split}"] = zeroshot_metrics(features.image, labels, classifier, mask)
    rows = ~_meta_tensor(features.meta, "ood", False, torch.bool)
    m = int(rows.sum())
    if m:
        image, text = features.image[rows], features.text[rows]
        retrieval = retrieval_metrics(image, text, torch.arange(m), ks=RECALL_KS)
        if bool((labels[rows] >= 0).all()):
            retrieval.update(class_retrieval_metrics(image, text, torch.arange(m), labels[rows]))
    else:
        retrieval = {f"{d}_retrieval_recall@{k}": math.nan for d in ("image", "text") for k in RECALL_KS}
    results["retrieval"] = {**retrieval, "n": m}
    results["skipped"] = dict(features.skipped)
    return results


def evaluate_shapes(
    bundle: Any,
    data_dir: str | Path,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = True,
    amp: bool | None = None,
) -> dict[str, Any]:
    """Evaluate a ``ClipBundle`` on a shapes-style folder (``eval/*.tar``, ``classnames.txt``, ``templates.txt``,
    and ``ood/*.tar`` when present: its rows form the ``zeroshot_ood`` group).

    ``amp`` defaults to on for CUDA, like CLIP_benchmark; on CPU it has no effect.
    """
    from clipslim.data.shapes import read_lines

    data_dir = Path(data_dir)
    amp = torch.device(device).type == "cuda" if amp is None else amp
    classnames, templates = read_lines(data_dir / "classnames.txt"), read_lines(data_dir / "templates.txt")
    model = bundle.model.to(device)
    features = encode_shapes_eval(bundle, data_dir, batch_size, device, amp, progress)
    classifier = build_classifier(model, bundle.tokenizer, classnames, templates, device=device, amp=amp)
    return evaluate_features(features, classifier.cpu())


def concat_features(parts: list[Features]) -> Features:
    """One Features from several splits (rows in order; skip counts summed)."""
    skipped: dict[str, int] = {}
    for part in parts:
        for name, count in part.skipped.items():
            skipped[name] = skipped.get(name, 0) + count
    parts = [p for p in parts if len(p.meta)] or parts[:1]
    image, text = torch.cat([p.image for p in parts]), torch.cat([p.text for p in parts])
    return Features(image, text, [m for p in parts for m in p.meta], skipped, [k for p in parts for k in p.key])


def encode_shapes_eval(
    bundle: Any,
    data_dir: str | Path,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    amp: bool = False,
    progress: bool = True,
) -> Features:
    """Features of a shapes folder's ``eval/`` split, plus its ``ood/`` split when the folder has one (v2+)."""
    from clipslim.data.loader import make_loader  # lazy: data pulls in webdataset and PIL

    data_dir, parts = Path(data_dir), []
    for split in SHAPES_EVAL_SPLITS:
        folder = data_dir / split
        if split != "eval" and not any(folder.glob("*.tar")):
            continue
        loader = make_loader(str(folder), bundle.preprocess_val, bundle.tokenizer, batch_size, train=False)
        parts.append(encode_batches(bundle.model.to(device), loader, device=device, amp=amp, progress=progress))
    return concat_features(parts)


def split_model_spec(spec: str) -> tuple[str, str]:
    """(model, pretrained) as CLIP_benchmark names them: ``arch:tag`` splits; hub ids and folders stay whole."""
    if spec.startswith(("hf-hub:", "local-dir:")):
        return spec, ""
    model, _, pretrained = spec.partition(":")
    return model, pretrained


def _json_safe(obj: Any) -> Any:
    """NaN/inf become null so the file is strict JSON (CLIP_benchmark writes bare NaN for acc5)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def write_results(
    path: str | Path,
    results: Mapping[str, Any],
    model_spec: str,
    dataset: str,
    *,
    task: str = DEFAULT_TASK,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write a CLIP_benchmark-shaped result file (``dataset, model, pretrained, task, metrics``) atomically.

    Metric groups go under ``metrics``; ``skipped`` counts, the full spec and ``extra`` are clipslim additions.
    """
    model, pretrained = split_model_spec(model_spec)
    metrics = {k: v for k, v in results.items() if k != "skipped"}
    doc = {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "metrics": metrics}
    doc.update({"language": "en", "model_spec": model_spec, "skipped": dict(results.get("skipped", {}))})
    doc.update(extra or {})
    atomic_write_json(path, _json_safe(doc))
