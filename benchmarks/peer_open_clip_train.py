"""clipslim vs open_clip_train on the same distillation job, alternating A/B rounds in one run (issue 20).

The job: the demo's 50% student (inherited from ``shapes-teacher:demo``, exported as an open_clip folder) distilled
from the teacher (exported folder), CLIP loss + open_clip_train's distillation loss (= clipslim ``clip`` +
``affinity`` at the teacher's own scale), on a CSV of PNG files (open_clip_train 3.3.0 crashes on the shapes
webdataset shards after its first batch with ``KeyError: 'fname'``), batch 128, fp32, AdamW (lr 1e-3, wd 0.1, betas
0.9/0.98, eps 1e-6), warmup + cosine, grad-norm clip 1.0, open_clip's random-crop training transform, one loader
worker, the same thread count. open_clip_train is the copy inside the pinned open_clip_torch wheel; pandas, which it
needs, is installed into this benchmark's own folder (``--work``/peer-site), never into clipslim's environment.

Each tool reports its own per-step wall time (clipslim: metrics.csv at log_every 1; open_clip_train: its
``Batch (t)`` log line at --log-every-n-steps 1), both including the wait for data; the first ``--skip`` steps of
every run (start-up, allocator warm-up) are dropped. ``speedup`` = open_clip_train median step / clipslim median
step, with each round's paired ratio and a 95% t-interval over rounds.

    python benchmarks/peer_open_clip_train.py       # 5 rounds x 40 steps, ~5 min on 2 cores
    python benchmarks/peer_open_clip_train.py --variant before=train.optimizer=loop,train.fast_attention=false \\
        --variant fused_only=train.fast_attention=false    # each change alone, in the same rounds
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PEER_PACKAGES = ["pandas==2.3.3", "python-dateutil==2.9.0.post0", "pytz==2025.2", "tzdata==2025.2", "six==1.17.0"]
BATCH, LR, WD, WARMUP = 128, 1e-3, 0.1, 10


def sh(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> str:
    """Run a command; on failure print its tail and stop."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout + proc.stderr


def write_csv_data(out: Path, n: int) -> Path:
    """``n`` shapes training pairs as PNG files + ``train.csv`` (filepath, caption), absolute paths for both tools."""
    from clipslim.data.shapes import shard_samples

    table = out / "train.csv"
    if table.is_file() and sum(1 for _ in table.open()) == n + 1:
        return table
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / "train.tmp", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption"])
        for s in shard_samples("train", 0, 0, n, seed=7, image_size=64):
            path = out / "images" / f"{s['__key__']}.png"
            path.write_bytes(s["png"])
            w.writerow([str(path), s["txt"].decode()])
    (out / "train.tmp").replace(table)
    return table


def prepare(work: Path, steps: int) -> dict[str, Path]:
    """Teacher and student folders (exported once), the CSV and the peer's site folder with pandas."""
    teacher, student = work / "teacher", work / "student"
    if not (teacher / "open_clip_config.json").is_file():
        sh(
            [
                str(BIN / "clipslim"),
                "export",
                "--model",
                "shapes-teacher:demo",
                "--out",
                str(teacher),
                "--dtype",
                "fp32",
            ]
        )
    if not (student / "open_clip_config.json").is_file():
        sh([str(BIN / "clipslim"), "inherit", "--teacher", "shapes-teacher:demo", "--student", "shapes-student-50",
            "--out", str(student)])  # fmt: skip
    site = work / "peer-site"
    if not (site / "pandas").is_dir():
        sh([str(BIN / "pip"), "install", "--quiet", "--no-deps", "--target", str(site), *PEER_PACKAGES])
    table = write_csv_data(work / "data", steps * BATCH)
    return {"teacher": teacher, "student": student, "site": site, "csv": table}


