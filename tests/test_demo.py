"""The demo end to end, shrunk: tiny teacher and student, 32 px data, a few steps."""

import json

import pytest

from clipslim.cli import main
from clipslim.workflows.demo import run_demo


@pytest.mark.slow
def test_shrunk_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    shrink = ("student.arch=tiny-student", "train.batch_size=32", "train.warmup=1", "data.num_workers=0")
    data_args = {"n_train": 256, "n_eval": 128, "shard_size": 64, "image_size": 32, "workers": 0, "progress": False}
    result = run_demo(
        out, steps=4, data_dir=tmp_path / "shapes", teacher="tiny-teacher", overrides=shrink, data_args=data_args
    )
    rows = result["rows"]
    assert [r["model"] for r in rows][0] == "teacher (tiny-teacher)" and len(rows) == 3
    assert rows[1]["params"] == rows[2]["params"] < rows[0]["params"]
    assert all(r["images_per_s"] > 0 and 0 <= r["zeroshot_heldout_acc1"] <= 1 for r in rows)
    assert (out / "demo.png").stat().st_size > 10_000
    assert "| teacher (tiny-teacher) |" in (out / "demo.md").read_text()
    assert json.loads((out / "demo.json").read_text()) == rows
    # another teacher / student names the runs (so a shrunk demo is not filed under the recipes' own names)
    distill = out / "demo-distill_teacher-tiny-teacher_student.arch-tiny-student"
    scratch = out / "demo-scratch_student.arch-tiny-student"
    assert (distill / "inherit.json").is_file() and not (scratch / "inherit.json").exists()
    printed = capsys.readouterr().out
    assert "of the teacher's held-out zero-shot top-1" in printed

    # A second run reuses both finished runs instead of training again.
    mtime = (distill / "results.json").stat().st_mtime
    run_demo(out, steps=4, data_dir=tmp_path / "shapes", teacher="tiny-teacher", overrides=shrink, data_args=data_args)
    assert (distill / "results.json").stat().st_mtime == mtime


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.yaml" in err
    assert main(["eval", "--model", "no-such-arch", "--data", str(tmp_path)]) == 2
    assert "unknown architecture 'no-such-arch'" in capsys.readouterr().err


def test_cli_train_with_overrides(tiny_shapes, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: cli\nstudent: {arch: tiny-student}\n"
        f"data: {{train: {tiny_shapes / 'train'}, eval: {tiny_shapes}, num_workers: 0}}\n"
        "objectives: {clip: 1.0}\ntrain: {steps: 50, batch_size: 32}\n"
    )
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--set", "train.steps=2", "--quiet"]) == 0
    assert "image_retrieval_recall@1" in capsys.readouterr().out
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--set", "train.steps=2", "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
