"""`clipslim prune-tokens`: fit a token pruner on a model's calibration data, save it, and measure what it costs.

The output folder is an open_clip export of the *unpruned* weights (stock open_clip loads it unpruned) plus
``token_pruning.json`` / ``.safetensors``, which clipslim's ``load_model`` re-applies, so ``clipslim eval`` and
``clipslim bench`` on the folder measure the pruned model. ``prune_tokens.json`` has the before/after numbers.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write_json
from ..tokens.calibrate import calibration_images, fit_pruner
from ..tokens.options import FitOptions
from ..tokens.prune import PruneConfig, apply_token_pruning, remove_token_pruning, save_token_pruning


def image_throughput(model: torch.nn.Module, pruned: Any, images: torch.Tensor, repeats: int = 10) -> dict[str, float]:
    """Images/s of the image encoder unpruned vs pruned (``pruned``: a fitted pruner), timed interleaved."""
    from ..eval.bench import interleaved_times

    apply_token_pruning(model, pruned.cfg, pruned)

    def run(enabled: bool) -> None:
        pruned.enabled = enabled
        with torch.no_grad():
            model.encode_image(images)

    times = interleaved_times({"full": lambda: run(False), "pruned": lambda: run(True)}, repeats, warmup=2)
    pruned.enabled = True
    remove_token_pruning(model)
    ips = {k: len(images) / statistics.median(v) for k, v in times.items()}
    return {
        "full_images_per_s": ips["full"],
        "pruned_images_per_s": ips["pruned"],
        "speedup": ips["pruned"] / ips["full"],
    }


def _accuracy(bundle: Any, data: Path) -> dict[str, float] | None:
    from ..eval.run import evaluate_shapes

    if not (data / "eval").is_dir():
        return None
    res = evaluate_shapes(bundle, data, progress=False)
    return {k: res[f"zeroshot_{k}"]["acc1"] for k in ("heldout", "seen", "all")}


def prune_tokens(
    spec: str, data: str | Path, out: str | Path, cfg: PruneConfig, opts: FitOptions | None = None, *,
    progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Fit, save to ``out`` and measure (zero-shot on ``data/eval`` if present, image-encoder images/s)."""
    from ..export import export_open_clip
    from ..models import load_model

    cfg.validate()
    opts = opts or FitOptions()
    data, out = Path(data), Path(out)
    if not (data / "train").is_dir():
        raise FileNotFoundError(f"{data / 'train'}: calibration shards not found (--data is a shapes-style folder)")
    bundle = load_model(spec)
    model = bundle.model.eval()
    images = calibration_images(bundle, data / "train", opts.calib_images)
    pruner, report = fit_pruner(model, cfg, images, opts, progress=progress)
    report = {"model": spec, "config": vars(cfg), "fit": report, "before": _accuracy(bundle, data)}
    report["speed"] = image_throughput(model, pruner, images[:64])
    export_open_clip(model, bundle.model_cfg, out, preprocess_cfg=bundle.preprocess_cfg, arch=bundle.arch)
    apply_token_pruning(model, cfg, pruner)
    save_token_pruning(model, out, extra={"fit": report["fit"]})
    reloaded = load_model(str(out))  # what users get back: must run pruned
    report["after"] = _accuracy(reloaded, data)
    atomic_write_json(out / "prune_tokens.json", report)
    return report
