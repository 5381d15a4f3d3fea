"""Measurements ``clipslim plan`` needs that ``bench`` lacks: training-step memory and time-bounded timing.

**Training memory on CPU by trace.** A real distillation step of a ViT-B student at 224 px and batch 32 takes tens of
seconds on a small CPU, four variants per candidate even more. So the step runs on *fake tensors*
(``FakeTensorMode``): the same Python code, the same aten ops with the same shapes, dtypes and device, in the same
order, with no arithmetic; tensors are created and freed exactly when the real ones would be. ``bench``'s
op-level live-bytes probe (:class:`~clipslim.eval.bench._TensorPeak`, keyed here by storage identity, since fake
storages share one address) counts them. On a real model the traced peak equals the real step's peak to the byte
(``tests/test_plan.py``). As for ``bench``, library workspaces (oneDNN scratch) and allocator slack are not counted.
"""

from __future__ import annotations

import copy
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .bench import _TensorPeak, peak_memory


class StoragePeak(_TensorPeak):
    """``bench``'s live-bytes probe keyed by storage identity, so it also counts fake tensors (all at address 0)."""

    def _track(self, storage: torch.UntypedStorage) -> None:
        key, size = storage._cdata, storage.nbytes()
        if not size or key in self.seen:
            return
        self.seen.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)


def fake_copy(model: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are fake tensors of the same shapes (no memory, no copy)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(mode.from_tensor(p.detach()), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = mode.from_tensor(b)
    return copy.deepcopy(model, memo)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct storages (tied weights counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


def model_bytes(model: nn.Module) -> int:
    return tensor_bytes([*model.parameters(), *model.buffers()])


def step_peak(
    step: Callable[[Sequence[nn.Module]], Any], models: Sequence[nn.Module], device: str = "cpu", trace: bool = True
) -> tuple[int, str]:
    """(bytes, method): peak memory of ``step(models)`` above the models' own weights, which stay resident.

    ``trace`` (CPU only) runs ``step`` on fake copies of ``models``; otherwise it runs for real and is measured by
    ``bench``'s probe (CUDA: the allocator's peak). Whatever ``step`` creates counts: inputs, activations, gradients,
    optimizer state, temporaries.
    """
    if trace and torch.device(device).type == "cpu":
        mode = FakeTensorMode()
        fakes = [fake_copy(m, mode) for m in models]
        probe = StoragePeak()
        with mode, probe:
            step(fakes)
        return probe.peak, "fake-tensor trace of the step, live tensor bytes op by op (bench's probe)"
    if torch.device(device).type == "cpu":
        probe = StoragePeak()
        with probe:
            step(models)
        return probe.peak, "live tensor bytes op by op during the real step (bench's probe)"
    peak, method = peak_memory(lambda: step(models), device)
    return int(peak or 0), method


def time_bounded(
    fn: Callable[[], Any], seconds: float, device: str = "cpu", min_calls: int = 1, max_calls: int = 50
) -> list[float]:
    """Seconds per call: one untimed warm-up, then timed calls until ``seconds`` have passed (at least
    ``min_calls``)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    fn()
    times: list[float] = []
    budget_end = time.perf_counter() + seconds
    while len(times) < min_calls or (time.perf_counter() < budget_end and len(times) < max_calls):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times
