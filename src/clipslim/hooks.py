"""Step hooks: things that change the run between optimizer steps without being a loss term.

A hook has ``before_step(ctx)``; the trainer calls every hook before each step with a :class:`StepContext`, a small
snapshot of what a hook may read, never the trainer itself. Sources: objectives that define ``before_step`` (e.g.
ProtoCLIP re-clustering at each episode start) and recipe sections that transform the model on a schedule (e.g.
``tokens:`` patch dropout). State a hook needs after a resume must live in the checkpointed module (buffers of an
objective) or be a pure function of the step.

Lifecycle: the trainer builds the hooks once (after the models, before the first step); on a resume the step
restarts at the checkpoint's and hooks see that step first; ``before_step`` runs on every rank before the forward of
step ``ctx.step`` (0-based); nothing is called after the last step.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


class BatchSource(Protocol):
    """A stream of training batches with a position (epoch, index of the next batch)."""

    epoch: int
    pos: int

    def next(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class StepContext:
    """What a hook may read before a step."""

    step: int
    """The step about to run (0-based)."""
    total_steps: int
    seed: int
    run_dir: Path
    device: torch.device
    autocast: Callable[[], AbstractContextManager[Any]]
    """The trainer's precision context (bf16/fp16 autocast on GPU, a no-op on CPU)."""
    student: nn.Module
    teacher: Any | None
    """The online teacher's :class:`clipslim.models.ClipBundle` (None with a cached teacher or none)."""
    data: str
    """The training data path (recipe data.train)."""
    progress: bool
    is_main: bool
    """Rank 0 (or the only process): the one that writes files and shows progress."""
    position: tuple[int, int]
    """(epoch, batch index) of the next batch the trainer will read."""
    open_stream: Callable[[tuple[int, int]], BatchSource]
    """A fresh stream of exactly the batches the trainer will read, opened at a position (e.g. ``position``), so a
    hook can look ahead (ProtoCLIP reads its next episode) without touching the trainer's own stream."""


@runtime_checkable
class StepHook(Protocol):
    def before_step(self, ctx: StepContext) -> None: ...
