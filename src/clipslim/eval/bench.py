"""`clipslim bench`: size, FLOPs, speed, latency, memory and a roofline for each model, measured the same way.

Everything a speed claim needs is in one JSON: parameter counts (total and without the token embedding), FLOPs per
image and per caption (``torch.utils.flop_counter``), items/s and p50/p95 latency per batch size (warm-up
excluded, ``repeats`` timed calls), peak memory, and the machine's own fp32 matmul FLOP/s and copy bandwidth
measured in the same run, so "fraction of peak" is relative to this machine at this moment, not a datasheet.

Peak memory on CPU is the peak of the live bytes of tensors one forward creates, counted op by op (see
:class:`_TensorPeak`): unlike the process's resident high-water mark it does not depend on pages kept from earlier
calls. Library workspaces (oneDNN scratch) are not included. Where no probe exists it is null with the reason.

The roofline's x axis is arithmetic intensity, FLOPs over the bytes every aten op reads and writes (tensor inputs
and outputs, views excluded): the traffic of an unfused run, so an upper bound on bytes and a lower bound on
intensity.
"""

from __future__ import annotations

import os
import platform
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves
from tqdm import tqdm

from clipslim.eval.mfu import flop_counter
from clipslim.models import ClipBundle, count_params, load_model

BATCH_SIZES = (1, 64)
SAMPLE_CAPTION = "a photo of a small red circle on the left"


# ---------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int, device: str | torch.device = "cpu") -> list[float]:
    """Seconds per call of ``repeats`` timed calls after ``warmup`` untimed ones (CUDA synchronised)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def interleaved_times(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: str | torch.device = "cpu", block: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each function, timed round-robin in blocks of ``block`` calls, so that load changes on a
    shared machine hit every contender alike; use this for ratios.

    Runtimes leave thread pools spinning after a call (ONNX Runtime does by default), which slows whatever runs
    next in the process; so after each switch one untimed call lets the previous runtime's threads go idle.
    """
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    while any(len(t) < repeats for t in times.values()):
        for name, fn in fns.items():
            count = min(block, repeats - len(times[name]))
            if count > 0 and len(fns) > 1:
                fn()  # settle after the switch
            for _ in range(count):
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - start)
    return times


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``q`` in [0, 100]."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def latency_stats(times: Sequence[float], batch: int) -> dict[str, float]:
    """p50/p95 latency (ms) per call, and items/s at the median."""
    p50 = percentile(times, 50)
    return {"latency_ms_p50": 1e3 * p50, "latency_ms_p95": 1e3 * percentile(times, 95), "items_per_s": batch / p50}


# ---------------------------------------------------------------- counting


class TrafficCounter(TorchDispatchMode):
    """Bytes every aten op reads and writes (its tensor inputs and outputs); views move nothing and are skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # torch's dispatch protocol
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            leaves = tree_leaves((args, kwargs or {}, out))
            self.bytes += sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))
        return out


def count_cost(fn: Callable[[], Any], module: nn.Module | None = None) -> tuple[int, int]:
    """(FLOPs, bytes moved) of one call; FLOPs of matmuls, convolutions and attention.

    ``module`` is put in train mode for the count (its output is discarded): in eval mode under no_grad,
    ``nn.MultiheadAttention`` takes a fused fast path that FlopCounterMode does not count at all.
    """
    traffic, was_training = TrafficCounter(), module.training if module is not None else False
    if module is not None:
        module.train()
    try:
        with torch.no_grad(), flop_counter() as flops, traffic:
            fn()
    finally:
        if module is not None:
            module.train(was_training)
    return int(flops.get_total_flops()), int(traffic.bytes)


# ---------------------------------------------------------------- memory


class _TensorPeak(TorchDispatchMode):
    """Live bytes of the tensors a call creates, and their peak: freed storages are subtracted when they die.

    Counted at the op level, so it does not depend on what the allocator kept from earlier calls (an RSS high-water
    delta does: a model measured after a bigger one reuses its freed pages and looks almost free)."""

    def __init__(self) -> None:
        super().__init__()
        self.live, self.peak = 0, 0
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if not size or key in self.seen:
            return
        self.seen.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)  # storages keep one Python object while they live

    def _free(self, key: int, size: int) -> None:
        self.seen.discard(key)
        self.live -= size


def peak_memory(fn: Callable[[], Any], device: str | torch.device) -> tuple[int | None, str]:
    """(bytes, method): extra memory at the peak of one call, or (None, why it cannot be measured here)."""
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base, "torch.cuda.max_memory_allocated"
    if device.type != "cpu":
        return None, f"no peak-memory probe for device type {device.type}"
    probe = _TensorPeak()
    with probe:
        fn()
    return probe.peak, "peak live bytes of tensors the call created (op-level count; excludes library workspaces)"


# ---------------------------------------------------------------- machine


@torch.inference_mode()
def machine_peaks(device: str | torch.device = "cpu", quick: bool = False) -> dict[str, float]:
    """This machine's fp32 matmul FLOP/s and copy bandwidth (bytes/s), best of a few runs."""
    device = torch.device(device)
    n = (1024 if quick else 2048) if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    matmul = min(time_calls(lambda: a @ b, repeats=3 if quick else 5, warmup=1, device=device))
    numel = (16 if quick else 64) * 2**20
    src, dst = torch.empty(numel, device=device).fill_(1.0), torch.empty(numel, device=device)
    copy = min(time_calls(lambda: dst.copy_(src), repeats=3 if quick else 5, warmup=1, device=device))
    return {"matmul_flops_per_s": 2 * n**3 / matmul, "memory_bytes_per_s": 2 * 4 * numel / copy, "matmul_n": n}


