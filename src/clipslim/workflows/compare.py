"""Train and evaluate several recipes at several seeds; summarise with t intervals and paired differences.

Why: one seed cannot carry a claim (issue 16: a from-scratch student's held-out top-1 spanned 12.8 points over three
seeds). Seed i sets ``train.seed = i`` for every recipe, so recipes at the same seed see the same data order and
their difference is paired, which removes the seed-to-seed swing the recipes share.

Layout: ``DIR/runs/<recipe>/seed<i>/`` (a normal run dir), ``DIR/compare.json``, ``DIR/compare.md``. Re-running the
same command skips finished runs and resumes an interrupted one from its latest checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..config import ConfigError, RunError
from ..eval.stats import METHOD, Interval, mean_interval, paired_interval
from ..io import atomic_write_json, atomic_write_text

# metric name -> (group in a run's results["eval"], key in that group); all are fractions in [0, 1].
METRICS: dict[str, tuple[str, str]] = {
    "heldout_acc1": ("zeroshot_heldout", "acc1"),
    "seen_acc1": ("zeroshot_seen", "acc1"),
    "ood_acc1": ("zeroshot_ood", "acc1"),
    "acc1": ("zeroshot_all", "acc1"),
    "image_retrieval_recall@1": ("retrieval", "image_retrieval_recall@1"),
    "text_retrieval_recall@1": ("retrieval", "text_retrieval_recall@1"),
    "image_retrieval_class_recall@1": ("retrieval", "image_retrieval_class_recall@1"),
    "text_retrieval_class_recall@1": ("retrieval", "text_retrieval_class_recall@1"),
}
TIE = "not significant (tie)"
# the columns of compare.md's one-glance summary table (the per-metric tables below it have every metric)
SUMMARY_METRICS = (
    "heldout_acc1",
    "seen_acc1",
    "ood_acc1",
    "image_retrieval_class_recall@1",
    "text_retrieval_class_recall@1",
)
TrainFn = Callable[..., dict[str, Any]]


@dataclass
class RecipeRuns:
    """One recipe's runs: its label (the recipe argument's stem), source path and per-seed results."""

    label: str
    path: Path
    results: dict[int, dict[str, Any]] = field(default_factory=dict)

    def values(self, metric: str) -> dict[int, float]:
        """Per-seed value of a metric, leaving out seeds where it is missing or NaN (e.g. no ood split)."""
        group, key = METRICS[metric]
        out = {}
        for seed, res in self.results.items():
            value = ((res.get("eval") or {}).get(group) or {}).get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                out[seed] = float(value)
        return out


def labels_for(paths: Sequence[str | Path]) -> list[str]:
    """Recipe labels (file stems); the same recipe twice is an error, since its runs would share a folder."""
    labels = [Path(p).stem for p in paths]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ConfigError(
            f"compare: recipe {', '.join(dupes)} given twice (each recipe once, the first is the baseline)"
        )
    return labels


def _default_train() -> TrainFn:
    from ..train import train  # lazy: the trainer pulls in torch and open_clip

    return train


def run_one(recipe: Any, run_dir: Path, train_fn: TrainFn, progress: bool) -> dict[str, Any]:
    """A finished run's results (read back), else train it: resumed when it has a checkpoint, fresh otherwise."""
    from ..recipe import recipe_to_yaml
    from ..train.checkpoint import latest_checkpoint

    wanted = recipe_to_yaml(recipe)
    written = run_dir / "recipe.yaml"
    if written.is_file() and written.read_text(encoding="utf-8") != wanted:
        raise ConfigError(f"{written}: made with a different recipe or --set; delete {run_dir} or use another --out")
    done = run_dir / "results.json"
    if done.is_file():
        results = json.loads(done.read_text(encoding="utf-8"))
        if results.get("steps") == recipe.train.steps:
            return results
    resume = latest_checkpoint(run_dir / "checkpoints") is not None
    results = train_fn(recipe, run_dir, resume=resume, progress=progress)
    if "stopped_at" in results:
        raise RunError(f"{run_dir}: stopped at step {results['stopped_at']}; run the same compare again to resume")
    return results


def run_compare(
    recipes: Sequence[str | Path],
    out: str | Path,
    seeds: int = 3,
    overrides: Sequence[str] = (),
    progress: bool = True,
    train_fn: TrainFn | None = None,
) -> dict[str, Any]:
    """Train every recipe at seeds 0..seeds-1 (one run after another), then write compare.json and compare.md."""
    from ..recipe import load_recipe

    if seeds < 1:
        raise ConfigError(f"compare: --seeds must be >= 1, got {seeds}")
    out, train_fn = Path(out), train_fn or _default_train()
    groups = [RecipeRuns(label, Path(p)) for label, p in zip(labels_for(recipes), recipes, strict=True)]
    loaded = {}
    for g in groups:  # every recipe is checked before the first run starts
        for seed in range(seeds):
            recipe = load_recipe(g.path, [*overrides, f"train.seed={seed}"])
            if recipe.stages:
                raise ConfigError(f"{g.path}: compare runs single-stage recipes (this one has stages:)")
            loaded[g.label, seed] = recipe
    pairs = [(g, seed) for g in groups for seed in range(seeds)]
    for g, seed in tqdm(pairs, desc="compare", unit="run", disable=not progress):
        g.results[seed] = run_one(loaded[g.label, seed], run_dir(out, g.label, seed), train_fn, progress)
    summary = summarise(groups, list(range(seeds)), overrides)
    atomic_write_json(out / "compare.json", summary)
    atomic_write_text(out / "compare.md", to_markdown(summary))
    return summary


