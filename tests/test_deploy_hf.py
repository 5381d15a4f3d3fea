"""`clipslim export --format hf` and `hf:PATH` specs: exact conversion both ways, loads in a clipslim-free process,
every CLIP-shaped option maps, everything else is refused with one line naming the part."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import seeded_model
from open_clip.transform import PreprocessCfg, image_transform_v2

from clipslim.cli import main
from clipslim.deploy.hf import CHECK_FILE, SAMPLE_CAPTIONS, HfConversionError, _gradient_image, export_hf
from clipslim.models import ClipBundle, ModelSpecError, load_model

# Run in a fresh interpreter: only torch + transformers, and it fails if anything pulled clipslim in.
HF_SCRIPT = """
import sys, torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer
folder, inputs, out = sys.argv[1:4]
data = torch.load(inputs)
model = CLIPModel.from_pretrained(folder).eval()
processor = CLIPProcessor.from_pretrained(folder)
tokenizer = CLIPTokenizer.from_pretrained(folder)
text = tokenizer(data["captions"], padding=True, truncation=True, return_tensors="pt")
with torch.no_grad():
    result = {
        "image": model.get_image_features(pixel_values=data["images"]).pooler_output,
        "text": model.get_text_features(**text).pooler_output,
        "pixels": processor(images=Image.open(data["png"]), return_tensors="pt")["pixel_values"],
        "logits": model(pixel_values=data["images"], **text).logits_per_image,
        "max_length": tokenizer.model_max_length,
    }
assert "clipslim" not in sys.modules, "the HF folder needed clipslim"
torch.save(result, out)
"""


def _even_margin(size: int) -> tuple[int, int]:
    """An image size whose resized long side leaves an even crop margin: transformers' center crop rounds an odd
    margin down where torchvision rounds it half-to-even (a one-pixel shift, see deploy/hf.py)."""
    return size * 3 // 2, size * 5 // 4


def _run_hf(folder: Path, bundle: ClipBundle, tmp_path: Path) -> dict:
    """Embeddings etc. computed by transformers alone from ``folder``, with this bundle's sample inputs."""
    size = bundle.model.visual.image_size[0]
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    inputs, out = tmp_path / "inputs.pt", tmp_path / "out.pt"
    _gradient_image(*_even_margin(size)).save(tmp_path / "image.png")
    torch.save({"images": images, "captions": SAMPLE_CAPTIONS, "png": str(tmp_path / "image.png")}, inputs)
    script = tmp_path / "hf_only.py"
    script.write_text(HF_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(folder), str(inputs), str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"images": images, **torch.load(out, weights_only=False)}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min().item()


