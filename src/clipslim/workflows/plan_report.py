"""The table and plot of a ``clipslim plan`` result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..plots import pyplot, save_figure

MEMORY_COLUMNS = ("online", "online_ckpt", "cached", "cached_ckpt")


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f}"


def _acc(row: dict[str, Any]) -> str:
    zs = row.get("zeroshot")
    if zs:
        return f"{100 * zs['acc1']:.1f}"
    return "refused" if str(row.get("inherit", "")).startswith("refused") else "–"


def _mark(row: dict[str, Any], key: str) -> str:
    return {True: "✓", False: "", None: "–"}[row.get(key)]


def plan_table(result: dict[str, Any]) -> str:
    """Markdown table: one row per model, the teacher first; memory in MiB."""
    batch = result["options"]["batch"]
    head = (
        f"| model | source | params (non-emb.) | GFLOPs/img | img/s b{batch} | b1 ms | train MiB b{batch}: online "
        "| online+ckpt | cached | cached+ckpt | zero-shot top-1 | Pareto | in budget |"
    )
    lines = [head, "|---" * 13 + "|"]
    for r in result["rows"]:
        mem = r.get("train_memory_bytes") or {}
        lines.append(
            f"| {r['name']} | {r['source']} | {r['params'] / 1e6:.1f}M ({r['params_non_embedding'] / 1e6:.1f}M) "
            f"| {r['gflops_per_image']:.3g} | {r['images_per_s']:.1f} | {r['latency_ms_b1']:.1f} | "
            + " | ".join(_mib(mem.get(c)) for c in MEMORY_COLUMNS)
            + f" | {_acc(r)} | {_mark(r, 'pareto')} | {_mark(r, 'fits')} |"
        )
    m = result["machine"]
    lines.append(
        f"\n{m['device']} ({m['device_name']}, {m['threads']} threads, load {m['load_average_1min']:.1f}); "
        f"Pareto: {' vs '.join(result['pareto_axes'])}; memory: "
        f"{next((r['memory_method'] for r in result['rows'] if 'memory_method' in r), '–')}; {result['wall_s']} s"
    )
    return "\n".join(lines)


def plot_plan(result: dict[str, Any], path: str | Path) -> Path:
    """Left: images/s against the Pareto merit (accuracy or non-embedding params); right: training memory."""
    plt = pyplot()
    by_acc = result["pareto_axes"][1] != "params_non_embedding"
    rows = result["rows"]
    studs = [r for r in rows if r["role"] == "student"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5))
    for r in rows:
        y = 100 * r["zeroshot"]["acc1"] if by_acc and r.get("zeroshot") else r["params_non_embedding"] / 1e6
        marker = "*" if r["role"] == "teacher" else ("o" if r.get("pareto") else "x")
        color = "k" if r["role"] == "teacher" else {True: "C2", False: "C3", None: "C0"}[r.get("fits")]
        ax.plot(r["images_per_s"], y, marker, color=color, markersize=9)
        ax.annotate(r["name"], (r["images_per_s"], y), fontsize=7)
    ax.set(xscale="log", xlabel=f"images/s (batch {result['options']['batch']})",
           ylabel="zero-shot top-1 after inheritance (%)" if by_acc else "non-embedding params (M)",
           title="o Pareto, x dominated; green in budget, red over")  # fmt: skip
    width = 0.2
    for i, col in enumerate(MEMORY_COLUMNS):
        vals = [(r.get("train_memory_bytes") or {}).get(col, 0) / 2**30 for r in studs]
        bx.bar([j + i * width for j in range(len(studs))], vals, width, label=col)
    bx.set_xticks([j + 1.5 * width for j in range(len(studs))], [r["name"] for r in studs], rotation=30, ha="right",
                  fontsize=7)  # fmt: skip
    bx.set(ylabel="peak training memory (GiB)", title="distillation step memory")
    bx.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
