"""Gradient accumulation that keeps the whole contrastive batch (open_clip's ``accum_freq``).

A contrastive loss couples every pair of the batch, so summing the losses of k smaller batches is a different loss
(fewer negatives, other affinity targets). Here, as in ``open_clip_train/train.py``: the student's embeddings of all
k micro-batches are computed first without gradients (and the teacher's, once); then each micro-batch is encoded
again with gradients and its rows are put back into the cached full-batch embeddings, the loss of the *whole* batch
is computed and back-propagated. Only one micro-batch's activations are alive at a time, and the k backward passes
sum to the gradient of the full-batch loss with respect to the encoders.

Two corrections make the result equal to the single big batch (tested to fp32 tolerance):

- Parameters the loss reads directly rather than through the embeddings (the student's logit scale and bias, every
  objective's projectors and temperatures) receive the full gradient in each of the k passes; theirs is divided by k
  (open_clip counts the logit scale k times).
- Randomness inside the student forward (patch dropout, a token schedule) is replayed: each micro-batch's grad pass
  starts from the RNG state of its no-grad pass, so both passes see the same tokens.

Objectives that run their own student forward (masked_feature, slimmable) or gate it (l0_sparsity), and ProtoCLIP's
episode state, are refused by :func:`check_accum` in one line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..distributed import current_env
from ..outputs import Outputs

ACCUM_OBJECTIVES = frozenset({"clip", "affinity", "feature", "icl", "cross_kd", "gradient", "fusion"})
"""Objectives that read only the batch's embeddings (student and teacher) and the batch itself."""


def check_accum(objectives: list[str], accum_freq: int, batch_size: int) -> None:
    """Refuse, in one line, what accumulation cannot reproduce exactly."""
    if accum_freq == 1:
        return
    if batch_size % accum_freq:
        raise ConfigError(f"train.accum_freq: {accum_freq} must divide train.batch_size {batch_size}")
    refused = [name for name in objectives if name not in ACCUM_OBJECTIVES]
    if refused:
        raise ConfigError(
            f"train.accum_freq: objective(s) {', '.join(refused)} run or change their own student forward and cannot "
            f"be accumulated; use accum_freq 1 (supported: {', '.join(sorted(ACCUM_OBJECTIVES))})"
        )
    if current_env().enabled:
        raise ConfigError("train.accum_freq: not supported under torchrun yet; use accum_freq 1 or more processes")


def split_batch(batch: dict[str, Any], k: int) -> list[dict[str, Any]]:
    """k micro-batches: every tensor or list with one row per sample is sliced, anything else is kept whole."""
    n = len(batch["image"])
    size = n // k
    parts: list[dict[str, Any]] = [{} for _ in range(k)]
    for key, value in batch.items():
        rows = (torch.is_tensor(value) and value.dim() > 0 and len(value) == n) or (
            isinstance(value, list) and len(value) == n
        )
        for i, part in enumerate(parts):
            part[key] = value[i * size : (i + 1) * size] if rows else value
    return parts


def concat_outputs(parts: list[Outputs], scale_from: Outputs) -> Outputs:
    """One batch of outputs from micro-batch parts; scale and bias from ``scale_from`` (the live pass)."""
    image = torch.cat([p.image for p in parts])
    text = torch.cat([p.text for p in parts])
    return Outputs(image=image, text=text, logit_scale=scale_from.logit_scale, logit_bias=scale_from.logit_bias)


class Splice:
    """Given the student's encoder, encode micro-batch ``index`` with gradients and put it among the cached rows."""

    def __init__(self, cached: list[Outputs], index: int, micro: dict[str, Any]) -> None:
        self.cached, self.index, self.micro = cached, index, micro

    def __call__(self, encode_batch: Callable[[dict[str, Any]], Outputs]) -> Outputs:
        live = encode_batch(self.micro)
        parts = [live if i == self.index else part for i, part in enumerate(self.cached)]
        return concat_outputs(parts, live)


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def direct_parameters(distiller: nn.Module) -> list[nn.Parameter]:
    """Parameters the loss reads besides the embeddings: the student's scale/bias and every objective's extras."""
    student = distiller.student
    own = [getattr(student, name, None) for name in ("logit_scale", "logit_bias")]
    return [p for p in own if isinstance(p, nn.Parameter)] + list(distiller.objectives.parameters())


def _cache_pass(
    distiller: nn.Module,
    teacher: Callable | None,
    micros: list[dict[str, Any]],
    autocast: Callable,
    device: torch.device,
) -> tuple[list[Outputs], Outputs | None, list[tuple]]:
    """Student embeddings of every micro-batch (no grad), the teacher's for the whole batch, each pass's RNG state."""
    cached, teacher_parts, states = [], [], []
    with torch.no_grad(), autocast():
        for micro in micros:
            states.append(_rng_state(device))
            cached.append(distiller.encode_batch(micro))
            if teacher is not None:
                teacher_parts.append(teacher(micro))
    states.append(_rng_state(device))  # where the step leaves the generator: as if each micro-batch ran once
    teacher_out = concat_outputs(teacher_parts, teacher_parts[0]) if teacher_parts else None
    return cached, teacher_out, states


def accumulated_backward(
    forward: Callable, distiller: nn.Module, teacher: Callable | None, batch: dict[str, Any], k: int,
    autocast: Callable, scaler: torch.amp.GradScaler | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Forward and backward of the full-batch loss in k micro-batches; returns the last pass's outputs (every pass
    computes the same full-batch loss). ``forward`` is the (maybe DDP-wrapped) distiller."""
    device = batch["image"].device
    micros = split_batch(batch, k)
    cached, teacher_out, states = _cache_pass(distiller, teacher, micros, autocast, device)
    out: dict[str, torch.Tensor] = {}
    for j, micro in enumerate(micros):
        _set_rng_state(states[j], device)
        sync = contextlib.nullcontext() if j == k - 1 else getattr(forward, "no_sync", contextlib.nullcontext)()
        with sync:
            with autocast():
                out = forward(batch, teacher_out, splice=Splice(cached, j, micro))
            (scaler.scale(out["loss"]) if scaler else out["loss"]).backward()
    _set_rng_state(states[-1], device)
    for p in direct_parameters(distiller):
        if p.grad is not None:
            p.grad.div_(k)
    return out
