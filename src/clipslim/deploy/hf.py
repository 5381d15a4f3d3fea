"""open_clip CLIP <-> Hugging Face ``transformers`` CLIP folders, both ways, checked on sample inputs.

``export_hf`` writes a folder that ``CLIPModel`` / ``CLIPTokenizer`` / ``CLIPProcessor.from_pretrained`` load with
no clipslim: ``config.json`` + ``model.safetensors``, the tokenizer files built from open_clip's BPE
(``deploy/tokenizer.py``), and ``preprocessor_config.json`` from the model's preprocess config. Only students whose
towers are what CLIPModel computes are converted; anything else stops with one line naming the part, because a
silently different model is worse than none. Exact rewrites used: q/k/v split from ``in_proj``, projections
transposed, LayerScale folded into ``out_proj`` / ``fc2``, a missing text projection as the identity, argmax
pooling through CLIP's ``eos_token_id == 2`` path (the legacy rule: pool at the largest token id).

``hf_to_open_clip`` is the reverse (``hf:PATH`` model specs): an HF CLIP folder becomes an open_clip folder that
``load_model`` reads like any other. Both directions are checked: image and text embeddings of the two models on
sample inputs, each side tokenising with its own tokenizer, must reach cosine >= ``MIN_COSINE``.

CLIPProcessor reproduces open_clip's eval transform to float rounding, except where resizing leaves an odd crop
margin (e.g. 128x71 -> 115x64): transformers' center crop rounds it down, torchvision rounds half to even, so the
crop is one pixel apart. The check's test image has an even margin; the pixel difference is reported, not gated.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from open_clip.transformer import LayerScale, ResidualAttentionBlock, TextTransformer, VisionTransformer
from torch import nn

from clipslim.deploy.tokenizer import VOCAB_SIZE, check_open_clip_tokenizer, compare_ids, hf_token_ids
from clipslim.io import atomic_write_json

MIN_COSINE = 0.9999
CHECK_FILE = "clipslim_hf_check.json"
LEGACY_ARGMAX_EOS = 2  # transformers' CLIPTextModel pools at input_ids.argmax() when eos_token_id == 2
BOS_ID, EOS_ID = VOCAB_SIZE - 2, VOCAB_SIZE - 1
ACTS = {"QuickGELU": "quick_gelu", ("GELU", "none"): "gelu", ("GELU", "tanh"): "gelu_pytorch_tanh"}
RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL codes CLIPImageProcessor stores
SAMPLE_CAPTIONS = [
    "a photo of a red circle",
    "A small BLUE square on the left.",
    "two green triangles, one above the other",
    "a very very very very very very very very long caption that is cut at the context length",
    "",
    "yellow star",
]


class HfConversionError(ValueError):
    """A model that does not map onto transformers' CLIPModel; the message names the part."""


# ---------------------------------------------------------------- open_clip -> HF: what the towers are


def text_tower(model: nn.Module) -> Any:
    """The text tower as an object with TextTransformer's attribute names (CLIP keeps them on the model itself)."""
    if hasattr(model, "text"):
        if not isinstance(model.text, TextTransformer):
            raise HfConversionError(f"text tower {type(model.text).__name__} (only open_clip's TextTransformer maps)")
        return model.text
    return _FlatText(model)


class _FlatText:
    """open_clip's ``CLIP`` class flattens the text tower into the model; give it TextTransformer's names."""

    def __init__(self, model: nn.Module):
        self.token_embedding, self.positional_embedding = model.token_embedding, model.positional_embedding
        self.transformer, self.ln_final, self.text_projection = model.transformer, model.ln_final, model.text_projection
        self.attn_mask, self.pool_type = model.attn_mask, model.text_pool_type
        self.eos_id, self.cls_emb = getattr(model, "text_eos_id", None), None


def _act_name(module: nn.Module) -> str | None:
    name = type(module).__name__
    return ACTS.get(name) or ACTS.get((name, getattr(module, "approximate", None)))


