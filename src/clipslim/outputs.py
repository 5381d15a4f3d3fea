"""Shared types every layer speaks: what a CLIP model produces for a batch, and how to get it.

A leaf: it imports torch only, so data readers, objectives, distributed helpers and the trainer can all use these
without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Outputs:
    """What a CLIP tower pair produces for one batch: L2-normalised embeddings and the (exponentiated) scale."""

    image: torch.Tensor
    text: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None = None
    rows: slice | None = None
    """Local-loss mode under torchrun: the rows of the gathered batch that are this rank's queries (None: all)."""


@dataclass(frozen=True)
class Dims:
    """Embedding sizes an objective may need to build projectors."""

    embed_dim: int


def encode(model: nn.Module, images: torch.Tensor, texts: torch.Tensor) -> Outputs:
    """Normalised embeddings and exponentiated scale of an open_clip model."""
    image = model.encode_image(images, normalize=True)
    text = model.encode_text(texts, normalize=True)
    bias = getattr(model, "logit_bias", None)
    return Outputs(image=image, text=text, logit_scale=model.logit_scale.exp(), logit_bias=bias)


def embed_dim(model: nn.Module) -> int:
    """The joint embedding width of an open_clip model (text projection's output, else a tower's ``output_dim``)."""
    text = getattr(model, "text", model)  # CustomTextCLIP (timm / HF towers) keeps the projection in its text tower
    proj = getattr(text, "text_projection", None)
    if isinstance(proj, nn.Parameter):
        return proj.shape[1]
    if isinstance(proj, nn.Linear):
        return proj.out_features
    dim = getattr(text, "output_dim", None) or getattr(model.visual, "output_dim", None)
    if dim is None:
        raise ValueError(f"cannot tell the embedding width of {type(model).__name__}")
    return int(dim)
