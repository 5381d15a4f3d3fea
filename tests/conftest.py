"""Shared fixtures: a tiny shapes dataset (32 px, to match the tiny model configs) written once per session."""

from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def seeded_model(arch: str):
    """A randomly initialised model, reproducible across tests (seed 0), in eval mode."""
    from clipslim.models import load_model

    torch.manual_seed(0)
    bundle = load_model(arch)
    bundle.model.eval()
    return bundle


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    from clipslim.data.shapes import write_shapes

    out = tmp_path_factory.mktemp("shapes")
    write_shapes(out, n_train=256, n_eval=128, seed=0, shard_size=64, image_size=32, workers=0, progress=False)
    return out


@pytest.fixture
def tiny_recipe(tiny_shapes):
    """A two-teacher-term distillation recipe on tiny models; tests override what they need."""

    def make(**train):
        from clipslim.recipe import recipe_from_dict

        return recipe_from_dict(
            {
                "name": "tiny",
                "teacher": "tiny-teacher",
                "student": {"arch": "tiny-student", "init": "inherit"},
                "data": {"train": str(tiny_shapes / "train"), "eval": str(tiny_shapes), "num_workers": 0},
                "objectives": {"clip": 1.0, "affinity": {"weight": 1.0, "teacher_scale": 50.0}},
                "train": {"steps": 6, "batch_size": 32, "warmup": 2, "log_every": 1, "save_every": 3, **train},
            }
        )

    return make
