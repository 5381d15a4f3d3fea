"""`clipslim prune-blocks`: score blocks, remove the least harmful, optionally distill the pruned model back, and
write the folder (model/, blocks.json, blocks.md, blocks.png).

The method (block scoring, greedy removal, building the smaller model) is :mod:`clipslim.inherit.blocks`; this is
the end-to-end job around it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..inherit.blocks import (
    BlockId,
    ValidationSet,
    block_latency,
    greedy_prune,
    pruned_model,
)

log = logging.getLogger(__name__)


def _markdown(result: dict[str, Any]) -> str:
    lines = ["| blocks removed | block | depth | val top-1 | fidelity |", "|---|---|---|---|---|"]
    for r in result["history"]:
        lines.append(
            f"| {r['removed']} | {r['block'] or '-'} | {r['depth']} | {100 * r['val_acc1']:.1f} | {r['fidelity']:.4f} |"
        )
    lines += ["", "| block skipped alone | val top-1 | drop | fidelity |", "|---|---|---|---|"]
    for r in result["single_block"]:
        lines.append(f"| {r['block']} | {100 * r['val_acc1']:.1f} | {100 * r['drop']:+.1f} | {r['fidelity']:.4f} |")
    for name, ev in (result.get("test") or {}).items():
        held, seen = ev["zeroshot_heldout"]["acc1"], ev["zeroshot_seen"]["acc1"]
        lines.append(f"\ntest ({name}): held-out top-1 {100 * held:.1f}, seen top-1 {100 * seen:.1f}")
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    hist = result["history"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["removed"] for r in hist], [100 * r["val_acc1"] for r in hist], marker="o")
    for r in hist[1:]:
        ax.annotate(r["block"], (r["removed"], 100 * r["val_acc1"]), fontsize=7, rotation=30)
    ax.set(xlabel="blocks removed (greedy)", ylabel="validation zero-shot top-1 (%)", title="Direct block pruning")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _recover(spec: str, out: Path, data_dir: Path, arch: str, steps: int, batch: int, progress: bool) -> dict:
    """Short affinity distillation of the pruned model from the original one (a normal, resumable run)."""
    from ..recipe import recipe_from_dict
    from ..train import train
    from ..train.checkpoint import latest_checkpoint

    recipe = recipe_from_dict(
        {
            "name": "prune-recover",
            "teacher": spec,
            "student": {"arch": arch, "init": str(out / "model")},
            "data": {"train": str(data_dir / "train"), "eval": str(data_dir), "num_workers": 1},
            "objectives": {"affinity": {"weight": 1.0, "teacher_scale": 50.0}},
            "train": {"steps": steps, "batch_size": batch, "warmup": max(1, steps // 10), "save_every": steps},
        }
    )
    run_dir = out / "recover"
    resume = latest_checkpoint(run_dir / "checkpoints") is not None
    return train(recipe, run_dir, resume=resume, progress=progress).get("eval") or {}


def prune_blocks(
    spec: str,
    data_dir: str | Path,
    out: str | Path,
    *,
    target_depth: int | None = None,
    target_latency_ms: float | None = None,
    val_shards: str | Path | None = None,
    val_samples: int = 512,
    recover_steps: int = 0,
    recover_batch_size: int = 128,
    progress: bool = True,
) -> dict[str, Any]:
    """Greedy block removal on model ``spec``; writes ``out/model`` (open_clip folder), ``blocks.json``,
    ``blocks.md`` and ``blocks.png`` (validation accuracy against blocks removed), test accuracy before and after
    (and after ``recover_steps`` of affinity distillation from the original model, batch ``recover_batch_size``)."""
    from ..export import export_open_clip
    from ..io import atomic_write_json, atomic_write_text
    from ..models import load_model

    out, data_dir = Path(out), Path(data_dir)
    bundle = load_model(spec)
    val = ValidationSet.from_data(bundle, data_dir, val_shards, val_samples)
    latency = None
    if target_latency_ms is not None:
        v, t = bundle.model_cfg["vision_cfg"], bundle.model_cfg["text_cfg"]
        latency = block_latency(bundle.model, v["image_size"], t.get("context_length", 77))
    result = greedy_prune(
        bundle.model, val, target_depth=target_depth, target_latency_ms=target_latency_ms, latency_ms=latency,
        progress=progress,
    )  # fmt: skip
    small, cfg = pruned_model(bundle.model, bundle.model_cfg, result["kept"])
    arch = f"{bundle.arch}-pruned"
    export_open_clip(
        small, cfg, out / "model", preprocess_cfg=bundle.preprocess_cfg, arch=arch,
        extra={"source": spec, "kept_blocks": result["kept"]},
    )  # fmt: skip
    if latency is not None:
        result["latency_ms"] = {"full": latency(set()), "pruned": latency({(k, i) for k, i in _removed(result)})}
    if (data_dir / "eval").is_dir():
        recover = (recover_steps, recover_batch_size)
        result["test"] = _test(spec, bundle, out, data_dir, arch, recover, progress)
    atomic_write_json(out / "blocks.json", result)
    atomic_write_text(out / "blocks.md", _markdown(result))
    _plot(result, out / "blocks.png")
    return result


def _test(spec: str, bundle: Any, out: Path, data_dir: Path, arch: str, recover: tuple, progress: bool) -> dict:
    """Test-split accuracy of the full model, the pruned one and the recovered one (``recover``: steps, batch)."""
    from ..eval.run import evaluate_shapes
    from ..models import load_model

    test = {
        "full": evaluate_shapes(bundle, data_dir, progress=False),
        "pruned": evaluate_shapes(load_model(str(out / "model")), data_dir, progress=False),
    }
    if recover[0] > 0:
        test["recovered"] = _recover(spec, out, data_dir, arch, *recover, progress)
    return test


def _removed(result: dict[str, Any]) -> list[BlockId]:
    return [(name.split(".")[0], int(name.split(".")[1])) for name in result["removed"]]
