"""Throughput of the image and text encoders, measured the same way for every model (warm-up excluded)."""

from __future__ import annotations

import time

import torch
from torch import nn


@torch.no_grad()
def encoder_throughput(
    model: nn.Module, image_size: int, context_length: int, batch: int = 256, repeats: int = 5, warmup: int = 2
) -> dict[str, float]:
    """Images/s and captions/s at ``batch`` on the model's device; the median of ``repeats`` timed runs."""
    model.eval()
    device = next(model.parameters()).device
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    texts = torch.randint(1, 1000, (batch, context_length), device=device)
    return {
        "images_per_s": batch / _median_time(lambda: model.encode_image(images), repeats, warmup, device),
        "captions_per_s": batch / _median_time(lambda: model.encode_text(texts), repeats, warmup, device),
    }


def _median_time(fn, repeats: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