@pytest.mark.parametrize("spec", ["tiny-student", "shapes-teacher:demo"])
def test_cli_export_hf_matches_open_clip_in_a_clipslim_free_process(spec, tmp_path, capsys):
    torch.manual_seed(0)
    out = tmp_path / "hf"
    if spec == "tiny-student":  # random init: export the exact weights the comparison uses
        bundle = seeded_model(spec)
        weights = tmp_path / "w.pt"
        torch.save(bundle.model.state_dict(), weights)
        spec = f"tiny-student:{weights}"
    bundle = load_model(spec)
    assert main(["export", "--model", spec, "--format", "hf", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "image min cosine" in printed and "text min cosine" in printed and f"wrote {out}" in printed
    assert json.loads((out / CHECK_FILE).read_text())["ok"]
    got = _run_hf(out, bundle, tmp_path)
    tokens = torch.as_tensor(bundle.tokenizer(SAMPLE_CAPTIONS)).long()
    with torch.no_grad():
        image, text = bundle.model.encode_image(got["images"]), bundle.model.encode_text(tokens)
        logits = bundle.model.logit_scale.exp() * (
            torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
        )
    assert _cos(image, got["image"]) >= 0.9999 and _cos(text, got["text"]) >= 0.9999
    torch.testing.assert_close(got["logits"], logits, atol=1e-3, rtol=1e-4)
    pil = _gradient_image(*_even_margin(got["pixels"].shape[-1]))
    torch.testing.assert_close(got["pixels"][0], bundle.preprocess_val(pil), atol=1e-5, rtol=0)
    assert got["max_length"] == bundle.model.context_length


def _bundle(embed_dim: int = 32, vision: dict | None = None, text: dict | None = None, **top) -> ClipBundle:
    """A random tiny open_clip model built from a config (seed 0), with the pieces an export reads."""
    torch.manual_seed(0)
    vision_cfg = {"image_size": 32, "patch_size": 16, "width": 32, "layers": 2, "head_width": 16, **(vision or {})}
    text_cfg = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, **(text or {})}
    cfg = {"embed_dim": embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg, **top}
    custom = cfg.pop("custom_text", False)
    model = (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**cfg).eval()
    pre = PreprocessCfg(size=32)
    tok = open_clip.SimpleTokenizer(context_length=text_cfg["context_length"])
    return ClipBundle(model, None, image_transform_v2(pre, False), tok, "test", "test", cfg, dataclasses.asdict(pre))


def _randomise_layer_scales(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.data.uniform_(0.5, 1.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"quick_gelu": True},
        {"vision": {"ls_init_value": 1.0}, "text": {"ls_init_value": 1.0}},  # folded into out_proj / fc2
        {"custom_text": True},
        {"text": {"proj_type": "none"}},  # identity projection (width == embed_dim)
        {"text": {"pool_type": "eos", "eos_id": 49407}},
        {"vision": {"final_ln_after_pool": True}},
        {"vision": {"norm_kwargs": {"eps": 1e-6}}, "text": {"norm_kwargs": {"eps": 1e-6}}},
        {"vision": {"act_kwargs": {"approximate": "tanh"}}},
        {"vision": {"pos_embed_type": "sin_cos_2d"}},
    ],
    ids=[
        "quick_gelu",
        "layer_scale",
        "custom_text",
        "no_text_proj",
        "eos_pool",
        "ln_after_pool",
        "eps",
        "tanh",
        "sincos",
    ],
)
def test_clip_shaped_options_convert_exactly_and_round_trip(kwargs, tmp_path):
    bundle = _bundle(**kwargs)
    _randomise_layer_scales(bundle.model)
    check = export_hf(bundle, tmp_path / "hf")
    assert check["ok"] and check["image_min_cosine"] > 0.99999 and check["text_min_cosine"] > 0.99999, check
    back = load_model(f"hf:{tmp_path / 'hf'}")  # hf:PATH converts back and checks itself against the folder
    images = torch.randn(2, 3, 32, 32)
    tokens = torch.as_tensor(bundle.tokenizer(SAMPLE_CAPTIONS)).long()
    with torch.no_grad():
        assert _cos(back.model.encode_image(images), bundle.model.encode_image(images)) > 0.99999
        assert _cos(back.model.encode_text(tokens), bundle.model.encode_text(tokens)) > 0.99999


def test_hf_spec_round_trips_weights_and_preprocessing(tmp_path):
    src = seeded_model("tiny-student")
    export_hf(src, tmp_path / "hf")
    back = load_model(f"hf:{tmp_path / 'hf'}")
    assert back.spec == f"hf:{tmp_path / 'hf'}"
    want, got = src.model.state_dict(), back.model.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    for key in ("mean", "std", "size"):
        assert list(back.preprocess_cfg[key]) == list(src.preprocess_cfg[key]), key
    for key in ("interpolation", "resize_mode"):
        assert back.preprocess_cfg[key] == src.preprocess_cfg[key], key
    assert back.model_cfg["text_cfg"]["pool_type"] == "argmax" and back.model.context_length == 16


