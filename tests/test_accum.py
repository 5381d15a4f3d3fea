"""One-GPU memory options: accumulation that keeps the whole contrastive batch equals the single big batch (loss and
every gradient, fp32 tolerance), checkpointing changes no gradient, a bf16 teacher runs, refusals are one line."""

import contextlib

import pytest
import torch
from conftest import seeded_model

from clipslim.config import ConfigError
from clipslim.distiller import Distiller, OnlineTeacher
from clipslim.outputs import embed_dim
from clipslim.recipe import ObjectiveSpec
from clipslim.registry import get_objective
from clipslim.train import Trainer
from clipslim.train.accum import ACCUM_OBJECTIVES, accumulated_backward

CAPTIONS = ["a red circle", "a blue square", "two green stars", "a small yellow triangle"] * 2


def _distiller(names: list[str]) -> tuple[Distiller, OnlineTeacher, dict]:
    teacher, student = seeded_model("tiny-teacher"), seeded_model("tiny-student")
    specs = [ObjectiveSpec(n, 1.0, get_objective(n).Config()) for n in names]
    distiller = Distiller(student.model, specs, embed_dim(teacher.model)).train()
    torch.manual_seed(1)
    batch = {"image": torch.randn(8, 3, 32, 32), "text": torch.as_tensor(student.tokenizer(CAPTIONS)).long()}
    return distiller, OnlineTeacher(teacher.model), batch


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return grads


@pytest.mark.slow
def test_accumulation_equals_the_big_batch():
    k = 4  # micro-batches of 2
    distiller, teacher, batch = _distiller(sorted(ACCUM_OBJECTIVES))
    full = distiller(batch, teacher(batch))
    full["loss"].backward()
    expected = _grads(distiller)
    out = accumulated_backward(distiller, distiller, teacher, batch, k, contextlib.nullcontext)
    got = _grads(distiller)
    for name in ACCUM_OBJECTIVES:
        torch.testing.assert_close(out[f"{name}_loss"], full[f"{name}_loss"], rtol=1e-5, atol=1e-6)
    assert set(got) == set(expected) and len(got) > 20
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_trainer_step_with_accumulation_and_checkpointing_matches(tiny_recipe, tmp_path):
    outs = []
    for i, extra in enumerate([{}, {"accum_freq": 4, "grad_checkpointing": True}]):
        trainer = Trainer(tiny_recipe(steps=1, **extra), tmp_path / f"r{i}", progress=False)
        outs.append(trainer.train_step(trainer.stream.next()))
        trainer.stream.close()
    torch.testing.assert_close(outs[1]["loss"], outs[0]["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[1]["grad_norm"], outs[0]["grad_norm"], rtol=1e-4, atol=1e-6)


def test_teacher_kept_in_bf16(tiny_recipe, tmp_path):
    trainer = Trainer(tiny_recipe(steps=1, teacher_precision="bf16"), tmp_path / "r", progress=False)
    assert next(trainer.built.teacher.model.parameters()).dtype == torch.bfloat16
    batch = trainer.stream.next()
    t = trainer.teacher(batch)
    assert t.image.dtype == torch.float32 and t.logit_scale.dtype == torch.float32
    assert torch.isfinite(trainer.train_step(batch)["loss"])
    trainer.stream.close()


@pytest.mark.parametrize(
    ("objectives", "train", "match"),
    [
        ({"masked_feature": 1.0}, {"accum_freq": 2}, r"masked_feature run or change their own student forward"),
        ({"clip": 1.0}, {"accum_freq": 3}, r"train.accum_freq: must be >= 1 and divide batch_size 32"),
    ],
)
def test_accumulation_refusals_are_one_line(tiny_shapes, tmp_path, objectives, train, match):
    from clipslim.recipe import recipe_from_dict

    recipe = {
        "name": "r", "teacher": "tiny-teacher", "student": {"arch": "tiny-student"},
        "data": {"train": str(tiny_shapes / "train"), "num_workers": 0},
        "objectives": objectives, "train": {"steps": 1, "batch_size": 32, **train},
    }  # fmt: skip
    with pytest.raises(ConfigError, match=match) as err:
        Trainer(recipe_from_dict(recipe), tmp_path / "r", progress=False)
    assert "\n" not in str(err.value)