def _blocks_config(blocks: nn.ModuleList, where: str) -> dict[str, Any]:
    """hidden_act, heads, FFN width and LayerNorm eps shared by every block, or the refusal naming the block."""
    seen: dict[str, set] = {"hidden_act": set(), "num_attention_heads": set(), "intermediate_size": set(), "eps": set()}
    for i, blk in enumerate(blocks):
        part = f"{where}.resblocks.{i}"
        if type(blk) is not ResidualAttentionBlock:
            raise HfConversionError(f"{part} is a {type(blk).__name__} (qk_norm / scaled-cosine / scale_* options)")
        attn = blk.attn
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn or not attn.batch_first:
            raise HfConversionError(f"{part}.attn has separate k/v dims or extra bias tokens")
        if hasattr(blk, "ln_1_kv"):
            raise HfConversionError(f"{part} is a cross-attention block")
        for ls in (blk.ls_1, blk.ls_2):
            if not isinstance(ls, nn.Identity | LayerScale):
                raise HfConversionError(f"{part} layer scale {type(ls).__name__}")
        act = _act_name(blk.mlp.gelu)
        if act is None:
            raise HfConversionError(f"{part} activation {blk.mlp.gelu!r} (CLIP has gelu, gelu tanh, quick_gelu)")
        seen["hidden_act"].add(act)
        seen["num_attention_heads"].add(attn.num_heads)
        seen["intermediate_size"].add(blk.mlp.c_fc.out_features)
        seen["eps"].update({blk.ln_1.eps, blk.ln_2.eps})
    differing = [k for k, v in seen.items() if len(v) > 1]
    if differing:
        raise HfConversionError(f"{where} blocks differ in {differing} (a CLIP config has one value per tower)")
    return {k: next(iter(v)) for k, v in seen.items()}


def _check_no_hooks(module: nn.Module, where: str) -> None:
    for name, sub in module.named_modules():
        if sub._forward_hooks or sub._forward_pre_hooks or name.endswith("token_pruner"):
            raise HfConversionError(f"{where}.{name} has a forward hook (token pruning is not part of CLIPModel)")


def vision_config(visual: nn.Module) -> dict[str, Any]:
    """CLIPVisionConfig fields of an open_clip image tower, or HfConversionError naming what does not map."""
    if type(visual) is not VisionTransformer:
        raise HfConversionError(f"image tower {type(visual).__name__} (timm / ModifiedResNet towers do not map)")
    if visual.attn_pool is not None:
        raise HfConversionError("image tower has an attentional pooler (vision_cfg.attentional_pool)")
    if visual.pool_type != "tok":
        raise HfConversionError(f"image pooling '{visual.pool_type}' (CLIP pools the class token)")
    if isinstance(visual.ln_pre, nn.Identity):
        raise HfConversionError("image tower has no pre-LayerNorm (vision_cfg.no_ln_pre)")
    if visual.proj is None:
        raise HfConversionError("image tower has no projection")
    conv = visual.conv1
    h, w = visual.image_size
    if h != w or conv.kernel_size[0] != conv.kernel_size[1] or conv.stride != conv.kernel_size or conv.bias is not None:
        raise HfConversionError(f"image size {h}x{w} / patch conv {conv} (CLIP has square images and patches)")
    _check_no_hooks(visual, "visual")
    blocks = _blocks_config(visual.transformer.resblocks, "visual.transformer")
    eps = {blocks.pop("eps"), visual.ln_pre.eps, visual.ln_post.eps}
    if len(eps) > 1:
        raise HfConversionError(f"image tower LayerNorm eps differ: {sorted(eps)}")
    return {
        **blocks, "hidden_size": visual.transformer.width, "num_hidden_layers": len(visual.transformer.resblocks),
        "image_size": h, "patch_size": conv.kernel_size[0], "num_channels": conv.in_channels,
        "layer_norm_eps": eps.pop(), "projection_dim": visual.proj.shape[1],
    }  # fmt: skip


def _text_pooling(text: Any) -> int:
    """eos_token_id that makes CLIPTextModel pool where open_clip pools."""
    if text.pool_type == "argmax":
        return LEGACY_ARGMAX_EOS
    if text.pool_type == "eos" and text.eos_id not in (None, LEGACY_ARGMAX_EOS):
        return int(text.eos_id)
    raise HfConversionError(f"text pooling '{text.pool_type}' (CLIP pools at the end-of-text token: argmax or eos)")


