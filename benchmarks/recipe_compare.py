"""Run the anchors' objective mixes on the demo data for the same steps and tabulate accuracy and step time.

    python benchmarks/recipe_compare.py --steps 300 --out runs/recipe_compare

Each recipe is an ordinary run directory under --out (finished runs are reused, interrupted ones resume), so the
table can be rebuilt at any time. Results: <out>/recipe_compare.json and .md.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from clipslim.data.shapes import write_shapes
from clipslim.io import atomic_write_json, atomic_write_text
from clipslim.recipe import load_recipe, recipe_to_yaml, resolve_recipe
from clipslim.train import train
from clipslim.train.checkpoint import latest_checkpoint

RECIPES = ("demo_scratch", "openclip_distill", "tinyclip", "mobileclip", "clipkd")


def run_one(name: str, out: Path, data: Path, steps: int) -> dict:
    overrides = [f"data.train={data / 'train'}", f"data.eval={data}", f"train.steps={steps}", "train.eval_every=0"]
    recipe = load_recipe(resolve_recipe(name), overrides)
    run_dir = out / recipe.name
    same = (run_dir / "recipe.yaml").is_file() and (run_dir / "recipe.yaml").read_text() == recipe_to_yaml(recipe)
    if same and (run_dir / "results.json").is_file():
        results = json.loads((run_dir / "results.json").read_text())
    else:
        results = train(recipe, run_dir, resume=same and latest_checkpoint(run_dir / "checkpoints") is not None)
    with open(run_dir / "metrics.csv", newline="") as f:
        rates = [float(r["pairs_per_s"]) for r in csv.DictReader(f)][1:]  # the first window includes start-up
    ev = results["eval"]
    return {
        "recipe": name,
        "objectives": {s.name: s.weight for s in recipe.objective_specs()},
        "init": recipe.student.init,
        "heldout_acc1": ev["zeroshot_heldout"]["acc1"],
        "seen_acc1": ev["zeroshot_seen"]["acc1"],
        "i2t_r1": ev["retrieval"]["text_retrieval_recall@1"],
        "t2i_r1": ev["retrieval"]["image_retrieval_recall@1"],
        "s_per_step": recipe.train.batch_size / statistics.median(rates),
    }


def table(rows: list[dict]) -> str:
    lines = ["| recipe | init | objectives (weight) | held-out top-1 | seen top-1 | I→T R@1 | T→I R@1 | s/step |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        objs = ", ".join(f"{k} {v:g}" for k, v in r["objectives"].items())
        lines.append(
            f"| {r['recipe']} | {r['init']} | {objs} | {100 * r['heldout_acc1']:.1f} | {100 * r['seen_acc1']:.1f} | "
            f"{100 * r['i2t_r1']:.1f} | {100 * r['t2i_r1']:.1f} | {r['s_per_step']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", type=Path, default=Path("runs/recipe_compare"))
    p.add_argument("--data", type=Path, default=Path(".data/shapes"))
    p.add_argument("--recipes", nargs="+", default=list(RECIPES))
    args = p.parse_args()
    write_shapes(args.data)
    rows = [run_one(name, args.out, args.data, args.steps) for name in args.recipes]
    atomic_write_json(args.out / "recipe_compare.json", {"steps": args.steps, "rows": rows})
    atomic_write_text(args.out / "recipe_compare.md", table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
