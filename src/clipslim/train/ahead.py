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
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from ..distiller import Outputs

TeacherFn = Callable[[dict[str, Any]], "Outputs"]


class BatchStream(Protocol):
    """What a feed needs of clipslim.train.loop.BatchStream (kept structural: loop imports this module)."""

    epoch: int
    pos: int
    skipped: dict[str, int]
    _it: Any

    def next(self) -> dict[str, Any]: ...


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


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity set, which a container may narrow below os.cpu_count())."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


class Lanes:
    """Two disjoint halves of the CPUs this process may use: the student's thread runs on the first, the teacher's
    thread and the data loader's worker processes on the second. Unpinned, the three share both cores and the
    student's step, which sets the pace, gets ~2/3 of one (docs/LOG.md, issue 20). The main thread's own set is put
    back on close."""

    def __init__(self) -> None:
        cpus = usable_cpus() if hasattr(os, "sched_setaffinity") else []
        half = len(cpus) // 2
        self.student, self.teacher = set(cpus[:half]), set(cpus[half:])
        self.saved = set(cpus)
        self.pinned: set[int] = set()
        self.active = half >= 1
        if self.active:
            os.sched_setaffinity(0, self.student)

    def pin_teacher_thread(self) -> None:
        if self.active:
            os.sched_setaffinity(0, self.teacher)

    def pin_workers(self, stream: BatchStream) -> None:
        """The loader's worker processes (a new set each epoch) join the teacher's lane."""
        for worker in getattr(stream._it, "_workers", None) or ():
            pid = getattr(worker, "pid", None)
            if self.active and pid and pid not in self.pinned:
                with contextlib.suppress(OSError):  # a worker that already exited
                    os.sched_setaffinity(pid, self.teacher)
                self.pinned.add(pid)

    def close(self) -> None:
        if self.active:
            os.sched_setaffinity(0, self.saved)


class AheadFeed(SerialFeed):
    """Hands out (batch t, teacher outputs for t) and starts the teacher on batch t+1 in a worker thread."""

    def __init__(self, stream: BatchStream, teacher: TeacherFn, autocast: Callable[[], Any], pin: bool = True) -> None:
        super().__init__(stream)
        self.teacher, self.autocast, self.pin = teacher, autocast, pin
        self.lanes: Lanes | None = None
        self.pool: ThreadPoolExecutor | None = None  # made on the first batch: a trainer that never runs pins nothing
        self.pending: tuple[dict[str, Any], Future[Outputs], Position] | None = None
        self.current: Position | None = None

    def _teacher(self, batch: dict[str, Any]) -> Outputs:
        with self.autocast():  # autocast state is per thread
            return self.teacher(batch)

    def next(self, more: bool = True) -> tuple[dict[str, Any], Outputs | None]:
        """Batch t and its teacher outputs; with ``more`` (a step follows) the teacher starts on batch t+1."""
        before = self.position()
        if self.pending is None:  # first step (or after close): computed here, so a FLOP counter on this thread sees it
            batch = self.stream.next()
            out, self.current = self._teacher(batch), super().position()
        else:
            batch, future, self.current = self.pending
            self.pending = None
            out = future.result()
        if more:
            try:
                ahead = self.stream.next()
            except BaseException:  # e.g. too much bad data: batch t is not trained, so a checkpoint must not count it
                self.current = before
                raise
            self.pending = (ahead, self._pool().submit(self._teacher, ahead), super().position())
        if self.lanes is not None:
            self.lanes.pin_workers(self.stream)
        return batch, out

    def _pool(self) -> ThreadPoolExecutor:
        if self.pool is None:
            self.lanes = Lanes() if self.pin else None
            init = self.lanes.pin_teacher_thread if self.lanes else None
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="clipslim-teacher", initializer=init)
        return self.pool

    def position(self) -> Position:
        return self.current if self.current is not None else super().position()

    def close(self) -> None:
        if self.pending is not None:
            with contextlib.suppress(Exception):  # its error, if any, belongs to a batch that is never trained
                self.pending[1].result()
            self.pending = None
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        if self.lanes is not None:
            self.lanes.close()
            self.lanes = None


def ahead_wanted(mode: str, device: torch.device, online: bool, accum_freq: int, hooks: int, world_size: int) -> bool:
    """``train.teacher_ahead``: never; always (an online teacher, whole batches); or auto = also on a CPU with a core
    to spare for the teacher thread (2 × torch threads ≤ cores), one process, and no step hooks."""
    if mode == "never" or not online or accum_freq > 1:  # micro-batches run the teacher per chunk (train/accum.py)
        return False
    if mode == "always":
        return True
    spare_core = 2 * torch.get_num_threads() <= len(usable_cpus())
    return device.type == "cpu" and spare_core and hooks == 0 and world_size == 1
