"""Weight inheritance compared at equal total training steps and equal student size (issue #6).

Five ways to get a 50% student (``shapes-student-50``, 51.8% of the teacher's non-embedding parameters) from the
demo teacher, each distilled with the same affinity-mimicking objective for the same total number of steps:

- ``random``      random init, S steps
- ``manual``      TinyCLIP manual inheritance (interval layers, leading heads/channels), S steps
- ``importance``  importance-ranked inheritance (``--importance`` method, default activation), S steps
- ``auto``        L0 masks on a full teacher copy for S/2 steps (target = the student's size), fused, then S/2 steps
- ``multistage``  100% -> 75% (S/2 steps) -> 50% (S/2 steps), each stage inheriting from the previous student

For each: zero-shot top-1 (held-out and seen classes) of the student right at its start (random/manual/importance:
inheritance alone, no training; auto: the fused model after its masked half; multistage: the 50% stage right after
inheriting from the trained 75% student) and after all S steps, image->text R@1, parameters, wall time. Writes
``OUT/inheritance_compare.json`` and ``.md``. Runs are normal run dirs under OUT: rerunning reuses finished ones and
resumes interrupted ones.

    python benchmarks/inheritance_compare.py --steps 400            # one seed (~20 min on 2 CPU cores)
    python benchmarks/inheritance_compare.py --steps 400 --seeds 3  # the README table: OUT/seed<i>/ + compare.json/md
    python benchmarks/inheritance_compare.py --steps 40 --out runs/ic-smoke

With ``--seeds N`` every seed gets its own folder ``OUT/seed<i>`` (seed i = data order i for every method, so the
methods' differences are paired) and ``OUT/compare.json`` / ``compare.md`` summarise the final students the way
``clipslim compare`` does, with ``manual`` (TinyCLIP's rule) as the baseline of the paired differences, plus the
at-start accuracies with their own intervals.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

from clipslim.eval.stats import mean_interval, paired_interval
from clipslim.io import atomic_write_json, atomic_write_text
from clipslim.models import count_params, load_model
from clipslim.recipe import recipe_from_dict, recipe_to_yaml
from clipslim.train import train
from clipslim.train.checkpoint import latest_checkpoint
from clipslim.workflows.compare import RecipeRuns, summarise, to_markdown
from clipslim.workflows.stages import run_stages

log = logging.getLogger("inheritance_compare")
METHODS = ("random", "manual", "importance", "auto", "multistage")


def base_recipe(args: argparse.Namespace, name: str, steps: int) -> dict[str, Any]:
    data = Path(args.data)
    return {
        "name": name,
        "teacher": args.teacher,
        "student": {"arch": args.student, "init": "inherit"},
        "data": {"train": str(data / "train"), "eval": str(data), "num_workers": 1},
        "objectives": {"clip": 0.0, "affinity": {"weight": 1.0, "teacher_scale": 50.0}},
        "train": {
            "steps": steps, "batch_size": args.batch_size, "lr": args.lr, "warmup": max(1, steps // 8),
            "eval_every": steps, "save_every": max(1, steps // 2), "seed": args.seed,
        },
    }  # fmt: skip


def single_run(args: argparse.Namespace, name: str, init: str) -> dict[str, Any]:
    data = base_recipe(args, name, args.steps)
    data["student"]["init"] = init
    recipe = recipe_from_dict(data)
    run_dir = Path(args.out) / name
    if (run_dir / "results.json").is_file() and (run_dir / "recipe.yaml").read_text() == recipe_to_yaml(recipe):
        log.info("%s: reusing %s", name, run_dir)
    else:
        train(recipe, run_dir, resume=latest_checkpoint(run_dir / "checkpoints") is not None)
    return _summary(run_dir, run_dir, json.loads((run_dir / "results.json").read_text()))


def _half(steps: int) -> tuple[int, int]:
    first = max(1, steps // 2)
    return first, max(1, steps - first)


def stage_run(args: argparse.Namespace, name: str, stages: list[dict[str, Any]]) -> dict[str, Any]:
    """A multi-stage recipe starting from the teacher; each stage evaluates at its start and its end."""
    data = base_recipe(args, name, args.steps)
    data["student"] = {"arch": args.teacher_arch, "init": args.teacher}
    data["stages"] = stages
    summary = run_stages(recipe_from_dict(data), Path(args.out) / name, progress=not args.quiet)
    last = Path(summary["stages"][-1]["run_dir"])
    return _summary(last, Path(args.out) / name, json.loads((last / "results.json").read_text()))


def auto_stages(args: argparse.Namespace) -> list[dict[str, Any]]:
    first, second = _half(args.steps)
    target = 1 - count_params(load_model(args.student).model).non_embedding / _teacher_params(args)
    l0 = {"target_sparsity": round(target, 4), "ramp_steps": max(1, (3 * first) // 4)}
    return [
        {"name": "prune", "init": "continue", "steps": first, "l0": l0},
        {"name": "distill", "init": "continue", "steps": second},
    ]


def multistage_stages(args: argparse.Namespace) -> list[dict[str, Any]]:
    first, second = _half(args.steps)
    width75 = {"vision_cfg": {"width": args.intermediate_width}}
    return [
        {"name": "s75", "arch": args.teacher_arch, "model_cfg": width75, "init": "inherit", "steps": first},
        {"name": "s50", "arch": args.student, "init": "inherit", "steps": second},
    ]


def _teacher_params(args: argparse.Namespace) -> int:
    return count_params(load_model(args.teacher).model).non_embedding


def _evals(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "evals.csv"
    return list(csv.DictReader(path.open())) if path.is_file() else []


def _summary(run_dir: Path, root: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Start (first eval row, or the fused model) and end accuracy of the final student."""
    rows = _evals(run_dir)
    start = {k: float(rows[0][f"{k}/acc1"]) for k in ("zeroshot_heldout", "zeroshot_seen")} if rows else {}
    ev = results["eval"]
    return {
        "run_dir": str(root),
        "results": str(run_dir / "results.json"),
        "params_non_embedding": results["params_non_embedding"],
        "start_heldout": start.get("zeroshot_heldout"),
        "start_seen": start.get("zeroshot_seen"),
        "end_heldout": ev["zeroshot_heldout"]["acc1"],
        "end_seen": ev["zeroshot_seen"]["acc1"],
        "end_image_r1": ev["retrieval"]["image_retrieval_recall@1"],
    }