def test_hf_folder_as_teacher_and_for_eval(tmp_path, tiny_shapes, capsys):
    from clipslim.export import export_open_clip
    from clipslim.recipe import recipe_from_dict
    from clipslim.train import train

    teacher = seeded_model("tiny-teacher")
    export_hf(teacher, tmp_path / "teacher_hf")
    export_open_clip(teacher.model, teacher.model_cfg, tmp_path / "teacher_oc", preprocess_cfg=teacher.preprocess_cfg)
    spec, same = f"hf:{tmp_path / 'teacher_hf'}", str(tmp_path / "teacher_oc")
    assert main(["eval", "--model", spec, "--model", same, "--data", str(tiny_shapes)]) == 0
    acc = json.loads(capsys.readouterr().out)
    assert acc[spec] == acc[same] and acc[spec]  # the converted teacher scores exactly what the original does
    recipe = recipe_from_dict(
        {
            "name": "hf-teacher", "teacher": spec, "student": {"arch": "tiny-student", "init": "inherit"},
            "data": {"train": str(tiny_shapes / "train"), "eval": str(tiny_shapes), "num_workers": 0},
            "objectives": {"affinity": {"weight": 1.0, "teacher_scale": 50.0}},
            "train": {"steps": 2, "batch_size": 16, "warmup": 1, "log_every": 1, "save_every": 2},
        }
    )  # fmt: skip
    results = train(recipe, tmp_path / "run", progress=False)
    assert results["steps"] == 2 and "affinity_loss" in (tmp_path / "run" / "metrics.csv").read_text()


@pytest.mark.parametrize(
    ("kwargs", "part"),
    [
        (
            {"vision": {"attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 4}},
            "attentional pooler",
        ),
        ({"vision": {"pool_type": "avg"}}, "image pooling 'avg'"),
        ({"vision": {"no_ln_pre": True}}, "no pre-LayerNorm"),
        ({"vision": {"layers": [1, 1, 1, 1], "width": 16, "head_width": 16}}, "ModifiedResNet"),
        ({"vision": {"timm_model_name": "test_vit", "timm_model_pretrained": False}}, "TimmModel"),
        ({"vision": {"qk_norm": True}}, "CustomResidualAttentionBlock"),
        ({"text": {"no_causal_mask": True}}, "no causal mask"),
        ({"text": {"pool_type": "last"}}, "text pooling 'last'"),
        ({"text": {"proj_bias": True}}, "text projection has a bias"),
        ({"text": {"embed_cls": True}, "custom_text": True}, "appends a class token"),
        ({"init_logit_bias": -10.0}, "logit_bias"),
    ],
)
def test_parts_that_do_not_map_are_refused_by_name(kwargs, part, tmp_path):
    bundle = _bundle(**kwargs)
    proj = getattr(bundle.model, "text_projection", None)
    if isinstance(proj, torch.nn.Linear):  # open_clip initialises the bias to zero, which converts exactly
        proj.bias.data.fill_(0.1)
    with pytest.raises(HfConversionError, match=part.replace("(", r"\(")):
        export_hf(bundle, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.iterdir())  # no half-written folder left


def test_token_pruning_and_letterbox_preprocessing_are_refused(tmp_path):
    from clipslim.tokens.prune import PruneConfig, apply_token_pruning

    bundle = _bundle()
    bundle.preprocess_cfg = {**bundle.preprocess_cfg, "resize_mode": "longest"}
    with pytest.raises(HfConversionError, match="resize_mode 'longest'"):
        export_hf(bundle, tmp_path / "hf")
    bundle = _bundle(vision={"layers": 3})
    apply_token_pruning(bundle.model, PruneConfig(keep_ratio=0.5, after_block=0))
    with pytest.raises(HfConversionError, match="forward hook"):
        export_hf(bundle, tmp_path / "hf")


def test_cli_refusal_is_one_line(tmp_path, capsys):
    folder = tmp_path / "src"
    from clipslim.export import export_open_clip

    bundle = _bundle(text={"no_causal_mask": True})
    export_open_clip(bundle.model, bundle.model_cfg, folder, preprocess_cfg=bundle.preprocess_cfg)
    assert main(["export", "--model", str(folder), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no causal mask" in err and not (tmp_path / "hf").exists()


def test_bad_hf_specs_are_one_line(tmp_path):
    with pytest.raises(ModelSpecError, match="not a folder"):
        load_model(f"hf:{tmp_path / 'missing'}")
    export_hf(seeded_model("tiny-student"), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "siglip"}))
    with pytest.raises(ModelSpecError, match="model_type 'siglip'"):
        load_model(f"hf:{tmp_path / 'hf'}")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    vocab = json.loads((tmp_path / "hf" / "vocab.json").read_text())
    vocab["a</w>"], vocab["b</w>"] = vocab["b</w>"], vocab["a</w>"]
    (tmp_path / "hf" / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ModelSpecError, match="not CLIP's BPE vocab"):
        load_model(f"hf:{tmp_path / 'hf'}")
