"""``gradient``: CLIP-KD gradient distillation (GD).

Matches the student's and the teacher's analytic InfoNCE gradients with respect to the (normalised) embeddings: for
each direction, anchors p and keys k with L = CE(τ p kᵀ, y) averaged over the B rows,

    ∂L/∂p = τ (P − Y) k / B,    ∂L/∂k = τ (P − Y)ᵀ p / B,    P = softmax(τ p kᵀ),

and the loss is the sum of the four MSEs (image→text anchor and key grads, text→image anchor and key grads).
Student gradients use the student's learned scale, teacher gradients the teacher's own scale. When embedding sizes
differ the student embeddings are first projected to the teacher's size and re-normalised (Î_s, as in CLIP-KD), with
projectors owned by this objective.

Anchor quirk fixed (distill_methods.md §8.3): CLIP-KD passes the exponentiated scale as a temperature and divides by
it, so its softmax is almost uniform and the raw loss is ~1e-7 (hence its weight 1e8). These are the true gradients
of the InfoNCE actually used (the student's scale gets gradients through them, as in CLIP-KD). The raw loss scales
like (τ/B)²/d: with the demo's B = d = 128 it is ~4e-4 for a random student at τ_s = 14 (~7e-3 at 50), so a weight
of ~1e3 puts it on the scale of the other terms; it shrinks as 1/B² for larger batches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Dims, Objective, ObjectiveConfig, Outputs, register
from .feature import project, projector


def info_nce_grads(anchors: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients of mean-over-rows CE(scale · anchors keysᵀ, diagonal) w.r.t. anchors and keys."""
    logits = scale * anchors @ keys.T
    residual = logits.softmax(dim=1) - torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype)
    coeff = scale / anchors.shape[0]
    return coeff * residual @ keys, coeff * residual.T @ anchors


@register
class GradientObjective(Objective):
    name = "gradient"
    needs_teacher = True

    def __init__(self, cfg: ObjectiveConfig, student_dims: Dims, teacher_dims: Dims | None) -> None:
        super().__init__(cfg, student_dims, teacher_dims)
        self.image_proj: nn.Module = projector(student_dims, teacher_dims)
        self.text_proj: nn.Module = projector(student_dims, teacher_dims)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        assert teacher is not None, "gradient needs teacher outputs"
        with torch.no_grad():
            t_grads = four_grads(teacher.image.float(), teacher.text.float(), teacher.logit_scale.float())
        image, text = project(self.image_proj, student.image), project(self.text_proj, student.text)
        s_grads = four_grads(image, text, student.logit_scale.float())
        loss = torch.stack([F.mse_loss(s, t) for s, t in zip(s_grads, t_grads, strict=True)]).sum()
        return {"gradient_loss": loss}


def four_grads(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(∂/∂image, ∂/∂text) of image→text CE, then (∂/∂text, ∂/∂image) of text→image CE."""
    return (*info_nce_grads(image, text, scale), *info_nce_grads(text, image, scale))
