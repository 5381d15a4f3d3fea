"""`clipslim report`: one accuracy x speed x size table and Pareto plots for a teacher and its students.

Inputs are whatever the other commands leave behind, merged per model:

- a training run directory (``results.json`` with ``eval`` and params, ``student/``, ``recipe.yaml``): the student,
  plus the recipe's teacher as a row of its own (accuracy only if another input has it);
- ``clipslim eval`` / CLIP_benchmark result JSONs (``model``, ``pretrained``, ``task``, ``metrics``);
- ``clipslim bench`` JSONs (``models`` with params and ``images_per_s``).

Rows without images/s, params or FLOPs are measured (the model is loaded by its spec) unless ``measure=False``;
images/s is timed in several interleaved rounds and kept as a mean with a Student-t interval. The accuracy axis is
zero-shot top-1 (``acc1``, all classes); on shapes ``heldout_acc1`` / ``ood_acc1`` are shown too and can be chosen.

A model is Pareto-optimal when no other is at least as accurate and at least as cheap, and strictly better in one.
The cost axis is images/s, params or FLOPs per image (``cost``). Speeds are compared with their noise: models of
the same architecture (same params and FLOPs) share one pooled speed, and two speeds whose intervals overlap (or,
without intervals, that differ by less than ``speed_noise``) are a tie, so timing noise never makes a model
"optimal" by itself.
"""

from __future__ import annotations

import html
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clipslim.config import ConfigError
from clipslim.eval.stats import mean_interval
from clipslim.io import atomic_write_json, atomic_write_text, read_mapping

log = logging.getLogger(__name__)
METRICS = ("acc1", "heldout_acc1", "ood_acc1")
COSTS = ("images_per_s", "params", "flops")
SPEED_NOISE = 0.1
"""Relative speed difference treated as noise when a speed has no interval (a single bench number)."""


@dataclass
class Row:
    """One model: what it is, how big and fast, and its zero-shot accuracy per dataset."""

    name: str
    spec: str
    role: str = "model"  # teacher | student | model
    params: int | None = None
    params_non_embedding: int | None = None
    images_per_s: float | None = None
    images_per_s_ci95: list[float] | None = None
    """Student-t 95% interval of images/s over timing rounds (None: one number, e.g. from a bench JSON)."""
    flops: int | None = None
    """Image-encoder FLOPs per image."""
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # dataset -> {acc1, heldout_acc1, ...}
    sources: list[str] = field(default_factory=list)


class ReportError(ValueError):
    """An input that is neither a run directory nor a result JSON clipslim can read; the message names it."""


# ---------------------------------------------------------------- reading inputs


def _shapes_groups(metrics: dict[str, Any]) -> dict[str, float]:
    """Top-1 from shapes' grouped eval (``zeroshot_all`` / ``_heldout`` / ``_ood``) as ``acc1`` / ``heldout_acc1``
    / ``ood_acc1``."""
    out = {}
    for key, group in (("acc1", "zeroshot_all"), ("heldout_acc1", "zeroshot_heldout"), ("ood_acc1", "zeroshot_ood")):
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
    rows = []
    for m in doc["models"]:
        row = Row(m["model"], m["model"], sources=[source], **{k: m.get(k) for k in keys})
        row.flops = m.get("flops_per_image")
        rows.append(row)
    return rows


def _from_run_dir(run: Path) -> list[Row]:

    results_path = run / "results.json"
    if not results_path.is_file():
        raise ReportError(f"{run}: not a run directory (no results.json)")
    results = _load_json(results_path)
    if not isinstance(results, dict):
        raise ReportError(f"{results_path}: expected a JSON object, got {type(results).__name__}")
    try:
        recipe = read_mapping(run / "recipe.yaml") if (run / "recipe.yaml").is_file() else {}
    except ConfigError as err:
        raise ReportError(str(err)) from err
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
    """Rows from one run directory, result JSON or bench JSON; contents of the wrong shape (a list where a mapping
    belongs, a missing key) are a one-line ReportError naming the file, never a traceback."""
    path = Path(path)
    try:
        return _read_input(path)
    except ReportError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise ReportError(f"{path}: unexpected contents ({type(err).__name__}: {err})") from err


