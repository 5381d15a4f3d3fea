"""`clipslim dedup`: embed every training image with a teacher, find near-duplicates (faiss), write a keep-list.

A recipe trains on the kept samples only with ``data.keep_list: LIST``; the others are skipped before decoding and
counted as ``not_in_keep_list``. The report (``LIST.report.json``, also printed) gives the counts, how many dropped
samples share their kept twin's caption or class (shapes meta), and example pairs across the similarity range.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.dedup import Duplicates, near_duplicates
from ..data.loader import DataError, make_loader
from ..io import atomic_write_json, atomic_write_text
from ..models import load_model

log = logging.getLogger(__name__)


@dataclass
class Embedded:
    """Per sample, in data order: key, teacher image embedding, a caption fingerprint and its class (-1: none)."""

    keys: list[str] = field(default_factory=list)
    chunks: list[np.ndarray] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    classes: list[int] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def add(self, batch: dict[str, Any], image: torch.Tensor) -> None:
        self.keys += batch["key"]
        self.chunks.append(image.float().cpu().numpy())
        self.captions += [hashlib.blake2b(row.numpy().tobytes(), digest_size=8).hexdigest() for row in batch["text"]]
        self.classes += [int(m.get("cls", -1)) if int(m.get("n_objects", 1)) == 1 else -1 for m in batch["meta"]]
        for kind, count in batch["skipped"].items():
            self.skipped[kind] = self.skipped.get(kind, 0) + count

    @property
    def embeddings(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros((0, 1), np.float32)


@torch.no_grad()
def embed_images(teacher: str, data: str | Path, batch_size: int, device: str) -> Embedded:
    """The teacher's L2-normalised image embedding of every readable sample (its eval transform)."""
    bundle = load_model(teacher, device=device)
    model = bundle.model.eval()
    out = Embedded()
    for batch in make_loader(str(data), bundle.preprocess_val, bundle.tokenizer, batch_size, train=False):
        out.add(batch, model.encode_image(batch["image"].to(device), normalize=True))
    return out


def _check_keys(keys: list[str], data: str | Path) -> None:
    """A keep-list names samples by key, so two samples with one key (e.g. in two shards) would be ambiguous."""
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            raise DataError(f"{data}: sample key '{key}' occurs more than once; a keep-list needs unique keys")
        seen.add(key)


def _examples(pairs: list[tuple[int, int, float]], emb: Embedded, count: int) -> list[dict[str, Any]]:
    """``count`` pairs spread over the similarity range, least similar (the threshold's edge) first."""
    ranked = sorted(pairs, key=lambda p: p[2])
    picks = sorted({round(q) for q in np.linspace(0, len(ranked) - 1, count)}) if ranked and count else []
    rows = []
    for i, j, sim in (ranked[p] for p in picks):
        row = {"kept": emb.keys[i], "dropped": emb.keys[j], "cosine": round(sim, 4)}
        row["same_caption"] = emb.captions[i] == emb.captions[j]
        if emb.classes[i] >= 0 and emb.classes[j] >= 0:
            row["classes"] = [emb.classes[i], emb.classes[j]]
        rows.append(row)
    return rows


def report_of(emb: Embedded, found: Duplicates, threshold: float, k: int, examples: int) -> dict[str, Any]:
    n, kept = len(emb.keys), int(found.keep.sum())
    labelled = [(i, j) for i, j, _ in found.pairs if emb.classes[i] >= 0 and emb.classes[j] >= 0]
    return {
        "samples": n, "kept": kept, "dropped": n - kept, "dropped_fraction": round((n - kept) / max(n, 1), 6),
        "threshold": threshold, "k": k, "saturated": found.saturated,
        "dropped_same_caption": sum(emb.captions[i] == emb.captions[j] for i, j, _ in found.pairs),
        "dropped_same_class": sum(emb.classes[i] == emb.classes[j] for i, j in labelled) if labelled else None,
        "dropped_labelled": len(labelled), "skipped": dict(emb.skipped),
        "examples": _examples(found.pairs, emb, examples),
    }  # fmt: skip


def dedup(
    teacher: str,
    data: str | Path,
    threshold: float,
    out: str | Path,
    *,
    k: int = 32,
    batch_size: int = 256,
    device: str = "cpu",
    examples: int = 6,
    report_path: str | Path | None = None,
) -> dict[str, Any]:
    """Write the keep-list ``out`` (kept sample keys in data order) and its report; return the report."""
    if not -1.0 <= threshold <= 1.0 or k < 1:
        raise DataError(f"need a cosine threshold in [-1, 1] and k >= 1 (got {threshold}, {k})")
    emb = embed_images(teacher, data, batch_size, device)
    if not emb.keys:
        raise DataError(f"{data}: no readable samples to deduplicate")
    _check_keys(emb.keys, data)
    found = near_duplicates(emb.embeddings, threshold, k)
    report = {"teacher": teacher, "data": str(data), **report_of(emb, found, threshold, k, examples)}
    kept = [key for key, keep in zip(emb.keys, found.keep, strict=True) if keep]
    report["keep_list"] = str(atomic_write_text(out, "\n".join(kept) + "\n"))
    report_path = Path(report_path) if report_path else Path(f"{out}.report.json")
    report["report"] = str(atomic_write_json(report_path, report))
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The report in a few printable lines: counts, a saturation warning, the example pairs, where files went."""
    r = report
    line = (
        f"{r['samples']} samples: kept {r['kept']}, dropped {r['dropped']} ({r['dropped_fraction']:.1%}) at cosine >= "
        f"{r['threshold']}; {r['dropped_same_caption']} dropped share their kept twin's caption"
    )
    if r["dropped_labelled"]:
        line += f", {r['dropped_same_class']} of {r['dropped_labelled']} labelled its class"
    lines = [line]
    if r["saturated"]:
        lines.append(f"{r['saturated']} samples had >= {r['k']} near-duplicates: raise --k to see them all")
    for ex in r["examples"]:
        same = "  (same caption)" if ex["same_caption"] else ""
        lines.append(f"  cosine {ex['cosine']:.4f}  kept {ex['kept']}  dropped {ex['dropped']}{same}")
    lines.append(f"wrote {r['keep_list']} and {r['report']}")
    return lines