def machine_info(device: str | torch.device) -> dict[str, Any]:
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    info = {"device": str(device), "device_name": name, "torch": torch.__version__, "threads": torch.get_num_threads()}
    # CPU timings are only as good as the machine is idle; record how busy it was (1-minute load average).
    return {**info, "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}


# ---------------------------------------------------------------- models


def image_hw(bundle: ClipBundle) -> tuple[int, int]:
    """Input height and width the model's transforms produce."""
    size = bundle.preprocess_cfg.get("size") or bundle.model_cfg.get("vision_cfg", {}).get("image_size", 224)
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _callers(bundle: ClipBundle, device: torch.device) -> dict[str, Callable[[int], Callable[[], Any]]]:
    """Per encoder: batch size -> a no-argument call on fixed inputs of that batch size."""
    model, (h, w) = bundle.model, image_hw(bundle)
    tokens = torch.as_tensor(bundle.tokenizer([SAMPLE_CAPTION])).to(device)

    def image(batch: int) -> Callable[[], Any]:
        x = torch.randn(batch, 3, h, w, device=device)
        return lambda: model.encode_image(x)

    def text(batch: int) -> Callable[[], Any]:
        t = tokens.repeat(batch, 1)
        return lambda: model.encode_text(t)

    return {"image": image, "text": text}


@torch.inference_mode()
def bench_encoder(
    make_call: Callable[[int], Callable[[], Any]],
    batch_sizes: Sequence[int],
    device: torch.device,
    peaks: dict[str, float],
    repeats: int = 20,
    warmup: int = 3,
    module: nn.Module | None = None,
) -> list[dict[str, Any]]:
    """One row per batch size: latency, items/s, peak memory, FLOPs, bytes moved, achieved FLOP/s."""
    rows = []
    for batch in batch_sizes:
        fn = make_call(batch)
        memory, method = peak_memory(fn, device)
        flops, traffic = count_cost(fn, module)
        stats = latency_stats(time_calls(fn, repeats, warmup, device), batch)
        achieved = flops * stats["items_per_s"] / batch
        rows.append(
            {
                "batch": batch,
                **stats,
                "peak_memory_bytes": memory,
                "peak_memory_method": method,
                "flops": flops,
                "bytes_moved": traffic,
                "arithmetic_intensity": flops / max(traffic, 1),
                "achieved_flops_per_s": achieved,
                "fraction_of_matmul_peak": achieved / peaks["matmul_flops_per_s"],
            }
        )
    return rows


def bench_bundle(
    bundle: ClipBundle,
    device: str | torch.device = "cpu",
    batch_sizes: Sequence[int] = BATCH_SIZES,
    peaks: dict[str, float] | None = None,
    repeats: int = 20,
    warmup: int = 3,
) -> dict[str, Any]:
    """Size, FLOPs per image/caption and per-batch-size speed of both encoders of one model."""
    device = torch.device(device)
    bundle.model.to(device).eval()
    peaks = peaks or machine_peaks(device)
    calls = _callers(bundle, device)
    result: dict[str, Any] = {"model": bundle.spec, "arch": bundle.arch, **count_params(bundle.model).as_dict()}
    result["image_size"] = list(image_hw(bundle))
    result["flops_per_image"] = count_cost(calls["image"](1), bundle.model)[0]
    result["flops_per_caption"] = count_cost(calls["text"](1), bundle.model)[0]
    for name, make_call in calls.items():
        result[name] = bench_encoder(make_call, batch_sizes, device, peaks, repeats, warmup, bundle.model)
    result["images_per_s"] = result["image"][-1]["items_per_s"]  # at the largest (throughput) batch size
    result["captions_per_s"] = result["text"][-1]["items_per_s"]
    return result


def images_per_s(bundle: ClipBundle, batch: int = 64, device: str = "cpu", repeats: int = 10) -> float:
    """Image-encoder throughput at ``batch``, timed as ``clipslim bench`` times it (for the report's fill-ins)."""
    bundle.model.to(device).eval()
    with torch.inference_mode():
        fn = _callers(bundle, torch.device(device))["image"](batch)
        return latency_stats(time_calls(fn, repeats, 2, device), batch)["items_per_s"]


def bench_models(
    specs: Sequence[str],
    device: str = "cpu",
    batch_sizes: Sequence[int] = BATCH_SIZES,
    *,
    quick: bool = False,
    repeats: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """``clipslim bench``: the machine's peaks, then every model; ``quick`` shrinks the peak probes and repeats."""
    if not specs or any(b < 1 for b in batch_sizes):
        raise ValueError(f"bench needs at least one --model and batch sizes >= 1 (got {list(batch_sizes)})")
    repeats = repeats or (5 if quick else 20)
    peaks = machine_peaks(device, quick=quick)
    models = []
    for spec in tqdm(specs, desc="bench", unit="model", disable=not progress):
        torch.manual_seed(0)
        bundle = load_model(spec, device=device)
        models.append(bench_bundle(bundle, device, sorted(batch_sizes), peaks, repeats, warmup=1 if quick else 3))
        del bundle
    return {
        **machine_info(device),
        "machine": peaks,
        "batch_sizes": sorted(batch_sizes),
        "repeats": repeats,
        "models": models,
    }


# ---------------------------------------------------------------- roofline


def plot_roofline(result: dict[str, Any], out_png: str | Path) -> Path:
    """Log-log roofline: the measured matmul and bandwidth roofs, one point per model, encoder and batch size."""
    from ..plots import pyplot, save_figure

    plt = pyplot()

    peak, bw = result["machine"]["matmul_flops_per_s"], result["machine"]["memory_bytes_per_s"]
    rows = [(m["model"], enc, r) for m in result["models"] for enc in ("image", "text") for r in m[enc]]
    xs = [r["arithmetic_intensity"] for _, _, r in rows] + [peak / bw]
    grid = np.geomspace(min(xs) / 4, max(xs) * 4, 200)
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.loglog(grid, [min(peak, bw * x) for x in grid], "k-", label="roof: measured matmul peak / copy bandwidth")
    for i, model in enumerate(dict.fromkeys(m for m, _, _ in rows)):
        for enc, marker in (("image", "o"), ("text", "s")):
            pts = [r for m, e, r in rows if m == model and e == enc]
            ax.loglog(
                [r["arithmetic_intensity"] for r in pts],
                [r["achieved_flops_per_s"] for r in pts],
                marker=marker,
                linestyle=":",
                color=f"C{i}",
                label=f"{model} {enc}",
            )
            for r in pts:
                ax.annotate(f"b{r['batch']}", (r["arithmetic_intensity"], r["achieved_flops_per_s"]), fontsize=7)
    ax.set(
        xlabel="arithmetic intensity (FLOP / byte moved, unfused)",
        ylabel="achieved FLOP/s",
        title=f"roofline on {result['device_name']} ({result['device']}, {result['threads']} threads)",
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return save_figure(fig, out_png)


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def bench_table(result: dict[str, Any]) -> str:
    """Markdown summary of a ``bench_models`` result: one row per model, image encoder first, then text."""
    head = (
        "| model | params (non-emb.) | MFLOPs/img | MFLOPs/caption | img/s b1 | img/s bN | img p50/p95 ms b1 "
        "| captions/s bN | img peak MiB bN | % matmul peak bN |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for m in result["models"]:
        img1, imgn, txtn = m["image"][0], m["image"][-1], m["text"][-1]
        lines.append(
            f"| {m['model']} | {m['params'] / 1e6:.2f}M ({m['params_non_embedding'] / 1e6:.2f}M) "
            f"| {m['flops_per_image'] / 1e6:.1f} | {m['flops_per_caption'] / 1e6:.1f} | {img1['items_per_s']:.0f} "
            f"| {imgn['items_per_s']:.0f} (b{imgn['batch']}) "
            f"| {img1['latency_ms_p50']:.2f}/{img1['latency_ms_p95']:.2f} "
            f"| {txtn['items_per_s']:.0f} | {_mib(imgn['peak_memory_bytes'])} "
            f"| {100 * imgn['fraction_of_matmul_peak']:.1f} |"
        )
    peaks = result["machine"]
    lines.append(
        f"\nmachine: {result['device_name']} ({result['device']}, {result['threads']} threads), fp32 matmul "
        f"{peaks['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, copy {peaks['memory_bytes_per_s'] / 1e9:.1f} GB/s"
    )
    return "\n".join(lines)
