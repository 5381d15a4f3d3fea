"""Two gloo processes on a global batch give one process's loss and gradients on that whole batch, per objective.

The workers run real DDP (torch.distributed, gloo on CPU) around the Distiller; features are gathered with gradient.
In global mode every rank computes the full-batch loss; in local-loss mode each rank's loss covers its own rows and
their mean is the full-batch loss. Either way DDP's averaged gradients must equal the single-process gradients.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from clipslim.distiller import Distiller
from clipslim.distributed import wrap_ddp
from clipslim.models import load_model
from clipslim.objectives import Outputs
from clipslim.recipe import recipe_from_dict

OBJECTIVES = {
    "clip": {"weight": 1.0},
    "affinity": {"weight": 1.0, "teacher_scale": 50.0},
    "feature": {"weight": 100.0},
    "masked_feature": {"weight": 100.0, "keep_ratio": 0.5},
    "icl": {"weight": 1.0},
    "gradient": {"weight": 1000.0},
    "fusion": {"weight": 1.0},
    "cross_kd": {"weight": 1.0},
    "clip+positives": {"positives": {"cascade": [{"view": "image", "top_k": 3}, {"view": "text", "threshold": 0.0}]}},
    "affinity+positives": {"teacher_scale": 50.0, "positives": {"cascade": [{"view": "text", "top_k": 2}]}},
}  # fmt: skip
"""Objective name (before any ``+variant``) -> options; positives are mined across ranks (captions repeat there)."""
GLOBAL_BATCH, TEACHER_DIM = 8, 48


def _inputs() -> tuple[dict, Outputs]:
    g = torch.Generator().manual_seed(1)
    text = torch.randint(1, 500, (8, 16), generator=g)
    text[6], text[3] = text[1], text[2]  # repeated captions, one pair across the two ranks
    batch = {
        "image": torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g),
        "text": text,
        "meta": [{"cls": c} for c in (0, 1, 2, 2, 0, 3, 1, 0)],
    }
    t_img = F.normalize(torch.randn(GLOBAL_BATCH, TEACHER_DIM, generator=g), dim=-1)
    t_txt = F.normalize(torch.randn(GLOBAL_BATCH, TEACHER_DIM, generator=g), dim=-1)
    return batch, Outputs(t_img, t_txt, torch.tensor(30.0))


def _distiller(name: str, local_loss: bool) -> Distiller:
    torch.manual_seed(0)
    recipe = recipe_from_dict(
        {
            "teacher": "tiny-teacher",
            "student": {"arch": "tiny-student"},
            "data": {"train": "x"},
            "objectives": {name.split("+")[0]: OBJECTIVES[name]},
        }  # fmt: skip
    )
    student = load_model("tiny-student").model
    return Distiller(student, recipe.objective_specs(), TEACHER_DIM, local_loss=local_loss)


def _run(model: torch.nn.Module, batch: dict, teacher: Outputs) -> tuple[float, dict[str, torch.Tensor]]:
    out = model(batch, teacher)
    out["loss"].backward()
    named = model.module.named_parameters() if hasattr(model, "module") else model.named_parameters()
    return out["loss"].item(), {k: p.grad.clone() for k, p in named if p.grad is not None}


def _worker(rank: int, world: int, port: int, path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    batch, teacher = _inputs()
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    local_batch = {k: v[rows] for k, v in batch.items()}
    local_teacher = Outputs(teacher.image[rows], teacher.text[rows], teacher.logit_scale)
    results = {}
    for name in OBJECTIVES:
        for local_loss in (False, True):
            ddp = wrap_ddp(_distiller(name, local_loss), torch.device("cpu"))  # exactly what the trainer uses
            loss, grads = _run(ddp, local_batch, local_teacher)
            losses = [None] * world
            dist.all_gather_object(losses, loss)
            results[(name, local_loss)] = (losses, grads)
    if rank == 0:
        torch.save({f"{n}|{int(ll)}": v for (n, ll), v in results.items()}, path)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> dict:
    path = str(tmp_path_factory.mktemp("ddp") / "results.pt")
    mp.spawn(_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("local_loss", [False, True], ids=["global", "local_loss"])
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_two_processes_equal_one(two_process_results, name, local_loss):
    batch, teacher = _inputs()
    ref_loss, ref_grads = _run(_distiller(name, local_loss), batch, teacher)
    losses, grads = two_process_results[f"{name}|{int(local_loss)}"]
    if local_loss and name not in ("feature", "masked_feature", "gradient"):
        assert losses[0] != pytest.approx(losses[1]), "local-loss ranks should see different rows"
        assert sum(losses) / len(losses) == pytest.approx(ref_loss, rel=1e-5)
    else:  # every rank computes the full global-batch loss
        assert losses == pytest.approx([ref_loss] * 2, rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    for key, ref in ref_grads.items():
        scale = ref.abs().max().item() + 1e-12  # summation order differs across processes: compare at fp32 scale
        torch.testing.assert_close(grads[key], ref, rtol=1e-4, atol=1e-5 * scale, msg=f"{name}: gradient of {key}")
