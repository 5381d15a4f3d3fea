"""Real open_clip families as teachers (and a timm-tower student), end to end on random weights of the real configs:
ViT-B-32 / B-16 / L-14 into smaller ViTs with and without inheritance, a SigLIP teacher with its own HF tokenizer
read from a local folder, an RN50 teacher (inheritance into a ViT refused), a MobileCLIP student. Image sizes are
shrunk through derived configs to keep the suite fast, except where a test says it keeps the real geometry."""

import copy
import json
from pathlib import Path

import open_clip
import pytest
import torch

from clipslim.config import ConfigError
from clipslim.data.loader import make_loader
from clipslim.models import ModelSpecError, load_model, load_tokenizer
from clipslim.recipe import recipe_from_dict
from clipslim.train import Trainer, train
from clipslim.train.setup import build_student

WORDS = "a an the of in on with and red green blue yellow purple orange pink white circle square triangle star"


def make_hf_tokenizer(folder: Path, context_length: int = 64) -> Path:
    """A tiny T5-style (pad 0, eos 1, unk 2) Hugging Face tokenizer written offline with ``tokenizers``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS.split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>",
              "unk_token": "<unk>", "model_max_length": context_length}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def tokenizer_root(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")  # open_clip's HFTokenizer (clipslim[deploy] / [proto] install it)
    root = tmp_path_factory.mktemp("tokenizers")
    make_hf_tokenizer(root / "timm" / "ViT-B-16-SigLIP")
    return root


def resized(arch: str, size: int, folder: Path) -> str:
    """Register ``<arch>-px<size>``: the real config with only the image size changed (a smaller test geometry)."""
    cfg = copy.deepcopy(open_clip.get_model_config(arch))
    cfg["vision_cfg"]["image_size"] = size
    name = f"{arch}-px{size}"
    path = folder / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return name


def _recipe(data: Path, teacher: str, student: str, init: str = "random", batch: int = 2, **extra) -> object:
    objectives = extra.pop("objectives", {"clip": 1.0, "affinity": 1.0, "feature": 1.0})
    return recipe_from_dict(
        {
            "name": "family",
            "teacher": teacher,
            "student": {"arch": student, "init": init},
            "data": {"train": str(data / "train"), "num_workers": 0},
            "objectives": objectives,
            "train": {"steps": 1, "batch_size": batch, "warmup": 1, "log_every": 1, **extra.pop("train", {})},
            **extra,
        }
    )


def _one_step(recipe, run_dir: Path) -> tuple[Trainer, dict, dict]:
    trainer = Trainer(recipe, run_dir, progress=False)
    batch = trainer.stream.next()
    before = {k: v.detach().clone() for k, v in trainer.built.student.model.named_parameters()}
    out = trainer.train_step(batch)
    trainer.stream.close()
    assert torch.isfinite(out["loss"]), out
    moved = [k for k, v in trainer.built.student.model.named_parameters() if not torch.equal(v, before[k])]
    assert moved, "no student weight changed"
    return trainer, batch, out


@pytest.mark.slow
def test_vit_b32_into_half_student_inherited_at_real_geometry(tiny_shapes, tmp_path):
    """The issue's headline pair at 224 px, 77 tokens: ViT-B-32 -> ViT-B-32-half by manual inheritance."""
    trainer, batch, out = _one_step(_recipe(tiny_shapes, "ViT-B-32", "ViT-B-32-half", "inherit"), tmp_path / "r")
    assert batch["image"].shape == (2, 3, 224, 224) and batch["text"].shape == (2, 77)
    assert trainer.built.inherit_report is not None
    assert {"clip_loss", "affinity_loss", "feature_loss"} <= set(out)


@pytest.mark.slow
def test_vit_b16_into_vit_s16_random_init_other_width(tiny_shapes, tmp_path):
    """No inheritance; the teacher's embedding is 512-d, the student's 384-d (feature term projects)."""
    teacher, student = resized("ViT-B-16", 64, tmp_path), resized("ViT-S-16", 64, tmp_path)
    trainer, batch, _ = _one_step(_recipe(tiny_shapes, teacher, student), tmp_path / "r")
    assert trainer.built.distiller.objectives["feature"].cfg is not None
    assert batch["image"].shape[-1] == 64


@pytest.mark.slow
def test_vit_l14_inherits_into_quarter_student(tmp_path):
    """ViT-L-14 (428M) is too slow for a training step here: build, inherit, one forward at batch 1 and 56 px."""
    from clipslim.inherit import inherit_manual
    from clipslim.outputs import encode

    teacher = load_model(resized("ViT-L-14", 56, tmp_path)).model.eval()
    student = load_model(resized("ViT-L-14-quarter", 56, tmp_path)).model.eval()
    report = inherit_manual(teacher, student)
    assert report
    with torch.no_grad():
        out = encode(student, torch.randn(1, 3, 56, 56), torch.zeros(1, 77, dtype=torch.long))
    assert out.image.shape == (1, 768) and torch.isfinite(out.image).all()


