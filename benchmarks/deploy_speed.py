"""ONNX Runtime against eager PyTorch, one lever at a time, measured side by side in one run.

    python benchmarks/deploy_speed.py --model runs/deploy19/student --threads 1 2 --data runs/deploy19/data
    python benchmarks/deploy_speed.py --quick     # random-init shapes-student-50, 1 thread, few rounds

For each thread count (torch and ONNX Runtime get the same one: ``torch.set_num_threads`` and ``intra_op_num_threads``),
batch size and encoder, eager PyTorch and every variant take turns in 10 rounds (``interleaved_times``); a ratio is
the median over rounds of (variant / eager in that round), with quartiles as the spread. Variants: ``ort`` is
``OrtConfig()`` on the shipped graph (rewritten blocks, opset 20); every other one changes exactly one thing from it:
graph optimisation level, parallel execution (inter-op threads = threads), spinning on, I/O binding, no memory arena,
no memory pattern, ORT at 1 intra-op thread (only when threads > 1), the export graph (opset 18: GELU as Erf
arithmetic; open_clip's blocks without the rewrite), precision (fp16, int8). The 1-minute load average is recorded:
on a shared machine, multi-threaded timings are at the mercy of other jobs (see docs/LOG.md). A random-init model is
fine for latency; ``--data`` adds zero-shot accuracy (trained weights needed). Writes ``results/deploy_speed.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from clipslim.deploy import OrtClip, OrtConfig, accuracy, compare_speed, export_onnx
from clipslim.deploy.onnx import quantize_int8, to_fp16
from clipslim.io import atomic_write_json
from clipslim.models import load_model

TARGET_RATIO = 1.0  # issue 19: ONNX Runtime at least as fast as eager at batch 1 and 64
RESULTS = Path(__file__).parent / "results" / "deploy_speed.json"
CONFIG_LEVERS = {
    "opt_disable": {"optimization": "disable"},
    "opt_basic": {"optimization": "basic"},
    "opt_extended": {"optimization": "extended"},
    "parallel": {"parallel": True},
    "spinning": {"spinning": True},
    "io_binding": {"io_binding": True},
    "no_mem_arena": {"mem_arena": False},
    "no_mem_pattern": {"mem_pattern": False},
}


def export_graphs(bundle: Any, root: Path) -> dict[str, dict[str, Path]]:
    """The shipped fp32 graph, its fp16 / int8 conversions, and the two graph levers (older opset, no rewrite)."""
    graphs = {"ort": export_onnx(bundle, root / "ort")}
    graphs["graph_opset18"] = export_onnx(bundle, root / "opset18", opset=18)
    graphs["graph_no_rewrite"] = export_onnx(bundle, root / "no_rewrite", rewrite=False)
    for name, convert in (("fp16", to_fp16), ("int8", quantize_int8)):
        (root / name).mkdir()
        graphs[name] = {k: convert(p, root / name / p.name) for k, p in graphs["ort"].items()}
    return graphs


def variants(graphs: dict[str, dict[str, Path]], threads: int) -> dict[str, OrtClip]:
    """One session pair per lever; sessions take the current torch thread count."""
    out = {name: OrtClip(files["image"], files["text"]) for name, files in graphs.items()}
    base = graphs["ort"]
    for name, change in CONFIG_LEVERS.items():
        change = {**change, "inter_threads": threads} if change.get("parallel") else change
        out[name] = OrtClip(base["image"], base["text"], OrtConfig(**change))
    if threads > 1:
        out["intra_1"] = OrtClip(base["image"], base["text"], OrtConfig(intra_threads=1))
    return out


def ratios(levers: dict[str, Any]) -> dict[str, list[float]]:
    """``variant_tT_bB_encoder -> [median, p25, p75]`` ratio to eager, the summary to read first."""
    return {
        f"{variant}_{t}_{b}_{encoder}": [
            round(s["ratio_to_eager"], 3),
            round(s["ratio_p25"], 3),
            round(s["ratio_p75"], 3),
        ]
        for t, per_batch in levers.items()
        for b, per_encoder in per_batch.items()
        for encoder, per_variant in per_encoder.items()
        for variant, s in per_variant.items()
        if variant != "eager"
    }


def table(levers: dict[str, Any]) -> str:
    """Markdown: one row per variant, one column per thread count / batch / encoder, "median (p25-p75)"."""
    cols = [(t, b, e) for t, pb in levers.items() for b, pe in pb.items() for e in pe]
    names = list(dict.fromkeys(v for t, b, e in cols for v in levers[t][b][e]))
    lines = ["| variant | " + " | ".join(f"{t} {b} {e}" for t, b, e in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in names:
        cells = []
        for t, b, e in cols:
            s = levers[t][b][e].get(name)
            cells.append(f"{s['ratio_to_eager']:.2f} ({s['ratio_p25']:.2f}-{s['ratio_p75']:.2f})" if s else "")
        if name == "eager":
            cells = [f"{levers[t][b][e]['eager']['latency_ms_p50']:.2f} ms" for t, b, e in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target(levers: dict[str, Any]) -> dict[str, Any]:
    """Per thread count: the default session's worst median ratio over batch sizes and encoders, and whether it
    is <= 1."""
    out = {}
    for t, per_batch in levers.items():
        worst = max(per_encoder[e]["ort"]["ratio_to_eager"] for per_encoder in per_batch.values() for e in per_encoder)
        out[t] = {"ort_worst_ratio": worst, "max": TARGET_RATIO, "met": worst <= TARGET_RATIO}
    return out


def time_levers(bundle: Any, graphs: dict[str, dict[str, Path]], args: argparse.Namespace) -> dict[str, Any]:
    levers: dict[str, Any] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        contenders = variants(graphs, threads)
        levers[f"t{threads}"] = {
            f"b{b}": compare_speed(bundle, contenders, batch=b, repeats=args.repeats, warmup=3)
            for b in args.batch_sizes
        }
        print(f"threads {threads}: timed", flush=True)
    return levers


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    bundle = load_model(args.model)
    bundle.model.eval()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        graphs = export_graphs(bundle, Path(tmp))
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        levers = time_levers(bundle, graphs, args)
        result: dict[str, Any] = {
            "model": args.model, "device": "cpu", "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__, "machine": platform.processor() or platform.machine(),
            "load_average_1min": {"before": load_before, "after": os.getloadavg()[0], "cpu_count": os.cpu_count()},
            "repeats": args.repeats, "command": " ".join(["python", *sys.argv]),
            "default_ort_config": dataclasses.asdict(OrtConfig()), "levers_changed_from_default": CONFIG_LEVERS,
            "target": target(levers), "ratios": ratios(levers), "table": table(levers),
            "setup_s": {"export": export_s, "timing": time.perf_counter() - start}, "levers": levers,
        }  # fmt: skip
        if args.data:
            torch.set_num_threads(args.threads[0])
            picked = {k: OrtClip(graphs[k]["image"], graphs[k]["text"]) for k in ("ort", "fp16", "int8")}
            result["accuracy"] = {"data": args.data, **accuracy(bundle, picked, args.data)}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="shapes-student-50", help="model timed (random init is fine for latency)")
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts, torch and ORT alike")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeats", type=int, help="timed calls per variant (10 rounds; default 50, 10 with --quick)")
    p.add_argument("--quick", action="store_true", help="10 calls per variant")
    p.add_argument("--data", help="eval set: zero-shot accuracy of eager / fp32 / fp16 / int8 (trained --model)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.repeats = args.repeats or (10 if args.quick else 50)
    result = run(args)
    atomic_write_json(args.out, result)
    print(result["table"])
    print(json.dumps({"target": result["target"], "accuracy": result.get("accuracy")}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
