"""``feature``: CLIP-KD feature distillation (FD).

MSE(norm(P_v I_s), I_t) + MSE(norm(P_t T_s), T_t). ``P`` is a learned ``Linear(d_s, d_t)`` only when the embedding
sizes differ (identity otherwise, as in CLIP-KD); it lives in this module, so the Distiller trains and checkpoints it.
``F.mse_loss`` averages over the embedding dimension too, which is why CLIP-KD weights this term by 2000.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Dims, Objective, ObjectiveConfig, Outputs, register


def projector(student_dims: Dims, teacher_dims: Dims | None) -> nn.Module:
    """``Linear(d_s, d_t)`` when the sizes differ, else a parameter-free identity. Every objective owns its own."""
    if teacher_dims is None or teacher_dims.embed_dim == student_dims.embed_dim:
        return nn.Identity()
    return nn.Linear(student_dims.embed_dim, teacher_dims.embed_dim)


def project(proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Project a student embedding into the teacher's space and re-normalise it (Î_s in CLIP-KD)."""
    return F.normalize(proj(x).float(), dim=-1)


@dataclass
class FeatureConfig(ObjectiveConfig):
    text: bool = True
    """Also match the text embeddings (CLIP-KD does); false keeps only the image term."""


@register
class FeatureObjective(Objective):
    name = "feature"
    needs_teacher = True
    Config = FeatureConfig

    def __init__(self, cfg: FeatureConfig, student_dims: Dims, teacher_dims: Dims | None) -> None:
        super().__init__(cfg, student_dims, teacher_dims)
        self.cfg: FeatureConfig = cfg
        self.image_proj = projector(student_dims, teacher_dims)
        # No unused parameters when the text term is off (DDP would complain about parameters without gradients).
        self.text_proj = projector(student_dims, teacher_dims) if cfg.text else nn.Identity()

    def forward(self, student: Outputs, teacher: Outputs | None, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        assert teacher is not None, f"{self.name} needs teacher outputs"
        image = F.mse_loss(project(self.image_proj, student.image), teacher.image.float())
        out = {f"{self.name}_image_mse": image.detach()}
        loss = image
        if self.cfg.text:
            text = F.mse_loss(project(self.text_proj, student.text), teacher.text.float())
            out[f"{self.name}_text_mse"] = text.detach()
            loss = loss + text
        return {f"{self.name}_loss": loss, **out}
