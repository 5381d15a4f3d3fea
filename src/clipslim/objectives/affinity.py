"""``affinity``: TinyCLIP affinity mimicking (= CLIP-KD "CRD" = MobileCLIP's distillation loss).

The student's image→text and text→image softmaxes are pulled towards the teacher's, computed at a fixed teacher
scale that is separate from the student's learned scale. Soft-target cross-entropy equals KL up to the teacher's
entropy, which carries no gradient.

Several teachers (MobileCLIP's ensemble): the teacher embedding is the concatenation of K teachers' embeddings;
``teacher_slices`` says each one's size. Each slice is re-L2-normalised, gets its own scale, and the K softmax
targets are averaged *after* the softmax (``--distill-average-after-softmax``), not the logits.

A sigmoid teacher (SigLIP: logits τ_t I Tᵀ + b, trained with a pairwise sigmoid loss) gives the same kind of target:
the row softmax of its logits, i.e. its image→text and text→image ranking of the batch. The bias b is one constant
per matrix, so it cancels in the softmax and is ignored; with ``teacher_scale: null`` the SigLIP's own learned scale
τ_t (≈ 10 at init, ≈ 100+ trained) sets the sharpness, otherwise the fixed scale does. The teacher's per-pair
sigmoid probabilities are not used: a softmax student is taught the teacher's ranking, not its calibration.

With ``positives:`` (see :mod:`clipslim.objectives.positives`) the teacher's probability mass on each query's mined
positives is shared evenly among them: a positive the teacher ranks low is no longer taught as a near-negative, the
negatives keep the teacher's values, and a query without other positives keeps the plain target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..config import ConfigError
from .base import Dims, Objective, ObjectiveConfig, Outputs, register
from .clip import contrastive_logits
from .positives import PositivesConfig, mine_batch, spread

WHERE = "objectives.affinity"


@dataclass
class AffinityConfig(ObjectiveConfig):
    teacher_scale: float | None = 50.0
    """Fixed teacher logit scale (TinyCLIP 50, MobileCLIP 100); null uses the teacher's own learned scale."""
    teacher_slices: list[int] | None = None
    """Sizes of each teacher's slice of the concatenated teacher embedding (MobileCLIP: [768, 768]); null: one."""
    teacher_scales: list[float] | None = None
    """One fixed scale per slice (MobileCLIP2: [70, 60]); null uses ``teacher_scale`` for every slice."""
    positives: PositivesConfig | None = None
    """Spread the teacher's targets over mined positives (null: the teacher's softmax as is)."""

    def validate(self, where: str) -> None:
        if self.teacher_slices is not None and (not self.teacher_slices or min(self.teacher_slices) < 1):
            raise ConfigError(
                f"{where}.teacher_slices: expected a non-empty list of sizes >= 1, got {self.teacher_slices}"
            )
        k = len(self.teacher_slices) if self.teacher_slices is not None else 1
        if self.teacher_scales is not None and len(self.teacher_scales) != k:
            raise ConfigError(
                f"{where}.teacher_scales: expected {k} scale(s) (one per teacher slice), got {self.teacher_scales}"
            )
        if self.teacher_scales is not None and min(self.teacher_scales) <= 0:
            raise ConfigError(f"{where}.teacher_scales: scales must be > 0, got {self.teacher_scales}")


def soft_cross_entropy(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of −Σ softmax(target) · log_softmax(logits)."""
    return soft_cross_entropy_probs(target_logits.softmax(dim=1), logits)


def soft_cross_entropy_probs(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of −Σ target · log_softmax(logits), for targets that are already probabilities."""
    return -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()


@register
class AffinityObjective(Objective):
    name = "affinity"
    needs_teacher = True
    Config = AffinityConfig

    def __init__(self, cfg: AffinityConfig, student_dims: Dims, teacher_dims: Dims | None) -> None:
        super().__init__(cfg, student_dims, teacher_dims)
        self.cfg: AffinityConfig = cfg
        cfg.validate(WHERE)  # again, for configs built in code rather than from a recipe
        slices = cfg.teacher_slices
        if slices is not None and teacher_dims is not None and sum(slices) != teacher_dims.embed_dim:
            raise ConfigError(
                f"{WHERE}.teacher_slices: sizes {slices} sum to {sum(slices)}, not the teacher embed_dim "
                f"{teacher_dims.embed_dim}"
            )

    def _scale(self, k: int, teacher: Outputs) -> float | torch.Tensor:
        if self.cfg.teacher_scales is not None:
            return self.cfg.teacher_scales[k]
        return teacher.logit_scale if self.cfg.teacher_scale is None else self.cfg.teacher_scale

    def targets(self, teacher: Outputs, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher image→text and text→image probabilities, averaged over teachers after the softmax."""
        image, text = teacher.image.float(), teacher.text.float()
        slices = self.cfg.teacher_slices or [image.shape[-1]]
        p_i2t, p_t2i = image.new_zeros(()), image.new_zeros(())
        for k, (img, txt) in enumerate(zip(image.split(slices, -1), text.split(slices, -1), strict=True)):
            if self.cfg.teacher_slices is not None:  # each teacher's slice is its own unit-norm embedding
                img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
            i2t, t2i = contrastive_logits(img, txt, self._scale(k, teacher), rows)
            p_i2t = p_i2t + i2t.softmax(dim=1) / len(slices)
            p_t2i = p_t2i + t2i.softmax(dim=1) / len(slices)
        return p_i2t, p_t2i

    def forward(self, student: Outputs, teacher: Outputs | None, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        assert teacher is not None, "affinity needs teacher outputs"
        p_i2t, p_t2i = self.targets(teacher, student.rows)
        metrics: dict[str, torch.Tensor] = {}
        if self.cfg.positives is not None:
            positives, metrics = mine_batch(self.cfg.positives, self.name, batch, teacher, student.rows)
            p_i2t, p_t2i = spread(p_i2t, positives), spread(p_t2i, positives)
        s_i2t, s_t2i = contrastive_logits(student.image, student.text, student.logit_scale, student.rows)
        loss = 0.5 * (soft_cross_entropy_probs(p_i2t, s_i2t) + soft_cross_entropy_probs(p_t2i, s_t2i))
        return {"affinity_loss": loss, **metrics}
