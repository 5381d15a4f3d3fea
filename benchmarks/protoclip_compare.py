"""ProtoCLIP ablation on the demo data at equal steps: CLIP only, + prototypes, + PBT, + external MiniLM teacher, and
with affinity distillation; plus the per-episode cost (feature extraction pass, k-means + PBT) against step time.

    python benchmarks/protoclip_compare.py --steps 300 --batch-size 64

Every variant trains shapes-student-50 from random init (ProtoCLIP trains from scratch) with the same seed, data
order, lr schedule and steps; the shipped teacher only runs for the affinity rows. Writes
benchmarks/results/protoclip_compare.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from clipslim.recipe import recipe_from_dict
from clipslim.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]


def variants(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    proto = {
        "weight": 1.0, "episode_steps": args.episode_steps, "warmup_episodes": 1, "k": args.k,
        "hidden_dim": args.hidden_dim, "dim": 128,
    }  # fmt: skip
    minilm = {**proto, "external": "minilm", "external_cache": args.minilm_cache}
    affinity = {"weight": 1.0, "teacher_scale": 50.0}
    return {
        "clip": {"clip": 1.0},
        "clip+proto": {"clip": 1.0, "proto": {**proto, "pbt": False}},
        "clip+proto+pbt": {"clip": 1.0, "proto": proto},
        "clip+proto+pbt+minilm": {"clip": 1.0, "proto": minilm},
        "clip+affinity": {"clip": 1.0, "affinity": affinity},
        "clip+affinity+proto+pbt+minilm": {"clip": 1.0, "affinity": affinity, "proto": minilm},
        "clip+proto+pbt+teacher_text": {"clip": 1.0, "proto": {**proto, "external": "teacher"}},
    }


def run_one(name: str, objectives: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    recipe = recipe_from_dict(
        {
            "name": "protoclip-" + name.replace("+", "_"),
            "teacher": "shapes-teacher:demo",
            "student": {"arch": "shapes-student-50", "init": "random"},
            "data": {"train": args.data + "/train", "eval": args.data, "num_workers": args.workers},
            "objectives": objectives,
            "train": {
                "steps": args.steps, "batch_size": args.batch_size, "lr": 1e-3, "warmup": 50, "seed": args.seed,
                "device": args.device, "save_every": 10_000, "log_every": 10,
            },
        }
    )  # fmt: skip
    out = Path(args.runs) / name.replace("+", "_")
    shutil.rmtree(out, ignore_errors=True)
    trainer = Trainer(recipe, out, progress=False)
    eval_s = []
    evaluate = trainer.evaluate

    def timed_eval() -> Any:
        t = time.perf_counter()
        res = evaluate()
        eval_s.append(time.perf_counter() - t)
        return res

    trainer.evaluate = timed_eval  # type: ignore[method-assign]
    t0 = time.perf_counter()
    results = trainer.run()
    wall = time.perf_counter() - t0 - sum(eval_s)
    ev = results["eval"]
    row: dict[str, Any] = {
        "heldout_top1": _pct(ev["zeroshot_heldout"]["acc1"]), "seen_top1": _pct(ev["zeroshot_seen"]["acc1"]),
        "i2t_r1": _pct(ev["retrieval"]["text_retrieval_recall@1"]),
        "t2i_r1": _pct(ev["retrieval"]["image_retrieval_recall@1"]),
    }  # fmt: skip
    proto = trainer.built.distiller.objectives["proto"] if "proto" in objectives else None
    timings = proto.builder.timings if proto is not None and proto.builder is not None else []
    episode_s = sum(t["extract_s"] + t["cluster_s"] for t in timings)
    step_s = (wall - episode_s) / args.steps  # training steps only (export and cache building included, small)
    row["s_per_step"] = round(step_s, 4)
    if timings:
        extract = statistics.median(t["extract_s"] for t in timings)
        cluster = statistics.median(t["cluster_s"] for t in timings)
        row["episodes"] = len(timings)
        row["episode_samples"] = int(timings[0]["samples"])
        row["episode_extract_s"] = round(extract, 3)
        row["episode_cluster_s"] = round(cluster, 4)
        row["episode_in_steps"] = round((extract + cluster) / step_s, 2)
        row["overhead_per_step"] = round((extract + cluster) / (args.episode_steps * step_s), 4)
        row["cluster_overhead_per_step"] = round(cluster / (args.episode_steps * step_s), 5)
        last = trainer.metrics.rows[-1]
        row["proto_matched"] = last.get("proto_matched")
    if proto is not None and proto.builder is not None:
        proto.builder.close()
    del trainer.evaluate  # the timing wrapper refers back to the trainer: break that cycle
    trainer.stream._it = None  # and stop this run's loader workers now
    del trainer, proto
    gc.collect()  # loader workers of this variant end before the next one starts
    return row


def _pct(x: float) -> float:
    return round(100 * x, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--episode-steps", type=int, default=50)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default=str(ROOT / ".data/shapes"))
    p.add_argument("--minilm-cache", default=str(ROOT / "runs/proto_cache/external_minilm.safetensors"))
    p.add_argument("--runs", default=str(ROOT / "runs/protoclip_compare"))
    p.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/protoclip_compare.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows: dict[str, Any] = {}
    for name, objectives in variants(args).items():
        if args.only and name not in args.only:
            continue
        rows[name] = run_one(name, objectives, args)
        print(name, json.dumps(rows[name]), flush=True)
        write_report(args, rows)  # after every variant, so a cut-short run keeps what it measured


def write_report(args: argparse.Namespace, rows: dict[str, Any]) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    report = {
        "command": "python benchmarks/protoclip_compare.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in (
                ("steps", args.steps),
                ("batch_size", args.batch_size),
                ("episode_steps", args.episode_steps),
                ("k", args.k),
                ("hidden_dim", args.hidden_dim),
                ("device", args.device),
                ("threads", args.threads),
                ("workers", args.workers),
            )
        ),  # fmt: skip
        "device": device,
        "host": platform.node(),
        "torch": torch.__version__,
        "student": "shapes-student-50, random init",
        "note": "one seed; accuracies in %; s_per_step excludes episode building and evaluation; overhead_per_step "
        "is (extraction pass + k-means + PBT) per episode / (episode_steps x s_per_step)",
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
