"""Per-precision ONNX bundles: everything a runtime needs to embed images and captions without clipslim or torch.

``OUT/<precision>/`` holds ``image.onnx``, ``text.onnx``, the tokenizer files (CLIP BPE from open_clip's wheel,
see ``tokenizer.py``) and ``preprocess.json``: image size, mean, std, interpolation and resize mode from the
model's preprocess config, the input/output contract and the logit scale. fp16 and int8 files are derived from the
fp32 export, so all precisions share one graph.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipslim.deploy.onnx import FP16_MAX, IMAGE_FILE, TEXT_FILE, export_onnx, quantize_int8, to_fp16
from clipslim.io import atomic_write_json

PRECISIONS = ("fp32", "fp16", "int8")
PREPROCESS_FILE = "preprocess.json"


def _resize_steps(pre: dict[str, Any], h: int, w: int) -> list[str]:
    """open_clip's eval transform in words (``open_clip.transform.image_transform``, is_train=False)."""
    interp, mode = pre.get("interpolation", "bicubic"), pre.get("resize_mode", "shortest")
    resize = {
        "shortest": [f"resize the shorter side to {min(h, w)} ({interp})", f"center crop {h}x{w}"],
        "longest": [
            f"resize the longer side to {max(h, w)} ({interp})",
            f"pad to {h}x{w} with {pre.get('fill_color', 0)}",
        ],
        "squash": [f"resize to {h}x{w} ignoring aspect ratio ({interp})"],
    }[mode]
    return [*resize, "RGB, float in [0, 1] (divide by 255)", "subtract mean, divide by std (per channel)", "NCHW"]


def preprocess_json(bundle: Any, precision: str, tokenizer_files: list[str], why_no_tokenizer: str | None) -> dict:
    """The contract of a bundle: how to turn an image and a caption into the two inputs, what comes out."""
    from clipslim.eval.bench import image_hw
    from clipslim.export import jsonable

    pre, (h, w) = bundle.preprocess_cfg, image_hw(bundle)
    context = int(torch.as_tensor(bundle.tokenizer(["a"])).shape[1])
    scale = getattr(bundle.model, "logit_scale", None)
    return jsonable({
        "precision": precision, "source": bundle.spec,
        "image": {
            "file": IMAGE_FILE, "input": "image", "shape": ["batch", 3, h, w], "dtype": "float32", "size": [h, w],
            "mean": pre.get("mean"), "std": pre.get("std"), "interpolation": pre.get("interpolation"),
            "resize_mode": pre.get("resize_mode"), "fill_color": pre.get("fill_color", 0),
            "mode": pre.get("mode", "RGB"), "steps": _resize_steps(pre, h, w),
        },
        "text": {
            "file": TEXT_FILE, "input": "text", "shape": ["batch", context], "dtype": "int64",
            "context_length": context, "tokenizer_files": tokenizer_files,
            "tokenizer_missing_because": why_no_tokenizer,
            "pooling": "at the largest token id (end of text); pad with 0 or <|endoftext|>, truncate keeping it last",
        },
        "outputs": {"image": "image_embeds", "text": "text_embeds", "normalized": True,
                    "dim": bundle.model_cfg.get("embed_dim")},
        "logit_scale": float(scale.detach().exp()) if scale is not None else None,
        "similarity": "logit_scale * image_embeds @ text_embeds.T",
    })  # fmt: skip


def _tokenizer(bundle: Any, folder: Path) -> tuple[list[str], str | None]:
    """Tokenizer files when the model uses open_clip's CLIP BPE, else why not."""
    from clipslim.deploy.tokenizer import check_open_clip_tokenizer, write_tokenizer

    why = check_open_clip_tokenizer(bundle.tokenizer)
    if why:
        return [], why
    context = int(torch.as_tensor(bundle.tokenizer(["a"])).shape[1])
    return [p.name for p in write_tokenizer(folder, context)], None


def write_bundles(bundle: Any, out_dir: str | Path, precisions: list[str]) -> dict[str, Path]:
    """``out_dir/<precision>/`` for each precision; returns the folders. fp32 is exported once and converted."""
    from clipslim.deploy.hf import quiet_transformers

    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ValueError(f"--precision {unknown[0]}: choose from {', '.join(PRECISIONS)}")
    out_dir = Path(out_dir)
    fp32 = out_dir / "fp32"
    files = export_onnx(bundle, fp32)
    folders = {}
    for precision in precisions:
        folder = out_dir / precision
        folder.mkdir(parents=True, exist_ok=True)
        for src in files.values():
            if precision == "fp16":
                to_fp16(src, folder / src.name)
            elif precision == "int8":
                quantize_int8(src, folder / src.name)
        with quiet_transformers():
            names, why = _tokenizer(bundle, folder)
        atomic_write_json(folder / PREPROCESS_FILE, preprocess_json(bundle, precision, names, why))
        folders[precision] = folder
    if "fp32" not in precisions:
        shutil.rmtree(fp32)
    return folders


@torch.no_grad()
def peak_activations(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    """Largest |output| of any module per tower in eager fp32 (block outputs carry the residual stream, the usual
    culprit): above ``FP16_MAX`` an fp16 graph overflows."""
    peaks = {"image": 0.0, "text": 0.0}
    handles = []
    for name, module in model.named_modules():
        tower = "image" if name.startswith("visual") else "text"

        def hook(_m: nn.Module, _a: Any, out: Any, tower: str = tower) -> None:
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                    peaks[tower] = max(peaks[tower], t.detach().abs().max().item())

        if name:
            handles.append(module.register_forward_hook(hook))
    try:
        model.eval().encode_image(images)
        model.encode_text(tokens)
    finally:
        for h in handles:
            h.remove()
    return peaks


@torch.no_grad()
def half_nonfinite_rows(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, int]:
    """Rows that come out inf / nan when the model runs in fp16 in PyTorch. ONNX Runtime's CPU provider computes
    many fp16 nodes in fp32 (it inserts casts, then drops cast pairs), so the fp16 graph can hide an overflow on CPU
    that a GPU or mobile runtime would hit; this is the runtime-independent witness."""
    half = copy.deepcopy(model).half().eval()
    image = half.encode_image(images.half(), normalize=True)
    text = half.encode_text(tokens, normalize=True)
    return {tower: int((~torch.isfinite(x).all(dim=-1)).sum()) for tower, x in (("image", image), ("text", text))}


def fp16_overflow(peaks: dict[str, float], half_rows: dict[str, int], parity: dict[str, float]) -> dict[str, Any]:
    """Per tower: eager peak activation and headroom to fp16's largest value, inf/nan rows in PyTorch fp16 and in
    the fp16 ONNX graph on this runtime, and the verdict (any of the three)."""
    out = {}
    for tower in ("image", "text"):
        onnx_rows = parity[f"{tower}_nonfinite_rows"]
        out[tower] = {
            "peak_abs_activation": peaks[tower],
            "fp16_headroom": FP16_MAX / peaks[tower] if peaks[tower] else float("inf"),
            "torch_fp16_nonfinite_rows": half_rows[tower],
            "onnx_fp16_nonfinite_rows": onnx_rows,
            "overflow": peaks[tower] > FP16_MAX or half_rows[tower] > 0 or onnx_rows > 0,
        }
    return out
