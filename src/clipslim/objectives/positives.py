"""Multi-positive mining: which other pairs of the (gathered) batch are positives of each query.

Image–caption data repeats itself (shapes batches share captions and classes), so plain InfoNCE and affinity targets
push a student away from true positives. ``clip`` and ``affinity`` take a ``positives:`` option that spreads their
targets over a mined positive set:

- exact caption matches (identical token ids, ``batch["text"]``) always, when ``captions: true``;
- teacher-mined positives by a cascade of stages (Cascade Positive Retrieval, CPR): the first stage keeps the top-k
  and/or above-threshold candidates of the whole batch by one view (e.g. the teacher's image embedding), each next
  stage narrows the previous stage's candidates by another view (the teacher's text embedding, or caption equality).

Mining reads the teacher's outputs, which are the cached embeddings under ``data.teacher_cache``, and runs on the
gathered batch under torchrun (token ids and class labels are gathered here, without gradient). When the batch meta
has class labels (shapes: ``cls`` of a single-object sample), each stage's recall and precision against them are
reported: recall = mined same-class pairs / all same-class pairs among the queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..config import ConfigError
from ..distributed import gather_constant
from ..outputs import Outputs


@dataclass
class MineStage:
    """One cascade stage: keeps part of its candidates by one view's similarity to the query."""

    view: Literal["image", "text", "caption"] = "image"
    """image / text: cosine of the teacher's image / text embeddings; caption: identical token ids."""
    top_k: int | None = None
    """Keep the k most similar candidates (the query itself never counts)."""
    threshold: float | None = None
    """Keep candidates with cosine >= threshold (with top_k: the top k of those)."""

    def validate(self, where: str) -> None:
        if self.view == "caption":
            if self.top_k is not None or self.threshold is not None:
                raise ConfigError(f"{where}: a caption stage keeps identical captions; drop top_k/threshold")
            return
        if self.top_k is None and self.threshold is None:
            raise ConfigError(f"{where}: a {self.view} stage needs top_k, threshold or both")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"{where}.top_k: must be >= 1, got {self.top_k}")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"{where}.threshold: a cosine in [-1, 1], got {self.threshold}")


@dataclass
class PositivesConfig:
    captions: bool = True
    """Pairs whose captions are identical (same token ids) are positives of each other."""
    cascade: list[MineStage] = field(default_factory=list)
    """Teacher-mined positives: stage 1 mines from the whole batch, each next stage narrows the previous one's set;
    the last stage's set joins the caption matches. Empty: caption matches only."""

    def validate(self, where: str) -> None:
        if not self.captions and not self.cascade:
            raise ConfigError(f"{where}: mines nothing (captions: false and no cascade); drop positives instead")

    @property
    def needs_teacher(self) -> bool:
        return any(stage.view != "caption" for stage in self.cascade)

    def stage_names(self) -> list[str]:
        return [f"{i + 1}_{stage.view}" for i, stage in enumerate(self.cascade)]


@dataclass
class Mined:
    """Positive sets of the queries (rows) over the gathered batch (columns)."""

    positives: torch.Tensor
    """bool [queries, batch]: each query's positives, itself included (its target spreads over these)."""
    stages: dict[str, torch.Tensor]
    """bool [queries, batch] without the query itself: ``captions`` and each cascade stage's set, for metrics."""


def query_index(n: int, rows: slice | None, device: torch.device) -> torch.Tensor:
    """Batch index of each query (all rows, or this rank's rows in local-loss mode)."""
    return torch.arange(n, device=device) if rows is None else torch.arange(rows.start, rows.stop, device=device)


def caption_ids(tokens: torch.Tensor) -> torch.Tensor:
    """One id per distinct token row: equal ids are identical captions."""
    return torch.unique(tokens, dim=0, return_inverse=True)[1]


def _keep(stage: MineStage, candidates: torch.Tensor, sims: torch.Tensor) -> torch.Tensor:
    keep = candidates if stage.threshold is None else candidates & (sims >= stage.threshold)
    if stage.top_k is not None:
        k = min(stage.top_k, sims.shape[1])
        top = sims.masked_fill(~keep, float("-inf")).topk(k, dim=1).indices
        keep = keep & torch.zeros_like(keep).scatter_(1, top, True)
    return keep


