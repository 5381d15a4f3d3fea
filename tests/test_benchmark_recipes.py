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
