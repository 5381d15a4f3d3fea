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

from clipslim.eval.retrieval import retrieval_metrics
from clipslim.eval.zeroshot import autocast_ctx, build_classifier, zeroshot_metrics
from clipslim.io import atomic_write_json

RECALL_KS = (1, 5, 10)
DEFAULT_TASK = "zeroshot_classification+zeroshot_retrieval"


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
    """Rows that count for classification (a labelled single-object image), split by held-out class."""
    labels = _meta_tensor(meta, "cls", -1, torch.long)
    single = _meta_tensor(meta, "n_objects", 1, torch.long) == 1
    heldout = _meta_tensor(meta, "heldout", False, torch.bool)
    valid = (labels >= 0) & single
    return {"heldout": valid & heldout, "seen": valid & ~heldout, "all": valid}


def evaluate_features(features: Features, classifier: torch.Tensor) -> dict[str, Any]:
    """Zero-shot classification (C-way over all classes, split held-out/seen) and retrieval on all rows."""
    n = len(features.meta)
    if features.image.shape[0] != n or features.text.shape[0] != n:
        raise ValueError(f"features have {features.image.shape[0]} images, {features.text.shape[0]} texts, {n} metas")
    labels = _meta_tensor(features.meta, "cls", -1, torch.long)
    results: dict[str, Any] = {}
    for split, mask in classification_masks(features.meta).items():
        results[f"zeroshot_{split}"] = zeroshot_metrics(features.image, labels, classifier, mask)
    if n:
        retrieval = retrieval_metrics(features.image, features.text, torch.arange(n), ks=RECALL_KS)
    else:
        retrieval = {f"{d}_retrieval_recall@{k}": math.nan for d in ("image", "text") for k in RECALL_KS}
    results["retrieval"] = {**retrieval, "n": n}
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
    """Evaluate a ``ClipBundle`` on a shapes-style folder (``eval/*.tar``, ``classnames.txt``, ``templates.txt``).

    ``amp`` defaults to on for CUDA, like CLIP_benchmark; on CPU it has no effect.
    """
    from clipslim.data.loader import make_loader  # lazy: data pulls in webdataset and PIL
    from clipslim.data.shapes import read_lines

    data_dir = Path(data_dir)
    amp = torch.device(device).type == "cuda" if amp is None else amp
    classnames, templates = read_lines(data_dir / "classnames.txt"), read_lines(data_dir / "templates.txt")
    model = bundle.model.to(device)
    loader = make_loader(str(data_dir / "eval"), bundle.preprocess_val, bundle.tokenizer, batch_size, train=False)
    features = encode_batches(model, loader, device=device, amp=amp, progress=progress)
    classifier = build_classifier(model, bundle.tokenizer, classnames, templates, device=device, amp=amp)
    return evaluate_features(features, classifier.cpu())


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