def text_config(model: nn.Module) -> dict[str, Any]:
    """CLIPTextConfig fields of an open_clip text tower, or HfConversionError naming what does not map."""
    text = text_tower(model)
    if text.cls_emb is not None:
        raise HfConversionError("text tower appends a class token (text_cfg.embed_cls, CoCa-style)")
    n_pos, width = text.positional_embedding.shape
    causal = torch.full((n_pos, n_pos), float("-inf")).triu_(1)
    if text.attn_mask is None or not torch.equal(text.attn_mask.detach().float().cpu(), causal):
        raise HfConversionError("text tower has no causal mask (text_cfg.no_causal_mask)")
    proj = text.text_projection
    if isinstance(proj, nn.Linear) and proj.bias is not None and bool(proj.bias.detach().ne(0).any()):
        raise HfConversionError("text projection has a bias (text_cfg.proj_bias); CLIP's has none")
    if text.token_embedding.num_embeddings != VOCAB_SIZE:
        raise HfConversionError(f"text vocab_size {text.token_embedding.num_embeddings} != CLIP BPE's {VOCAB_SIZE}")
    blocks = _blocks_config(text.transformer.resblocks, "text.transformer")
    eps = {blocks.pop("eps"), text.ln_final.eps}
    if len(eps) > 1:
        raise HfConversionError(f"text tower LayerNorm eps differ: {sorted(eps)}")
    out_dim = width if proj is None else (proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])
    return {
        **blocks, "hidden_size": width, "num_hidden_layers": len(text.transformer.resblocks),
        "max_position_embeddings": n_pos, "vocab_size": VOCAB_SIZE, "layer_norm_eps": eps.pop(),
        "projection_dim": out_dim, "bos_token_id": BOS_ID, "eos_token_id": _text_pooling(text), "pad_token_id": EOS_ID,
    }  # fmt: skip


def hf_config(bundle: Any) -> dict[str, Any]:
    """The whole CLIPConfig as a dict; raises HfConversionError with the first part that does not map."""
    model = bundle.model
    if getattr(model, "logit_bias", None) is not None:
        raise HfConversionError("model has a logit_bias (SigLIP-style); CLIPModel's logits have none")
    why = check_open_clip_tokenizer(bundle.tokenizer)
    if why:
        raise HfConversionError(why)
    vision, text = vision_config(model.visual), text_config(model)
    if vision["projection_dim"] != text["projection_dim"]:
        raise HfConversionError(
            f"image / text embedding dims differ: {vision['projection_dim']} vs {text['projection_dim']}"
        )
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": vision["projection_dim"],
        "logit_scale_init_value": float(model.logit_scale.detach().float().reshape(-1)[0]),
        "vision_config": vision, "text_config": text,
    }  # fmt: skip


# ---------------------------------------------------------------- open_clip -> HF: weights


def _gamma(ls: nn.Module, width: int) -> torch.Tensor:
    return ls.gamma.detach().float() if isinstance(ls, LayerScale) else torch.ones(width)


def _block_state(blk: ResidualAttentionBlock, dst: str) -> dict[str, torch.Tensor]:
    attn, width = blk.attn, blk.ln_1.normalized_shape[0]
    bias = attn.in_proj_bias if attn.in_proj_bias is not None else torch.zeros(3 * width)
    g1, g2 = _gamma(blk.ls_1, width), _gamma(blk.ls_2, width)  # LayerScale folded into the output layers
    out_bias = attn.out_proj.bias if attn.out_proj.bias is not None else torch.zeros(width)
    out = {f"{dst}.layer_norm1.{k}": getattr(blk.ln_1, k) for k in ("weight", "bias")}
    out |= {f"{dst}.layer_norm2.{k}": getattr(blk.ln_2, k) for k in ("weight", "bias")}
    for name, w, b in zip("qkv", attn.in_proj_weight.chunk(3), bias.chunk(3), strict=True):
        out[f"{dst}.self_attn.{name}_proj.weight"], out[f"{dst}.self_attn.{name}_proj.bias"] = w, b
    out[f"{dst}.self_attn.out_proj.weight"] = attn.out_proj.weight * g1[:, None]
    out[f"{dst}.self_attn.out_proj.bias"] = out_bias * g1
    out[f"{dst}.mlp.fc1.weight"], out[f"{dst}.mlp.fc1.bias"] = blk.mlp.c_fc.weight, blk.mlp.c_fc.bias
    out[f"{dst}.mlp.fc2.weight"], out[f"{dst}.mlp.fc2.bias"] = (
        blk.mlp.c_proj.weight * g2[:, None],
        blk.mlp.c_proj.bias * g2,
    )
    return out


