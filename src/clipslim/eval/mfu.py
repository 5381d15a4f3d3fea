"""Model FLOPs utilisation: the FLOPs a step really runs ÷ (its time × this machine's matmul peak, same process).

``torch.utils.flop_counter`` knows the CUDA attention kernels but not the CPU ones, so on CPU it would count
attention as free, forward and backward: :data:`ATTENTION_FLOP_FORMULAS` adds them (and nn.MultiheadAttention's
fused inference kernel, which it does not count at all). The peak is measured, not read from a datasheet, in the
process and at the thread count of the step it divides, and cached: a run or a bench pays for it once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

_PEAKS: dict[tuple[str, torch.dtype, int, int], float] = {}


def _sdpa_flops(query: Sequence[int], key: Sequence[int], value: Sequence[int], *_: Any, **__: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_backward_flops(
    grad_out: Sequence[int], query: Sequence[int], key: Sequence[int], value: Sequence[int], *_: Any, **__: Any
) -> int:
    """Twice the forward (grads of the two products): model FLOPs, so the kernel's recomputed scores are not
    counted (torch's CUDA formula counts them, 2.5x)."""
    return 2 * sdpa_flop_count(query, key, value)


def _native_mha_flops(
    query: Sequence[int], key: Sequence[int], value: Sequence[int], embed_dim: int, *_: Any, **__: Any
) -> int:
    """Batch-first fused self-attention: q/k/v and output projections plus softmax(QKᵀ)V over all heads."""
    batch, tokens, width = (1, *query) if len(query) == 2 else query
    keys = key[-2]
    projections = 2 * batch * (tokens + 2 * keys) * width * embed_dim + 2 * batch * tokens * embed_dim * embed_dim
    return projections + 4 * batch * tokens * keys * embed_dim


ATTENTION_FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
    torch.ops.aten._native_multi_head_attention: _native_mha_flops,
}


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts CPU attention; it changes no result, only observes the ops."""
    return FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOP_FORMULAS)


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(what ``fn`` returns, the FLOPs it ran): matmuls, convolutions and attention, forward and any backward."""
    with flop_counter() as counter:
        out = fn()
    return out, int(counter.get_total_flops())


@torch.no_grad()
def matmul_peak(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seconds: float = 0.5) -> float:
    """Best FLOP/s of square matmuls over ~``seconds``, cached per device, dtype and thread count.

    The inputs come from a private generator: the global RNG, and so a training run, is left exactly as it was.
    """
    device = torch.device(device)
    n = 1024 if device.type == "cpu" else 8192
    key = (str(device), dtype, torch.get_num_threads(), n)
    if key not in _PEAKS:
        gen = torch.Generator(device=device).manual_seed(0)
        a, b = (torch.rand(n, n, generator=gen, device=device).to(dtype) for _ in range(2))
        _PEAKS[key] = 2 * n**3 / _best_time(lambda: a @ b, device, seconds)
    return _PEAKS[key]


def _best_time(fn: Callable[[], Any], device: torch.device, seconds: float) -> float:
    """Fastest of repeated calls (one untimed first), at least 3, stopping once ``seconds`` have passed."""
    fn()
    best, start, calls = float("inf"), time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - start < seconds:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tick = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best, calls = min(best, time.perf_counter() - tick), calls + 1
    return best


def mfu(flops_per_step: int, seconds_per_step: float, peak_flops_per_s: float) -> float:
    """Fraction of the peak the step's FLOPs reach at its measured speed."""
    return flops_per_step / max(seconds_per_step, 1e-12) / peak_flops_per_s


class MfuMeter:
    """MFU of a training loop: the first step run under :meth:`step` is counted and the others timed.

    Counting observes the real step (a dispatch mode only watches the ops), so the weights, RNG and optimizer state
    are those of a run without it; that step is slower and is left out of the timing. The time is the step's alone
    (data wait included, evaluation and checkpoints not). Recomputed FLOPs (gradient checkpointing, accum_freq)
    are counted as run. ``lanes``: CPU threads of compute working at once (2 when the teacher runs ahead in its own
    thread, clipslim.train.ahead), each with the measured peak, so the ratio stays a fraction of what they can do.
    """

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, lanes: int = 1) -> None:
        self.peak, self.dtype, self.lanes = matmul_peak(device, dtype) * lanes, dtype, lanes
        self.flops_per_step: int | None = None
        self.steps, self.seconds = 0, 0.0  # since the last take
        self.total_steps, self.total_seconds = 0, 0.0

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Wrap one training step."""
        if self.flops_per_step is None:
            with flop_counter() as counter:
                yield
            self.flops_per_step = int(counter.get_total_flops())
            return
        tick = time.perf_counter()
        yield
        self.steps, self.seconds = self.steps + 1, self.seconds + time.perf_counter() - tick

    def take(self) -> float | None:
        """MFU over the steps timed since the last take (None when there were none)."""
        steps, seconds = self.steps, self.seconds
        self.total_steps, self.total_seconds = self.total_steps + steps, self.total_seconds + seconds
        self.steps, self.seconds = 0, 0.0
        if not steps or self.flops_per_step is None:
            return None
        return round(mfu(self.flops_per_step, seconds / steps, self.peak), 4)

    def summary(self) -> dict[str, Any]:
        """What results.json records: FLOPs per step, the peak it is divided by, and the run's overall MFU."""
        overall = None
        if self.total_steps and self.flops_per_step:
            overall = mfu(self.flops_per_step, self.total_seconds / self.total_steps, self.peak)
        return {
            "flops_per_step": self.flops_per_step,
            "matmul_peak_flops_per_s": self.peak,
            "peak_dtype": str(self.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "lanes": self.lanes,
            "timed_steps": self.total_steps,
            "mfu": overall,
        }