def run_method(args: argparse.Namespace, method: str) -> dict[str, Any]:
    tick = time.perf_counter()
    if method == "random":
        row = single_run(args, "random", "random")
    elif method == "manual":
        row = single_run(args, "manual", "inherit")
    elif method == "importance":
        row = single_run(args, f"importance-{args.importance}", f"importance:{args.importance}")
    elif method == "auto":
        row = stage_run(args, "auto", auto_stages(args))
    else:
        row = stage_run(args, "multistage", multistage_stages(args))
    return {"method": method, **row, "wall_s": round(time.perf_counter() - tick, 1)}


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, teacher: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    lines = [
        f"Student {args.student} from {args.teacher}, {args.steps} total steps x {args.batch_size} pairs, "
        f"affinity mimicking (teacher scale 50). Zero-shot top-1 % (held-out / seen classes). "
        f"Teacher: {pct(teacher['heldout'])} / {pct(teacher['seen'])}.",
        "",
        "| method | params (non-emb.) | at start: held-out / seen | after all steps: held-out / seen "
        "| image retrieval R@1 | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['params_non_embedding'] / 1e6:.2f}M | {pct(r['start_heldout'])} / "
            f"{pct(r['start_seen'])} | {pct(r['end_heldout'])} / {pct(r['end_seen'])} | {pct(r['end_image_r1'])} "
            f"| {r['wall_s']} |"
        )
    lines += [
        "",
        "At start: random/manual/importance = the initialised student before any training; auto = the fused model "
        "after the masked half; multistage = the 50% stage right after inheriting from the trained 75% one.",
    ]
    return "\n".join(lines) + "\n"


def teacher_eval(args: argparse.Namespace) -> dict[str, float]:
    from clipslim.eval.run import evaluate_shapes

    ev = evaluate_shapes(load_model(args.teacher), args.data, progress=False)
    return {"heldout": ev["zeroshot_heldout"]["acc1"], "seen": ev["zeroshot_seen"]["acc1"]}


