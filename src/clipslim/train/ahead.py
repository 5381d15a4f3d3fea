"""Batches for the training loop, with the online teacher optionally run one batch ahead in a second thread.

Why (issue 20): on a CPU the frozen teacher's forward is ~45% of a distillation step and the loader worker leaves
most of the second core idle, so the teacher can run on batch t+1 while the student trains on batch t. The teacher
sees the same pixels and tokens in the same order with the same kernels, so its outputs and the trained weights are
the same as in the serial loop (tested bit for bit); only the waiting changes.

Positions (epoch, batch index, skip counts) are those of the batch handed to the step, not of the batch fetched
ahead, so a checkpoint resumes at the right batch and step hooks read the right stream position.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..distiller import Outputs
    from .loop import BatchStream

TeacherFn = Callable[[dict[str, Any]], "Outputs"]


@dataclass
class Position:
    """Where the stream stood right after the batch that the current step trains on."""

    epoch: int
    pos: int
    skipped: dict[str, int] = field(default_factory=dict)


class SerialFeed:
    """The plain loop: the step pulls a batch and runs the teacher itself."""

    def __init__(self, stream: BatchStream) -> None:
        self.stream = stream

    def next(self, more: bool = True) -> tuple[dict[str, Any], Outputs | None]:
        return self.stream.next(), None

    def position(self) -> Position:
        return Position(self.stream.epoch, self.stream.pos, dict(self.stream.skipped))

    def close(self) -> None:
        pass


class AheadFeed(SerialFeed):
    """Hands out (batch t, teacher outputs for t) and starts the teacher on batch t+1 in a worker thread."""

    def __init__(self, stream: BatchStream, teacher: TeacherFn, autocast: Callable[[], Any]) -> None:
        super().__init__(stream)
        self.teacher, self.autocast = teacher, autocast
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="clipslim-teacher")
        self.pending: tuple[dict[str, Any], Future[Outputs], Position] | None = None
        self.current: Position | None = None

    def _teacher(self, batch: dict[str, Any]) -> Outputs:
        with self.autocast():  # autocast state is per thread
            return self.teacher(batch)

    def next(self, more: bool = True) -> tuple[dict[str, Any], Outputs | None]:
        """Batch t and its teacher outputs; with ``more`` (a step follows) the teacher starts on batch t+1."""
        if self.pending is None:  # first step (or after close): computed here, so a FLOP counter on this thread sees it
            batch = self.stream.next()
            out, self.current = self._teacher(batch), super().position()
        else:
            batch, future, self.current = self.pending
            self.pending = None
            out = future.result()
        if more:
            ahead = self.stream.next()
            self.pending = (ahead, self.pool.submit(self._teacher, ahead), super().position())
        return batch, out

    def position(self) -> Position:
        return self.current if self.current is not None else super().position()

    def close(self) -> None:
        if self.pending is not None:
            with contextlib.suppress(Exception):  # its error, if any, belongs to a batch that is never trained
                self.pending[1].result()
            self.pending = None
        self.pool.shutdown(wait=True)


def ahead_wanted(mode: str, device: torch.device, online: bool, accum_freq: int, hooks: int, world_size: int) -> bool:
    """``train.teacher_ahead``: never; always (an online teacher, whole batches); or auto = also on a CPU with a core
    to spare for the teacher thread (2 × torch threads ≤ cores), one process, and no step hooks."""
    if mode == "never" or not online or accum_freq > 1:  # micro-batches run the teacher per chunk (train/accum.py)
        return False
    if mode == "always":
        return True
    spare_core = 2 * torch.get_num_threads() <= (os.cpu_count() or 1)
    return device.type == "cpu" and spare_core and hooks == 0 and world_size == 1
