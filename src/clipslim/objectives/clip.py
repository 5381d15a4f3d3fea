"""``clip``: the CLIP task loss (symmetric InfoNCE with the student's learned scale).

With ``positives:`` (see :mod:`clipslim.objectives.positives`) each query's target is spread evenly over its mined
positives (identical captions, teacher-mined neighbours): ½[CE(q, τ I Tᵀ) + CE(q, τ T Iᵀ)], q_ij = 1/|P(i)| on P(i).
With no other positive in the batch, q is the diagonal one-hot and this is plain InfoNCE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .base import Dims, Objective, ObjectiveConfig, Outputs, register
from .positives import PositivesConfig, mine_batch, uniform_targets


def contrastive_logits(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float, rows: slice | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image→text and text→image logits; rows are queries (only ``rows`` of them in local-loss mode)."""
    if rows is None:
        logits_per_image = scale * image @ text.T
        return logits_per_image, logits_per_image.T
    return scale * image[rows] @ text.T, scale * text[rows] @ image.T


def diagonal_labels(n: int, rows: slice | None, device: torch.device) -> torch.Tensor:
    """Index of each query's positive: the diagonal of the (global) batch."""
    return torch.arange(n, device=device) if rows is None else torch.arange(rows.start, rows.stop, device=device)


def info_nce(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """½[CE(τ I Tᵀ, y) + CE(τ T Iᵀ, y)] with y the diagonal."""
    per_image, per_text = contrastive_logits(image, text, scale, rows)
    labels = diagonal_labels(image.shape[0], rows, image.device)
    return 0.5 * (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels))


def multi_positive_nce(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, positives: torch.Tensor, rows: slice | None = None
) -> torch.Tensor:
    """½[CE(q, τ I Tᵀ) + CE(q, τ T Iᵀ)] with q uniform over each query's positives (bool [queries, batch])."""
    per_image, per_text = contrastive_logits(image, text, scale, rows)
    target = uniform_targets(positives)
    return -0.5 * ((target * per_image.log_softmax(1)).sum(1).mean() + (target * per_text.log_softmax(1)).sum(1).mean())


@dataclass
class ClipConfig(ObjectiveConfig):
    positives: PositivesConfig | None = None
    """Multi-positive targets over mined positives (null: the diagonal only, plain InfoNCE)."""


@register
class ClipObjective(Objective):
    """Ground-truth pairs; CLIP-KD#8 shows distillation still benefits from keeping it."""

    name = "clip"
    Config = ClipConfig

    def __init__(self, cfg: ClipConfig, student_dims: Dims, teacher_dims: Dims | None) -> None:
        super().__init__(cfg, student_dims, teacher_dims)
        self.cfg: ClipConfig = cfg

    @classmethod
    def reads_teacher(cls, cfg: ObjectiveConfig) -> bool:
        positives = getattr(cfg, "positives", None)
        return positives is not None and positives.needs_teacher

    def forward(self, student: Outputs, teacher: Outputs | None, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.cfg.positives is None:
            return {"clip_loss": info_nce(student.image, student.text, student.logit_scale, student.rows)}
        positives, metrics = mine_batch(self.cfg.positives, self.name, batch, teacher, student.rows)
        loss = multi_positive_nce(student.image, student.text, student.logit_scale, positives, student.rows)
        return {"clip_loss": loss, **metrics}
