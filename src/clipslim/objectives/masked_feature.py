"""``masked_feature``: CLIP-KD masked feature distillation (MFD).

FD where the student's image tower sees only a random ``keep_ratio`` of its patch tokens (plus CLS) while the
teacher's image embedding comes from the full image. The anchor computes the masked forward and then overwrites it
with the unmasked one (distill_methods.md §8.4), so as released its MFD is FD; this one really masks: the Distiller
runs the extra masked student forward through :meth:`MaskedFeatureObjective.student_view`.

Masking swaps the student ViT's ``patch_dropout`` module (applied by open_clip right after the positional embedding,
before ``ln_pre``) for :class:`KeepPatches` during that one forward, then restores it. Unlike open_clip's
``PatchDropout`` it masks in eval mode too, keeps exactly ``round(keep_ratio · N)`` patches and draws on the tokens'
device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..distributed import current_env
from .base import Dims, Outputs, register
from .feature import FeatureConfig, FeatureObjective


@dataclass
class MaskedFeatureConfig(FeatureConfig):
    keep_ratio: float = 0.25
    """Fraction of patch tokens the student sees (CLIP-KD ``--mask_ratio 0.75`` keeps 0.25); 1.0 is plain FD."""

    def validate(self, where: str) -> None:
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ConfigError(f"{where}.keep_ratio: must be in (0, 1], got {self.keep_ratio}")


def mask_seed(call: int) -> int:
    """Seed of the ``call``-th masked forward: from the process seed, so every rank draws the same global noise."""
    return (torch.initial_seed() + 7919 * call) % 2**63


def kept_patches(num_patches: int, keep_ratio: float) -> int:
    return max(1, round(keep_ratio * num_patches))


class KeepPatches(nn.Module):
    """Keeps the CLS token and a uniformly random ``keep_ratio`` subset of patch tokens per sample.

    With a ``seed`` the noise is drawn for the whole global batch and each rank takes its own rows, so a torchrun
    job masks exactly as one process on the same global batch would.
    """

    def __init__(self, keep_ratio: float, seed: int | None = None) -> None:
        super().__init__()
        self.keep_ratio, self.seed = keep_ratio, seed

    def _noise(self, batch: int, n: int, device: torch.device) -> torch.Tensor:
        if self.seed is None:
            return torch.rand(batch, n, device=device)
        env = current_env()
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.rand(batch * env.world_size, n, generator=g)
        return noise[env.rank * batch : (env.rank + 1) * batch].to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls, patches = x[:, :1], x[:, 1:]
        batch, n, width = patches.shape
        keep = kept_patches(n, self.keep_ratio)
        if keep == n:
            return x
        idx = self._noise(batch, n, x.device).topk(keep, dim=1).indices
        return torch.cat([cls, patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, width))], dim=1)


@register
class MaskedFeatureObjective(FeatureObjective):
    name = "masked_feature"
    Config = MaskedFeatureConfig
    cfg: MaskedFeatureConfig

    def __init__(self, cfg: MaskedFeatureConfig, student_dims: Dims, teacher_dims: Dims | None) -> None:
        super().__init__(cfg, student_dims, teacher_dims)
        # masked forwards so far: seeds the mask noise identically on every rank; a buffer, so a resume continues
        # the same sequence of masks instead of restarting it
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def student_view(self, model: nn.Module, batch: dict[str, Any], student: Outputs) -> Outputs:
        """The student's outputs with the image embedding replaced by a masked forward (text is reused as is)."""
        if self.cfg.keep_ratio == 1.0:
            return student
        visual = model.visual
        if not isinstance(getattr(visual, "patch_dropout", None), nn.Module):
            raise TypeError(f"{self.name} needs an open_clip VisionTransformer student (with .patch_dropout)")
        saved = visual.patch_dropout
        self.calls += 1  # same count on every rank: one masked forward per step
        visual.patch_dropout = KeepPatches(self.cfg.keep_ratio, seed=mask_seed(int(self.calls)))
        try:
            image = model.encode_image(batch["image"], normalize=True)
        finally:
            visual.patch_dropout = saved
        return dataclasses.replace(student, image=image)
