"""Image and text encoders as ONNX files, run with ONNX Runtime, optionally with int8 dynamic quantisation.

Each encoder is exported on its own (``torch.onnx.export``, the torch.export-based exporter, opset 18) with a
dynamic batch axis and returns **L2-normalised** embeddings (``image`` -> ``image_embeds``, ``text`` ->
``text_embeds``; "embedding" would clash with the name of the token-embedding node), so a deployment only needs
``image_embeds @ text_embeds.T``.
Text input is open_clip token ids (int64, ``[batch, context_length]``); ``deploy_config.json`` records the
tokenizer, the image preprocessing and everything else needed to feed the files without clipslim.

``OrtClip`` wraps the sessions as a module with ``encode_image`` / ``encode_text``, so the same evaluation code
that scores a PyTorch model scores the exported (or quantised) one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clipslim.io import atomic_write_json

IMAGE_FILE, TEXT_FILE = "image_encoder.onnx", "text_encoder.onnx"
INT8_SUFFIX = ".int8.onnx"
CONFIG_FILE = "deploy_config.json"
OPSET = 18


class ImageEncoder(nn.Module):
    """``images [B, 3, H, W] -> normalised embeddings [B, D]``: the graph that is exported."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, normalize=True)


class TextEncoder(nn.Module):
    """``token ids [B, L] (int64) -> normalised embeddings [B, D]``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=True)


def _export(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, opset: int) -> Path:
    """One encoder to ``path``; the exporter's chatter (progress lines, deprecation warnings) is silenced."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            input_names=[input_name],
            output_names=[f"{input_name}_embeds"],
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    return path


def example_inputs(bundle: Any, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (images, tokens) shaped as the model expects; tokens from real captions of varied length."""
    from clipslim.eval.bench import image_hw

    h, w = image_hw(bundle)
    images = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))
    captions = [f"a photo of {'a very ' * (i % 4)}red circle number {i}" for i in range(batch)]
    return images, torch.as_tensor(bundle.tokenizer(captions)).long()


def export_onnx(bundle: Any, out_dir: str | Path, opset: int = OPSET) -> dict[str, Path]:
    """Write ``image_encoder.onnx`` and ``text_encoder.onnx`` of a ``ClipBundle`` (moved to CPU) to ``out_dir``."""
    if opset < 17:
        raise ValueError(f"ONNX opset must be >= 17 (LayerNormalization), got {opset}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = bundle.model.cpu().eval()
    images, tokens = example_inputs(bundle)
    return {
        "image": _export(ImageEncoder(model), images, out_dir / IMAGE_FILE, "image", opset),
        "text": _export(TextEncoder(model), tokens, out_dir / TEXT_FILE, "text", opset),
    }


def quantize_int8(src: str | Path) -> Path:
    """Dynamic int8 quantisation (weights int8, activations quantised per call) next to ``src``: ``*.int8.onnx``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = Path(src)
    dst = src.with_name(src.name.removesuffix(".onnx") + INT8_SUFFIX)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it logs a "consider pre-processing" hint on every call
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return dst


def write_config(bundle: Any, out_dir: str | Path, files: dict[str, Path], **extra: Any) -> Path:
    """``deploy_config.json``: file names, input contract, preprocessing, tokenizer and source of the export."""
    from clipslim.eval.bench import image_hw
    from clipslim.export import jsonable

    context_length = int(example_inputs(bundle, 1)[1].shape[1])
    config = {
        "files": {k: p.name for k, p in files.items()},
        "image_input": {"name": "image", "shape": ["batch", 3, *image_hw(bundle)], "dtype": "float32"},
        "text_input": {"name": "text", "shape": ["batch", context_length], "dtype": "int64"},
        "outputs": {
            "names": ["image_embeds", "text_embeds"],
            "normalized": True,
            "dim": bundle.model_cfg.get("embed_dim"),
        },
        "logit_scale": float(bundle.model.logit_scale.detach().exp()) if hasattr(bundle.model, "logit_scale") else None,
        "preprocess_cfg": jsonable(bundle.preprocess_cfg),
        "tokenizer": "open_clip.get_tokenizer(model_cfg) (SimpleTokenizer unless text_cfg names an HF tokenizer)",
        "model_cfg": jsonable(bundle.model_cfg),
        "source": bundle.spec,
        **jsonable(extra),
    }
    return atomic_write_json(Path(out_dir) / CONFIG_FILE, config)


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """A CPU ONNX Runtime session; ``threads`` intra-op threads (default: torch's, for a like-for-like race)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OrtClip(nn.Module):
    """ONNX Runtime sessions behind the open_clip encoder interface (outputs are already normalised)."""

    def __init__(self, image_path: str | Path, text_path: str | Path, threads: int | None = None):
        super().__init__()
        self.image_session, self.text_session = ort_session(image_path, threads), ort_session(text_path, threads)

    @classmethod
    def from_folder(cls, folder: str | Path, int8: bool = False, threads: int | None = None) -> OrtClip:
        folder = Path(folder)
        suffix = INT8_SUFFIX if int8 else ".onnx"
        paths = [folder / f.replace(".onnx", suffix) for f in (IMAGE_FILE, TEXT_FILE)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"ONNX encoder not found: {missing[0]} (run `clipslim deploy`{' --int8' * int8})")
        return cls(*paths, threads=threads)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        out = self.image_session.run(None, {"image": images.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        out = self.text_session.run(None, {"text": tokens.detach().cpu().numpy().astype(np.int64)})[0]
        return torch.from_numpy(out)


@torch.no_grad()
def parity(reference: nn.Module, candidate: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    """Largest absolute difference and smallest cosine between normalised embeddings of the two models."""
    reference.eval()
    out: dict[str, float] = {}
    for name, ref, got in (
        ("image", reference.encode_image(images, normalize=True), candidate.encode_image(images, normalize=True)),
        ("text", reference.encode_text(tokens, normalize=True), candidate.encode_text(tokens, normalize=True)),
    ):
        ref, got = ref.float().cpu(), got.float().cpu()
        out[f"{name}_max_abs_diff"] = (ref - got).abs().max().item()
        out[f"{name}_min_cosine"] = torch.nn.functional.cosine_similarity(ref, got, dim=-1).min().item()
    return out
