"""Each model reads its own pixels: a teacher normalised differently from the student is fed its own transform during
distillation, inheritance copies the teacher's preprocessing, and runs record who read what."""

import json

import open_clip
import pytest
import torch
from conftest import seeded_model

from clipslim.data.loader import make_loader
from clipslim.distiller import encode
from clipslim.export import export_open_clip
from clipslim.models import load_model
from clipslim.recipe import recipe_from_dict
from clipslim.train import Trainer, train

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def _teacher_folder(path, image_size: int = 32):
    """A hub-format teacher trained 'elsewhere': mean 0.5 / std 0.25 (not OpenAI's), optionally another size."""
    b = seeded_model("tiny-teacher")
    cfg = json.loads(json.dumps(b.model_cfg))
    if image_size != 32:
        cfg["vision_cfg"]["image_size"] = image_size
        torch.manual_seed(1)
        model = open_clip.create_model("tiny-teacher", force_image_size=image_size)
    else:
        model = b.model
    pre = {**b.preprocess_cfg, "size": [image_size, image_size], "mean": MEAN, "std": STD}
    return export_open_clip(model, cfg, path, preprocess_cfg=pre, arch="elsewhere-teacher")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return _teacher_folder(tmp_path_factory.mktemp("teacher") / "elsewhere")


def _recipe(tiny_shapes, teacher, init="random", augment=False, **student):
    return recipe_from_dict(
        {
            "name": "own-pixels",
            "teacher": str(teacher),
            "student": {"arch": "tiny-student", "init": init, **student},
            "data": {"train": str(tiny_shapes / "train"), "num_workers": 0, "augment": augment},
            "objectives": {"clip": 1.0, "affinity": {"weight": 1.0, "teacher_scale": 50.0}},
            "train": {"steps": 2, "batch_size": 16, "warmup": 1, "log_every": 1},
        }
    )


def test_teacher_forward_during_distillation_equals_its_own_eval_path(tiny_shapes, teacher_dir, tmp_path):
    trainer = Trainer(_recipe(tiny_shapes, teacher_dir), tmp_path / "run", progress=False)
    teacher = load_model(str(teacher_dir))
    assert teacher.preprocess_cfg["mean"] == MEAN and trainer.built.student.preprocess_cfg["mean"] != MEAN
    batch = trainer.stream.next()
    during = trainer.teacher(batch)
    # the teacher's own eval path on the same samples (same seed -> same order; no random geometry)
    ref = next(iter(make_loader(tiny_shapes / "train", teacher.preprocess_val, teacher.tokenizer, 16, train=True)))
    assert ref["key"] == batch["key"]
    with torch.no_grad():
        own = encode(teacher.model.eval(), ref["image"], ref["text"])
    torch.testing.assert_close(during.image, own.image, rtol=0, atol=1e-6)
    torch.testing.assert_close(during.text, own.text, rtol=0, atol=1e-6)
    # and the student still reads its own (OpenAI-normalised) pixels, unchanged from a student-only run
    student = trainer.built.student
    mine = next(iter(make_loader(tiny_shapes / "train", student.preprocess_val, student.tokenizer, 16, train=True)))
    assert torch.equal(batch["image"], mine["image"])
    trainer.stream.close()


def test_augmentation_geometry_is_shared_and_student_pixels_unchanged(tiny_shapes, teacher_dir, tmp_path):
    trainer = Trainer(_recipe(tiny_shapes, teacher_dir, augment=True), tmp_path / "run", progress=False)
    batch = trainer.stream.next()
    s_pre = trainer.built.student.preprocess_cfg
    raw_s = batch["image"] * torch.tensor(s_pre["std"])[:, None, None] + torch.tensor(s_pre["mean"])[:, None, None]
    raw_t = batch["teacher_pixels"] * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    torch.testing.assert_close(raw_s, raw_t, rtol=0, atol=1e-5)  # same crop, each normalised its own way
    student = trainer.built.student
    alone = make_loader(tiny_shapes / "train", student.preprocess_train, student.tokenizer, 16, train=True)
    assert torch.equal(batch["image"], next(iter(alone))["image"])  # bit-identical to a student-only run
    trainer.stream.close()


