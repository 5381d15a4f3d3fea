"""Checkpoints that survive crashes: a directory per step, written under a temp name and renamed into place.

Layout: ``run/checkpoints/step_000100/{model.safetensors, optim.pt, state.json}`` and ``run/checkpoints/latest.json``
naming the newest one. A crash mid-write leaves only a ``.tmp-*`` directory that is ignored and cleaned on the next
save, so the previous checkpoint always stays usable. A checkpoint damaged afterwards (a truncated copy, a full disk
that lied) is skipped on resume: :func:`resume_checkpoint` walks back to the newest complete one and says which.
"""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..io import (
    atomic_write,
    atomic_write_json,
    inside,
    load_tensors,
    read_json,
    save_tensors,
    tensors_file_problem,
    write_failed,
)

LATEST = "latest.json"
FILES = ("model.safetensors", "optim.pt", "state.json")
STATE_KEYS = ("step", "epoch", "pos")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from; the one-line message names the file."""


class DamagedCheckpoint(CheckpointError):
    """Incomplete or unreadable (a crash or a bad copy): resume may fall back to an older checkpoint."""


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def save_checkpoint(
    root: str | Path, step: int, module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], keep: int
) -> Path:
    """Write a complete checkpoint for ``step`` and point latest.json at it; keep the newest ``keep`` ones. Any
    failure (disk full, read-only) is a WriteError naming the path, and the previous checkpoints stay intact."""
    root = Path(root)
    final = _step_dir(root, step)
    tmp = root / f".tmp-step_{step:06d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        save_tensors(tmp / "model.safetensors", module.state_dict())
        extra = {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}
        atomic_write(tmp / "optim.pt", lambda p: torch.save(extra, p))
        atomic_write_json(tmp / "state.json", {**state, "step": step})
        _fsync_dir(tmp)
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        atomic_write_json(root / LATEST, {"step": step, "dir": final.name})
    except (OSError, RuntimeError) as err:  # RuntimeError: torch.save on a full disk; WriteError is one too
        shutil.rmtree(tmp, ignore_errors=True)  # free what we took; the previous checkpoint stands
        raise write_failed(final, err) from err
    _prune(root, keep)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep: int) -> None:
    for old in _step_dirs(root)[keep:]:
        _remove(old)


def _remove(step_dir: Path) -> None:
    """Rename to a ``.tmp-`` name first (atomic), then delete: a kill mid-delete leaves no half checkpoint."""
    doomed = step_dir.with_name(f".tmp-old-{step_dir.name}")
    try:
        os.replace(step_dir, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _step_dirs(root: Path) -> list[Path]:
    """Checkpoint directories, newest first (by the step in the name)."""
    steps = [p for p in root.glob("step_*") if p.is_dir() and p.name.removeprefix("step_").isdigit()]
    return sorted(steps, key=lambda p: int(p.name.removeprefix("step_")), reverse=True)


def pointer_problem(root: str | Path) -> str | None:
    """What is wrong with ``latest.json`` (unreadable, a key missing, a dir outside ``root``), or None. The
    step directories themselves are what resume trusts; a bad pointer is reported and ignored."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    try:
        data = read_json(pointer)
        if not isinstance(data, dict) or "dir" not in data:
            raise ConfigError(f"{pointer}.dir: required key missing")
        inside(root, data["dir"], f"{pointer}.dir")
    except ConfigError as err:
        return f"{err}; ignored"
    return None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why a checkpoint directory is incomplete (checked cheaply, nothing unpickled), or None when it looks whole."""
    path = Path(path)
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    problem = tensors_file_problem(path / "model.safetensors")
    if problem:
        return f"model.safetensors {problem}"
    try:
        zipfile.ZipFile(path / "optim.pt").close()
    except (OSError, zipfile.BadZipFile):
        return "optim.pt truncated or not a torch file"
    try:
        read_state(path)
    except CheckpointError as err:
        return str(err).removeprefix(f"{path}/")
    return None


def read_state(path: Path) -> dict[str, Any]:
    """``state.json`` with its keys checked (step, epoch and pos as integers >= 0)."""
    where = path / "state.json"
    try:
        state = read_json(where)
    except ConfigError as err:
        raise DamagedCheckpoint(str(err)) from err
    if not isinstance(state, dict):
        raise DamagedCheckpoint(f"{where}: expected a JSON object")
    for key in STATE_KEYS:
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DamagedCheckpoint(f"{where}.{key}: expected an integer >= 0, got {value!r}")
    if not isinstance(state.get("skipped", {}), dict) or not isinstance(state.get("bad_steps", 0), int):
        raise DamagedCheckpoint(f"{where}: skipped/bad_steps have the wrong type")
    return state


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    return next((p for p in _step_dirs(Path(root)) if checkpoint_problem(p) is None), None)


def resume_checkpoint(
    root: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[Path, dict[str, Any], list[str]]:
    """Load the newest checkpoint that loads, walking back past damaged ones: (its path, its state, one note per
    checkpoint or pointer passed over). A refused file (a pickle that is not plain tensors) stops with one line."""
    root = Path(root)
    notes = [n for n in [pointer_problem(root)] if n]
    for path in _step_dirs(root):
        problem = checkpoint_problem(path)
        if problem is None:
            try:
                return path, load_checkpoint(path, module, optimizer), notes
            except DamagedCheckpoint as err:
                problem = str(err).removeprefix(f"{path}/")
        notes.append(f"{path.name}: {problem}")
    raise no_checkpoint(root, notes)


def no_checkpoint(root: Path, notes: list[str] | None = None) -> CheckpointError:
    """The error for a resume that finds nothing usable, naming what is wrong with each checkpoint."""
    if notes is None:
        notes = [f"{p.name}: {checkpoint_problem(p)}" for p in _step_dirs(root)]
    return CheckpointError(f"{root}: no complete checkpoint to resume from ({'; '.join(notes) or 'none saved'})")


def _read_optim(path: Path) -> dict[str, Any]:
    where = path / "optim.pt"
    try:
        extra = torch.load(where, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            raise CheckpointError(
                f"{where}: refused, it holds more than plain tensors (a forged or foreign file?); "
                "delete this checkpoint directory to resume from the one before"
            ) from err
        raise DamagedCheckpoint(f"{where}: unreadable ({str(err).splitlines()[0]})") from err
    except (OSError, RuntimeError, EOFError) as err:
        raise DamagedCheckpoint(f"{where}: truncated or corrupt ({str(err).splitlines()[0][:120]})") from err
    if not isinstance(extra, dict) or not isinstance(extra.get("optimizer"), dict):
        raise DamagedCheckpoint(f"{where}: expected {{optimizer, rng}}, got {type(extra).__name__}")
    if not isinstance(extra.get("rng"), torch.Tensor) or extra["rng"].dtype != torch.uint8:
        raise DamagedCheckpoint(f"{where}.rng: expected a uint8 RNG state tensor")
    return extra


def load_checkpoint(path: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore module (strict), optimizer and RNG; returns the saved trainer state. Never unpickles objects. Every
    file is read and checked before anything is restored, so a damaged checkpoint changes nothing."""
    path = Path(path)
    try:
        tensors = load_tensors(path / "model.safetensors")
    except Exception as err:  # safetensors raises its own error type on a truncated file
        raise DamagedCheckpoint(f"{path / 'model.safetensors'}: unreadable ({str(err).splitlines()[0]})") from err
    extra = _read_optim(path)
    state = read_state(path)
    try:
        module.load_state_dict(tensors, strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(extra["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: does not fit this model ({str(err).splitlines()[0][:200]})") from err
    torch.set_rng_state(extra["rng"])
    return state
