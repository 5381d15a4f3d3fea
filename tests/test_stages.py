"""Multi-stage recipes: stages chain, rerun skips, resume within a stage is exact, l0 stages fuse (tiny configs)."""

from __future__ import annotations

import json
import logging
import os
import shutil

import open_clip
import pytest
import torch
import yaml

from clipslim.cli import main
from clipslim.config import ConfigError
from clipslim.export import export_open_clip
from clipslim.io import load_tensors
from clipslim.models import count_params, load_model
from clipslim.recipe import recipe_from_dict
from clipslim.workflows.stages import run_stages


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.manual_seed(0)
    b = load_model("tiny-teacher")
    out = tmp_path_factory.mktemp("teacher") / "tiny-teacher"
    export_open_clip(b.model, b.model_cfg, out, arch="tiny-teacher")
    return out


def _recipe(teacher_dir, tiny_shapes, stages: list[dict], name: str = "ms") -> dict:
    return {
        "name": name,
        "teacher": str(teacher_dir),
        "student": {"arch": "tiny-teacher", "init": str(teacher_dir)},
        "data": {"train": str(tiny_shapes / "train"), "num_workers": 0},
        "objectives": {"affinity": {"weight": 1.0, "teacher_scale": 50.0}},
        "train": {"steps": 2, "batch_size": 16, "warmup": 1, "log_every": 1, "save_every": 2},
        "stages": stages,
    }


MANUAL = [
    {"name": "s75", "arch": "tiny-teacher", "model_cfg": {"vision_cfg": {"width": 48}}, "init": "inherit"},
    {"name": "s50", "arch": "tiny-student", "init": "importance:magnitude", "steps": 4},
]


@pytest.fixture(scope="module")
def manual_run(teacher_dir, tiny_shapes, tmp_path_factory):
    """The two-stage manual recipe run once through the CLI: (recipe path, out dir)."""
    root = tmp_path_factory.mktemp("manual")
    path = root / "ms.yaml"
    path.write_text(yaml.safe_dump(_recipe(teacher_dir, tiny_shapes, MANUAL)))
    assert main(["stages", str(path), "--out", str(root / "run"), "--quiet"]) == 0
    return path, root / "run"


def _mtimes(run):
    return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


