"""`clipslim report`: Pareto flags by hand, merging run dirs / eval / bench JSONs, measuring what is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clipslim.cli import main
from clipslim.eval.report import (
    ReportError,
    Row,
    pareto_optimal,
    read_input,
    speeds_tied,
    table_rows,
    write_report,
)
from clipslim.eval.run import write_results
from clipslim.export import export_open_clip
from clipslim.models import load_model


def test_pareto_optimal_hand_computed():
    pts = [(1.0, 0.5), (2.0, 0.4), (3.0, 0.6), (0.5, 0.9), (3.0, 0.6)]
    # (1, .5) and (2, .4) are dominated by (3, .6); equal points do not dominate each other
    assert pareto_optimal(pts) == [False, False, True, True, True]
    # smaller x is better (params): (0.5, .9) dominates everything
    assert pareto_optimal(pts, maximize=(False, True)) == [False, False, False, True, False]
    assert pareto_optimal([]) == []


def test_speed_ties_stop_noise_from_making_a_model_optimal():
    # the same model timed twice: 1000 vs 1050 img/s is noise, yet without ties each is "optimal" in one direction
    pts = [(1000.0, 0.50), (1050.0, 0.45)]
    assert pareto_optimal(pts) == [True, True]
    assert pareto_optimal(pts, x_tied=lambda i, j: True) == [True, False]
    a = {"params": 1, "params_non_embedding": 1, "flops": 1, "images_per_s": 100.0, "images_per_s_ci95": [90, 110]}
    b = {**a, "params": 2, "images_per_s": 125.0, "images_per_s_ci95": [111, 139]}
    assert not speeds_tied(a, b) and speeds_tied(a, {**b, "images_per_s_ci95": [105, 145]})
    assert speeds_tied(a, {**b, "params": 1, "images_per_s_ci95": [200, 210]})  # same architecture: same cost
    bare = {"params": 3, "params_non_embedding": 1, "flops": 1, "images_per_s_ci95": None}
    assert speeds_tied({**bare, "images_per_s": 100.0}, {**bare, "params": 4, "images_per_s": 109.0})
    assert not speeds_tied({**bare, "images_per_s": 100.0}, {**bare, "params": 4, "images_per_s": 112.0})


def test_table_flags_per_cost_axis_hand_computed():
    def row(name: str, params: int, flops: int, speed: float, ci: list[float], acc: float) -> Row:
        return Row(name, name, params=params, params_non_embedding=params // 2, images_per_s=speed,
                   images_per_s_ci95=ci, flops=flops, accuracy={"d": {"acc1": acc}})  # fmt: skip

    rows = [
        row("A", 10, 2, 1000.0, [950.0, 1050.0], 0.50),
        row("B", 10, 2, 1080.0, [1020.0, 1140.0], 0.45),  # A's architecture: pooled to 1040 [950, 1140]
        row("C", 5, 3, 1100.0, [1060.0, 1140.0], 0.40),  # fastest alone, but inside A/B's interval: a tie
        row("D", 20, 1, 500.0, [480.0, 520.0], 0.60),
    ]
    table = {r["name"]: r for r in table_rows(rows, "d", cost="flops")}
    assert table["A"]["images_per_s"] == table["B"]["images_per_s"] == 1040.0
    assert table["B"]["images_per_s_ci95"] == [950.0, 1140.0]
    flags = {n: (r["pareto_speed"], r["pareto_size"], r["pareto_flops"], r["pareto"]) for n, r in table.items()}
    assert flags == {
        "A": (True, True, False, False),
        "B": (False, False, False, False),
        "C": (False, True, False, False),
        "D": (True, True, True, True),
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A run dir (student of tiny-teacher), the teacher's eval JSON, a CLIP_benchmark file, and a bench JSON."""
    root = tmp_path_factory.mktemp("report")
    run = root / "distill"
    torch.manual_seed(0)
    student = load_model("tiny-student")
    export_open_clip(student.model, student.model_cfg, run / "student", arch="tiny-student")
    (run / "recipe.yaml").write_text("name: distill\nteacher: tiny-teacher\ndata: {eval: /somewhere/shapes}\n")
    groups = {"zeroshot_all": {"acc1": 0.5}, "zeroshot_heldout": {"acc1": 0.25}, "retrieval": {}}
    (run / "results.json").write_text(json.dumps({"params": 1_659_393, "params_non_embedding": 78_337, "eval": groups}))
    teacher = root / "shapes_tiny-teacher_zeroshot_classification.json"
    metrics = {"acc1": 0.7, "heldout_acc1": 0.6, "skipped": {}}
    write_results(
        teacher, metrics, "tiny-teacher", "shapes", task="zeroshot_classification", extra={"params": 3_617_025}
    )
    clip_benchmark = root / "cb.json"  # CLIP_benchmark's own format: no model_spec, no params
    doc = {"dataset": "shapes", "model": "tiny-student", "pretrained": "", "task": "zeroshot_classification"}
    clip_benchmark.write_text(json.dumps({**doc, "metrics": {"acc1": 0.2, "acc5": 0.5}, "language": "en"}))
    bench = root / "bench.json"
    speeds = (("tiny-teacher", 3_617_025, 100.0), ("tiny-student", 1_659_393, 1000.0))
    models = [{"model": m, "params": p, "images_per_s": s} for m, p, s in speeds]
    bench.write_text(json.dumps({"machine": {}, "models": models}))
    return {"run": run, "teacher": teacher, "cb": clip_benchmark, "bench": bench}


