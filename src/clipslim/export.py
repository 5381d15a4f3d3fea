"""Export a model as an open_clip hub-format folder, loadable by stock open_clip with no clipslim installed.

The folder holds ``open_clip_config.json`` and ``open_clip_model.safetensors``: the layout open_clip's
``local-dir:`` / ``hf-hub:`` loaders read. Of the json, open_clip reads ``model_cfg`` (architecture) and
``preprocess_cfg`` (keys of ``open_clip.transform.PreprocessCfg``: size, mode, mean, std, interpolation,
resize_mode, fill_color); ``arch`` and ``clipslim`` are ignored by open_clip and used by clipslim.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipslim.io import atomic_write_json, ensure_dir, save_tensors

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
REQUIRED_MODEL_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def jsonable(obj: Any) -> Any:
    """Fresh dicts/lists with tuples as lists, so configs survive ``json.dumps``; open_clip accepts lists back."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj


def export_state_dict(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """CPU copies of the weights, floating ones cast to ``dtype``; copies so tied tensors don't trip safetensors."""
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    out = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        out[name] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).clone()
    return out


def _model_preprocess_cfg(model: nn.Module) -> dict[str, Any]:
    visual = getattr(model, "visual", None)
    return dict(getattr(visual, "preprocess_cfg", None) or {})


def export_open_clip(
    model: nn.Module,
    model_cfg: dict[str, Any],
    out_dir: str | Path,
    *,
    preprocess_cfg: dict[str, Any] | None = None,
    arch: str | None = None,
    dtype: torch.dtype = torch.float32,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``out_dir/open_clip_config.json`` and ``out_dir/open_clip_model.safetensors`` atomically.

    ``preprocess_cfg=None`` takes the model's own ``visual.preprocess_cfg`` (set by open_clip), so mean/std/size
    travel with the weights. ``arch`` is omitted when None so clipslim falls back to the folder name.
    Weights are written first: a reader that finds the config also finds complete weights.
    """
    missing = [k for k in REQUIRED_MODEL_KEYS if k not in model_cfg]
    if missing:
        raise ValueError(f"model_cfg lacks {missing}: pass the architecture dict, not a whole open_clip config")
    if preprocess_cfg is None:
        preprocess_cfg = _model_preprocess_cfg(model)
    out_dir = ensure_dir(out_dir)
    save_tensors(out_dir / WEIGHTS_NAME, export_state_dict(model, dtype), metadata={"format": "pt"})
    config: dict[str, Any] = {"model_cfg": jsonable(model_cfg), "preprocess_cfg": jsonable(preprocess_cfg)}
    if arch is not None:
        config["arch"] = arch
    config["clipslim"] = jsonable(extra or {})
    atomic_write_json(out_dir / CONFIG_NAME, config)
    return out_dir
