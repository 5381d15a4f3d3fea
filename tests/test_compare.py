"""`clipslim compare`: Student-t intervals against hand-computed values, and an end-to-end run of two tiny recipes at
two seeds (compare.json / compare.md contents, skipping finished runs, resuming, refusing a changed recipe)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from clipslim.cli import main
from clipslim.config import ConfigError
from clipslim.eval.stats import mean_interval, paired_interval, t_cdf, t_quantile
from clipslim.workflows.compare import TIE, run_compare


def test_t_quantiles_match_the_table() -> None:
    for df, expected in ((1, 12.7062047), (2, 4.3026527), (4, 2.7764451), (10, 2.2281389), (29, 2.0452296)):
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-6)
    assert t_quantile(0.025, 3) == pytest.approx(-3.1824463, abs=1e-6)
    assert t_cdf(0.0, 5) == pytest.approx(0.5) and t_cdf(2.0150484, 5) == pytest.approx(0.95, abs=1e-7)
    with pytest.raises(ValueError, match="0 < p < 1"):
        t_quantile(1.0, 3)


def test_mean_interval_hand_computed() -> None:
    # values 0.5, 0.6, 0.7: mean 0.6, sd 0.1; t(0.975, 2) = 4.302653 -> half width 4.302653 * 0.1 / sqrt(3) = 0.248414
    iv = mean_interval([0.5, 0.6, 0.7])
    assert iv.mean == pytest.approx(0.6) and iv.sd == pytest.approx(0.1) and iv.n == 3
    assert (iv.lo, iv.hi) == (pytest.approx(0.351586, abs=1e-6), pytest.approx(0.848414, abs=1e-6))
    assert iv.to_dict()["ci95"] == [iv.lo, iv.hi]
    single = mean_interval([0.4])
    assert single.to_dict() == {"mean": 0.4, "ci95": None, "sd": None, "n": 1} and single.crosses_zero


def test_paired_interval_hand_computed() -> None:
    # diffs 0.05, 0.10, 0.04: mean 0.063333, sd 0.032146, half width 4.302653 * 0.032146 / sqrt(3) = 0.079854
    iv = paired_interval([0.55, 0.70, 0.74], [0.50, 0.60, 0.70])
    assert iv.mean == pytest.approx(0.063333, abs=1e-6) and iv.sd == pytest.approx(0.032146, abs=1e-6)
    assert (iv.lo, iv.hi) == (pytest.approx(-0.016521, abs=1e-6), pytest.approx(0.143187, abs=1e-6))
    assert iv.crosses_zero  # a +6.3 point mean difference that is still a tie at 3 seeds
    assert not paired_interval([0.6, 0.7, 0.8], [0.5, 0.61, 0.69]).crosses_zero
    with pytest.raises(ValueError, match="equal lengths"):
        paired_interval([1.0], [1.0, 2.0])


def _overrides(data: Path, steps: int = 3) -> list[str]:
    return [
        f"train.steps={steps}", "train.batch_size=16", "train.eval_every=0", "train.save_every=100",
        f"data.train={data / 'train'}", f"data.eval={data}", "data.num_workers=0",
        "teacher=tiny-teacher", "student.arch=tiny-student",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def compared(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compare")
    argv = ["compare", "demo_scratch", "demo_distill", "--seeds", "2", "--out", str(out), "--quiet"]
    assert main([*argv, *(x for o in _overrides(tiny_shapes) for x in ("--set", o))]) == 0
    return out


def _run_value(out: Path, label: str, seed: int, group: str, key: str) -> float:
    results = json.loads((out / "runs" / label / f"seed{seed}" / "results.json").read_text())
    return results["eval"][group][key]


def test_compare_json_has_means_intervals_and_paired_differences(compared: Path) -> None:
    doc = json.loads((compared / "compare.json").read_text())
    assert "Student t" in doc["interval"] and doc["baseline"] == "demo_scratch" and doc["seeds"] == [0, 1]
    assert list(doc["recipes"]) == ["demo_scratch", "demo_distill"]
    for label in doc["recipes"]:
        for seed in (0, 1):
            recipe = (compared / "runs" / label / f"seed{seed}" / "recipe.yaml").read_text()
            assert f"seed: {seed}" in recipe and "steps: 3" in recipe
    for label, entry in doc["recipes"].items():
        held = entry["metrics"]["heldout_acc1"]
        values = [_run_value(compared, label, s, "zeroshot_heldout", "acc1") for s in (0, 1)]
        assert held["values"] == values and held["n"] == 2 and held["mean"] == pytest.approx(sum(values) / 2)
        half = 12.7062047 * abs(values[0] - values[1]) / math.sqrt(2) / math.sqrt(2)  # sd of 2 = |a - b| / sqrt 2
        assert held["ci95"] == [pytest.approx(held["mean"] - half), pytest.approx(held["mean"] + half)]
        assert {"ood_acc1", "seen_acc1", "image_retrieval_recall@1"} <= set(entry["metrics"])
    paired = doc["recipes"]["demo_distill"]["paired"]["heldout_acc1"]
    diffs = [
        _run_value(compared, "demo_distill", s, "zeroshot_heldout", "acc1")
        - _run_value(compared, "demo_scratch", s, "zeroshot_heldout", "acc1")
        for s in (0, 1)
    ]
    assert paired["diffs"] == pytest.approx(diffs) and paired["mean"] == pytest.approx(sum(diffs) / 2)
    assert paired["tie"] == (paired["ci95"][0] <= 0 <= paired["ci95"][1])
    assert "paired" not in doc["recipes"]["demo_scratch"]
    md = (compared / "compare.md").read_text()
    assert "## heldout_acc1" in md and "| demo_scratch |" in md and "baseline" in md
    assert (TIE in md) == any(p["tie"] for p in doc["recipes"]["demo_distill"]["paired"].values())


def test_compare_skips_finished_runs_resumes_and_refuses_a_changed_recipe(compared: Path, tiny_shapes: Path) -> None:
    from clipslim.cli import resolve_recipe
    from clipslim.train import train

    calls: list[tuple[str, bool]] = []

    def counting_train(recipe, run_dir, *, resume, progress):
        calls.append((Path(run_dir).relative_to(compared).as_posix(), resume))
        return train(recipe, run_dir, resume=resume, progress=progress)

    recipes = [resolve_recipe("demo_scratch"), resolve_recipe("demo_distill")]
    before = (compared / "compare.json").read_text()
    run_compare(recipes, compared, seeds=2, overrides=_overrides(tiny_shapes), progress=False, train_fn=counting_train)
    assert calls == [] and (compared / "compare.json").read_text() == before
    (compared / "runs" / "demo_distill" / "seed1" / "results.json").unlink()  # as if killed after its last checkpoint
    run_compare(recipes, compared, seeds=2, overrides=_overrides(tiny_shapes), progress=False, train_fn=counting_train)
    assert calls == [("runs/demo_distill/seed1", True)]
    assert json.loads((compared / "compare.json").read_text()) == json.loads(before)  # same steps, same numbers
    with pytest.raises(ConfigError, match="recipe.yaml: made with a different recipe"):
        run_compare(recipes, compared, seeds=2, overrides=_overrides(tiny_shapes, steps=4), progress=False)
    with pytest.raises(ConfigError, match="given twice"):
        run_compare([recipes[0], recipes[0]], compared, seeds=1, progress=False)


def test_summary_table_shows_each_recipes_mean_and_paired_delta_marking_ties() -> None:
    from clipslim.workflows.compare import summary_table

    base = {"metrics": {"heldout_acc1": {"mean": 0.10, "n": 3, "ci95": [0.05, 0.15]}}}
    better = {
        "metrics": {"heldout_acc1": {"mean": 0.30, "n": 3}, "seen_acc1": {"mean": 0.5, "n": 3}},
        "paired": {
            "heldout_acc1": {"mean": 0.20, "n": 3, "ci95": [0.10, 0.30], "tie": False},
            "seen_acc1": {"mean": 0.01, "n": 3, "ci95": [-0.02, 0.04], "tie": True},
        },
    }
    lines = summary_table({"recipes": {"a": base, "b": better}})
    assert lines[0] == "| recipe | heldout_acc1 | seen_acc1 |"
    assert lines[2] == "| a | 10.0 |  |"
    assert lines[3] == "| b | 30.0 (Δ +20.0 [+10.0, +30.0]) | 50.0 (Δ +1.0 [-2.0, +4.0], tie) |"
