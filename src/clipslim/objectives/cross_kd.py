"""``cross_kd``: CLIP-KD's cross-distillation term (``--alpha_cross_kd_loss``, off in its final recipe).

½[KL(sm(τ_t I_t T_tᵀ) ‖ sm(τ_c Î_s T_tᵀ)) + KL(sm(τ_t T_t I_tᵀ) ‖ sm(τ_c T̂_s I_tᵀ))]: the student's image against
the teacher's texts, and the student's text against the teacher's images, each pulled to the teacher's own
cross-modal distribution for that row (KL with T=1 and batchmean, as CLIP-KD's ``DistillKL``). ICL's logits, with
the teacher's soft targets instead of the diagonal.

τ_t is the teacher's own scale (CLIP-KD) unless ``teacher_scale`` fixes one. τ_c and the projectors are this
objective's own; as in ``icl``, τ_c is stored as a log, exponentiated and clamped (CLIP-KD uses its shared ICL scale
raw, distill_methods.md §8.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError
from .base import Dims, Objective, Outputs, register
from .feature import project, projector
from .icl import LearnedScale, LearnedScaleConfig


@dataclass
class CrossKdConfig(LearnedScaleConfig):
    teacher_scale: float | None = None
    """Fixed teacher logit scale for the targets; null uses the teacher's own (CLIP-KD)."""

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.teacher_scale is not None and not self.teacher_scale > 0:
            raise ConfigError(f"{where}.teacher_scale: must be > 0 or null, got {self.teacher_scale}")


def kl_rows(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Σ_rows KL(sm(target) ‖ sm(logits)) / rows (``F.kl_div(..., reduction='batchmean')``)."""
    log_p = target_logits.log_softmax(1)
    return (log_p.exp() * (log_p - logits.log_softmax(1))).sum(1).mean()


@register
class CrossKdObjective(Objective):
    name = "cross_kd"
    needs_teacher = True
    Config = CrossKdConfig

    def __init__(self, cfg: CrossKdConfig, student_dims: Dims, teacher_dims: Dims | None) -> None:
        super().__init__(cfg, student_dims, teacher_dims)
        self.cfg: CrossKdConfig = cfg
        self.image_proj = projector(student_dims, teacher_dims)
        self.text_proj = projector(student_dims, teacher_dims)
        self.scale = LearnedScale(cfg.scale_init, cfg.max_scale)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        assert teacher is not None, "cross_kd needs teacher outputs"
        scale = self.scale()
        t_scale = teacher.logit_scale if self.cfg.teacher_scale is None else self.cfg.teacher_scale
        rows = slice(None) if student.rows is None else student.rows
        t_image, t_text = teacher.image.float(), teacher.text.float()
        image, text = project(self.image_proj, student.image)[rows], project(self.text_proj, student.text)[rows]
        i2t = kl_rows(t_scale * t_image[rows] @ t_text.T, scale * image @ t_text.T)
        t2i = kl_rows(t_scale * t_text[rows] @ t_image.T, scale * text @ t_image.T)
        return {"cross_kd_loss": 0.5 * (i2t + t2i), "cross_kd_scale": scale.detach()}
