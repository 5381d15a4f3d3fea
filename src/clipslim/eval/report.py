"""`clipslim report`: one accuracy x speed x size table and Pareto plots for a teacher and its students.

Inputs are whatever the other commands leave behind, merged per model:

- a training run directory (``results.json`` with ``eval`` and params, ``student/``, ``recipe.yaml``): the student,
  plus the recipe's teacher as a row of its own (accuracy only if another input has it);
- ``clipslim eval`` / CLIP_benchmark result JSONs (``model``, ``pretrained``, ``task``, ``metrics``);
- ``clipslim bench`` JSONs (``models`` with params and ``images_per_s``).

Rows without images/s or params are measured (the model is loaded by its spec) unless ``measure=False``. The
accuracy axis is zero-shot top-1 (``acc1``, all classes); on shapes ``heldout_acc1`` is shown too and can be
chosen as the axis. A model is Pareto-optimal when no other is at least as accurate and at least as fast (or as
small) and strictly better in one of the two.
"""

from __future__ import annotations

import html
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clipslim.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)
METRICS = ("acc1", "heldout_acc1")


@dataclass
class Row:
    """One model: what it is, how big and fast, and its zero-shot accuracy per dataset."""

    name: str
    spec: str
    role: str = "model"  # teacher | student | model
    params: int | None = None
    params_non_embedding: int | None = None
    images_per_s: float | None = None
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # dataset -> {acc1, heldout_acc1}
    sources: list[str] = field(default_factory=list)


class ReportError(ValueError):
    """An input that is neither a run directory nor a result JSON clipslim can read; the message names it."""


# ---------------------------------------------------------------- reading inputs


def _shapes_groups(metrics: dict[str, Any]) -> dict[str, float]:
    """Top-1 from shapes' grouped eval (``zeroshot_all`` / ``zeroshot_heldout``) as ``acc1`` / ``heldout_acc1``."""
    out = {}
    for key, group in (("acc1", "zeroshot_all"), ("heldout_acc1", "zeroshot_heldout")):
        value = (metrics.get(group) or {}).get("acc1")
        if isinstance(value, int | float):
            out[key] = float(value)
    return out


def _zeroshot(metrics: dict[str, Any]) -> dict[str, float]:
    flat = {k: float(metrics[k]) for k in METRICS if isinstance(metrics.get(k), int | float)}
    return flat or _shapes_groups(metrics)


def _spec_of(doc: dict[str, Any]) -> str:
    if doc.get("model_spec"):
        return str(doc["model_spec"])
    return f"{doc['model']}:{doc['pretrained']}" if doc.get("pretrained") else str(doc["model"])


def _from_result_json(doc: dict[str, Any], source: str) -> list[Row]:
    if not {"model", "metrics"} <= set(doc):
        raise ReportError(f"{source}: result JSON lacks 'model' or 'metrics'")
    spec = _spec_of(doc)
    row = Row(spec, spec, sources=[source], params=doc.get("params"))
    row.params_non_embedding = doc.get("params_non_embedding")
    if "zeroshot_classification" in str(doc.get("task", "")) or "zeroshot_all" in doc["metrics"]:
        accuracy = _zeroshot(doc["metrics"])
        if accuracy:
            row.accuracy[str(doc.get("dataset", "?"))] = accuracy
    return [row]


def _from_bench_json(doc: dict[str, Any], source: str) -> list[Row]:
    keys = ("params", "params_non_embedding", "images_per_s")
    return [Row(m["model"], m["model"], sources=[source], **{k: m.get(k) for k in keys}) for m in doc["models"]]


def _from_run_dir(run: Path) -> list[Row]:
    import yaml

    results_path = run / "results.json"
    if not results_path.is_file():
        raise ReportError(f"{run}: not a run directory (no results.json)")
    results = _load_json(results_path)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text()) if (run / "recipe.yaml").is_file() else {}
    dataset = Path(str((recipe.get("data") or {}).get("eval", "?"))).name
    student = Row(run.name, str(run / "student"), "student", results.get("params"), sources=[str(run)])
    student.params_non_embedding = results.get("params_non_embedding")
    student.images_per_s = results.get("images_per_s")
    accuracy = _zeroshot(results.get("eval") or {})
    if accuracy:
        student.accuracy[dataset] = accuracy
    rows = [student]
    if recipe.get("teacher"):
        rows.append(Row(f"teacher ({recipe['teacher']})", str(recipe["teacher"]), "teacher", sources=[str(run)]))
    return rows


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ReportError(f"{path}: not readable JSON ({err})") from err


