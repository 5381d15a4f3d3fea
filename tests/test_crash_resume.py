"""Crashes lose nothing but the time since the last checkpoint.

A real training process is SIGKILLed (no handler runs) at random steps and once in the middle of writing a
checkpoint; after every kill the checkpoint on disk must be complete and loadable, and the resumed run must end with
exactly the weights of a run that was never interrupted. A failing disk (full, read-only) must leave the previous
checkpoint intact.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clipslim.io import load_tensors
from clipslim.train import checkpoint as ckpt
from clipslim.train.checkpoint import latest_checkpoint

STEPS = 30


def write_recipe(path: Path, data: Path) -> Path:
    path.write_text(
        json.dumps(
            {
                "name": "crash",
                "student": {"arch": "tiny-student"},
                "data": {"train": str(data / "train"), "num_workers": 0},
                "objectives": {"clip": 1.0},
                "train": {"steps": STEPS, "batch_size": 32, "warmup": 2, "save_every": 1, "log_every": 1, "seed": 3},
            }
        )
    )
    return path


def start(recipe: Path, run: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "clipslim.cli", "train", str(recipe), "--out", str(run), "--quiet"]
    if latest_checkpoint(run / "checkpoints") is not None:
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same arithmetic in every process
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll until ``predicate()`` holds; False if the process ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    raise TimeoutError("training process made no progress")


def saved_step(run: Path) -> int:
    latest = latest_checkpoint(run / "checkpoints")
    return json.loads((latest / "state.json").read_text())["step"] if latest else 0


def assert_checkpoints_whole(run: Path) -> None:
    """Every step_* directory is complete and loadable; latest.json names one of them."""
    root = run / "checkpoints"
    for step_dir in root.glob("step_*"):
        assert {p.name for p in step_dir.iterdir()} == {"model.safetensors", "optim.pt", "state.json"}, step_dir
        load_tensors(step_dir / "model.safetensors")
        torch.load(step_dir / "optim.pt", weights_only=True)
        json.loads((step_dir / "state.json").read_text())
    if (root / "latest.json").exists():
        assert latest_checkpoint(root) is not None


def kill_mid_write(run: Path, proc: subprocess.Popen) -> bool:
    """SIGKILL as soon as a checkpoint is being written (its temp directory exists)."""
    root = run / "checkpoints"
    if not wait_for(lambda: root.is_dir() and any(root.glob(".tmp-*")), proc):
        return False
    proc.send_signal(signal.SIGKILL)
    return True


def kill_at_random_step(run: Path, proc: subprocess.Popen, rng: random.Random) -> bool:
    target = saved_step(run) + rng.randint(1, 6)
    if not wait_for(lambda: saved_step(run) >= target, proc):
        return False
    time.sleep(rng.uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)
    return True


def test_sigkill_anywhere_then_resume_equals_uninterrupted(tiny_shapes: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.json", tiny_shapes)
    reference = start(recipe, tmp_path / "ref")
    run, rng, kills = tmp_path / "run", random.Random(7), 0
    for kill in (kill_mid_write, kill_at_random_step, kill_at_random_step, kill_mid_write):
        proc = start(recipe, run)
        args = (run, proc) if kill is kill_mid_write else (run, proc, rng)
        if kill(*args):
            proc.wait(timeout=60)
            assert proc.returncode == -signal.SIGKILL
            kills += 1
        else:
            assert proc.wait() == 0, proc.stderr.read()[-2000:]
        assert_checkpoints_whole(run)
    assert kills >= 3, "the run finished before it could be killed enough times"
    proc = start(recipe, run)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-2000:]
    final = lambda root: load_tensors(latest_checkpoint(root / "checkpoints") / "model.safetensors")  # noqa: E731
    got, want = final(run), final(tmp_path / "ref")
    assert saved_step(run) == STEPS and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), "resumed weights differ from the uninterrupted run"
    assert not list((run / "checkpoints").glob(".tmp-*"))


def _failing_disk(code: int = errno.ENOSPC):
    """save_tensors that writes part of the file, then fails like a full (ENOSPC) or read-only (EROFS) disk."""

    def save(path, tensors, metadata=None):
        Path(path).write_bytes(b"\x00" * 64)
        raise OSError(code, os.strerror(code), str(path))

    return save


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_failing_disk_keeps_previous_checkpoint_and_training_goes_on(
    tiny_recipe, tmp_path, monkeypatch, caplog, code: int
) -> None:
    from clipslim.train import Trainer

    trainer = Trainer(tiny_recipe(steps=6, save_every=2), tmp_path / "run", progress=False)
    real = ckpt.save_tensors
    calls = {"n": 0}

    def flaky(path, tensors, metadata=None):
        calls["n"] += 1
        return (_failing_disk(code) if calls["n"] == 2 else real)(path, tensors, metadata)  # the step-4 save fails

    monkeypatch.setattr(ckpt, "save_tensors", flaky)
    results = trainer.run()
    assert results["steps"] == 6 and os.strerror(code) in caplog.text
    assert "last good checkpoint" in caplog.text and "step_000002" in caplog.text
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert steps == ["step_000002", "step_000006"]  # 4 was never half-written; 2 stayed intact
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
    assert_checkpoints_whole(tmp_path / "run")


def test_failed_final_checkpoint_is_one_line_error_and_keeps_previous(tiny_recipe, tmp_path, monkeypatch) -> None:
    from clipslim.cli import main
    from clipslim.recipe import recipe_to_yaml

    recipe = tiny_recipe(steps=4, save_every=2)
    path = tmp_path / "r.yaml"
    path.write_text(recipe_to_yaml(recipe))
    real = ckpt.save_tensors
    calls = {"n": 0}

    def fail_last(p, tensors, metadata=None):
        calls["n"] += 1
        return (_failing_disk() if calls["n"] == 2 else real)(p, tensors, metadata)

    monkeypatch.setattr(ckpt, "save_tensors", fail_last)
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_000002"
    assert_checkpoints_whole(tmp_path / "run")


def test_everything_written_stays_inside_the_run_dir(tiny_recipe, tmp_path, monkeypatch) -> None:
    """A run writes nothing outside its run directory (default runs/<name> under the working directory)."""
    from clipslim.cli import main
    from clipslim.recipe import recipe_to_yaml

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "r.yaml").write_text(recipe_to_yaml(tiny_recipe(steps=3, save_every=2)))
    before = {p for p in tmp_path.rglob("*")}
    assert main(["train", "r.yaml", "--quiet"]) == 0
    new = {p for p in tmp_path.rglob("*")} - before
    run = work / "runs" / "tiny"
    assert new and all(p == run.parent or p.is_relative_to(run) for p in new), sorted(map(str, new))
