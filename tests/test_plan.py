"""`clipslim plan` (issue 22, part 4) on tiny configs: candidates, traced memory equal to the real step's, the
command end to end with data and a budget, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from clipslim.cli import main
from clipslim.eval.plan_probe import step_peak
from clipslim.models import load_model
from clipslim.workflows.plan import StepShape, distill_steps, mark_pareto
from clipslim.workflows.plan_candidates import fraction_config, parse_fraction, resolve_students


@pytest.mark.parametrize(("online", "ckpt"), [(True, True), (False, False)])
def test_traced_step_memory_equals_the_real_steps(online, ckpt):
    torch.manual_seed(0)
    student, teacher = load_model("tiny-student").model, load_model("tiny-teacher").model
    shape = StepShape(8, (32, 32), 16, (32, 32), 16, 32, 50.0, "cpu")
    models = [student, teacher] if online else [student]
    step = lambda ms: distill_steps(ms, shape, ("clip", "affinity"), ckpt)  # noqa: E731
    traced, _ = step_peak(step, models, trace=True)
    real, _ = step_peak(step, models, trace=False)
    assert traced == real > 0


def test_fractions_keep_head_dim_and_cut_depth():
    cfg = load_model("tiny-teacher").model_cfg
    cut = fraction_config(cfg, 0.75, 0.5)
    assert (cut["vision_cfg"]["width"], cut["vision_cfg"]["layers"]) == (48, 2)
    assert (cut["text_cfg"]["width"], cut["text_cfg"]["heads"], cut["text_cfg"]["layers"]) == (48, 3, 2)
    assert parse_fraction("ViT-B-32-half") is None
    with pytest.raises(ValueError, match="fractions must be in"):
        parse_fraction("1.5x0.5")


def test_default_candidates_are_inheritable_shipped_configs_and_fractions(tmp_path):
    teacher = load_model("tiny-teacher")
    cands = resolve_students(None, teacher.model, teacher.arch, teacher.model_cfg, None, tmp_path)
    names = [c.name for c in cands]
    assert names == ["tiny-student", "tiny-teacher-w0.75-d0.5"]  # 0.5x0.5 is tiny-student's shape: deduplicated
    assert (tmp_path / "configs" / "tiny-teacher-w0.75-d0.5.json").is_file()
    with pytest.raises(ValueError, match="unknown config 'nope'"):
        resolve_students(["nope"], teacher.model, teacher.arch, teacher.model_cfg, None, tmp_path)


def test_pareto_by_speed_and_capacity():
    rows = [
        {"images_per_s": 10.0, "params_non_embedding": 5},
        {"images_per_s": 20.0, "params_non_embedding": 3},
        {"images_per_s": 15.0, "params_non_embedding": 2},  # slower and smaller than the second: dominated
    ]
    mark_pareto(rows, by_accuracy=False)
    assert [r["pareto"] for r in rows] == [True, True, False]


def test_plan_command_measures_every_candidate(tiny_shapes, tmp_path, capsys):
    out = tmp_path / "plan"
    argv = ["plan", "--teacher", "tiny-teacher", "--students", "tiny-student", "1x0.5", "--batch", "4"]
    argv += ["--seconds", "0.05", "--data", str(tiny_shapes), "--budget-params", "2M", "--out", str(out)]
    assert main([*argv, "--no-progress"]) in (0, None)
    table = capsys.readouterr().out
    assert "| tiny-student | shipped |" in table and "tiny-teacher-w1-d0.5" in table
    result = json.loads((out / "plan.json").read_text())
    teacher, *students = result["rows"]
    assert teacher["role"] == "teacher" and "zeroshot" in teacher
    for row in students:
        assert row["images_per_s"] > 0 and row["latency_ms_b1"] > 0 and row["gflops_per_image"] > 0
        mem = row["train_memory_bytes"]
        assert mem["online"] > mem["cached"] > 0 and mem["online_ckpt"] > mem["cached_ckpt"] > 0
        assert row["inherit"] == "manual" and 0 <= row["zeroshot"]["acc1"] <= 1
        assert row["fits"] == (row["params"] <= 2e6)
    assert any(r["pareto"] for r in students)
    assert result["pareto_axes"] == ["images_per_s", "zeroshot acc1"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--teacher", "no-such-arch"], "unknown architecture 'no-such-arch'"),
        (["--teacher", "tiny-teacher", "--students", "2x1"], "fractions must be in (0, 1]"),
        (["--teacher", "tiny-teacher", "--batch", "0"], "--batch must be >= 1"),
    ],
)
def test_plan_errors_are_one_line(argv, message, tmp_path, capsys):
    assert main(["plan", *argv, "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_budgets_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--teacher", "tiny-teacher", "--budget-ms", "5", "--budget-params", "1M"])
    assert "not allowed with argument" in capsys.readouterr().err