def thread_env(threads: int, extra_path: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if extra_path is not None:
        env["PYTHONPATH"] = f"{extra_path}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def run_clipslim(p: dict[str, Path], out: Path, steps: int, threads: int, overrides: list[str]) -> list[float]:
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe = out.parent / "peer.yaml"
    recipe.write_text(
        f"name: peer\nteacher: {p['teacher']}\n"
        f"student: {{arch: shapes-student-50, init: {p['student']}, preprocess: own}}\n"
        f"data: {{train: {p['csv']}, num_workers: 1, augment: true}}\n"
        "objectives: {clip: 1.0, affinity: {weight: 1.0}}\n"
        f"train: {{steps: {steps}, batch_size: {BATCH}, lr: {LR}, weight_decay: {WD}, warmup: {WARMUP},"
        f" betas: [0.9, 0.98], eps: 1.0e-6, grad_clip: 1.0, precision: fp32, log_every: 1, save_every: {steps + 1},"
        " divergence_steps: 0}\n"
    )
    sets = [a for o in overrides for a in ("--set", o)]
    sh([str(BIN / "clipslim"), "train", str(recipe), "--out", str(out), "--quiet", *sets], thread_env(threads))
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    return [BATCH / float(r["pairs_per_s"]) for r in rows]


def run_peer(p: dict[str, Path], out: Path, threads: int) -> list[float]:
    cmd = [
        str(BIN / "python"), "-m", "open_clip_train.main", "--model", f"local-dir:{p['student']}",
        "--distill-model", f"local-dir:{p['teacher']}", "--distill-pretrained", "local", "--train-data", str(p["csv"]),
        "--dataset-type", "csv", "--csv-separator", ",", "--csv-img-key", "filepath", "--csv-caption-key", "caption",
        "--batch-size", str(BATCH), "--epochs", "1", "--lr", str(LR), "--wd", str(WD), "--warmup", str(WARMUP),
        "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--grad-clip-norm", "1.0", "--precision", "fp32",
        "--workers", "1", "--log-every-n-steps", "1", "--device", "cpu", "--logs", str(out.parent), "--name", out.name,
        "--save-frequency", "0", "--zeroshot-frequency", "0", "--report-to", "",
    ]  # fmt: skip
    text = sh(cmd, thread_env(threads, p["site"]), log=out.parent / f"{out.name}.log")
    return [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", text)]


def interval(ratios: list[float]) -> list[float]:
    """95% Student-t interval of the mean round ratio (a single round has none)."""
    if len(ratios) < 2:
        return [float("nan"), float("nan")]
    mean, sem = statistics.mean(ratios), statistics.stdev(ratios) / len(ratios) ** 0.5
    half = stats.t.ppf(0.975, len(ratios) - 1) * sem
    return [round(mean - half, 3), round(mean + half, 3)]


def parse_variants(specs: list[str]) -> dict[str, list[str]]:
    """``NAME=KEY=VALUE[,KEY=VALUE]`` -> {NAME: overrides}; clipslim's defaults always run as ``clipslim``."""
    variants: dict[str, list[str]] = {"clipslim": []}
    for spec in specs:
        name, _, sets = spec.partition("=")
        variants[name] = [s for s in sets.split(",") if s]
    return variants


def one_round(r: int, args: argparse.Namespace, paths: dict[str, Path], variants: dict[str, list[str]]) -> dict:
    """Every tool and variant once, in an order rotated by the round index; per-step medians and wall times."""
    tools = ["open_clip_train", *variants]
    tools = tools[r % len(tools) :] + tools[: r % len(tools)]
    got: dict[str, float] = {}
    for tool in tools:
        out = args.work / "runs" / f"{tool}-{r}"
        sh(["rm", "-rf", str(out)])
        t0 = time.perf_counter()
        if tool == "open_clip_train":
            times = run_peer(paths, out, args.threads)
        else:
            times = run_clipslim(paths, out, args.steps, args.threads, args.overrides + variants[tool])
        if len(times) < args.skip + 3:
            sys.exit(f"{tool}: only {len(times)} step times parsed from round {r}")
        got[tool] = statistics.median(times[args.skip :])
        got[f"{tool}_wall_s"] = round(time.perf_counter() - t0, 1)
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="rounds, tool order rotating (default 5)")
    ap.add_argument("--steps", type=int, default=40, help="training steps per run (default 40)")
    ap.add_argument("--skip", type=int, default=8, help="first steps of each run left out (default 8)")
    ap.add_argument("--threads", type=int, default=1, help="torch/OMP threads for both tools (default 1)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "peer", help="scratch folder (default runs/peer)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="clipslim override, every variant")
    ap.add_argument(
        "--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
        help="another clipslim configuration run in the same rounds, e.g. before=train.optimizer=loop",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "peer_open_clip_train.json")
    args = ap.parse_args()
    paths = prepare(args.work, args.steps)
    variants = parse_variants(args.variant)
    rows: list[dict[str, float]] = []
    for r in range(args.rounds):
        rows.append(one_round(r, args, paths, variants))
        line = ", ".join(f"{t} {rows[-1][t]:.3f}" for t in ["open_clip_train", *variants])
        print(f"round {r} (s/step): {line}", flush=True)
    write(args, rows, variants)


def variant_summary(rows: list[dict[str, float]], name: str, overrides: list[str]) -> dict:
    peer = statistics.median(r["open_clip_train"] for r in rows)
    mine = statistics.median(r[name] for r in rows)
    ratios = [r["open_clip_train"] / r[name] for r in rows]
    return {
        "overrides": overrides, "median_step_s": round(mine, 4), "speedup": round(peer / mine, 3),
        "round_ratios": [round(x, 3) for x in ratios], "ratio_spread": [round(min(ratios), 3), round(max(ratios), 3)],
        "ratio_ci95": interval(ratios),
    }  # fmt: skip


def write(args: argparse.Namespace, rows: list[dict[str, float]], variants: dict[str, list[str]]) -> None:
    per_variant = {name: variant_summary(rows, name, args.overrides + sets) for name, sets in variants.items()}
    result = {
        "job": "demo 50% student from shapes-teacher:demo, clip + distill loss, CSV of 64 px PNGs, batch 128, fp32",
        "threads": args.threads, "steps_per_run": args.steps, "skipped_steps": args.skip, "rounds": args.rounds,
        "torch": torch.__version__, "cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg(),
        "open_clip_train_median_step_s": round(statistics.median(r["open_clip_train"] for r in rows), 4),
        "speedup": per_variant["clipslim"]["speedup"], "variants": per_variant, "rounds_detail": rows,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    keys = ("speedup", "ratio_spread", "ratio_ci95")
    print(json.dumps({name: {k: v[k] for k in keys} for name, v in per_variant.items()}))


if __name__ == "__main__":
    main()
