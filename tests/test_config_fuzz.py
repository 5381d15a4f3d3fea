"""Property-based: random recipes give a valid run or a clean one-line error, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from clipslim.cli import main
from clipslim.config import ConfigError
from clipslim.objectives import objective_names
from clipslim.recipe import Recipe, recipe_from_dict, recipe_to_yaml

ARCHS = ["tiny-student", "tiny-teacher", "shapes-student-25", "no-such-arch", "tiny-student:/nowhere.safetensors"]
# per key: values a user plausibly writes (valid, out of range, wrong type); fuzzing draws these most of the time
PLAUSIBLE: dict[str, dict[str, list[Any]]] = {
    "": {"name": ["fuzz", "bad/name", "../up", ""], "teacher": [None, "tiny-teacher", "tiny-student", "no-such-arch"],
         "stages": [[], [{"name": "a"}]], "bogus": [1]},
    "student": {"arch": ARCHS, "init": ["random", "inherit", "importance:magnitude", "importance:activation",
                "importance:nope", "tiny-student", "no-such-arch"], "inherit_from": [None, "tiny-teacher", "nope"],
                "calib_batches": [1, 0], "bogus": [1]},
    "data": {"augment": [True, False], "max_bad_fraction": [0.0, 0.5, 1.0, 2.0], "eval": [None, "/nowhere"],
             "train": ["/nowhere", "x.csv"], "bogus": [1]},
    "train": {"batch_size": [8, 16, 300, 0], "lr": [1e-3, 0.0, -1.0, "fast"], "weight_decay": [0.0, 0.1],
              "warmup": [0, 1, -1], "betas": [[0.9, 0.98], [0.9], "x"], "grad_clip": [None, 1.0, 0.0],
              "precision": ["fp32", "auto", "bf16", "int4"], "seed": [0, 1], "log_every": [1, 0],
              "save_every": [1, 5, 0], "keep_checkpoints": [1, 0], "eval_every": [0, 1, -1], "max_bad_steps": [1, 0],
              "bogus": [1]},
}  # fmt: skip
OPTION_VALUES = {
    "teacher_scale": [50.0, 0.0, -1.0, "x"], "keep_ratio": [0.25, 1.0, 0.0, 1.5, -0.1], "mask_seed": [0, 1, "x"],
    "weight": [1.0, 0.0, -1.0, "x", None], "bogus": [1],
}  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 5),
    st.floats(-2.0, 2.0),
    st.sampled_from([float("nan"), float("inf"), 1e30]),
    st.sampled_from(["", "x", "inherit", "random", "importance:magnitude", "importance:nope", "cpu", "fp32", "../up"]),
    st.sampled_from(ARCHS),
)
garbage = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)  # noqa: E501


def value_for(options: list[Any]) -> st.SearchStrategy:
    """Mostly a plausible value for the key, sometimes anything at all."""
    return st.one_of(st.sampled_from(options), st.sampled_from(options), st.sampled_from(options), garbage)


def base(data: Path) -> dict[str, Any]:
    return {
        "name": "fuzz",
        "teacher": "tiny-teacher",
        "student": {"arch": "tiny-student", "init": "inherit"},
        "data": {"train": str(data / "train"), "num_workers": 0},
        "objectives": {"clip": 1.0, "affinity": 1.0},
        "train": {"steps": 1, "batch_size": 16, "warmup": 0, "device": "cpu"},
    }


@st.composite
def mutated(draw: st.DrawFn, data: Path) -> dict[str, Any]:
    recipe = base(data)
    for _ in range(draw(st.integers(0, 3))):
        section = draw(st.sampled_from([*PLAUSIBLE, "objectives"]))
        if section == "objectives":
            name = draw(st.sampled_from([*objective_names(), "nope"]))
            option = draw(st.sampled_from(sorted(OPTION_VALUES)))
            value = draw(
                st.one_of(
                    value_for(OPTION_VALUES["weight"]),
                    st.fixed_dictionaries({option: value_for(OPTION_VALUES[option])}),
                )
            )
            if isinstance(recipe["objectives"], dict):
                recipe["objectives"][name] = value
            continue
        key = draw(st.sampled_from(sorted(PLAUSIBLE[section])))
        node = recipe if not section else recipe.setdefault(section, {})
        if isinstance(node, dict):
            node[key] = draw(value_for(PLAUSIBLE[section][key]))
    return recipe


@pytest.fixture(scope="module")
def data(tiny_shapes: Path) -> Path:
    return tiny_shapes


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_recipes_validate_cleanly(data: Path, draw: st.DataObject) -> None:
    recipe = draw.draw(mutated(data))
    try:
        parsed = recipe_from_dict(recipe)
    except ConfigError as err:
        message = str(err)
        assert message and "\n" not in message and "Traceback" not in message
        event("refused")
        return
    event("valid")
    assert isinstance(parsed, Recipe)
    assert recipe_from_dict(json.loads(json.dumps(__import__("yaml").safe_load(recipe_to_yaml(parsed))))) == parsed


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_recipes_run_or_fail_in_one_line(data: Path, tmp_path_factory: pytest.TempPathFactory, capsys,
                                                draw: st.DataObject) -> None:  # fmt: skip
    recipe = draw.draw(mutated(data))
    tmp = tmp_path_factory.mktemp("fuzz")
    path = tmp / "recipe.json"
    path.write_text(json.dumps(recipe, allow_nan=True))
    pin = ["--set", "train.steps=1", "--set", "data.num_workers=0", "--set", "train.device=cpu"]
    code = main(["train", str(path), "--out", str(tmp / "run"), "--quiet", *pin])
    err = capsys.readouterr().err
    event("ran" if code == 0 else "refused")
    if code == 0:
        assert (tmp / "run" / "student" / "open_clip_config.json").is_file()
    else:
        lines = [line for line in err.splitlines() if line.startswith("clipslim train: error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"teacher": "tiny-student", "student": {"arch": "tiny-teacher", "init": "inherit"}}, "student.init"),
        ({"objectives": {"masked_feature": {"keep_ratio": 1.5}}}, "objectives.masked_feature.keep_ratio"),
        ({"objectives": {"masked_feature": {"keep_ratio": 0.0}}}, "objectives.masked_feature.keep_ratio"),
        ({"train": {"betas": [0.9]}}, "train.betas"),
        ({"data": {"max_bad_fraction": 2.0}}, "data.max_bad_fraction"),
        ({"name": "../../etc"}, "name"),
    ],
)
def test_impossible_combinations_name_the_field(data: Path, tmp_path: Path, capsys, change: dict, field: str) -> None:
    recipe = base(data)
    for key, value in change.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) and key != "objectives" else value
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe))
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training step


def test_errors_inside_optional_sections_name_the_exact_field(data: Path) -> None:
    """`tokens:` and a stage's `l0:` are optional sections; their errors must still point at the bad key."""
    recipe = base(data)
    recipe["tokens"] = {"schedule": [{"until": 0.5, "patch_dropout": 1.5}]}
    with pytest.raises(ConfigError, match=r"^recipe\.tokens\.schedule\[0\]\.patch_dropout: must be in"):
        recipe_from_dict(recipe)
    recipe["tokens"] = {"bogus": 1}
    with pytest.raises(ConfigError, match=r"^recipe\.tokens\.bogus: unknown key"):
        recipe_from_dict(recipe)