def read_input(path: str | Path) -> list[Row]:
    """Rows from one run directory, result JSON or bench JSON."""
    path = Path(path)
    if path.is_dir():
        return _from_run_dir(path)
    if not path.is_file():
        raise ReportError(f"report input not found: {path}")
    doc = _load_json(path)
    if isinstance(doc, dict) and isinstance(doc.get("models"), list):
        return _from_bench_json(doc, str(path))
    if isinstance(doc, dict):
        return _from_result_json(doc, str(path))
    raise ReportError(f"{path}: expected a JSON object (a clipslim/CLIP_benchmark result or a bench file)")


# ---------------------------------------------------------------- merging and filling in


def _key(spec: str) -> str:
    """One key per model however it was written: folders and files by resolved path."""
    bare = spec.removeprefix("local-dir:")
    return str(Path(bare).resolve()) if Path(bare).exists() else spec


def merge_rows(rows: Sequence[Row]) -> list[Row]:
    """Rows of the same model merged; the first known value of each field wins, accuracies are united."""
    merged: dict[str, Row] = {}
    for row in rows:
        key = _key(row.spec)
        if key not in merged:
            merged[key] = Row(**{**asdict(row), "accuracy": {d: dict(a) for d, a in row.accuracy.items()}})
            continue
        into = merged[key]
        if into.role == "model" and row.role != "model":
            into.role, into.name = row.role, row.name
        for name in ("params", "params_non_embedding", "images_per_s"):
            if getattr(into, name) is None:
                setattr(into, name, getattr(row, name))
        for dataset, acc in row.accuracy.items():
            into.accuracy.setdefault(dataset, {}).update(acc)
        into.sources += [s for s in row.sources if s not in into.sources]
    return list(merged.values())


def fill_missing(rows: Sequence[Row], device: str = "cpu", batch: int = 64, rounds: int = 3) -> None:
    """Measure images/s (as ``clipslim bench`` does, at ``batch``) and count params where an input lacked them.

    Models are timed in alternating rounds and each keeps its best round, so a burst of background load does not
    land on one model (two students of one architecture otherwise differed by ~15% here).
    """
    from clipslim.eval.bench import images_per_s
    from clipslim.models import count_params, load_model

    to_time = []
    for row in rows:
        if row.images_per_s is not None and row.params is not None:
            continue
        try:
            bundle = load_model(row.spec, device=device)
        except ValueError as err:  # e.g. a pretrained tag that needs a download on an offline machine
            log.warning("cannot load %s to measure it: %s", row.spec, err)
            continue
        counts = count_params(bundle.model)
        row.params = row.params if row.params is not None else counts.total
        row.params_non_embedding = row.params_non_embedding or counts.non_embedding
        if row.images_per_s is None:
            to_time.append((row, bundle))
    for _ in range(rounds):
        for row, bundle in to_time:
            speed = images_per_s(bundle, batch=batch, device=device)
            row.images_per_s = max(row.images_per_s or 0.0, speed)


# ---------------------------------------------------------------- Pareto, table, plot


def pareto_optimal(points: Sequence[tuple[float, float]], maximize: tuple[bool, bool] = (True, True)) -> list[bool]:
    """For each (x, y): True when no other point is at least as good in both and strictly better in one."""
    signs = [1 if m else -1 for m in maximize]
    pts = [(signs[0] * x, signs[1] * y) for x, y in points]

    def dominated(p: tuple[float, float]) -> bool:
        return any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in pts)

    return [not dominated(p) for p in pts]


def pick_dataset(rows: Sequence[Row]) -> str | None:
    """The dataset most rows have zero-shot accuracy on (ties: the first seen)."""
    counts = Counter(d for r in rows for d in r.accuracy)
    return counts.most_common(1)[0][0] if counts else None


def table_rows(rows: Sequence[Row], dataset: str | None, metric: str = "acc1") -> list[dict[str, Any]]:
    """Plain dicts for the table and JSON, with the two Pareto flags (speed and size) against ``metric``."""
    out = []
    for r in rows:
        acc = r.accuracy.get(dataset or "", {})
        out.append({**asdict(r), "acc1": acc.get("acc1"), "heldout_acc1": acc.get("heldout_acc1")})
        del out[-1]["accuracy"]
    for flag, axis, maximize in (("pareto_speed", "images_per_s", True), ("pareto_size", "params", False)):
        ok = [r for r in out if r[metric] is not None and r[axis] is not None]
        flags = pareto_optimal([(r[axis], r[metric]) for r in ok], (maximize, True))
        for r in out:
            r[flag] = None
        for r, optimal in zip(ok, flags, strict=True):
            r[flag] = optimal
    order = {"teacher": 0, "student": 1, "model": 2}
    return sorted(out, key=lambda r: (order[r["role"]], -(r["params"] or 0)))


