"""One slimmable (Scala) training vs separately trained students of the same widths, at equal compute (issue #9).

The student is ``shapes-student-50`` (image tower: 5 blocks, width 128 = 4 heads of 32) inherited from the demo
teacher; its image tower is slimmed to 25/50/75/100% width (1-4 heads), the text tower stays full.

- ``slimmable``: one run of S steps; the full width distils from the teacher (affinity), and every step activates
  all four widths (``n_random: 2`` with four widths), the smaller ones learning from the next larger one plus their
  own CLIP loss. Each width is then cut out with the ``clipslim slice`` code path and evaluated as a stock model.
- ``separate``: four runs of S steps, one per width, each a stock student of that width (leading heads/channels of
  the same inherited weights) distilled from the teacher with the same affinity loss.
- ``sliced_full``: the separately trained full-width student cut to each width after training (no slimmable
  training): what slicing alone gives.

Equal compute: every width's image tower gets S forward/backward passes in both arms (the slimmable run also runs
the teacher and the text tower once per step instead of four times, so it is cheaper in total). Writes
``benchmarks/results/slimmable_compare.json`` and ``docs/img/slimmable.png``. The machine is shared: wall times are
indicative only.

    python benchmarks/slimmable_compare.py --steps 200
    python benchmarks/slimmable_compare.py --steps 200 --seeds 3   # the README table: OUT/seed<i>/ + compare.json/md

With ``--seeds N`` every seed gets ``OUT/seed<i>/results.json`` (a finished seed is reused when the command is run
again; a half-done one is redone) and the summary holds, per width and arm, the mean with its Student-t 95% interval
and the paired difference (same seed, same data order) against the separate students.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from clipslim.eval.run import evaluate_shapes
from clipslim.eval.stats import mean_interval, paired_interval
from clipslim.export import export_open_clip
from clipslim.inherit import inherit_manual
from clipslim.io import atomic_write_json, atomic_write_text
from clipslim.models import count_params, load_model
from clipslim.recipe import recipe_from_dict
from clipslim.slimmable import SlimmableCLIP
from clipslim.train import train

log = logging.getLogger("slimmable_compare")
WIDTHS = [0.25, 0.5, 0.75, 1.0]
SPLITS = ("all", "heldout", "seen", "ood")
ARMS = ("slimmable", "separate", "sliced_full")


def recipe(args: argparse.Namespace, name: str, student: dict[str, Any], slim: bool) -> dict[str, Any]:
    data = Path(args.data)
    objectives: dict[str, Any] = {"affinity": {"weight": 1.0, "teacher_scale": 50.0}}
    if slim:
        objectives["slimmable"] = {"widths": WIDTHS, "n_random": 2, "isolated": not args.no_isolated}
    return {
        "name": name,
        "teacher": args.teacher,
        "student": student,
        "data": {"train": str(data / "train"), "eval": str(data), "num_workers": 1},
        "objectives": objectives,
        "train": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup": max(1, args.steps // 8),
                  "eval_every": 0, "save_every": args.steps, "seed": args.seed},
    }  # fmt: skip


def zeroshot(folder: Path, data: str) -> dict[str, float]:
    res = evaluate_shapes(load_model(str(folder)), data, progress=False)
    return {k: round(100 * res[f"zeroshot_{k}"]["acc1"], 2) for k in SPLITS if f"zeroshot_{k}" in res}


def visual_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.visual.parameters())


def export_widths(model_dir: Path, out: Path, isolated: bool, widths: list[float]) -> dict[float, Path]:
    """Cut every width out of a trained model (the `clipslim slice` code path) into hub folders."""
    bundle = load_model(str(model_dir))
    slim = SlimmableCLIP(bundle.model.eval(), WIDTHS, isolated=isolated)
    folders = {}
    for r in widths:
        small, cfg = slim.extract(r, bundle.model_cfg)
        folders[r] = export_open_clip(small, cfg, out / f"w{int(r * 100)}", preprocess_cfg=bundle.preprocess_cfg)
    return folders


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    teacher = load_model(args.teacher)
    student = load_model(args.student)
    inherit_manual(teacher.model, student.model)
    init_dir = export_open_clip(student.model, student.model_cfg, out / "init" / "w100")
    inits = export_widths(init_dir, out / "init", isolated=False, widths=WIDTHS[:-1]) | {1.0: init_dir}
    results: dict[str, Any] = {"widths": {}, "wall_s": {}}

    t0 = time.perf_counter()
    slim_spec = {"arch": args.student, "init": "inherit"}
    train(recipe_from_dict(recipe(args, "slimmable", slim_spec, slim=True)), out / "slimmable", progress=False)
    results["wall_s"]["slimmable"] = round(time.perf_counter() - t0, 1)
    slim_folders = export_widths(out / "slimmable" / "student", out / "slimmable" / "slices", not args.no_isolated,
                                 WIDTHS)  # fmt: skip

    results["wall_s"]["separate"] = 0.0
    separate: dict[float, Path] = {}
    for r in WIDTHS if not args.slimmable_only else []:
        t0 = time.perf_counter()
        name = f"separate-w{int(r * 100)}"
        spec = {"arch": str(inits[r]), "init": str(inits[r])}
        train(recipe_from_dict(recipe(args, name, spec, slim=False)), out / name, progress=False)
        results["wall_s"]["separate"] += round(time.perf_counter() - t0, 1)
        separate[r] = out / name / "student"
    sliced = export_widths(separate[1.0], out / "sliced_full", isolated=False, widths=WIDTHS) if separate else {}

    for r in WIDTHS:
        model = load_model(str(slim_folders[r])).model
        row = {"visual_params": visual_params(model), **count_params(model).as_dict()}
        row["slimmable"] = zeroshot(slim_folders[r], args.data)
        if separate:
            row["separate"] = zeroshot(separate[r], args.data)
            row["sliced_full"] = zeroshot(sliced[r], args.data)
        row["init"] = zeroshot(inits[r], args.data)
        results["widths"][str(r)] = row
        log.info("width %s: %s", r, json.dumps(row))
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    from clipslim.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    rows = results["widths"]
    x = [rows[w]["visual_params"] / 1e6 for w in rows]
    for ax, split in zip(axes, ("seen", "heldout"), strict=True):
        for arm, style in (("slimmable", "o-"), ("separate", "s--"), ("sliced_full", "^:")):
            if arm not in rows[next(iter(rows))]:
                continue
            ax.plot(x, [rows[w][arm][split] for w in rows], style, label=arm.replace("_", " "))
        for w, xi in zip(rows, x, strict=True):
            ax.annotate(f"{float(w):g}", (xi, rows[w]["slimmable"][split]), textcoords="offset points", xytext=(3, 4))
        ax.set_xlabel("image tower parameters (M)")
        ax.set_ylabel(f"zero-shot top-1, {split} classes (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"One slimmable checkpoint vs separate students ({results['steps']} steps each, shapes)")
    fig.tight_layout()
    save_figure(fig, path)


def one_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """OUT/seed<i>/results.json, reused when that seed finished before; a half-done seed folder is redone."""
    out = Path(args.out) / f"seed{seed}"
    done = out / "results.json"
    if done.exists():
        log.info("seed %d: reusing %s", seed, done)
        return json.loads(done.read_text())
    if out.exists():
        log.info("seed %d: %s is incomplete, training it again", seed, out)
        shutil.rmtree(out)
    seed_args = argparse.Namespace(**{**vars(args), "seed": seed, "out": str(out)})
    results = {"seed": seed, "steps": args.steps, "batch_size": args.batch_size, **run(seed_args)}
    atomic_write_json(done, results)
    return results


def _iv(values: list[float]) -> dict[str, Any]:
    return {**mean_interval(values).to_dict(), "values": values}


def _paired(values: list[float], base: list[float]) -> dict[str, Any]:
    iv = paired_interval(values, base)
    return {**iv.to_dict(), "tie": iv.crosses_zero}


def seeds_summary(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Per width, arm and split: mean [95% t interval] over seeds, and the paired Δ of each arm vs ``separate``."""
    widths: dict[str, Any] = {}
    for w in per_seed[0]["widths"]:
        rows = [r["widths"][w] for r in per_seed]
        entry: dict[str, Any] = {"visual_params": rows[0]["visual_params"], "arms": {}, "paired_vs_separate": {}}
        for arm in ARMS:
            splits = [k for k in SPLITS if k in rows[0][arm]]
            entry["arms"][arm] = {k: _iv([r[arm][k] for r in rows]) for k in splits}
            if arm != "separate":
                entry["paired_vs_separate"][arm] = {
                    k: _paired([r[arm][k] for r in rows], [r["separate"][k] for r in rows]) for k in splits
                }
        widths[w] = entry
    return {
        "interval": "Student-t 95% over seeds; Δ paired by seed (same data order), arm − separate",
        "seeds": [r["seed"] for r in per_seed],
        "widths": widths,
    }