def _ln(prefix: str, ln: nn.LayerNorm) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": ln.weight, f"{prefix}.bias": ln.bias}


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CLIPModel weights from an open_clip CLIP (call after ``hf_config`` has accepted the model)."""
    v, t = model.visual, text_tower(model)
    out = {
        "vision_model.embeddings.patch_embedding.weight": v.conv1.weight,
        "vision_model.embeddings.class_embedding": v.class_embedding,
        "vision_model.embeddings.position_embedding.weight": v.positional_embedding,
        **_ln("vision_model.pre_layrnorm", v.ln_pre), **_ln("vision_model.post_layernorm", v.ln_post),
        "visual_projection.weight": v.proj.t(),
        "text_model.embeddings.token_embedding.weight": t.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": t.positional_embedding,
        **_ln("text_model.final_layer_norm", t.ln_final),
        "logit_scale": model.logit_scale.reshape(()),
    }  # fmt: skip
    proj = t.text_projection
    width = t.positional_embedding.shape[1]
    out["text_projection.weight"] = (
        torch.eye(width) if proj is None else proj.weight if isinstance(proj, nn.Linear) else proj.t()
    )
    for i, blk in enumerate(v.transformer.resblocks):
        out |= _block_state(blk, f"vision_model.encoder.layers.{i}")
    for i, blk in enumerate(t.transformer.resblocks):
        out |= _block_state(blk, f"text_model.encoder.layers.{i}")
    return {k: t.detach().float().cpu().contiguous().clone() for k, t in out.items()}


# ---------------------------------------------------------------- preprocessing


def image_processor_config(preprocess_cfg: dict[str, Any], image_size: int) -> dict[str, Any]:
    """CLIPImageProcessor settings that reproduce open_clip's eval transform (resize, crop, normalise)."""
    size = preprocess_cfg.get("size", image_size)
    h, w = (size, size) if isinstance(size, int) else size
    mode, interp = preprocess_cfg.get("resize_mode", "shortest"), preprocess_cfg.get("interpolation", "bicubic")
    if interp not in RESAMPLE:
        raise HfConversionError(f"preprocess interpolation '{interp}' has no PIL resample code")
    if mode == "shortest" and h == w:
        resize = {"size": {"shortest_edge": h}, "do_center_crop": True, "crop_size": {"height": h, "width": w}}
    elif mode == "squash":
        resize = {"size": {"height": h, "width": w}, "do_center_crop": False}
    else:
        raise HfConversionError(f"preprocess resize_mode '{mode}' at {h}x{w} (CLIPImageProcessor has no letterbox)")
    return {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "resample": RESAMPLE[interp], **resize,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": list(preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        "image_std": list(preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
    }  # fmt: skip


# ---------------------------------------------------------------- checks (both directions)


def _gradient_image(width: int, height: int) -> Any:
    """A smooth RGB test image of another size than the model's, so the processor really resizes and crops."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8))


def _pixel_diff(bundle: Any, hf_dir: str | Path, size: int) -> float:
    """Largest difference between open_clip's eval transform and CLIPProcessor on one image (reported, not gated)."""
    from transformers import CLIPProcessor

    image = _gradient_image(size * 3 // 2, size * 5 // 4)
    ours = bundle.preprocess_val(image)
    theirs = CLIPProcessor.from_pretrained(str(hf_dir))(images=image, return_tensors="pt")["pixel_values"][0]
    return (ours - theirs).abs().max().item() if ours.shape == theirs.shape else float("inf")


@torch.no_grad()
def compare(bundle: Any, hf_dir: str | Path, n_images: int = 4, seed: int = 0) -> dict[str, Any]:
    """Embeddings of the HF folder (its own tokenizer) vs the open_clip bundle (its own) on sample inputs."""
    from transformers import CLIPModel

    with quiet_transformers():
        hf = CLIPModel.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    model = bundle.model.eval()
    p = next(model.parameters())
    size = hf.config.vision_config.image_size
    images = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(seed))
    ctx = hf.config.text_config.max_position_embeddings
    oc_ids = torch.as_tensor(bundle.tokenizer(SAMPLE_CAPTIONS)).long()
    hf_ids = hf_token_ids(hf_dir, SAMPLE_CAPTIONS, ctx)
    pairs = {
        "image": (model.encode_image(images.to(p.device, p.dtype)), hf.get_image_features(pixel_values=images)),
        "text": (model.encode_text(oc_ids.to(p.device)), hf.get_text_features(input_ids=hf_ids)),
    }
    out: dict[str, Any] = {"captions": len(SAMPLE_CAPTIONS), "token_ids_agree": compare_ids(oc_ids, hf_ids)}
    for name, (ref, got) in pairs.items():
        got = getattr(got, "pooler_output", got)  # transformers 5 returns an output object
        ref, got = ref.float().cpu(), got.float().cpu()
        out[f"{name}_min_cosine"] = torch.nn.functional.cosine_similarity(ref, got, dim=-1).min().item()
        out[f"{name}_max_abs_diff"] = (ref - got).abs().max().item()
    if (Path(hf_dir) / "preprocessor_config.json").is_file():
        out["pixels_max_abs_diff"] = _pixel_diff(bundle, hf_dir, size)
    out["ok"] = min(out["image_min_cosine"], out["text_min_cosine"]) >= MIN_COSINE
    return out


