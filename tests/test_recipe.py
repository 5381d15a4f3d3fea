"""Recipes: every shipped YAML validates; bad keys and types fail before compute with the field named."""

from pathlib import Path

import pytest

from clipslim.config import ConfigError
from clipslim.recipe import RECIPES_DIR, load_recipe, parse_overrides, recipe_from_dict

BASE = {
    "teacher": "tiny-teacher",
    "student": {"arch": "tiny-student", "init": "inherit"},
    "data": {"train": "x"},
    "objectives": {"clip": 1.0, "affinity": {"weight": 0.5, "teacher_scale": 50}},
}


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_validate(path: Path):
    recipe = load_recipe(path)
    assert recipe.objective_specs(), "every recipe trains something"
    assert recipe.student.arch


def test_weights_and_options_parsed():
    recipe = recipe_from_dict(BASE)
    specs = {s.name: s for s in recipe.objective_specs()}
    assert specs["clip"].weight == 1.0 and specs["affinity"].weight == 0.5
    assert specs["affinity"].cfg.teacher_scale == 50.0
    assert recipe.train.betas == (0.9, 0.98)


def test_zero_weight_term_is_dropped():
    recipe = recipe_from_dict({**BASE, "objectives": {"clip": 1.0, "affinity": 0}})
    assert [s.name for s in recipe.objective_specs()] == ["clip"]


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"trian": {}}, r"recipe.trian: unknown key"),
        ({"train": {"lr": "fast"}}, r"recipe.train.lr: expected float"),
        ({"train": {"steps": 0}}, r"recipe.train.steps: must be >= 1"),
        ({"train": {"precision": "fp8"}}, r"recipe.train.precision: expected one of"),
        ({"objectives": {"clip": -1}}, r"objectives.clip.weight"),
        ({"objectives": {"clp": 1}}, r"objectives.clp: unknown objective"),
        ({"objectives": {"affinity": {"tau": 1}}}, r"objectives.affinity.tau: unknown key"),
        ({"objectives": {"clip": 0}}, r"at least one objective"),
        ({"teacher": None}, r"teacher: required"),
        ({"student": {"init": "inherit"}}, r"recipe.student.arch: required"),
        ({"data": {}}, r"recipe.data.train: required"),
    ],
)
def test_bad_recipes_name_the_field(patch, message):
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict({**BASE, **patch})


def test_overrides():
    assert parse_overrides(["train.steps=20", "objectives.clip=0.5", "name=x"]) == {
        "train": {"steps": 20},
        "objectives": {"clip": 0.5},
        "name": "x",
    }
    recipe = recipe_from_dict(BASE, ["train.steps=7", "objectives.affinity.teacher_scale=100"])
    assert recipe.train.steps == 7
    assert {s.name: s for s in recipe.objective_specs()}["affinity"].cfg.teacher_scale == 100.0
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["steps"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_recipe(bad)