def one_seed(args: argparse.Namespace, methods: list[str], teacher: dict[str, float]) -> list[dict[str, Any]]:
    """Every method at args.seed into args.out; writes that folder's inheritance_compare.json / .md."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [run_method(args, m) for m in methods]
    doc = {"args": vars(args), "teacher": teacher, "rows": rows}
    atomic_write_json(out / "inheritance_compare.json", doc)
    atomic_write_text(out / "inheritance_compare.md", markdown(rows, args, teacher))
    print((out / "inheritance_compare.md").read_text())
    return rows


def seeds_summary(per_seed: dict[int, list[dict[str, Any]]], methods: list[str]) -> dict[str, Any]:
    """compare.json for the final students (baseline: manual when run, else the first method) plus the at-start
    top-1 of each method: mean, t interval and the paired difference vs the baseline."""
    order = ["manual", *[m for m in methods if m != "manual"]] if "manual" in methods else methods
    groups = []
    for method in order:
        g = RecipeRuns(method, Path(method))
        for seed, rows in per_seed.items():
            row = next(r for r in rows if r["method"] == method)
            g.results[seed] = json.loads(Path(row["results"]).read_text())
        groups.append(g)
    doc = summarise(groups, sorted(per_seed))
    doc["start"] = {}
    for key in ("start_heldout", "start_seen"):
        values = {m: [next(r for r in rows if r["method"] == m)[key] for rows in per_seed.values()] for m in order}
        doc["start"][key] = {
            m: {
                **mean_interval(v).to_dict(),
                "values": v,
                "paired_vs_" + order[0]: paired_interval(v, values[order[0]]).to_dict(),
            }
            for m, v in values.items()
            if None not in v
        }
    return doc


def start_markdown(doc: dict[str, Any]) -> str:
    """The at-start table (mean [95% CI] per method) that goes after compare.md's tables."""
    base = doc["baseline"]
    lines = ["", "## at start (right after inheritance; auto: fused model; multistage: 50% stage start)", ""]
    lines += [f"| method | held-out | seen | held-out Δ vs {base} | seen Δ vs {base} |", "|---|---|---|---|---|"]
    held, seen = doc["start"]["start_heldout"], doc["start"]["start_seen"]
    for m in held:

        def cell(iv: dict[str, Any], sign: str = "") -> str:
            lo, hi = iv["ci95"] or (float("nan"), float("nan"))
            return f"{100 * iv['mean']:{sign}.1f} [{100 * lo:{sign}.1f}, {100 * hi:{sign}.1f}]"

        lines.append(
            f"| {m} | {cell(held[m])} | {cell(seen[m])} | {cell(held[m]['paired_vs_' + base], '+')} "
            f"| {cell(seen[m]['paired_vs_' + base], '+')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400, help="total training steps per method")
    p.add_argument("--teacher", default="shapes-teacher:demo")
    p.add_argument("--teacher-arch", default="shapes-teacher", help="architecture of --teacher (multistage 75%%)")
    p.add_argument("--student", default="shapes-student-50")
    p.add_argument("--intermediate-width", type=int, default=128, help="multistage: the 75%% stage's vision width")
    p.add_argument("--importance", default="activation", choices=["magnitude", "activation", "gradient"])
    p.add_argument("--data", default=".data/shapes")
    p.add_argument("--out", default="runs/inheritance_compare")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="the seed of a one-seed run")
    p.add_argument("--seeds", type=int, default=0, help="N > 0: seeds 0..N-1 into OUT/seed<i>, then compare.json")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    teacher = teacher_eval(args)
    if args.seeds <= 0:
        one_seed(args, methods, teacher)
        return
    out, per_seed = Path(args.out), {}
    for seed in range(args.seeds):
        per_seed[seed] = one_seed(
            argparse.Namespace(**{**vars(args), "seed": seed, "out": str(out / f"seed{seed}")}), methods, teacher
        )
    doc = {**seeds_summary(per_seed, methods), "teacher": teacher, "args": vars(args)}
    atomic_write_json(out / "compare.json", doc)
    atomic_write_text(out / "compare.md", to_markdown(doc) + start_markdown(doc))
    print((out / "compare.md").read_text())


if __name__ == "__main__":
    main()
