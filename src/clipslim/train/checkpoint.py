"""Checkpoints that survive crashes: a directory per step, written under a temp name and renamed into place.

Layout: ``run/checkpoints/step_000100/{model.safetensors, optim.pt, state.json}`` and ``run/checkpoints/latest.json``
pointing at the newest complete one. A crash mid-write leaves only a ``.tmp-*`` directory that is ignored and
cleaned on the next save, so the previous checkpoint always stays usable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import atomic_write_json, load_tensors, save_tensors

LATEST = "latest.json"


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def save_checkpoint(
    root: str | Path, step: int, module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], keep: int
) -> Path:
    """Write a complete checkpoint for ``step`` and point latest.json at it; keep the newest ``keep`` ones."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step_{step:06d}"
    tmp.mkdir()
    try:
        save_tensors(tmp / "model.safetensors", module.state_dict())
        torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp / "optim.pt")
        atomic_write_json(tmp / "state.json", {**state, "step": step})
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. disk full: free what we took; the previous checkpoint stands
        raise
    final = _step_dir(root, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_json(root / LATEST, {"step": step, "dir": final.name})
    _prune(root, keep)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / json.loads(pointer.read_text())["dir"]
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore module (strict), optimizer and RNG; returns the saved trainer state. Never unpickles objects."""
    path = Path(path)
    module.load_state_dict(load_tensors(path / "model.safetensors"), strict=True)
    extra = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(extra["optimizer"])
    torch.set_rng_state(extra["rng"])
    return json.loads((path / "state.json").read_text())