def _cell(value: Any, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "M":
        return f"{value / 1e6:.2f}M"
    if kind == "flag":
        return "✓" if value else ""
    return f"{value:.0f}" if isinstance(value, float) else str(value)


COLUMNS = (
    ("model", "name", "str"),
    ("role", "role", "str"),
    ("params", "params", "M"),
    ("non-emb. params", "params_non_embedding", "M"),
    ("images/s", "images_per_s", "num"),
    ("zero-shot top-1 (%)", "acc1", "pct"),
    ("held-out top-1 (%)", "heldout_acc1", "pct"),
    ("Pareto: speed", "pareto_speed", "flag"),
    ("Pareto: size", "pareto_size", "flag"),
)


def markdown_table(table: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[key], kind) for _, key, kind in COLUMNS) + " |" for r in table]
    return "\n".join(lines)


def html_table(table: Sequence[dict[str, Any]], title: str) -> str:
    head = "".join(f"<th>{html.escape(c[0])}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(r[key], kind))}</td>" for _, key, kind in COLUMNS) + "</tr>"
        for r in table
    )
    title = html.escape(title)
    return (
        f"<!doctype html><meta charset='utf-8'><title>{title}</title><h1>{title}</h1>"
        f"<table border='1' cellpadding='4'><tr>{head}</tr>{body}</table><p><img src='pareto.png'></p>\n"
    )


def plot_pareto(table: Sequence[dict[str, Any]], out_png: str | Path, metric: str = "acc1", title: str = "") -> Path:
    """Zero-shot top-1 against images/s and against params; Pareto-optimal models ringed and joined."""
    from ..plots import pyplot, save_figure

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, axis, flag, label in (
        (axes[0], "images_per_s", "pareto_speed", "images/s (image encoder)"),
        (axes[1], "params", "pareto_size", "parameters"),
    ):
        pts = [r for r in table if r[metric] is not None and r[axis] is not None]
        for r in pts:
            marker = {"teacher": "s", "student": "o"}.get(r["role"], "^")
            ax.scatter(r[axis], 100 * r[metric], marker=marker, s=60, c="C3" if r[flag] else "C0", zorder=3)
            ax.annotate(r["name"], (r[axis], 100 * r[metric]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        front = sorted((r[axis], 100 * r[metric]) for r in pts if r[flag])
        if front:
            ax.plot(*zip(*front, strict=True), "C3--", lw=1, label="Pareto-optimal")
            ax.legend(fontsize=8)
        ax.set(xlabel=label, ylabel=f"zero-shot top-1 ({metric}, %)", xscale="log")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"{title or 'accuracy vs speed and size'}\n(square: teacher, circle: student, triangle: other)")
    fig.tight_layout()
    return save_figure(fig, out_png)


def write_report(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    metric: str = "acc1",
    dataset: str | None = None,
    write_html: bool = False,
    measure: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """Read every input, merge per model, fill in speed/size, and write report.md/.json, pareto.png (+ .html)."""
    if metric not in METRICS:
        raise ReportError(f"unknown metric '{metric}' (choose from {', '.join(METRICS)})")
    if not inputs:
        raise ReportError("report needs at least one run directory or result JSON")
    rows = merge_rows([row for path in inputs for row in read_input(path)])
    if measure:
        fill_missing(rows, device=device)
    dataset = dataset or pick_dataset(rows)
    table = table_rows(rows, dataset, metric)
    out_dir = Path(out_dir)
    title = f"clipslim report: zero-shot {metric} on {dataset or 'no dataset'}"
    atomic_write_text(out_dir / "report.md", f"# {title}\n\n{markdown_table(table)}\n\n![pareto](pareto.png)\n")
    atomic_write_json(out_dir / "report.json", {"dataset": dataset, "metric": metric, "rows": table})
    plot_pareto(table, out_dir / "pareto.png", metric, title)
    if write_html:
        atomic_write_text(out_dir / "report.html", html_table(table, title))
    return {"dataset": dataset, "metric": metric, "rows": table, "markdown": markdown_table(table)}