def _cell(iv: dict[str, Any], signed: bool = False) -> str:
    fmt = "+.1f" if signed else ".1f"
    if iv["ci95"] is None:
        return f"{iv['mean']:{fmt}}"
    lo, hi = iv["ci95"]
    text = f"{iv['mean']:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"
    return f"{text} (tie)" if iv.get("tie") else text


def seeds_markdown(doc: dict[str, Any]) -> str:
    """One table per split: each arm's mean [95% CI] and the paired Δ vs separate students."""
    lines = [f"# slimmable vs separate students (seeds {', '.join(map(str, doc['seeds']))})", "", doc["interval"] + "."]
    for split in SPLITS:
        if split not in doc["widths"]["1.0"]["arms"]["slimmable"]:
            continue
        lines += ["", f"## zero-shot top-1, {split} (%)", ""]
        lines += ["| width | image-tower params | slimmable | separate | sliced full | slimmable − separate |"]
        lines.append("|---|---|---|---|---|---|")
        for w, e in doc["widths"].items():
            arms, d = e["arms"], e["paired_vs_separate"]["slimmable"][split]
            cells = " | ".join(_cell(arms[a][split]) for a in ARMS)
            lines.append(f"| {w} | {e['visual_params'] / 1e6:.2f}M | {cells} | {_cell(d, signed=True)} |")
    return "\n".join(lines) + "\n"


