"""Randomised patch-token dropout for training (FLIP), with a ratio a schedule can change between steps.

Replaces the ViT's ``patch_dropout`` module (open_clip applies it right after the position embeddings). Unlike
open_clip's ``PatchDropout`` the ratio is mutable and the count exact (``round((1 - ratio)·N)`` patches, CLS always
kept, noise drawn on the tokens' device); like it, eval mode passes every token through.
"""

from __future__ import annotations

import torch
from torch import nn

from ..objectives.masked_feature import KeepPatches


class ScheduledPatchDropout(nn.Module):
    """Keeps CLS plus a uniformly random ``1 - ratio`` of the patch tokens of each sample, in training mode only."""

    def __init__(self, ratio: float = 0.0) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.ratio == 0.0:
            return x
        return KeepPatches(1.0 - self.ratio)(x)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}"
