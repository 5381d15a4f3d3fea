"""``torch.compile``d encoders behind the open_clip interface, to measure what compilation buys.

On CPU, inductor generates C++ and needs a compiler (gcc/clang on PATH); the first call of each input shape pays
the compilation (tens of seconds for a small ViT on two cores), so benchmarks warm up every batch size first.
"""

from __future__ import annotations

import shutil
from typing import Any

import torch
from torch import nn


def check_compiler(backend: str = "inductor", device: str = "cpu") -> None:
    """Fail early, with the reason, where inductor cannot build CPU kernels."""
    has_compiler = any(shutil.which(cc) for cc in ("gcc", "g++", "clang", "c++"))
    if backend == "inductor" and torch.device(device).type == "cpu" and not has_compiler:
        raise RuntimeError("torch.compile (inductor) on CPU needs a C++ compiler on PATH (gcc or clang)")


class CompiledClip(nn.Module):
    """``encode_image`` / ``encode_text`` compiled separately, each with a static batch (``dynamic=False``)."""

    def __init__(self, model: nn.Module, backend: str = "inductor", mode: str | None = None):
        super().__init__()
        self.model = model.eval()
        self._image = torch.compile(model.encode_image, backend=backend, mode=mode, dynamic=False)
        self._text = torch.compile(model.encode_text, backend=backend, mode=mode, dynamic=False)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> Any:
        return self._image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> Any:
        return self._text(tokens, normalize=normalize)


def compile_clip(
    model: nn.Module, backend: str = "inductor", mode: str | None = None, device: str = "cpu"
) -> CompiledClip:
    """A ``CompiledClip`` after checking that ``backend`` can run here."""
    check_compiler(backend, device)
    return CompiledClip(model, backend=backend, mode=mode)
