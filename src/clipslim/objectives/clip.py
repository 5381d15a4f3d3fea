"""``clip``: the CLIP task loss (symmetric InfoNCE with the student's learned scale)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import Objective, Outputs, register


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


@register
class ClipObjective(Objective):
    """Ground-truth pairs; CLIP-KD#8 shows distillation still benefits from keeping it."""

    name = "clip"

    def forward(self, student: Outputs, teacher: Outputs | None, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"clip_loss": info_nce(student.image, student.text, student.logit_scale, student.rows)}
