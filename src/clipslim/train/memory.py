"""One-GPU memory options of a run: the student's activation checkpointing and a half-precision frozen teacher.

Both trade compute for memory and change no result beyond rounding: checkpointing recomputes each block's
activations in the backward pass (open_clip's ``set_grad_checkpointing``: ViT, text transformer and timm towers); a
teacher kept in bf16/fp16 halves its weights and activations (it is never trained, so no master copy is needed) and
hands fp32 embeddings to the losses. bf16 autocast of the student on a GPU is ``train.precision`` (auto picks it).
"""

from __future__ import annotations

import logging

import torch

from ..config import ConfigError
from ..recipe import TrainSection
from .accum import check_accum
from .setup import Built

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def apply_memory_options(built: Built, cfg: TrainSection, device: torch.device) -> None:
    """Apply ``train.grad_checkpointing`` / ``teacher_precision`` and check ``accum_freq``, before any step."""
    check_accum(list(built.distiller.weights), cfg.accum_freq, cfg.batch_size)
    if cfg.grad_checkpointing:
        set_checkpointing = getattr(built.student.model, "set_grad_checkpointing", None)
        if set_checkpointing is None:
            raise ConfigError(f"train.grad_checkpointing: {built.student.arch} has no set_grad_checkpointing")
        set_checkpointing(True)
    dtype = DTYPES[cfg.teacher_precision]
    if built.teacher is not None and dtype != torch.float32:
        if device.type == "cpu":
            log.info(
                "train.teacher_precision %s on CPU: saves memory; faster only where the CPU has bf16 matrix units"
                " (AMX / AVX512-BF16; benchmarks/teacher_precision_cpu.py measures it), slower elsewhere",
                cfg.teacher_precision,
            )
        built.teacher.model.to(dtype)
