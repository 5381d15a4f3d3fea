"""``icl``: CLIP-KD interactive contrastive learning.

½[CE(τ_c Î_s T_tᵀ, y) + CE(τ_c T̂_s I_tᵀ, y)]: each student embedding is the anchor and the teacher's embeddings of
the other modality are the contrast set, so the student is pulled into the teacher's embedding space.
τ_c is this objective's own learnable scale and the projectors are its own (nothing is shared with ``feature``).

Anchor quirk fixed (distill_methods.md §8.1): CLIP-KD uses its ICL scale raw (≈ 2.66 = ln(1/0.07) at init). Here it
is stored as a log and exponentiated and clamped to ≤ ``max_scale`` like CLIP's own scale, so it starts at 1/0.07.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from .base import Dims, Objective, ObjectiveConfig, Outputs, register
from .clip import diagonal_labels
from .feature import project, projector


@dataclass
class LearnedScaleConfig(ObjectiveConfig):
    scale_init: float = 1 / 0.07
    """Initial value of the learned logit scale (CLIP's 1/0.07)."""
    max_scale: float = 100.0
    """The scale is clamped to at most this (CLIP's rule)."""

    def validate(self, where: str) -> None:
        if not 0.0 < self.scale_init <= self.max_scale:
            raise ConfigError(f"{where}.scale_init: must be in (0, max_scale={self.max_scale}], got {self.scale_init}")


class LearnedScale(nn.Module):
    """exp(log_scale) clamped to ≤ max_scale; a parameter of the objective, so it is trained and checkpointed."""

    def __init__(self, init: float, max_scale: float) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)))
        self.max_scale = max_scale

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)


@register
class IclObjective(Objective):
    name = "icl"
    needs_teacher = True
    Config = LearnedScaleConfig

    def __init__(self, cfg: LearnedScaleConfig, student_dims: Dims, teacher_dims: Dims | None) -> None:
        super().__init__(cfg, student_dims, teacher_dims)
        self.image_proj = projector(student_dims, teacher_dims)
        self.text_proj = projector(student_dims, teacher_dims)
        self.scale = LearnedScale(cfg.scale_init, cfg.max_scale)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        assert teacher is not None, "icl needs teacher outputs"
        scale = self.scale()
        image, text = project(self.image_proj, student.image), project(self.text_proj, student.text)
        rows = student.rows
        loss = 0.5 * (
            _anchor_ce(image, teacher.text.float(), scale, rows) + _anchor_ce(text, teacher.image.float(), scale, rows)
        )
        return {"icl_loss": loss, "icl_scale": scale.detach()}


def _anchor_ce(anchors: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, rows: slice | None) -> torch.Tensor:
    """CE(τ · anchors keysᵀ, y) with y the diagonal (local anchors against global keys in local-loss mode)."""
    labels = diagonal_labels(anchors.shape[0], rows, anchors.device)
    queries = anchors if rows is None else anchors[rows]
    return F.cross_entropy(scale * queries @ keys.T, labels)