def _read_input(path: Path) -> list[Row]:
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
        if into.images_per_s is None:
            into.images_per_s, into.images_per_s_ci95 = row.images_per_s, row.images_per_s_ci95
        for name in ("params", "params_non_embedding", "flops"):
            if getattr(into, name) is None:
                setattr(into, name, getattr(row, name))
        for dataset, acc in row.accuracy.items():
            into.accuracy.setdefault(dataset, {}).update(acc)
        into.sources += [s for s in row.sources if s not in into.sources]
    return list(merged.values())


def fill_missing(rows: Sequence[Row], device: str = "cpu", batch: int = 64, rounds: int = 5) -> None:
    """Measure images/s (as ``clipslim bench`` does, at ``batch``), params and FLOPs where an input lacked them.

    Models are timed in ``rounds`` interleaved rounds, so a burst of background load hits every model alike; each
    keeps the mean and the Student-t interval of its rounds (two students of one architecture once differed by ~15%
    in a single timing here: the interval is what says whether a speed difference is real).
    """
    from clipslim.eval.bench import images_per_s
    from clipslim.models import count_params, load_model

    to_time = []
    for row in rows:
        if row.images_per_s is not None and row.params is not None and row.flops is not None:
            continue
        try:
            bundle = load_model(row.spec, device=device)
        except ValueError as err:  # e.g. a pretrained tag that needs a download on an offline machine
            log.warning("cannot load %s to measure it: %s", row.spec, err)
            continue
        counts = count_params(bundle.model)
        row.params = row.params if row.params is not None else counts.total
        row.params_non_embedding = row.params_non_embedding or counts.non_embedding
        if row.flops is None:
            row.flops = _image_flops(bundle, device)
        if row.images_per_s is None:
            to_time.append((row, bundle, []))
    for _ in range(rounds):
        for _row, bundle, speeds in to_time:
            speeds.append(images_per_s(bundle, batch=batch, device=device))
    for row, _bundle, speeds in to_time:
        iv = mean_interval(speeds)
        row.images_per_s = iv.mean
        row.images_per_s_ci95 = None if iv.lo is None else [iv.lo, iv.hi]


def _image_flops(bundle: Any, device: str) -> int:
    """FLOPs of one image through the image encoder."""
    import torch

    from clipslim.eval.bench import count_cost, image_hw

    x = torch.randn(1, 3, *image_hw(bundle), device=device)
    return count_cost(lambda: bundle.model.encode_image(x), bundle.model)[0]


# ---------------------------------------------------------------- Pareto, table, plot


def pareto_optimal(
    points: Sequence[tuple[float, float]],
    maximize: tuple[bool, bool] = (True, True),
    x_tied: Callable[[int, int], bool] | None = None,
) -> list[bool]:
    """For each (x, y): True when no other point is at least as good in both and strictly better in one.

    ``x_tied(i, j)``: the x of points i and j are equal within noise (default: exactly equal); a tied x is neither
    better nor worse, so only y can then make one point dominate the other.
    """
    signs = [1 if m else -1 for m in maximize]
    pts = [(signs[0] * x, signs[1] * y) for x, y in points]
    tied = x_tied or (lambda i, j: pts[i][0] == pts[j][0])

    def dominates(j: int, i: int) -> bool:
        (qx, qy), (px, py), tie = pts[j], pts[i], tied(i, j)
        return (tie or qx > px) and qy >= py and ((not tie and qx > px) or qy > py)

    return [not any(dominates(j, i) for j in range(len(pts)) if j != i) for i in range(len(pts))]


def cost_key(row: dict[str, Any]) -> tuple[Any, ...] | None:
    """Same params, non-embedding params and FLOPs: the same architecture, hence the same cost."""
    key = (row.get("params"), row.get("params_non_embedding"), row.get("flops"))
    return None if key[0] is None else key