class quiet_transformers:
    """transformers prints progress bars and load reports on every save/load; an export prints its own summary."""

    def __enter__(self) -> None:
        from transformers.utils import logging as hf_logging

        self._bar, self._level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()

    def __exit__(self, *exc: object) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._level)
        if self._bar:
            hf_logging.enable_progress_bar()


def _require(check: dict[str, Any], what: str) -> None:
    if not check["ok"]:
        worst = min(("image", "text"), key=lambda k: check[f"{k}_min_cosine"])
        raise HfConversionError(
            f"{what}: {worst} embeddings differ (min cosine {check[f'{worst}_min_cosine']:.6f} < {MIN_COSINE})"
        )


# ---------------------------------------------------------------- export


def _write_hf_folder(
    bundle: Any, config: dict[str, Any], processor_cfg: dict[str, Any], folder: Path, dtype: torch.dtype
) -> None:
    """Model, tokenizer and processor files, written by transformers itself so its readers find what they expect."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from clipslim.deploy.tokenizer import write_tokenizer

    with quiet_transformers():
        hf = CLIPModel(CLIPConfig(**config)).eval()
        hf.load_state_dict(hf_state_dict(bundle.model), strict=True)
        hf.to(dtype).save_pretrained(str(folder))
        write_tokenizer(folder, config["text_config"]["max_position_embeddings"])
        image_processor = CLIPImageProcessor(**{k: v for k, v in processor_cfg.items() if k != "image_processor_type"})
        tokenizer = CLIPTokenizer.from_pretrained(str(folder))
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(folder))
    atomic_write_json(folder / "preprocessor_config.json", processor_cfg)  # what transformers 4.x reads


def export_hf(bundle: Any, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Write the HF folder (into a temporary sibling, moved into place once the check passes); returns the check.

    ``dtype`` is the weights' dtype on disk; the check loads them back in float32, so it measures the rounding."""
    config = hf_config(bundle)
    processor_cfg = image_processor_config(bundle.preprocess_cfg, config["vision_config"]["image_size"])
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_hf_folder(bundle, config, processor_cfg, tmp, dtype)
        check = compare(bundle, tmp)
        _require(check, f"export of {bundle.spec} to {out_dir}")
        atomic_write_json(tmp / CHECK_FILE, {"source": bundle.spec, "min_cosine_required": MIN_COSINE, **check})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return check


def check_summary(check: dict[str, Any]) -> str:
    """One line for the terminal: both cosines, the largest differences, tokenizer and processor agreement."""
    cells = [
        f"{k} min cosine {check[f'{k}_min_cosine']:.7f} (max abs {check[f'{k}_max_abs_diff']:.1e})"
        for k in ("image", "text")
    ]
    cells.append(f"token ids {check['token_ids_agree']}/{check['captions']} captions agree")
    if "pixels_max_abs_diff" in check:
        cells.append(f"processor pixels max abs {check['pixels_max_abs_diff']:.1e}")
    return f"HF vs open_clip (required cosine >= {MIN_COSINE}): " + ", ".join(cells)