def test_teacher_with_another_image_size_gets_its_own_size(tiny_shapes, tmp_path):
    teacher = _teacher_folder(tmp_path / "t48", image_size=48)
    trainer = Trainer(_recipe(tiny_shapes, teacher, augment=True), tmp_path / "run", progress=False)
    batch = trainer.stream.next()
    assert batch["image"].shape[-1] == 32 and batch["teacher_pixels"].shape[-1] == 48
    out = trainer.train_step(batch)
    assert torch.isfinite(out["loss"])
    trainer.stream.close()


def test_same_preprocessing_shares_one_tensor(tiny_recipe, tmp_path):
    trainer = Trainer(tiny_recipe(steps=1), tmp_path / "run", progress=False)
    batch = trainer.stream.next()
    assert "teacher_pixels" not in batch and "teacher_tokens" not in batch
    assert (trainer.teacher.image_key, trainer.teacher.text_key) == ("image", "text")
    trainer.stream.close()


def test_inherited_student_reads_images_like_its_teacher(tiny_shapes, teacher_dir, tmp_path):
    results = train(_recipe(tiny_shapes, teacher_dir, init="inherit"), tmp_path / "run", progress=False)
    exported = json.loads((tmp_path / "run" / "student" / "open_clip_config.json").read_text())
    assert exported["preprocess_cfg"]["mean"] == MEAN and exported["preprocess_cfg"]["std"] == STD
    assert exported["preprocess_cfg"]["size"] in (32, [32, 32])
    teacher_hash = results["run"]["teacher"]["weights"]
    assert exported["clipslim"]["teacher"] == {"spec": str(teacher_dir), "weights_sha256_16": teacher_hash}
    inherit = json.loads((tmp_path / "run" / "inherit.json").read_text())
    assert inherit["preprocess_adopted"]["mean"][1] == MEAN
    assert results["run"]["student"]["mean"] == MEAN and results["run"]["teacher"]["mean"] == MEAN
    _, _, val = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'run' / 'student'}")
    assert list(val.transforms[-1].mean) == MEAN  # stock open_clip feeds it what its weights expect


def test_student_can_keep_its_own_preprocessing(tiny_shapes, teacher_dir, tmp_path):
    recipe = _recipe(tiny_shapes, teacher_dir, init="inherit", preprocess="own")
    trainer = Trainer(recipe, tmp_path / "run", progress=False)
    assert trainer.built.student.preprocess_cfg["mean"] != MEAN
    assert "teacher_pixels" in trainer.stream.next()
    trainer.stream.close()


def test_inherit_command_writes_the_teachers_normalisation(teacher_dir, tmp_path, capsys):
    from clipslim.cli import main

    assert (
        main(["inherit", "--teacher", str(teacher_dir), "--student", "tiny-student", "--out", str(tmp_path / "s")]) == 0
    )
    cfg = json.loads((tmp_path / "s" / "open_clip_config.json").read_text())
    assert cfg["preprocess_cfg"]["mean"] == MEAN and cfg["preprocess_cfg"]["std"] == STD
    assert "mean" in capsys.readouterr().out  # it says what it wrote


def test_missing_teacher_path_is_named(tiny_shapes, tmp_path):
    from clipslim.models import ModelSpecError

    with pytest.raises(ModelSpecError, match="model path not found: /nowhere/teacher"):
        load_model("/nowhere/teacher")


def test_eval_json_records_preprocessing_templates_and_classes(tiny_shapes, teacher_dir, tmp_path):
    from clipslim.cli import main

    argv = ["eval", "--model", str(teacher_dir), "--data", str(tiny_shapes), "--out", str(tmp_path / "ev")]
    assert main([*argv, "--task", "zeroshot_classification"]) == 0
    (path,) = (tmp_path / "ev").glob("*zeroshot_classification*.json")
    doc = json.loads(path.read_text())
    assert doc["preprocess"]["mean"] == MEAN and doc["preprocess"]["image_size"] in (32, [32, 32])
    assert doc["metrics"]["n_classes"] == 64
    assert doc["metrics"]["templates"] == (tiny_shapes / "templates.txt").read_text().splitlines()
