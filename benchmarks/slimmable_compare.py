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
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from clipslim.eval.run import evaluate_shapes
from clipslim.export import export_open_clip
from clipslim.inherit import inherit_manual
from clipslim.io import atomic_write_json
from clipslim.models import count_params, load_model
from clipslim.recipe import recipe_from_dict
from clipslim.slimmable import SlimmableCLIP
from clipslim.train import train

log = logging.getLogger("slimmable_compare")
WIDTHS = [0.25, 0.5, 0.75, 1.0]


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
    return {k: round(100 * res[f"zeroshot_{k}"]["acc1"], 2) for k in ("all", "heldout", "seen")}


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
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