def test_stages_chain_each_from_the_previous_student(manual_run, teacher_dir):
    _, run = manual_run
    first, second = run / "01-s75", run / "02-s50"
    assert json.loads((run / "configs" / "ms-s75.json").read_text())["vision_cfg"]["width"] == 48
    s75 = yaml.safe_load((first / "recipe.yaml").read_text())["student"]
    assert (s75["arch"], s75["init"], s75["inherit_from"]) == ("ms-s75", "inherit", str(teacher_dir))
    s50 = yaml.safe_load((second / "recipe.yaml").read_text())["student"]
    assert s50["inherit_from"] == str(first / "student") and s50["init"] == "importance:magnitude"
    assert json.loads((second / "inherit.json").read_text())["visual"]["teacher"]["width"] == 48  # from stage 1
    stock, _, _ = open_clip.create_model_and_transforms(f"local-dir:{first / 'student'}")
    assert stock.visual.transformer.width == 48
    summary = json.loads((run / "stages.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["s75", "s50"] and [s["steps"] for s in summary["stages"]] == [
        2,
        4,
    ]
    assert summary["student"] == str(second / "student")
    assert "| s50 | 4 |" in (run / "stages.md").read_text()


def test_rerun_skips_finished_stages(manual_run, caplog):
    path, run = manual_run
    before = _mtimes(run / "01-s75") | _mtimes(run / "02-s50")
    with caplog.at_level(logging.INFO, logger="clipslim"):
        assert main(["stages", str(path), "--out", str(run), "--quiet"]) == 0
    assert _mtimes(run / "01-s75") | _mtimes(run / "02-s50") == before
    assert "finished earlier, skipping" in caplog.text


def test_resume_within_a_stage_is_exact(manual_run, tmp_path):
    path, run = manual_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for p in copy.rglob("*.yaml"):  # the copied stage recipes point at the copy
        p.write_text(p.read_text().replace(str(run), str(copy)))
    stage = copy / "02-s50"
    want = load_tensors(stage / "student" / "open_clip_model.safetensors")
    shutil.rmtree(stage / "student")
    shutil.rmtree(stage / "checkpoints" / "step_000004")
    (stage / "results.json").unlink()
    (stage / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "dir": "step_000002"}))
    first_before = _mtimes(copy / "01-s75")
    assert main(["stages", str(path), "--out", str(copy), "--quiet"]) == 0
    assert _mtimes(copy / "01-s75") == first_before  # stage 1 untouched
    got = load_tensors(stage / "student" / "open_clip_model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)  # resumed at step 2 == uninterrupted
    steps = [row.split(",")[0] for row in (stage / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4"]


def test_l0_stage_fuses_and_the_next_stage_continues(teacher_dir, tiny_shapes, tmp_path):
    stages = [
        {"name": "prune", "init": "continue", "steps": 3, "l0": {"target_sparsity": 0.5, "ramp_steps": 2}},
        {"name": "tune", "init": "continue", "steps": 1},
    ]
    recipe = recipe_from_dict(_recipe(teacher_dir, tiny_shapes, stages, name="auto"))
    summary = run_stages(recipe, tmp_path / "run", progress=False)
    prune, tune = tmp_path / "run" / "01-prune", tmp_path / "run" / "02-tune"
    results = json.loads((prune / "results.json").read_text())
    fused = results["fused"]
    full = count_params(load_model(str(teacher_dir)).model).non_embedding
    stock, _, _ = open_clip.create_model_and_transforms(f"local-dir:{prune / 'student'}")
    got = count_params(stock).non_embedding
    assert got == fused["params_non_embedding"] == results["params_non_embedding"]
    assert abs(got - 0.5 * full) / (0.5 * full) < 0.02
    assert "l0_expected_sparsity" in (prune / "metrics.csv").read_text().splitlines()[0]
    tuned = json.loads((tune / "student" / "open_clip_config.json").read_text())["model_cfg"]
    assert tuned == json.loads((prune / "student" / "open_clip_config.json").read_text())["model_cfg"]
    assert summary["stages"][1]["params_non_embedding"] == got
    # A crash after training but before fusing: the rerun fuses again from the final checkpoint, identically.
    weights = load_tensors(prune / "student" / "open_clip_model.safetensors")
    results.pop("fused")
    (prune / "results.json").write_text(json.dumps(results))
    shutil.rmtree(prune / "student")
    run_stages(recipe, tmp_path / "run", progress=False)
    again = load_tensors(prune / "student" / "open_clip_model.safetensors")
    assert all(torch.equal(again[k], weights[k]) for k in weights)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"stages": [{"name": "a", "arch": "tiny-student"}, {"name": "a", "arch": "tiny-student"}]}, "unique"),
        ({"stages": [{"name": "a", "init": "continue", "arch": "tiny-student"}]}, r"stages\[0\]\.arch"),
        ({"stages": [{"name": "a", "init": "copy"}]}, r"stages\[0\]\.init"),
        ({"stages": [{"name": "a"}]}, r"stages\[0\]\.arch: required"),
        ({"stages": [{"name": "a b", "arch": "x"}]}, r"stages\[0\]\.name"),
        ({"stages": [{"name": "a", "init": "continue", "l0": {"target_sparsity": 1.5}}]}, "target_sparsity"),
        ({"student": {"arch": "tiny-teacher", "init": "random"}}, "student.init"),
    ],
)
def test_bad_stage_recipes_name_the_field(teacher_dir, tiny_shapes, patch, message):
    data = {**_recipe(teacher_dir, tiny_shapes, [{"name": "a", "arch": "tiny-student"}]), **patch}
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict(data)


def test_stage_recipes_refuse_plain_train_and_foreign_dirs(manual_run, teacher_dir, tiny_shapes, tmp_path):
    from clipslim.train import train

    recipe = recipe_from_dict(_recipe(teacher_dir, tiny_shapes, MANUAL))
    with pytest.raises(ConfigError, match="clipslim stages"):
        train(recipe, tmp_path / "plain")
    _, run = manual_run
    other = recipe_from_dict({**_recipe(teacher_dir, tiny_shapes, MANUAL), "train": {"steps": 3, "batch_size": 16}})
    with pytest.raises(ConfigError, match="different recipe"):
        run_stages(other, run, progress=False)
    assert os.listdir(run / "01-s75")  # nothing removed
