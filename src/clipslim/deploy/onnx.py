"""Image and text encoders as ONNX files run with ONNX Runtime, in fp32, fp16 or int8 (dynamic quantisation).

Each encoder is exported on its own (``torch.onnx.export``, the torch.export-based exporter, opset 20) with a
dynamic batch axis and returns **L2-normalised** embeddings (``image`` -> ``image_embeds``, ``text`` ->
``text_embeds``; "embedding" would clash with the name of the token-embedding node), so a deployment only needs
``image_embeds @ text_embeds.T``. The transformer blocks are exported through ``export_graph.OrtBlock`` (same
weights, a graph ONNX Runtime runs faster). Text input is open_clip token ids (int64, ``[batch, context_length]``).
fp16 files keep fp32 inputs and outputs (casts inside), so every precision is fed the same way. Opset 20 because
it has a ``Gelu`` op: below it GELU exports as Div / Erf / Add / Mul, which ONNX Runtime does not fuse and which
made its batch-64 latency exceed eager PyTorch's (``docs/LOG.md``, issue 19).

``OrtClip`` wraps the sessions as a module with ``encode_image`` / ``encode_text``, so the same evaluation code
that scores a PyTorch model scores the exported one. ``OrtConfig`` holds the session settings the speed benchmark
sweeps (threads, graph optimisation, execution mode, spinning, I/O binding, memory arena and pattern); its defaults
are the measured best (``benchmarks/deploy_speed.py``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

IMAGE_FILE, TEXT_FILE = "image.onnx", "text.onnx"
OPSET = 20  # first opset with Gelu
FP16_MAX = 65504.0


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
    quiet = logging.getLogger("onnxscript")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "skipping constant folding" notes, one per node
    try:
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
    finally:
        quiet.setLevel(level)
    return path


def example_inputs(bundle: Any, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (images, tokens) shaped as the model expects; tokens from real captions of varied length."""
    from clipslim.eval.bench import image_hw

    h, w = image_hw(bundle)
    images = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))
    captions = [f"a photo of {'a very ' * (i % 4)}red circle number {i}" for i in range(batch)]
    return images, torch.as_tensor(bundle.tokenizer(captions)).long()


def export_onnx(bundle: Any, out_dir: str | Path, opset: int = OPSET, rewrite: bool = True) -> dict[str, Path]:
    """Write ``image.onnx`` and ``text.onnx`` of a ``ClipBundle`` (a CPU copy) to ``out_dir``.

    ``rewrite=False`` exports open_clip's blocks as they are (the benchmark's baseline graph)."""
    from clipslim.deploy.export_graph import onnx_ready

    if opset < 17:
        raise ValueError(f"ONNX opset must be >= 17 (LayerNormalization), got {opset}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = bundle.model.cpu().eval()
    model = onnx_ready(model) if rewrite else model
    images, tokens = example_inputs(bundle)
    return {
        "image": _export(ImageEncoder(model), images, out_dir / IMAGE_FILE, "image", opset),
        "text": _export(TextEncoder(model), tokens, out_dir / TEXT_FILE, "text", opset),
    }


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantisation (weights int8, activations quantised per call) of ``src`` into ``dst``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it logs a "consider pre-processing" hint on every call
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return Path(dst)


def to_fp16(src: str | Path, dst: str | Path) -> Path:
    """fp16 weights and activations, fp32 inputs/outputs; the final L2 norm stays fp32 (its sum of squares would
    overflow fp16 for embeddings longer than 256)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    blocked = [*DEFAULT_OP_BLOCK_LIST, "ReduceL2"]
    onnx.save(convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked), str(dst))
    return Path(dst)


@dataclass(frozen=True)
class OrtConfig:
    """ONNX Runtime CPU session settings; ``None`` threads means torch's count (a like-for-like race)."""

    intra_threads: int | None = None
    inter_threads: int = 1
    optimization: str = "all"  # disable | basic | extended | all
    parallel: bool = False  # ORT_PARALLEL execution mode (runs independent nodes concurrently)
    spinning: bool = False  # busy-waiting intra-op threads: 2x slower at batch 64 when another job shares the cores
    io_binding: bool = False  # bind numpy buffers instead of run()'s feed dict
    mem_arena: bool = True  # CPU memory arena: reuse freed blocks instead of calling malloc
    mem_pattern: bool = True  # plan activation buffers from the first run's shapes

    def session_options(self) -> Any:
        import onnxruntime as ort

        level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_threads or torch.get_num_threads()
        opts.inter_op_num_threads = self.inter_threads
        opts.graph_optimization_level = level
        opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL if self.parallel else ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        opts.enable_cpu_mem_arena = self.mem_arena
        opts.enable_mem_pattern = self.mem_pattern
        opts.log_severity_level = 3  # fp16 graphs log one "inserted cast" warning per node on CPU
        return opts


def ort_session(path: str | Path, config: OrtConfig | None = None) -> Any:
    """A CPU ONNX Runtime session with ``config`` (default ``OrtConfig()``)."""
    import onnxruntime as ort

    opts = (config or OrtConfig()).session_options()
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class _Runner:
    """One session and how it is called: feed dict, or I/O binding to numpy buffers."""

    def __init__(self, path: str | Path, config: OrtConfig):
        self.session = ort_session(path, config)
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name
        self.io_binding = config.io_binding

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        if not self.io_binding:
            return torch.from_numpy(self.session.run([self.output], {self.input: x})[0])
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input, np.ascontiguousarray(x))
        binding.bind_output(self.output, "cpu")
        self.session.run_with_iobinding(binding)
        return torch.from_numpy(binding.get_outputs()[0].numpy())


class OrtClip(nn.Module):
    """ONNX Runtime sessions behind the open_clip encoder interface (outputs are already normalised)."""

    def __init__(self, image_path: str | Path, text_path: str | Path, config: OrtConfig | None = None):
        super().__init__()
        config = config or OrtConfig()
        self.image_runner, self.text_runner = _Runner(image_path, config), _Runner(text_path, config)

    @classmethod
    def from_folder(cls, folder: str | Path, config: OrtConfig | None = None) -> OrtClip:
        """The encoders of one bundle folder written by ``clipslim deploy`` (e.g. ``OUT/int8``)."""
        folder = Path(folder)
        paths = [folder / IMAGE_FILE, folder / TEXT_FILE]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"ONNX encoder not found: {missing[0]} (run `clipslim deploy --format onnx`)")
        return cls(*paths, config=config)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.image_runner(images.detach().cpu().float().numpy())

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.text_runner(tokens.detach().cpu().numpy().astype(np.int64))


@torch.no_grad()
def parity(reference: nn.Module, candidate: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    """Largest absolute difference and smallest cosine between normalised embeddings of the two models, and how
    many rows of the candidate are not finite (fp16 overflow shows up as inf / nan rows)."""
    reference.eval()
    out: dict[str, float] = {}
    for name, ref, got in (
        ("image", reference.encode_image(images, normalize=True), candidate.encode_image(images, normalize=True)),
        ("text", reference.encode_text(tokens, normalize=True), candidate.encode_text(tokens, normalize=True)),
    ):
        ref, got = ref.float().cpu(), got.float().cpu()
        bad = ~torch.isfinite(got).all(dim=-1)
        out[f"{name}_nonfinite_rows"] = int(bad.sum())
        ref, got = ref[~bad], got[~bad]
        out[f"{name}_max_abs_diff"] = (ref - got).abs().max().item() if len(got) else float("nan")
        out[f"{name}_min_cosine"] = (
            torch.nn.functional.cosine_similarity(ref, got, dim=-1).min().item() if len(got) else float("nan")
        )
    return out