def plot_seeds(doc: dict[str, Any], path: Path, steps: int) -> None:
    """Means over seeds with their 95% intervals as error bars."""
    from clipslim.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    rows = doc["widths"]
    x = [rows[w]["visual_params"] / 1e6 for w in rows]
    for ax, split in zip(axes, ("seen", "heldout", "ood"), strict=True):
        for arm, style in (("slimmable", "o-"), ("separate", "s--"), ("sliced_full", "^:")):
            ivs = [rows[w]["arms"][arm][split] for w in rows]
            err = [[iv["mean"] - (iv["ci95"] or [iv["mean"]] * 2)[0] for iv in ivs],
                   [(iv["ci95"] or [iv["mean"]] * 2)[1] - iv["mean"] for iv in ivs]]  # fmt: skip
            ax.errorbar(x, [iv["mean"] for iv in ivs], yerr=err, fmt=style, capsize=3, label=arm.replace("_", " "))
        ax.set_xlabel("image tower parameters (M)")
        ax.set_ylabel(f"zero-shot top-1, {split} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    n = len(doc["seeds"])
    fig.suptitle(f"One slimmable checkpoint vs separate students ({steps} steps each, shapes, {n} seeds, 95% CI)")
    fig.tight_layout()
    save_figure(fig, path)


def main_seeds(args: argparse.Namespace) -> None:
    per_seed = [one_seed(args, seed) for seed in range(args.seeds)]
    doc = {**seeds_summary(per_seed), "command": "python " + " ".join(sys.argv), "args": vars(args)}
    out = Path(args.json)
    atomic_write_json(out / "compare.json", doc)
    atomic_write_text(out / "compare.md", seeds_markdown(doc))
    plot_seeds(doc, Path(args.plot), args.steps)
    print((out / "compare.md").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="the seed of a one-seed run")
    p.add_argument("--seeds", type=int, default=0, help="N > 0: seeds 0..N-1 into OUT/seed<i>; --json is then a folder")
    p.add_argument("--teacher", default="shapes-teacher:demo")
    p.add_argument("--student", default="shapes-student-50")
    p.add_argument("--data", default=".data/shapes")
    p.add_argument("--no-isolated", action="store_true", help="slimmable arm without isolated activation")
    p.add_argument("--slimmable-only", action="store_true", help="skip the separate students (for ablations)")
    p.add_argument("--out", default="runs/slimmable_compare")
    p.add_argument("--json", default="benchmarks/results/slimmable_compare.json")
    p.add_argument("--plot", default="docs/img/slimmable.png")
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.seeds > 0:
        main_seeds(args)
        return
    if Path(args.out).exists():
        sys.exit(f"{args.out} exists: remove it or pick another --out")
    results = {"steps": args.steps, "batch_size": args.batch_size, "isolated": not args.no_isolated, **run(args)}
    results["command"] = "python " + " ".join(sys.argv)
    results["note"] = (
        "Equal compute: each width's image tower gets the same number of steps in both arms (the slimmable run "
        "activates all 4 widths per step). Accuracies on the 2048-image shapes eval set (held-out = 12 colour x "
        "shape combinations never seen in training). Wall times on a shared 2-core CPU, 1 thread: indicative only."
    )
    atomic_write_json(args.json, results)
    plot(results, Path(args.plot))
    print(json.dumps(results["widths"], indent=1))


if __name__ == "__main__":
    main()
