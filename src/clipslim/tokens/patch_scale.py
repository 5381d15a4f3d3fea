"""Flexible patch scaling (FlexiViT-style) as a training-time view of an open_clip ViT.

At patch scale ``s`` the image tower embeds ``s·p``-pixel patches of the same image with a kernel resized on the fly
from the native ``p×p`` one, and bilinearly resampled position embeddings, so the sequence is ``s²`` times shorter.
The stored parameters stay the native ones and gradients flow back through the resize; in eval mode (and at
``s = 1``) the tower runs exactly as open_clip built it, so evaluation and export always see the native model.

Kernel resize, pseudo-inverse (FlexiViT): with ``B`` the bilinear resize of a ``p×p`` patch to ``q×q``, the new
kernel ``w' = pinv(Bᵀ) w`` is the smallest one with ``<B x, w'> = <x, w>`` for every patch ``x``, so a patch that
is an upsampled native patch gets exactly the native token.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer, _expand_token
from torch import nn

from ..config import ConfigError


@functools.lru_cache(maxsize=16)
def resize_matrix(p: int, q: int) -> torch.Tensor:
    """``[q², p²]`` matrix of the bilinear resize of a ``p×p`` patch to ``q×q`` (float64, CPU)."""
    basis = torch.eye(p * p, dtype=torch.float64).view(p * p, 1, p, p)
    out = F.interpolate(basis, size=(q, q), mode="bilinear", align_corners=False, antialias=False)
    return out.view(p * p, q * q).t().contiguous()


@functools.lru_cache(maxsize=16)
def _pinv_resize(p: int, q: int) -> torch.Tensor:
    """``[p², q²]``: multiply a flattened ``p×p`` kernel (as a row) by this to get the ``q×q`` pinv-resized one."""
    return torch.linalg.pinv(resize_matrix(p, q).t()).t().contiguous()


def resize_kernel(weight: torch.Tensor, q: int, method: str = "pinv") -> torch.Tensor:
    """Resize a conv kernel ``[D, C, p, p]`` to ``[D, C, q, q]`` differentiably."""
    d, c, p, _ = weight.shape
    if q == p:
        return weight
    if method == "bilinear":  # area-normalised so a constant image keeps its token
        resized = F.interpolate(weight, size=(q, q), mode="bilinear", align_corners=False, antialias=q < p)
        return resized * (p * p) / (q * q)
    mat = _pinv_resize(p, q).to(device=weight.device, dtype=weight.dtype)
    return (weight.reshape(d * c, p * p) @ mat).view(d, c, q, q)


def resample_positions(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """``[1 + H·W, D]`` position embeddings (CLS first) resampled bilinearly to a ``new_grid`` of patches."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    cls, grid = pos[:1], pos[1:]
    grid = grid.t().reshape(1, -1, *old_grid)
    grid = F.interpolate(grid, size=new_grid, mode="bilinear", align_corners=False)  # 2x: box mean
    return torch.cat([cls, grid.reshape(pos.shape[1], -1).t()], dim=0)


def check_scalable(visual: nn.Module, scale: int, where: str = "tokens") -> None:
    """A patch scale must divide the image into whole patches of a native open_clip ViT."""
    if not isinstance(visual, VisionTransformer):
        raise ConfigError(
            f"{where}: token compression needs an open_clip VisionTransformer, got {type(visual).__name__}"
        )
    size, patch = visual.image_size, visual.patch_size
    if any(s % (p * scale) for s, p in zip(size, patch, strict=True)):
        raise ConfigError(f"{where}.patch_scale: {scale}x patches of {patch} do not tile the {size} image")


class PatchScaler:
    """Installs a scaled ``_embeds`` on one ViT instance (its class and state dict are untouched)."""

    def __init__(self, visual: VisionTransformer, method: str = "pinv") -> None:
        self.visual, self.method, self.scale = visual, method, 1

    def install(self) -> PatchScaler:
        self.visual._embeds = self._embeds  # instance attribute shadows VisionTransformer._embeds
        return self

    def remove(self) -> None:
        self.visual.__dict__.pop("_embeds", None)

    def _embeds(self, x: torch.Tensor) -> Any:
        v = self.visual
        if not v.training or self.scale == 1:
            return VisionTransformer._embeds(v, x)
        q = v.patch_size[0] * self.scale
        weight = resize_kernel(v.conv1.weight, q, self.method)
        x = F.conv2d(x, weight.to(x.dtype), stride=q)
        new_grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([_expand_token(v.class_embedding, x.shape[0]).to(x.dtype), x], dim=1)
        x = x + resample_positions(v.positional_embedding, v.grid_size, new_grid).to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))