def pool_same_architecture(table: list[dict[str, Any]]) -> None:
    """Give models of one architecture one speed: the mean of their speeds, with the widest interval among them
    widened to cover every member's value (their differences are timing noise, not a property of the weights)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in table:
        if r["images_per_s"] is not None and cost_key(r) is not None:
            groups.setdefault(cost_key(r), []).append(r)
    for members in groups.values():
        if len(members) < 2:
            continue
        speeds = [m["images_per_s"] for m in members]
        lows = [m["images_per_s_ci95"][0] if m["images_per_s_ci95"] else m["images_per_s"] for m in members]
        highs = [m["images_per_s_ci95"][1] if m["images_per_s_ci95"] else m["images_per_s"] for m in members]
        for m in members:
            m["images_per_s"], m["images_per_s_ci95"] = sum(speeds) / len(speeds), [min(lows), max(highs)]


def speeds_tied(a: dict[str, Any], b: dict[str, Any], noise: float = SPEED_NOISE) -> bool:
    """Same architecture, overlapping intervals, or (without intervals) less than ``noise`` relative difference."""
    if cost_key(a) is not None and cost_key(a) == cost_key(b):
        return True
    ia, ib = a.get("images_per_s_ci95"), b.get("images_per_s_ci95")
    if ia and ib:
        return ia[0] <= ib[1] and ib[0] <= ia[1]
    sa, sb = a["images_per_s"], b["images_per_s"]
    return abs(sa - sb) <= noise * max(sa, sb)


PARETO_FLAGS = {"images_per_s": "pareto_speed", "params": "pareto_size", "flops": "pareto_flops"}


def _flag(out: list[dict[str, Any]], axis: str, metric: str, noise: float) -> None:
    flag = PARETO_FLAGS[axis]
    ok = [r for r in out if r[metric] is not None and r[axis] is not None]
    tie = (lambda i, j: speeds_tied(ok[i], ok[j], noise)) if axis == "images_per_s" else None
    flags = pareto_optimal([(r[axis], r[metric]) for r in ok], (axis == "images_per_s", True), tie)
    for r in out:
        r[flag] = None
    for r, optimal in zip(ok, flags, strict=True):
        r[flag] = optimal


def table_rows(
    rows: Sequence[Row],
    dataset: str | None,
    metric: str = "acc1",
    cost: str = "images_per_s",
    noise: float = SPEED_NOISE,
) -> list[dict[str, Any]]:
    """Plain dicts for the table and JSON: a Pareto flag per cost axis (speed, size, FLOPs) against ``metric``, and
    ``pareto`` for the chosen ``cost``."""
    out = []
    for r in rows:
        acc = r.accuracy.get(dataset or "", {})
        out.append({**asdict(r), **{m: acc.get(m) for m in METRICS}})
        del out[-1]["accuracy"]
    pool_same_architecture(out)
    for axis in COSTS:
        _flag(out, axis, metric, noise)
    for r in out:
        r["pareto"] = r[PARETO_FLAGS[cost]]
    order = {"teacher": 0, "student": 1, "model": 2}
    return sorted(out, key=lambda r: (order[r["role"]], -(r["params"] or 0)))


def pick_dataset(rows: Sequence[Row]) -> str | None:
    """The dataset most rows have zero-shot accuracy on (ties: the first seen)."""
    counts = Counter(d for r in rows for d in r.accuracy)
    return counts.most_common(1)[0][0] if counts else None


def _cell(value: Any, kind: str, row: dict[str, Any] | None = None) -> str:
    if value is None:
        return "–"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "M":
        return f"{value / 1e6:.2f}M"
    if kind == "G":
        return f"{value / 1e9:.3f}"
    if kind == "flag":
        return "✓" if value else ""
    if kind == "speed" and row and row.get("images_per_s_ci95"):
        lo, hi = row["images_per_s_ci95"]
        return f"{value:.0f} [{lo:.0f}, {hi:.0f}]"
    return f"{value:.0f}" if isinstance(value, float) else str(value)


COLUMNS = (
    ("model", "name", "str"),
    ("role", "role", "str"),
    ("params", "params", "M"),
    ("non-emb. params", "params_non_embedding", "M"),
    ("GFLOPs/image", "flops", "G"),
    ("images/s [95% CI]", "images_per_s", "speed"),
    ("zero-shot top-1 (%)", "acc1", "pct"),
    ("held-out top-1 (%)", "heldout_acc1", "pct"),
    ("ood top-1 (%)", "ood_acc1", "pct"),
    ("Pareto: speed", "pareto_speed", "flag"),
    ("Pareto: size", "pareto_size", "flag"),
    ("Pareto: FLOPs", "pareto_flops", "flag"),
)
AXIS_LABELS = {"images_per_s": "images/s (image encoder)", "params": "parameters", "flops": "FLOPs per image"}


def _columns(table: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """COLUMNS without the ones no row has a value for (e.g. ood top-1 off shapes v2)."""
    return [c for c in COLUMNS if c[2] == "str" or any(r.get(c[1]) is not None for r in table)]


def markdown_table(table: Sequence[dict[str, Any]]) -> str:
    cols = _columns(table)
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r[key], kind, r) for _, key, kind in cols) + " |" for r in table]
    return "\n".join(lines)


def html_table(table: Sequence[dict[str, Any]], title: str) -> str:
    cols = _columns(table)
    head = "".join(f"<th>{html.escape(c[0])}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(r[key], kind, r))}</td>" for _, key, kind in cols) + "</tr>"
        for r in table
    )
    title = html.escape(title)
    return (
        f"<!doctype html><meta charset='utf-8'><title>{title}</title><h1>{title}</h1>"
        f"<table border='1' cellpadding='4'><tr>{head}</tr>{body}</table><p><img src='pareto.png'></p>\n"
    )


def plot_pareto(
    table: Sequence[dict[str, Any]],
    out_png: str | Path,
    metric: str = "acc1",
    title: str = "",
    cost: str = "images_per_s",
) -> Path:
    """Zero-shot top-1 against each cost axis that has data (the chosen ``cost`` first); Pareto-optimal models
    ringed and joined; speeds drawn with their interval."""
    from ..plots import pyplot, save_figure

    plt = pyplot()
    axes_names = [cost, *(a for a in COSTS if a != cost and any(r[a] is not None for r in table))]
    fig, axes = plt.subplots(1, len(axes_names), figsize=(5.5 * len(axes_names), 4.5), squeeze=False)
    for ax, axis in zip(axes[0], axes_names, strict=True):
        flag = PARETO_FLAGS[axis]
        pts = [r for r in table if r[metric] is not None and r[axis] is not None]
        for r in pts:
            marker = {"teacher": "s", "student": "o"}.get(r["role"], "^")
            ax.scatter(r[axis], 100 * r[metric], marker=marker, s=60, c="C3" if r[flag] else "C0", zorder=3)
            if axis == "images_per_s" and r["images_per_s_ci95"]:
                lo, hi = r["images_per_s_ci95"]
                ax.plot([lo, hi], [100 * r[metric]] * 2, "C0-", lw=1, alpha=0.6)
            ax.annotate(r["name"], (r[axis], 100 * r[metric]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        front = sorted((r[axis], 100 * r[metric]) for r in pts if r[flag])
        if front:
            ax.plot(*zip(*front, strict=True), "C3--", lw=1, label="Pareto-optimal")
            ax.legend(fontsize=8)
        suffix = " — cost axis" if axis == cost else ""
        ax.set(xlabel=AXIS_LABELS[axis] + suffix, ylabel=f"zero-shot top-1 ({metric}, %)", xscale="log")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"{title or 'accuracy vs cost'}\n(square: teacher, circle: student, triangle: other)")
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
    cost: str = "images_per_s",
    speed_noise: float = SPEED_NOISE,
) -> dict[str, Any]:
    """Read every input, merge per model, fill in speed/size/FLOPs, and write report.md/.json, pareto.png (+ .html)."""
    if metric not in METRICS:
        raise ReportError(f"unknown metric '{metric}' (choose from {', '.join(METRICS)})")
    if cost not in COSTS:
        raise ReportError(f"unknown cost '{cost}' (choose from {', '.join(COSTS)})")
    if not inputs:
        raise ReportError("report needs at least one run directory or result JSON")
    rows = merge_rows([row for path in inputs for row in read_input(path)])
    if measure:
        fill_missing(rows, device=device)
    dataset = dataset or pick_dataset(rows)
    table = table_rows(rows, dataset, metric, cost, speed_noise)
    out_dir = Path(out_dir)
    title = f"clipslim report: zero-shot {metric} on {dataset or 'no dataset'}, cost {cost}"
    front = ", ".join(r["name"] for r in table if r["pareto"]) or "none (no row has both numbers)"
    notes = (
        f"Pareto-optimal on {metric} × {cost}: {front}. Speeds: mean of timing rounds with a Student t 95% interval; "
        f"same architecture = one pooled speed; overlapping intervals (or < {speed_noise:.0%} apart without one) tie."
    )
    atomic_write_text(
        out_dir / "report.md", f"# {title}\n\n{notes}\n\n{markdown_table(table)}\n\n![pareto](pareto.png)\n"
    )
    doc = {"dataset": dataset, "metric": metric, "cost": cost, "speed_noise": speed_noise, "rows": table}
    atomic_write_json(out_dir / "report.json", doc)
    plot_pareto(table, out_dir / "pareto.png", metric, title, cost)
    if write_html:
        atomic_write_text(out_dir / "report.html", html_table(table, title))
    return {**doc, "markdown": markdown_table(table)}
