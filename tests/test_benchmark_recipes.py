"""The recipe files of the measurement scripts in benchmarks/ load, and each script runs every one of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipslim.recipe import load_recipe

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.parametrize(("folder", "prefix"), [("multipos", "$M/"), ("protoclip", '"$B"/')])
def test_benchmark_recipes_load_with_distinct_names_and_run_sh_names_each(folder: str, prefix: str) -> None:
    paths = sorted((BENCHMARKS / folder).glob("*.yaml"))
    assert len(paths) >= 5
    names = {load_recipe(p).name for p in paths}
    assert len(names) == len(paths)  # compare keeps runs per recipe: names must not collide
    script = (BENCHMARKS / folder / "run.sh").read_text(encoding="utf-8")
    assert all(f"{prefix}{p.name}" in script for p in paths)


def _load(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slimmable_seeds_summary_pairs_by_seed() -> None:
    bench = _load("slimmable_compare")

    def seed(i: int, slim: float) -> dict:
        arms = {"slimmable": {"heldout": slim}, "separate": {"heldout": 50.0 + i}, "sliced_full": {"heldout": 1.0}}
        return {"seed": i, "widths": {"1.0": {"visual_params": 10**6, **arms}}}

    doc = bench.seeds_summary([seed(0, 52.0), seed(1, 53.0), seed(2, 54.0)])
    row = doc["widths"]["1.0"]
    assert row["arms"]["separate"]["heldout"]["mean"] == 51.0
    paired = row["paired_vs_separate"]["slimmable"]["heldout"]
    assert paired["mean"] == 2.0 and paired["sd"] == 0.0 and not paired["tie"]  # +2 at every seed
    assert row["paired_vs_separate"]["sliced_full"]["heldout"]["mean"] == -50.0
    assert "| 1.0 | 1.00M | 53.0 [" in bench.seeds_markdown(doc)


def test_all_tables_script_names_existing_scripts() -> None:
    script = (BENCHMARKS / "all_tables.sh").read_text(encoding="utf-8")
    named = [w.split("/", 1)[1].rstrip('"') for w in script.split() if w.startswith('"$B/')]
    assert len(named) >= 4 and all((BENCHMARKS / n).is_file() for n in named)


def test_teacher_experiment_recipes_load_and_name_their_command() -> None:
    paths = sorted((BENCHMARKS / "teacher").glob("*.yaml"))
    assert len(paths) >= 2
    for p in paths:
        recipe = load_recipe(p)
        assert recipe.student.arch == "shapes-teacher"  # experiments on the shipped teacher's architecture
        assert f"clipslim train benchmarks/teacher/{p.name}" in p.read_text(encoding="utf-8")


def test_resize_patch_keeps_the_embedding_of_a_smooth_patch() -> None:
    """FlexiViT's pseudo-inverse resize: a smooth 16-px patch and its 8-px downsample embed alike (least squares, so
    ~10% off, not exact); the class token's position is kept."""
    import torch
    import torch.nn.functional as F

    bench = _load("teacher/resize_patch")
    torch.manual_seed(0)
    state = {"visual.conv1.weight": torch.randn(5, 3, 16, 16), "visual.positional_embedding": torch.randn(17, 5)}
    new = bench.resized_state(state, 8, 8)
    assert new["visual.conv1.weight"].shape == (5, 3, 8, 8) and new["visual.positional_embedding"].shape == (65, 5)
    assert torch.equal(new["visual.positional_embedding"][0], state["visual.positional_embedding"][0])  # class token
    x = F.interpolate(torch.randn(4, 3, 4, 4), size=(16, 16), mode="bilinear")
    old = F.conv2d(x, state["visual.conv1.weight"], stride=16)
    small = F.interpolate(x, size=(8, 8), mode="bicubic", antialias=True)
    err = (F.conv2d(small, new["visual.conv1.weight"], stride=8) - old).norm()
    assert err < 0.15 * old.norm()
    from clipslim.tokens.patch_scale import resize_kernel  # why the script uses timm's resize for this shrink

    ours = F.conv2d(
        F.interpolate(x, size=(8, 8), mode="bilinear"), resize_kernel(state["visual.conv1.weight"], 8), stride=8
    )
    assert (ours - old).norm() > 1.5 * err
