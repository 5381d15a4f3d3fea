"""``affinity``: TinyCLIP affinity mimicking (= CLIP-KD "CRD" = MobileCLIP's distillation loss).

The student's image→text and text→image softmaxes are pulled towards the teacher's, computed at a fixed teacher
scale that is separate from the student's learned scale. Soft-target cross-entropy equals KL up to the teacher's
entropy, which carries no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import Dims, Objective, ObjectiveConfig, Outputs, register
from .clip import contrastive_logits


@dataclass
class AffinityConfig(ObjectiveConfig):
    teacher_scale: float | None = 50.0
    """Fixed teacher logit scale (TinyCLIP 50, MobileCLIP 100); null uses the teacher's own learned scale."""


def soft_cross_entropy(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of −Σ softmax(target) · log_softmax(logits)."""
    return -(target_logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1).mean()


@register
class AffinityObjective(Objective):
    name = "affinity"
    needs_teacher = True
    Config = AffinityConfig

    def __init__(self, cfg: AffinityConfig, student_dims: Dims, teacher_dims: Dims | None) -> None:
        super().__init__(cfg, student_dims, teacher_dims)
        self.cfg: AffinityConfig = cfg

    def forward(self, student: Outputs, teacher: Outputs | None, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        assert teacher is not None, "affinity needs teacher outputs"
        scale = teacher.logit_scale if self.cfg.teacher_scale is None else self.cfg.teacher_scale
        t_i2t, t_t2i = contrastive_logits(teacher.image.float(), teacher.text.float(), scale)
        s_i2t, s_t2i = contrastive_logits(student.image, student.text, student.logit_scale)
        loss = 0.5 * (soft_cross_entropy(t_i2t, s_i2t) + soft_cross_entropy(t_t2i, s_t2i))
        return {"affinity_loss": loss}
