"""`clipslim demo`: the whole spine on the embedded data, in about ten minutes on two CPU cores.

1. draw the shapes data (cached after the first run);
2. evaluate the shipped teacher (``shapes-teacher:demo``);
3. build the 50% student by weight inheritance and distill it (recipe ``demo_distill``);
4. train the same student from random init for the same steps (recipe ``demo_scratch``);
5. print a table (params, images/s, zero-shot top-1, R@1) and plot loss and accuracy against steps.

Re-running reuses finished runs and resumes interrupted ones, so nothing already computed is lost.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write_json, atomic_write_text, read_mapping
from ..models import ClipBundle, count_params, load_model

log = logging.getLogger(__name__)
TEACHER = "shapes-teacher:demo"
RECIPES = ("demo_distill", "demo_scratch")


def _run_recipe(
    name: str, out: Path, data_dir: Path, steps: int | None, extra: list[str]
) -> tuple[Path, dict[str, Any]]:
    from ..recipe import load_recipe, resolve_recipe
    from ..train import train
    from ..train.checkpoint import latest_checkpoint

    overrides = [f"data.train={data_dir / 'train'}", f"data.eval={data_dir}"]
    if steps is not None:
        overrides += [f"train.steps={steps}", f"train.eval_every={max(1, steps // 4)}"]
    if load_recipe(resolve_recipe(name), overrides).teacher is None:  # e.g. the from-scratch baseline
        extra = [o for o in extra if not o.startswith("teacher=")]
    recipe = load_recipe(resolve_recipe(name), overrides + extra)
    run_dir = out / recipe.name
    done = run_dir / "results.json"
    if done.is_file() and (run_dir / "recipe.yaml").read_text() == _recipe_yaml(recipe):
        log.info("%s: reusing finished run in %s", recipe.name, run_dir)
        return run_dir, read_mapping(done)
    resume = latest_checkpoint(run_dir / "checkpoints") is not None
    if resume and (run_dir / "recipe.yaml").read_text() != _recipe_yaml(recipe):
        raise ValueError(f"{run_dir} holds a run of a different recipe; remove it or pass another --out")
    return run_dir, train(recipe, run_dir, resume=resume)


def _recipe_yaml(recipe: Any) -> str:
    from ..recipe import recipe_to_yaml

    return recipe_to_yaml(recipe)


def _speeds(bundles: list[ClipBundle], rounds: int = 3) -> list[float]:
    """Images/s of each model, measured together after all training, alternating models over several rounds and
    keeping each one's best round, so that a burst of background work does not land on a single model."""
    from ..eval.speed import encoder_throughput

    best = [0.0] * len(bundles)
    for _ in range(rounds):
        for i, b in enumerate(bundles):
            vcfg, tcfg = b.model_cfg["vision_cfg"], b.model_cfg["text_cfg"]
            torch.manual_seed(0)
            speed = encoder_throughput(b.model, vcfg["image_size"], tcfg.get("context_length", 77))
            best[i] = max(best[i], speed["images_per_s"])
    return best


def _row(name: str, bundle: ClipBundle, results: dict[str, Any], images_per_s: float) -> dict[str, Any]:
    return {
        "model": name,
        **count_params(bundle.model).as_dict(),
        "images_per_s": round(images_per_s),
        "zeroshot_heldout_acc1": results["zeroshot_heldout"]["acc1"],
        "zeroshot_seen_acc1": results["zeroshot_seen"]["acc1"],
        "i2t_r1": results["retrieval"]["text_retrieval_recall@1"],
        "t2i_r1": results["retrieval"]["image_retrieval_recall@1"],
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the demo results (the README shows this verbatim)."""
    head = "| model | params (non-emb.) | images/s | zero-shot top-1 held-out | seen | I→T R@1 | T→I R@1 |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f}M ({r['params_non_embedding'] / 1e6:.2f}M) | "
            f"{r['images_per_s']} | {100 * r['zeroshot_heldout_acc1']:.1f} | {100 * r['zeroshot_seen_acc1']:.1f} | "
            f"{100 * r['i2t_r1']:.1f} | {100 * r['t2i_r1']:.1f} |"
        )
    return "\n".join(lines)


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def plot_runs(runs: dict[str, Path], teacher_acc: float, out_png: Path) -> Path:
    """Loss and held-out zero-shot top-1 against steps for each run, the teacher as a reference line."""
    from ..plots import pyplot, save_figure

    plt = pyplot()

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for label, run_dir in runs.items():
        rows = read_csv_rows(run_dir / "metrics.csv")
        ax_loss.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], label=label)
        evals = read_csv_rows(run_dir / "evals.csv")
        steps = [int(r["step"]) for r in evals]
        ax_acc.plot(steps, [100 * float(r["zeroshot_heldout/acc1"]) for r in evals], marker="o", label=label)
    ax_acc.axhline(100 * teacher_acc, color="k", linestyle="--", label="teacher")
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss (each run's own objective)")
    ax_acc.set(xlabel="step", ylabel="top-1 (%)", title="zero-shot top-1, held-out classes", ylim=(0, 100))
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out_png)


def run_demo(
    out: Path,
    steps: int | None = None,
    data_dir: Path = Path(".data/shapes"),
    *,
    teacher: str = TEACHER,
    overrides: tuple[str, ...] = (),
    data_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the demo; ``teacher``, ``overrides`` (applied to both recipes) and ``data_args`` shrink it for tests."""
    from ..data.shapes import write_shapes
    from ..eval.run import evaluate_shapes

    write_shapes(data_dir, **(data_args or {}))
    extra = [f"teacher={teacher}", *overrides]
    teacher_bundle = load_model(teacher)
    measured = [(f"teacher ({teacher})", teacher_bundle, evaluate_shapes(teacher_bundle, data_dir, progress=False))]
    runs: dict[str, Path] = {}
    for name in RECIPES:
        run_dir, results = _run_recipe(name, out, data_dir, steps, extra)
        runs[run_dir.name] = run_dir
        label = "student 50%: inherited + distilled" if "distill" in name else "student 50%: from scratch"
        measured.append((label, load_model(str(run_dir / "student")), results["eval"]))
    speeds = _speeds([bundle for _, bundle, _ in measured])
    rows = [_row(*m, ips) for m, ips in zip(measured, speeds, strict=True)]
    table = format_table(rows)
    atomic_write_text(out / "demo.md", table + "\n")
    atomic_write_json(out / "demo.json", rows)
    plot_runs(runs, rows[0]["zeroshot_heldout_acc1"], out / "demo.png")
    ratio = rows[1]["zeroshot_heldout_acc1"] / max(rows[0]["zeroshot_heldout_acc1"], 1e-9)
    print(table)
    print(f"\ndistilled student reaches {100 * ratio:.1f}% of the teacher's held-out zero-shot top-1")
    print(f"table: {out / 'demo.md'}   plot: {out / 'demo.png'}")
    return {"rows": rows, "teacher_ratio": ratio}