@torch.no_grad()
def mine(cfg: PositivesConfig, tokens: torch.Tensor, teacher: Outputs | None, rows: slice | None) -> Mined:
    """Positive sets from gathered token ids [n, L] and (gathered) teacher outputs; see the module docstring."""
    n, device = tokens.shape[0], tokens.device
    query = query_index(n, rows, device)
    others = torch.ones(len(query), n, dtype=torch.bool, device=device)
    others[torch.arange(len(query), device=device), query] = False
    ids = caption_ids(tokens)
    same_caption = (ids[query][:, None] == ids[None, :]) & others
    stages = {"captions": same_caption}
    candidates = others
    for name, stage in zip(cfg.stage_names(), cfg.cascade, strict=True):
        if stage.view == "caption":
            candidates = candidates & same_caption
        else:
            if teacher is None:
                raise RuntimeError(f"positives: a {stage.view} stage mines from teacher outputs, but none were given")
            view = (teacher.image if stage.view == "image" else teacher.text).float()
            candidates = _keep(stage, candidates, view[query] @ view.T)
        stages[name] = candidates
    positives = ~others | (same_caption if cfg.captions else torch.zeros_like(others))
    if cfg.cascade:
        positives = positives | candidates
    return Mined(positives, stages)


def class_labels(batch: dict[str, Any], device: torch.device) -> torch.Tensor | None:
    """Class of each sample from its meta (``cls`` of a single-object sample, else -1), gathered like the features;
    None when the batch has no meta."""
    meta = batch.get("meta")
    if not meta:
        return None
    labels = [int(m.get("cls", -1)) if int(m.get("n_objects", 1)) == 1 else -1 for m in meta]
    return gather_constant(torch.tensor(labels, dtype=torch.long, device=device))


def mining_metrics(prefix: str, mined: Mined, labels: torch.Tensor | None, rows: slice | None) -> dict:
    """Mean extra positives per query; per stage, recall and precision against class labels when there are any
    (a pair counts when both samples are labelled; single batches are noisy, so average the logged rows)."""
    extra = mined.positives.sum(1).float() - 1
    out = {f"{prefix}_positives": extra.mean()}
    if labels is None:
        return out
    query = query_index(labels.shape[0], rows, labels.device)
    labelled = (labels[query][:, None] >= 0) & (labels[None, :] >= 0)
    truth = (labels[query][:, None] == labels[None, :]) & labelled
    truth[torch.arange(len(query), device=labels.device), query] = False
    if not truth.any():
        return out
    final = mined.positives.clone()
    final[torch.arange(len(query), device=labels.device), query] = False
    for name, found in {**mined.stages, "all": final}.items():
        hits, judged = (found & truth).sum().float(), (found & labelled).sum()
        out[f"{prefix}_mine_recall_{name}"] = hits / truth.sum()
        if judged:  # precision of an empty set is undefined: left out of this step's row
            out[f"{prefix}_mine_precision_{name}"] = hits / judged
    return out


def mine_batch(
    cfg: PositivesConfig, prefix: str, batch: dict[str, Any], teacher: Outputs | None, rows: slice | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Positive mask [queries, batch] and metrics for one (local) batch: token ids and labels are gathered first."""
    tokens = batch.get("text")
    if tokens is None:
        raise RuntimeError(f"{prefix}: positives need the batch's token ids (batch['text'])")
    tokens = gather_constant(tokens)
    mined = mine(cfg, tokens, teacher, rows)
    return mined.positives, mining_metrics(prefix, mined, class_labels(batch, tokens.device), rows)


def uniform_targets(positives: torch.Tensor) -> torch.Tensor:
    """Each query's target spread evenly over its positives (the diagonal one-hot when it has no other)."""
    mask = positives.float()
    return mask / mask.sum(1, keepdim=True)


def spread(probs: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Teacher probabilities with the mass on each query's positives shared evenly among them: negatives keep the
    teacher's values, and a query with no other positive keeps its row unchanged."""
    mask = positives.float()
    pooled = (probs * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
    return probs * (1 - mask) + pooled * mask