def run_dir(out: Path, label: str, seed: int) -> Path:
    return out / "runs" / label / f"seed{seed}"


def _paired(group: RecipeRuns, base: RecipeRuns, metric: str) -> dict[str, Any] | None:
    mine, theirs = group.values(metric), base.values(metric)
    common = sorted(set(mine) & set(theirs))
    if not common:
        return None
    iv = paired_interval([mine[s] for s in common], [theirs[s] for s in common])
    return {**iv.to_dict(), "seeds": common, "diffs": [mine[s] - theirs[s] for s in common], "tie": iv.crosses_zero}


def summarise(groups: Sequence[RecipeRuns], seeds: list[int], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """compare.json: per recipe and metric the mean, t interval, n and per-seed values; paired differences vs the
    first recipe (same seed) with their t interval and whether it crosses 0 (a tie)."""
    base = groups[0]
    doc: dict[str, Any] = {"interval": METHOD, "paired": "recipe − baseline at the same seed (same data order)"}
    doc.update({"seeds": seeds, "overrides": list(overrides), "baseline": base.label, "recipes": {}})
    for g in groups:
        metrics = {}
        for name in METRICS:
            values = g.values(name)
            if values:
                iv = mean_interval(list(values.values()))
                metrics[name] = {**iv.to_dict(), "seeds": sorted(values), "values": [values[s] for s in sorted(values)]}
        entry: dict[str, Any] = {"recipe": str(g.path), "metrics": metrics}
        if g is not base:
            entry["paired"] = {m: p for m in METRICS if (p := _paired(g, base, m)) is not None}
        doc["recipes"][g.label] = entry
    return doc


def _pct(iv: dict[str, Any], signed: bool = False) -> str:
    sign = "+" if signed else ""
    text = f"{100 * iv['mean']:{sign}.1f}"
    if iv.get("ci95") is None:
        return f"{text} (n={iv['n']}, no interval)"
    lo, hi = iv["ci95"]
    return f"{text} [{100 * lo:{sign}.1f}, {100 * hi:{sign}.1f}]"


def _verdict(paired: dict[str, Any]) -> str:
    if paired["tie"]:
        return TIE
    return "higher" if paired["mean"] > 0 else "lower"


def _summary_cell(r: dict[str, Any], metric: str) -> str:
    iv, paired = r["metrics"].get(metric), (r.get("paired") or {}).get(metric)
    if iv is None:
        return ""
    mean = f"{100 * iv['mean']:.1f}"
    if paired is None:
        return mean
    tie = ", tie" if paired["tie"] else ""
    return f"{mean} (Δ {_pct(paired, signed=True)}{tie})"


def summary_table(summary: dict[str, Any]) -> list[str]:
    """One row per recipe: the mean of each headline metric and its paired Δ vs the baseline, ties marked."""
    cols = [m for m in SUMMARY_METRICS if any(m in r["metrics"] for r in summary["recipes"].values())]
    lines = ["| recipe | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in summary["recipes"].items():
        lines.append(f"| {name} | " + " | ".join(_summary_cell(r, m) for m in cols) + " |")
    return lines


def to_markdown(summary: dict[str, Any]) -> str:
    """A summary table, then one table per metric: mean [95% CI] per recipe and the paired difference vs the
    baseline with a verdict."""
    base = summary["baseline"]
    lines = [
        f"# compare: {', '.join(summary['recipes'])} (seeds {', '.join(map(str, summary['seeds']))})",
        "",
        f"Values in %. {summary['interval']}. Δ: {summary['paired']}, baseline {base}; a Δ whose interval crosses 0 is"
        f" {TIE}.",
    ]
    if summary["overrides"]:
        lines.append(f"Overrides: `{' '.join('--set ' + o for o in summary['overrides'])}`.")
    lines += ["", "## Summary (mean; Δ vs " + base + " with its 95% CI)", "", *summary_table(summary)]
    for metric in METRICS:
        rows = [(name, r) for name, r in summary["recipes"].items() if metric in r["metrics"]]
        if not rows:
            continue
        lines += ["", f"## {metric}", "", "| recipe | mean [95% CI] | n | Δ vs " + base + " [95% CI] | verdict |"]
        lines.append("|---|---|---|---|---|")
        for name, r in rows:
            iv, paired = r["metrics"][metric], (r.get("paired") or {}).get(metric)
            diff, verdict = ("—", "baseline") if paired is None else (_pct(paired, signed=True), _verdict(paired))
            lines.append(f"| {name} | {_pct(iv)} | {iv['n']} | {diff} | {verdict} |")
    return "\n".join(lines) + "\n"


__all__ = [
    "METRICS",
    "SUMMARY_METRICS",
    "TIE",
    "Interval",
    "RecipeRuns",
    "run_compare",
    "run_one",
    "summarise",
    "summary_table",
    "to_markdown",
]
