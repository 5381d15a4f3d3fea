"""Deployment: ONNX export (+ int8) run with ONNX Runtime, ``torch.compile``, with parity, speed and accuracy.

``deploy(bundle, out_dir)`` is what ``clipslim deploy`` runs: export both encoders, check them against eager
PyTorch, time batch-1 latency of every variant side by side (interleaved rounds, same thread count), and, given
an eval set, measure how much accuracy int8 costs. Everything lands in ``deploy_report.json`` next to the files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipslim.deploy.onnx import (
    CONFIG_FILE,
    IMAGE_FILE,
    TEXT_FILE,
    OrtClip,
    example_inputs,
    export_onnx,
    parity,
    quantize_int8,
    write_config,
)
from clipslim.io import atomic_write_json

REPORT_FILE = "deploy_report.json"
PARITY_ATOL = 1e-4  # fp32 ONNX Runtime vs eager, on normalised embeddings

__all__ = [
    "CONFIG_FILE",
    "IMAGE_FILE",
    "REPORT_FILE",
    "TEXT_FILE",
    "OrtClip",
    "accuracy",
    "compare_speed",
    "deploy",
    "export_onnx",
    "parity",
    "quantize_int8",
]


def _calls(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, Callable[[], Any]]:
    return {
        "image": lambda: model.encode_image(images, normalize=True),
        "text": lambda: model.encode_text(tokens, normalize=True),
    }


def compare_speed(
    bundle: Any, variants: dict[str, nn.Module], batch: int = 1, repeats: int = 50, warmup: int = 5
) -> dict[str, dict[str, dict[str, float]]]:
    """Per encoder and variant (``eager`` + ``variants``): p50/p95 latency, items/s, p50 ratio to eager.

    Variants take turns in 10 rounds of ``repeats / 10`` calls each (see ``interleaved_times``).
    """
    from clipslim.eval.bench import interleaved_times, latency_stats

    images, tokens = example_inputs(bundle, batch)
    models = {"eager": bundle.model.eval(), **variants}
    calls = {name: _calls(m, images, tokens) for name, m in models.items()}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for encoder in ("image", "text"):
        with torch.inference_mode():
            fns = {n: c[encoder] for n, c in calls.items()}
            times = interleaved_times(fns, repeats, warmup, block=max(1, repeats // 10))
        stats = {name: latency_stats(t, batch) for name, t in times.items()}
        for s in stats.values():
            s["ratio_to_eager"] = s["latency_ms_p50"] / stats["eager"]["latency_ms_p50"]
        out[encoder] = stats
    return out


def accuracy(bundle: Any, variants: dict[str, nn.Module], data: Any, batch_size: int = 256) -> dict:
    """Zero-shot (or, for retrieval sets, retrieval) metrics of eager and every variant on one eval set."""
    from clipslim.eval.datasets import RunOptions, evaluate_data, open_eval_data

    eval_set = open_eval_data(data) if isinstance(data, str | Path) else data
    task = eval_set.default_tasks[0]
    opts = RunOptions(batch_size=batch_size, progress=False)
    models = {"eager": bundle.model, **variants}
    return {
        name: evaluate_data(dataclasses.replace(bundle, model=m), eval_set, [task], opts)["tasks"][task]
        for name, m in models.items()
    }


def deploy(
    bundle: Any, out_dir: str | Path, *, int8: bool = False, data: str | Path | None = None, repeats: int = 50
) -> dict[str, Any]:
    """Export, check parity, time and (with ``data``) score; writes the files, config and ``deploy_report.json``."""
    from clipslim.eval.datasets import open_eval_data

    eval_set = open_eval_data(data) if data is not None else None  # a bad path fails before the slow export
    out_dir = Path(out_dir)
    files = export_onnx(bundle, out_dir)
    variants: dict[str, nn.Module] = {"onnx": OrtClip(files["image"], files["text"])}
    if int8:
        files.update({f"{k}_int8": quantize_int8(p) for k, p in list(files.items())})
        variants["onnx_int8"] = OrtClip(files["image_int8"], files["text_int8"])
    images, tokens = example_inputs(bundle, 4)
    report: dict[str, Any] = {"model": bundle.spec, "threads": torch.get_num_threads()}
    report["parity"] = {name: parity(bundle.model, m, images, tokens) for name, m in variants.items()}
    report["parity_ok"] = all(report["parity"]["onnx"][f"{e}_max_abs_diff"] <= PARITY_ATOL for e in ("image", "text"))
    report["speed_batch1"] = compare_speed(bundle, variants, batch=1, repeats=repeats)
    if eval_set is not None:
        report["accuracy"] = accuracy(bundle, variants, eval_set)
    report["file_bytes"] = {k: p.stat().st_size for k, p in files.items()}
    write_config(bundle, out_dir, files)
    atomic_write_json(out_dir / REPORT_FILE, report)
    return report
