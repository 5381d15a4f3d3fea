"""torchrun support through torch.distributed (NCCL on GPU, gloo on CPU) — nothing home-made.

Without torchrun (no WORLD_SIZE in the environment) nothing is initialised and every helper here is a no-op, so
one CPU or one GPU runs with no process group at all.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

from .outputs import Outputs


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_torchrun() -> DistEnv:
    """Read torchrun's variables; a plain `python`/`clipslim` launch gives a single-process env."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    return DistEnv(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(env: DistEnv, device: torch.device) -> torch.device:
    """Join the process group torchrun set up; on GPU each process takes its local device."""
    if not env.enabled:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def current_env() -> DistEnv:
    """The env of an initialised process group (single-process otherwise)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistEnv()
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows in rank order; gradients flow back to each rank's own rows."""
    if not current_env().enabled:
        return x
    with warnings.catch_warnings():  # deprecated in favour of a private API; still the public autograd gather
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_nn.all_gather(x.contiguous()), dim=0)


def gather_constant(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of a tensor without gradient (token ids, class labels), in rank order; needs the same
    shape on every rank (training batches are, with drop_last)."""
    env = current_env()
    if not env.enabled:
        return x
    parts = [torch.empty_like(x) for _ in range(env.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def gather_outputs(out: Outputs | None, local_loss: bool = False) -> Outputs | None:
    """The global batch's embeddings, gathered with gradient (teacher outputs carry none).

    With ``local_loss`` the result also names this rank's rows, so contrastive terms use local queries against
    global keys (open_clip's --local-loss): same gradients, memory linear in the global batch.
    """
    env = current_env()
    if out is None or not env.enabled:
        return out
    n = out.image.shape[0]
    rows = slice(env.rank * n, (env.rank + 1) * n) if local_loss else None
    return dataclasses.replace(out, image=gather_rows(out.image), text=gather_rows(out.text), rows=rows)


def broadcast_flag(flag: bool) -> bool:
    """True on every rank if it is true on any (e.g. a stop signal received by one process)."""
    if not current_env().enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around the trained module (a no-op without a process group).

    ``find_unused_parameters`` is on because a recipe need not touch every parameter (FD alone never uses the
    student's logit scale); without it DDP silently skips all-reducing the whole bucket holding such a parameter,
    leaving its neighbours' gradients un-averaged (caught by tests/test_distributed.py).
    """
    if not current_env().enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