def export_hf_spec(spec: str, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> str:
    """``clipslim export --format hf``: load, convert, check; returns what to print."""
    from clipslim.models import load_model

    check = export_hf(load_model(spec), out_dir, dtype)
    return f"{check_summary(check)}\nwrote {out_dir}: load with transformers.CLIPModel.from_pretrained('{out_dir}')"


# ---------------------------------------------------------------- HF -> open_clip (hf:PATH specs)


def _act_cfg(hidden_act: str, where: str) -> tuple[bool, dict[str, Any] | None]:
    """(quick_gelu, act_kwargs) for one tower."""
    if hidden_act == "quick_gelu":
        return True, None
    if hidden_act in ("gelu", "gelu_pytorch_tanh"):
        return False, ({"approximate": "tanh"} if hidden_act.endswith("tanh") else None)
    raise HfConversionError(f"{where} hidden_act '{hidden_act}' (open_clip has gelu, gelu tanh, quick_gelu)")


def _tower_cfg(cfg: Any, where: str) -> tuple[dict[str, Any], bool]:
    quick, act_kwargs = _act_cfg(cfg.hidden_act, where)
    ratio = cfg.intermediate_size / cfg.hidden_size
    if int(cfg.hidden_size * ratio) != cfg.intermediate_size:
        raise HfConversionError(f"{where} intermediate_size {cfg.intermediate_size} is not width x a float ratio")
    out: dict[str, Any] = {"width": cfg.hidden_size, "layers": cfg.num_hidden_layers, "mlp_ratio": ratio}
    if act_kwargs:
        out["act_kwargs"] = act_kwargs
    if cfg.layer_norm_eps != 1e-5:
        out["norm_kwargs"] = {"eps": cfg.layer_norm_eps}
    return out, quick


def open_clip_config(config: Any) -> dict[str, Any]:
    """open_clip ``model_cfg`` of a transformers CLIPConfig, or HfConversionError naming what does not map."""
    v, t = config.vision_config, config.text_config
    if v.num_channels != 3 or v.hidden_size % v.num_attention_heads:
        raise HfConversionError(f"vision_config num_channels {v.num_channels} / heads {v.num_attention_heads}")
    vision, quick_v = _tower_cfg(v, "vision_config")
    text, quick_t = _tower_cfg(t, "text_config")
    if quick_v != quick_t:
        raise HfConversionError("one tower uses quick_gelu and the other not (open_clip has one quick_gelu switch)")
    vision |= {
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "head_width": v.hidden_size // v.num_attention_heads,
    }
    eos = t.eos_token_id[0] if isinstance(t.eos_token_id, list) else t.eos_token_id
    pool = {"pool_type": "argmax"} if eos == LEGACY_ARGMAX_EOS else {"pool_type": "eos", "eos_id": int(eos)}
    text |= {"context_length": t.max_position_embeddings, "vocab_size": t.vocab_size, "heads": t.num_attention_heads}
    cfg = {"embed_dim": config.projection_dim, "vision_cfg": vision, "text_cfg": {**text, **pool}}
    return cfg | ({"quick_gelu": True} if quick_v else {})


# (open_clip name, CLIPModel name) of every tensor copied as is; the projections are transposed on top.
_BLOCK_NAMES = [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj")]
_BLOCK_NAMES += [("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]
_TOP_NAMES = [
    ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
]
_TOP_NAMES += [(f"visual.ln_pre.{k}", f"vision_model.pre_layrnorm.{k}") for k in ("weight", "bias")]
_TOP_NAMES += [(f"visual.ln_post.{k}", f"vision_model.post_layernorm.{k}") for k in ("weight", "bias")]
_TOP_NAMES += [(f"ln_final.{k}", f"text_model.final_layer_norm.{k}") for k in ("weight", "bias")]


def _open_clip_block(sd: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    out = {f"{dst}.{a}.{k}": sd[f"{src}.{b}.{k}"] for a, b in _BLOCK_NAMES for k in ("weight", "bias")}
    for k in ("weight", "bias"):
        out[f"{dst}.attn.in_proj_{k}"] = torch.cat([sd[f"{src}.self_attn.{x}_proj.{k}"] for x in "qkv"])
    return out


def open_clip_state_dict(sd: dict[str, torch.Tensor], n_vision: int, n_text: int) -> dict[str, torch.Tensor]:
    """open_clip CLIP weights from CLIPModel's state dict."""
    out = {a: sd[b] for a, b in _TOP_NAMES}
    out["visual.proj"] = sd["visual_projection.weight"].t()
    out["text_projection"] = sd["text_projection.weight"].t()
    out["logit_scale"] = sd["logit_scale"].reshape(())
    for i in range(n_vision):
        out |= _open_clip_block(sd, f"vision_model.encoder.layers.{i}", f"visual.transformer.resblocks.{i}")
    for i in range(n_text):
        out |= _open_clip_block(sd, f"text_model.encoder.layers.{i}", f"transformer.resblocks.{i}")
    return {k: v.detach().float().cpu().contiguous().clone() for k, v in out.items()}


def _preprocess_cfg(hf_dir: Path, image_size: int) -> dict[str, Any]:
    """open_clip preprocess config from ``preprocessor_config.json`` (open_clip's CLIP defaults without one)."""
    cfg: dict[str, Any] = {"size": [image_size, image_size]}
    path = hf_dir / "preprocessor_config.json"
    if not path.is_file():
        return cfg
    pre = json.loads(path.read_text())
    names = {code: name for name, code in RESAMPLE.items()}
    cfg |= {"mean": pre.get("image_mean"), "std": pre.get("image_std"), "interpolation": names.get(pre.get("resample"))}
    cfg["resize_mode"] = "shortest" if pre.get("do_center_crop", True) else "squash"
    return {k: v for k, v in cfg.items() if v is not None}


def _check_hf_tokenizer(hf_dir: Path) -> None:
    """The folder's vocab must be CLIP's BPE (special-token spelling aside): clipslim tokenises with open_clip's."""
    from clipslim.deploy.tokenizer import clip_bpe

    path = hf_dir / "vocab.json"
    if not path.is_file():
        return  # no tokenizer shipped: CLIP's is the only one a CLIPModel folder implies
    vocab, _ = clip_bpe()
    theirs = json.loads(path.read_text())
    differ = [t for t, i in vocab.items() if i < BOS_ID and theirs.get(t) != i]
    if differ or len(theirs) != VOCAB_SIZE:
        raise HfConversionError(f"{path}: not CLIP's BPE vocab ({len(theirs)} tokens, {len(differ)} ids differ)")


def hf_to_open_clip(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Write an open_clip folder (``open_clip_config.json`` + weights) holding the HF CLIP in ``hf_dir``."""
    import open_clip
    from transformers import CLIPModel

    from clipslim.export import export_open_clip

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise HfConversionError(f"{hf_dir}: no config.json (expected a transformers CLIP folder)")
    model_type = json.loads((hf_dir / "config.json").read_text()).get("model_type")
    if model_type != "clip":
        raise HfConversionError(f"{hf_dir / 'config.json'}: model_type '{model_type}' (only CLIP folders convert)")
    _check_hf_tokenizer(hf_dir)
    with quiet_transformers():
        hf = CLIPModel.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    model_cfg = open_clip_config(hf.config)
    sd = open_clip_state_dict(
        hf.state_dict(), hf.config.vision_config.num_hidden_layers, hf.config.text_config.num_hidden_layers
    )
    model = open_clip.model.CLIP(**model_cfg)
    model.load_state_dict(sd, strict=True)  # every open_clip weight filled, nothing left over
    preprocess = _preprocess_cfg(hf_dir, hf.config.vision_config.image_size)
    return export_open_clip(
        model, model_cfg, out_dir, preprocess_cfg=preprocess, arch=hf_dir.name, extra={"source": f"hf:{hf_dir}"}
    )


def load_hf(spec: str, device: str | torch.device = "cpu", precision: str = "fp32") -> Any:
    """``load_model`` for ``hf:PATH``: convert to a temporary open_clip folder, load it, check it against HF."""
    from clipslim.models import ModelSpecError, load_model

    hf_dir = Path(spec.removeprefix("hf:"))
    if not hf_dir.is_dir():
        raise ModelSpecError(f"model spec {spec}: {hf_dir} is not a folder (expected hf:PATH to a transformers CLIP)")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = hf_to_open_clip(hf_dir, Path(tmp) / hf_dir.name)
            bundle = load_model(str(folder), device=device, precision=precision)
        if precision == "fp32":
            _require(compare(bundle, hf_dir), f"model spec {spec}")
    except HfConversionError as err:
        raise ModelSpecError(f"model spec {spec}: {err}") from err
    bundle.spec, bundle.arch = spec, hf_dir.name
    return bundle