def test_read_input_kinds(inputs):
    student, teacher = read_input(inputs["run"])
    assert (student.role, student.name) == ("student", "distill")
    assert student.accuracy == {"shapes": {"acc1": 0.5, "heldout_acc1": 0.25}}
    assert (teacher.role, teacher.spec, teacher.accuracy) == ("teacher", "tiny-teacher", {})
    [cb] = read_input(inputs["cb"])
    assert cb.spec == "tiny-student" and cb.accuracy == {"shapes": {"acc1": 0.2}} and cb.params is None
    assert [r.images_per_s for r in read_input(inputs["bench"])] == [100.0, 1000.0]


def test_report_merges_measures_and_flags(inputs, tmp_path):
    out = tmp_path / "rep"
    paths = [inputs[k] for k in ("run", "teacher", "cb", "bench")]
    report = write_report(paths, out, write_html=True)
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {"teacher (tiny-teacher)", "distill", "tiny-student"} and report["dataset"] == "shapes"
    teacher, student, scratch = rows["teacher (tiny-teacher)"], rows["distill"], rows["tiny-student"]
    assert (teacher["acc1"], teacher["heldout_acc1"], teacher["images_per_s"]) == (0.7, 0.6, 100.0)  # bench wins
    assert student["heldout_acc1"] == 0.25 and student["flops"] > 0 and teacher["flops"] > student["flops"]
    # one architecture, one speed: the measured student and the bench's 1000 img/s are pooled, interval covers both
    assert scratch["params"] == 1_659_393 and scratch["images_per_s"] == student["images_per_s"] > 0
    lo, hi = student["images_per_s_ci95"]
    assert lo <= min(student["images_per_s"], 1000.0) and hi >= 1000.0
    # size: teacher is most accurate; the distilled student beats the same-size random one
    assert (teacher["pareto_size"], student["pareto_size"], scratch["pareto_size"]) == (True, True, False)
    assert teacher["pareto_speed"] is True and scratch["pareto_speed"] is False  # tied speed, less accurate
    assert [r["role"] for r in report["rows"]] == ["teacher", "student", "model"]
    assert report["cost"] == "images_per_s" and all(r["pareto"] == r["pareto_speed"] for r in report["rows"])
    md = (out / "report.md").read_text()
    assert "| teacher (tiny-teacher) | teacher | 3.62M |" in md and "| 70.0 | 60.0 | ✓ | ✓ | ✓ |" in md
    assert "Pareto-optimal on acc1 × images_per_s: teacher (tiny-teacher), distill." in md
    assert (out / "pareto.png").stat().st_size > 10_000 and "<table" in (out / "report.html").read_text()
    assert json.loads((out / "report.json").read_text())["rows"] == report["rows"]
    held = write_report(paths, tmp_path / "held", metric="heldout_acc1", measure=False)
    held_rows = {r["name"]: r for r in held["rows"]}
    assert held_rows["distill"]["images_per_s"] is None and held_rows["tiny-student"]["pareto_size"] is None


def test_report_errors_are_one_line(inputs, tmp_path, capsys):
    bad = tmp_path / "list.json"
    bad.write_text("[1, 2]")
    for path, match in (
        (tmp_path / "nope.json", "not found"),
        (bad, "expected a JSON object"),
        (tmp_path, "results.json"),
    ):
        with pytest.raises(ReportError, match=match):
            read_input(path)
    assert main(["report", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "list.json" in capsys.readouterr().err


def test_cli_report(inputs, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["report", str(inputs["teacher"]), str(inputs["bench"]), "--out", str(out), "--no-measure", "--html"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| teacher" not in printed and "| tiny-teacher | model |" in printed and (out / "report.html").is_file()
    assert main([*argv, "--cost", "params"]) == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["cost"] == "params" and all(r["pareto"] == r["pareto_size"] for r in doc["rows"])
