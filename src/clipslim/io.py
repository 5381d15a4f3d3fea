"""Crash-safe file writes: everything clipslim writes goes to a temp file first, then is renamed into place.

A rename within one directory is atomic on POSIX, so a reader (or a resumed run) sees either the old file or the
new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from safetensors.torch import load_file, save_file

from .config import ConfigError, RunError

log = logging.getLogger(__name__)
T = TypeVar("T")

_UMASK = os.umask(0)
os.umask(_UMASK)


class WriteError(RunError):
    """A file that could not be written (disk full, read-only, no permission); the one-line message names it."""


def _why(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def write_failed(path: str | Path, err: BaseException) -> WriteError:
    """The one policy-wide error for a failed write: ``could not write PATH: reason``."""
    return err if isinstance(err, WriteError) else WriteError(f"could not write {path}: {_why(err)}")


def ensure_dir(path: str | Path) -> Path:
    """``mkdir -p`` whose failure (read-only or full disk) is a :class:`WriteError` naming the folder."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_failed(path, err) from err
    return path


def write_periodic(write: Callable[[], T], what: str, then: str = "retried at the next write") -> T | None:
    """Run a periodic write (a metrics row, an intermediate checkpoint, one cache shard). A failed one is logged in
    one line and the job goes on: the next periodic write retries, and the final write, which is not wrapped, stops
    the job with a :class:`WriteError` if the disk is still bad."""
    try:
        return write()
    except WriteError as err:
        log.error("%s not written (%s); going on, %s", what, err, then)
        return None


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename tmp_path to ``path``; the temp file is removed on failure. Any failure
    to write (``OSError``, or the ``RuntimeError`` torch.save raises on a full disk) is a :class:`WriteError`."""
    path = Path(path)
    ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise write_failed(path, err) from err
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files owner-only; give them the usual permissions
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        Path(tmp).unlink(missing_ok=True)
        raise write_failed(path, err) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write tensors as safetensors atomically (contiguous, detached, on CPU)."""
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def write(tmp: Path) -> None:
        save_file(flat, str(tmp), metadata=metadata)
        problem = tensors_file_problem(tmp)  # safetensors can return without error on a full disk
        if problem:
            raise OSError(f"the written file is incomplete ({problem}); disk full?")

    return atomic_write(path, write)


def tensors_file_problem(path: str | Path) -> str | None:
    """Why a safetensors file is unusable (missing, truncated, bad header), from its header and size alone."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                return f"truncated ({size} bytes, header says more)"
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return "missing"
    except (OSError, struct.error, ValueError) as err:
        return f"unreadable header ({_why(err)})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + n + max(ends, default=0) != size:
        return f"truncated ({size} bytes, expected {8 + n + max(ends, default=0)})"
    return None


def load_tensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file; never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device=device)
    except Exception as err:  # safetensors raises its own SafetensorError on a truncated or foreign file
        raise ConfigError(f"{path}: not a readable safetensors file ({_why(err)})") from err


def read_json(path: str | Path) -> Any:
    """A JSON file, or a one-line :class:`ConfigError` naming it (missing, unreadable, or not JSON)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read ({_why(err)})") from err
    try:
        return json.loads(text)
    except ValueError as err:
        raise ConfigError(f"{path}: not valid JSON ({_why(err)})") from err


def read_yaml(path: str | Path) -> Any:
    """A YAML file read safely (``!!python`` tags refused), or a one-line :class:`ConfigError` naming it."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read ({_why(err)})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({yaml_reason(err)})") from err


def yaml_reason(err: yaml.YAMLError) -> str:
    """The first line of a YAML error, with where it happened (``line 3``), without the echoed source."""
    problem = getattr(err, "problem", None) or _why(err)
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}" if mark is not None else problem


def read_mapping(path: str | Path) -> dict[str, Any]:
    """A JSON (``.json``) or YAML file whose top level must be a mapping; otherwise one line naming the file."""
    data = read_json(path) if str(path).endswith(".json") else read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level, got {kind_of(data)}")
    return data


def kind_of(value: Any) -> str:
    """What a parsed JSON/YAML value is, for messages: ``a list``, ``a number``, ``an empty file``."""
    kinds = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}
    return "an empty file" if value is None else kinds.get(type(value), type(value).__name__)


def check_number(value: Any, where: str, low: float, high: float) -> float:
    """A finite number in (low, high]; otherwise a one-line ConfigError naming ``where`` (file and key)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if not low < value <= high:
        raise ConfigError(f"{where}: must be in ({low:g}, {high:g}], got {value!r}")
    return float(value)


def inside(root: str | Path, relative: Any, where: str) -> Path:
    """``root / relative`` for a path read from a file under ``root``: it must stay inside ``root``."""
    if not isinstance(relative, str) or not relative:
        raise ConfigError(f"{where}: expected a path, got {relative!r}")
    base = Path(root).resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base) or target == base:
        raise ConfigError(f"{where}: {relative!r} points outside {root}")
    return target
