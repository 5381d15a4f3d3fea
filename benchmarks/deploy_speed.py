"""ONNX Runtime (fp32, int8) and torch.compile against eager PyTorch, measured side by side in one run.

    python benchmarks/deploy_speed.py            # shapes-student-50, batch 1 and 64, torch.compile included
    python benchmarks/deploy_speed.py --quick    # batch 1 only, fewer repeats, no torch.compile
    python benchmarks/deploy_speed.py --data .data/shapes   # + zero-shot accuracy of eager / ONNX / int8

Variants are timed in turns (10 rounds, one block of calls each per round, see ``interleaved_times``) with the same
number of threads, so a load change on a shared machine hits all of them alike and the ratios stay meaningful;
the 1-minute load average before and after is recorded because on a busy machine torch's OpenMP threads stall
far more than ONNX Runtime's (``--threads 1`` is the robust comparison there). Latency ratios are p50 over eager.
The target the issue set: ONNX Runtime batch-1 image-encoder latency <= 0.7x eager on CPU; the result records it
either way. A random-init model is fine for latency; accuracy needs trained weights (``--accuracy-model``, by
default the shipped teacher). Writes ``benchmarks/results/deploy_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from clipslim.deploy import OrtClip, accuracy, compare_speed, export_onnx, quantize_int8
from clipslim.deploy.compiled import compile_clip
from clipslim.io import atomic_write_json
from clipslim.models import load_model

TARGET_RATIO = 0.7
RESULTS = Path(__file__).parent / "results" / "deploy_speed.json"


def _variants(bundle: Any, folder: Path, compile_: bool) -> tuple[dict[str, Any], dict[str, float]]:
    """ONNX fp32 and int8 sessions (+ the compiled model) and how long each took to build."""
    setup: dict[str, float] = {}
    start = time.perf_counter()
    files = export_onnx(bundle, folder)
    setup["onnx_export_s"] = time.perf_counter() - start
    start = time.perf_counter()
    int8 = {k: quantize_int8(p) for k, p in files.items()}
    setup["int8_quantize_s"] = time.perf_counter() - start
    variants: dict[str, Any] = {"onnx": OrtClip(files["image"], files["text"])}
    variants["onnx_int8"] = OrtClip(int8["image"], int8["text"])
    if compile_:
        variants["compiled"] = compile_clip(bundle.model)  # compiles lazily, during the warm-up calls
    return variants, setup


def _ratios(speed: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    return {
        f"{variant}_vs_eager_{encoder}_b{batch}": stats["ratio_to_eager"]
        for batch, per_encoder in speed.items()
        for encoder, per_variant in per_encoder.items()
        for variant, stats in per_variant.items()
        if variant != "eager"
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    bundle = load_model(args.model)
    bundle.model.eval()
    load_before = os.getloadavg()[0]
    batches = [1] if args.quick else args.batch_sizes
    repeats = args.repeats or (30 if args.quick else 200)
    with tempfile.TemporaryDirectory() as tmp:
        variants, setup = _variants(bundle, Path(tmp), compile_=not (args.quick or args.no_compile))
        warmup = 3 if "compiled" not in variants else 5  # the first compiled call compiles
        start = time.perf_counter()
        speed = {b: compare_speed(bundle, variants, batch=b, repeats=repeats, warmup=warmup) for b in batches}
        setup["timing_s"] = time.perf_counter() - start
        ratio = speed[1]["image"]["onnx"]["ratio_to_eager"]
        target = {"onnx_image_b1_ratio_max": TARGET_RATIO, "onnx_image_b1_ratio": ratio, "met": ratio <= TARGET_RATIO}
        result: dict[str, Any] = {
            "model": args.model, "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__, "machine": platform.processor() or platform.machine(),
            "load_average_1min": {"before": load_before, "after": os.getloadavg()[0], "cpu_count": os.cpu_count()},
            "quick": args.quick, "repeats": repeats, "command": " ".join(["python", *sys.argv]),
            "target": target,
            "ratios": _ratios(speed), "setup": setup, "speed": {f"b{b}": s for b, s in speed.items()},
        }  # fmt: skip
        if args.data:
            result["accuracy"] = _accuracy(args, Path(tmp) / "acc")
    return result


def _accuracy(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Zero-shot metrics of eager, ONNX and int8 ONNX for trained weights (random-init accuracy means nothing)."""
    bundle = load_model(args.accuracy_model)
    bundle.model.eval()
    files = export_onnx(bundle, folder)
    int8 = {k: quantize_int8(p) for k, p in files.items()}
    variants = {"onnx": OrtClip(files["image"], files["text"]), "onnx_int8": OrtClip(int8["image"], int8["text"])}
    return {"model": args.accuracy_model, "data": str(args.data), **accuracy(bundle, variants, args.data)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="shapes-student-50", help="model timed (random init is fine)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeats", type=int, help="timed rounds (default 200, 30 with --quick)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile on CPU)")
    p.add_argument("--quick", action="store_true", help="batch 1 only, 30 rounds, no torch.compile")
    p.add_argument("--data", help="eval set for int8 accuracy, e.g. .data/shapes")
    p.add_argument("--accuracy-model", default="shapes-teacher:demo", help="trained model for --data")
    p.add_argument("--threads", type=int, help="torch and ONNX Runtime intra-op threads (default: torch's)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # OrtClip sessions take torch's thread count
    if 1 not in args.batch_sizes:
        args.batch_sizes = [1, *args.batch_sizes]
    result = run(args)
    atomic_write_json(args.out, result)
    print(json.dumps({"target": result["target"], "ratios": result["ratios"]}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
