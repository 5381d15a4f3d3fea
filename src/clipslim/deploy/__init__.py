"""Deployment: per-precision ONNX bundles run with ONNX Runtime, an HF ``transformers`` folder, ``torch.compile``.

``deploy(bundle, out_dir, precisions)`` is what ``clipslim deploy --format onnx`` runs: write one bundle per
precision (``bundle.py``), check each against eager PyTorch (max abs / cosine, fp16 overflow), score each on an
eval set against fp32 eager, time batch-1 and batch-64 latency of eager and every precision side by side
(interleaved rounds, same thread count), and note file sizes. Everything lands in ``deploy_report.json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipslim.deploy.onnx import IMAGE_FILE, TEXT_FILE, OrtClip, OrtConfig, example_inputs, export_onnx, parity
from clipslim.io import atomic_write_json

REPORT_FILE = "deploy_report.json"
PARITY_ATOL = 1e-4  # fp32 ONNX Runtime vs eager, on normalised embeddings
PARITY_SAMPLES = 16

__all__ = [
    "IMAGE_FILE",
    "REPORT_FILE",
    "TEXT_FILE",
    "OrtClip",
    "OrtConfig",
    "accuracy",
    "compare_speed",
    "deploy",
    "deploy_summary",
    "export_onnx",
    "parity",
    "report_table",
    "round_ratios",
]


def _calls(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, Callable[[], Any]]:
    return {
        "image": lambda: model.encode_image(images, normalize=True),
        "text": lambda: model.encode_text(tokens, normalize=True),
    }


def compare_speed(
    bundle: Any, variants: dict[str, nn.Module], batch: int = 1, repeats: int = 50, warmup: int = 5
) -> dict[str, dict[str, dict[str, float]]]:
    """Per encoder and variant (``eager`` + ``variants``): p50/p95 latency, items/s, and the ratio to eager.

    Variants take turns in 10 rounds of ``repeats / 10`` calls each (see ``interleaved_times``); the ratio is the
    median over rounds of (variant median / eager median in the same round), with its quartiles as the spread, so a
    load change between rounds cancels instead of landing on one variant.
    """
    from clipslim.eval.bench import interleaved_times, latency_stats

    images, tokens = example_inputs(bundle, batch)
    models = {"eager": bundle.model.eval(), **variants}
    calls = {name: _calls(m, images, tokens) for name, m in models.items()}
    block = max(1, repeats // 10)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for encoder in ("image", "text"):
        with torch.inference_mode():
            times = interleaved_times({n: c[encoder] for n, c in calls.items()}, repeats, warmup, block=block)
        stats = {name: latency_stats(t, batch) for name, t in times.items()}
        for name, s in stats.items():
            s.update(round_ratios(times[name], times["eager"], block))
        out[encoder] = stats
    return out


def round_ratios(times: list[float], reference: list[float], block: int) -> dict[str, float]:
    """Median and quartiles over rounds of ``median(times) / median(reference)`` within each round of ``block``
    calls (the order ``interleaved_times`` records them in)."""
    from statistics import median

    from clipslim.eval.bench import percentile

    rounds = range(0, min(len(times), len(reference)), block)
    ratios = [median(times[i : i + block]) / median(reference[i : i + block]) for i in rounds]
    return {
        "ratio_to_eager": median(ratios),
        "ratio_p25": percentile(ratios, 25),
        "ratio_p75": percentile(ratios, 75),
        "rounds": len(ratios),
    }


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


def _deltas(metrics: dict[str, Any], eager: dict[str, Any]) -> dict[str, float]:
    return {k: v - eager[k] for k, v in metrics.items() if isinstance(v, float) and isinstance(eager.get(k), float)}


def _checks(bundle: Any, variants: dict[str, OrtClip]) -> dict[str, dict[str, Any]]:
    """Parity of every precision on sample inputs, plus the fp16 overflow verdict."""
    from clipslim.deploy.bundle import fp16_overflow, half_nonfinite_rows, peak_activations

    images, tokens = example_inputs(bundle, PARITY_SAMPLES)
    out = {name: {"parity": parity(bundle.model, m, images, tokens)} for name, m in variants.items()}
    if "fp16" in out:
        peaks = peak_activations(bundle.model, images, tokens)
        half_rows = half_nonfinite_rows(bundle.model, images, tokens)
        out["fp16"]["fp16_overflow"] = fp16_overflow(peaks, half_rows, out["fp16"]["parity"])
    if "fp32" in out:
        p = out["fp32"]["parity"]
        out["fp32"]["parity_ok"] = max(p["image_max_abs_diff"], p["text_max_abs_diff"]) <= PARITY_ATOL
    return out


def deploy(
    bundle: Any,
    out_dir: str | Path,
    precisions: list[str] | tuple[str, ...] = ("fp32",),
    *,
    data: str | Path | None = None,
    repeats: int = 30,
    batch_sizes: tuple[int, ...] = (1, 64),
    config: OrtConfig | None = None,
) -> dict[str, Any]:
    """Write the bundles, check, score and time them; writes and returns ``deploy_report.json``."""
    from clipslim.deploy.bundle import write_bundles
    from clipslim.eval.datasets import open_eval_data

    eval_set = open_eval_data(data) if data is not None else None  # a bad path fails before the slow export
    out_dir = Path(out_dir)
    bundle.model.cpu().eval()
    folders = write_bundles(bundle, out_dir, list(precisions))
    config = config or OrtConfig()
    variants = {p: OrtClip.from_folder(f, config) for p, f in folders.items()}
    report: dict[str, Any] = {"model": bundle.spec, "threads": torch.get_num_threads()}
    report["ort_config"] = dataclasses.asdict(config)
    report["precisions"] = _checks(bundle, variants)
    for p, folder in folders.items():
        sizes = {k: (folder / f).stat().st_size for k, f in (("image", IMAGE_FILE), ("text", TEXT_FILE))}
        report["precisions"][p]["file_bytes"] = sizes
    report["latency"] = {f"b{b}": compare_speed(bundle, variants, batch=b, repeats=repeats) for b in batch_sizes}
    if eval_set is not None:
        scores = accuracy(bundle, variants, eval_set)
        report["accuracy"] = {"data": str(data), **scores}
        for p in variants:
            report["precisions"][p]["accuracy_delta_vs_eager"] = _deltas(scores[p], scores["eager"])
    report["table"] = report_table(report)
    atomic_write_json(out_dir / REPORT_FILE, report)
    return report


def report_table(report: dict[str, Any]) -> str:
    """Markdown: one row per precision (and eager) with parity, accuracy delta, latency ratios and sizes."""
    batches = list(report["latency"])
    acc = report.get("accuracy", {})
    head = ["variant", "image max abs / min cos", "text max abs / min cos", "acc1 (Δ vs eager)"]
    head += [f"{e} {b} ms (× eager)" for b in batches for e in ("image", "text")] + ["size MB (image + text)"]
    rows = [_row("eager", report, batches, acc, None)]
    rows += [_row(p, report, batches, acc, info) for p, info in report["precisions"].items()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _row(name: str, report: dict, batches: list[str], acc: dict, info: dict | None) -> list[str]:
    cells = [name]
    for tower in ("image", "text"):
        p = (info or {}).get("parity")
        cells.append(f"{p[f'{tower}_max_abs_diff']:.1e} / {p[f'{tower}_min_cosine']:.5f}" if p else "reference")
    if acc:
        delta = acc[name]["acc1"] - acc["eager"]["acc1"]
        cells.append(f"{100 * acc[name]['acc1']:.2f} ({100 * delta:+.2f})")
    else:
        cells.append("–")
    for b in batches:
        for tower in ("image", "text"):
            s = report["latency"][b][tower][name]
            cells.append(f"{s['latency_ms_p50']:.2f} ({s['ratio_to_eager']:.2f}×)")
    cells.append(f"{sum(info['file_bytes'].values()) / 2**20:.2f}" if info else "–")
    return cells


def deploy_summary(report: dict[str, Any], out_dir: str | Path) -> str:
    """What ``clipslim deploy`` prints: the table, how its ratios were taken, the fp16 overflow verdict, the files."""
    lines = [
        report["table"],
        f"ms: median latency; × eager: median over rounds of ONNX / eager, timed in turns, {report['threads']} "
        "thread(s) for torch and ONNX Runtime alike (--threads)",
    ]
    for tower, v in report["precisions"].get("fp16", {}).get("fp16_overflow", {}).items():
        if v["overflow"]:
            lines.append(
                f"fp16 {tower} tower OVERFLOWS: eager peak activation {v['peak_abs_activation']:.3g} > 65504, inf/nan "
                f"rows of {PARITY_SAMPLES}: {v['torch_fp16_nonfinite_rows']} in PyTorch fp16, "
                f"{v['onnx_fp16_nonfinite_rows']} in the fp16 ONNX on this runtime; use fp32 or int8 for it"
            )
        else:
            lines.append(f"fp16 {tower} tower: no overflow (eager peak activation {v['peak_abs_activation']:.3g}, "
                         f"{v['fp16_headroom']:.0f}x below fp16's max)")  # fmt: skip
    folders = ",".join(report["precisions"])
    lines.append(
        f"wrote {out_dir}/{{{folders}}}/ (image.onnx, text.onnx, tokenizer files, preprocess.json), {REPORT_FILE}"
    )
    return "\n".join(lines)
