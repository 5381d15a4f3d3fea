"""`clipslim slice`: the check that an extracted width equals the slimmable model at that width."""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def slice_gap(slim: Any, small: torch.nn.Module, width: float, bundle: Any) -> float:
    """Largest embedding difference between the slimmable model at ``width`` and the extracted one (random input)."""
    size = bundle.model_cfg.get("vision_cfg", {}).get("image_size", 224)
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    texts = bundle.tokenizer(["a photo", "a red circle"])
    a = torch.cat([slim.encode_image(images, width), slim.encode_text(texts, width)])
    b = torch.cat([small.encode_image(images, normalize=True), small.encode_text(texts, normalize=True)])
    return float((a - b).abs().max())
