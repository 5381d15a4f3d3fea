"""``fusion``: CLIP-KD augmented feature distillation (AFD).

f_I = norm(W_v [I_s; I_t]) and f_T = norm(W_t [T_s; T_t]) with learned W: Linear(d_s + d_t → d_s), then the CLIP
InfoNCE on (f_I, f_T) with this objective's own learned scale: the teacher's features are fused into the student's
so the contrastive gradient reaches the student through the fusion.

Anchor quirks fixed (distill_methods.md §8.1-8.2): CLIP-KD concatenates the *projected* student embedding (size d_t)
although W expects d_s + d_t inputs, so it crashes whenever d_s ≠ d_t; here the student's own normalised embedding
(size d_s) is concatenated, which matches W and is identical to the anchor when the sizes agree (no projector then).
A projector in front of W would be redundant anyway (two linear maps compose). The fusion scale is exp(log) clamped to
≤ 100 like CLIP's, where CLIP-KD uses it raw.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Dims, Objective, Outputs, register
from .clip import info_nce
from .icl import LearnedScale, LearnedScaleConfig


@register
class FusionObjective(Objective):
    name = "fusion"
    needs_teacher = True
    Config = LearnedScaleConfig

    def __init__(self, cfg: LearnedScaleConfig, student_dims: Dims, teacher_dims: Dims | None) -> None:
        super().__init__(cfg, student_dims, teacher_dims)
        d_s = student_dims.embed_dim
        d_t = teacher_dims.embed_dim if teacher_dims is not None else d_s
        self.image_fuse = nn.Linear(d_s + d_t, d_s)
        self.text_fuse = nn.Linear(d_s + d_t, d_s)
        self.scale = LearnedScale(cfg.scale_init, cfg.max_scale)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        assert teacher is not None, "fusion needs teacher outputs"
        image = _fuse(self.image_fuse, student.image, teacher.image)
        text = _fuse(self.text_fuse, student.text, teacher.text)
        scale = self.scale()
        return {"fusion_loss": info_nce(image, text, scale, student.rows), "fusion_scale": scale.detach()}


def _fuse(layer: nn.Linear, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.normalize(layer(torch.cat([student.float(), teacher.float()], dim=-1)), dim=-1)