@pytest.mark.slow
def test_siglip_teacher_uses_its_own_tokenizer_and_geometry(tiny_shapes, tokenizer_root, tmp_path):
    """ViT-B-16-SigLIP at its real 224 px / 64-token geometry (sigmoid loss, logit_bias, HF tokenizer from a local
    folder) teaching a CLIP-style student; every teacher-side term reads the teacher's tokens."""
    objectives = {"clip": 1.0, "affinity": {"weight": 1.0, "teacher_scale": None}, "feature": 1.0, "icl": 1.0}
    recipe = _recipe(tiny_shapes, "ViT-B-16-SigLIP", "tiny-student", tokenizers=str(tokenizer_root),
                     objectives=objectives)  # fmt: skip
    trainer, batch, out = _one_step(recipe, tmp_path / "r")
    assert batch["teacher_tokens"].shape == (2, 64) and batch["text"].shape == (2, 16)  # tiny-student: 16 tokens
    assert batch["teacher_pixels"].shape == (2, 3, 224, 224) and batch["image"].shape[-1] == 32
    assert trainer.teacher.text_key == "teacher_tokens"
    teacher = trainer.built.teacher
    alone = next(iter(make_loader(tiny_shapes / "train", teacher.preprocess_val, teacher.tokenizer, 2, train=True)))
    assert alone["key"] == batch["key"] and torch.equal(alone["text"], batch["teacher_tokens"])  # its own tokens
    assert trainer.built.teacher.model.logit_bias is not None
    assert {"clip_loss", "affinity_loss", "feature_loss", "icl_loss"} <= set(out)


def test_hub_tokenizer_missing_is_one_line(tmp_path, monkeypatch):
    cfg = open_clip.get_model_config("ViT-B-16-SigLIP")
    with pytest.raises(ModelSpecError, match=r"tokenizer 'timm/ViT-B-16-SigLIP' not found under .*CLIPSLIM_TOK"):
        load_tokenizer("ViT-B-16-SigLIP", cfg, str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection")

    monkeypatch.setattr(open_clip, "get_tokenizer", offline)
    monkeypatch.delenv("CLIPSLIM_TOKENIZERS", raising=False)
    with pytest.raises(ModelSpecError) as err:
        load_tokenizer("ViT-B-16-SigLIP", cfg, spec="ViT-B-16-SigLIP")
    assert "\n" not in str(err.value) and "CLIPSLIM_TOKENIZERS=DIR" in str(err.value)
    assert "DIR/timm/ViT-B-16-SigLIP/" in str(err.value) and "--set tokenizers=DIR" in str(err.value)


@pytest.mark.slow
def test_rn50_teacher_distils_and_refuses_inheritance(tiny_shapes, tmp_path):
    teacher = resized("RN50", 64, tmp_path)  # ModifiedResNet image tower, attention pooling
    trainer, _, _ = _one_step(_recipe(tiny_shapes, teacher, "tiny-student"), tmp_path / "r")
    with pytest.raises(ConfigError) as err:
        build_student(_recipe(tiny_shapes, teacher, "tiny-student", "inherit"), trainer.built.teacher)
    assert "\n" not in str(err.value) and "cannot inherit from the teacher" in str(err.value)


@pytest.mark.slow
def test_mobileclip_student_from_vit_teacher(tiny_shapes, tmp_path):
    """A MobileCLIP (timm FastViT-MCi tower) student distilled from a ViT teacher, end to end with export."""
    student = resized("MobileCLIP-S1", 64, tmp_path)
    results = train(_recipe(tiny_shapes, "tiny-teacher", student), tmp_path / "r", progress=False)
    assert results["steps"] == 1 and results["bad_steps"] == 0
    exported = load_model(str(tmp_path / "r" / "student"))
    assert type(exported.model.visual).__name__ == "TimmModel"


def test_affinity_target_of_a_sigmoid_teacher_ignores_its_bias():
    """The definition documented in objectives/affinity.py: row softmax of τ_t I Tᵀ, the bias cancelling."""
    from clipslim.objectives.affinity import AffinityConfig, AffinityObjective
    from clipslim.outputs import Dims, Outputs

    torch.manual_seed(0)
    image, text = (torch.nn.functional.normalize(torch.randn(6, 8), dim=-1) for _ in range(2))
    scale = torch.tensor(112.0)
    objective = AffinityObjective(AffinityConfig(teacher_scale=None), Dims(8), Dims(8))
    with_bias = objective.targets(Outputs(image, text, scale, logit_bias=torch.tensor(-16.5)))
    plain = objective.targets(Outputs(image, text, scale))
    expected = (scale * image @ text.T).softmax(dim=1)
    for got, ref in zip(with_bias, plain, strict=True):
        torch.testing.assert_close(got, ref)
    torch.testing.assert_close(with_bias[0], expected)
