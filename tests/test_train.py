"""Trainer: end-to-end on tiny models, exact resume after an interruption, teacher frozen, crash-safe checkpoints."""

import contextlib
import csv
import json
import os
import signal

import open_clip
import pytest
import torch

from clipslim.config import ConfigError
from clipslim.io import load_tensors
from clipslim.train import Trainer, train
from clipslim.train.checkpoint import latest_checkpoint


def test_end_to_end_writes_run_dir(tiny_recipe, tmp_path):
    results = train(tiny_recipe(eval_every=3), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert (run / "recipe.yaml").is_file() and (run / "inherit.json").is_file()
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 and "affinity_loss" in rows[0] and "clip_loss" in rows[0] and "pairs_per_s" in rows[0]
    evals = (run / "evals.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in evals[1:]] == ["0", "3", "6"]  # start, periodic, final
    assert results["steps"] == 6 and results["eval"]["zeroshot_heldout"]["n"] > 0
    assert json.loads((run / "results.json").read_text())["params"] == results["params"]
    model = open_clip.create_model(f"local-dir:{run / 'student'}")
    assert sum(p.numel() for p in model.parameters()) == results["params"]


def test_teacher_frozen_and_not_checkpointed(tiny_recipe, tmp_path):
    trainer = Trainer(tiny_recipe(steps=2), tmp_path / "run", progress=False)
    teacher = trainer.built.teacher.model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.run()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    saved = load_tensors(latest_checkpoint(tmp_path / "run" / "checkpoints") / "model.safetensors")
    assert all(k.startswith(("student.", "objectives.")) for k in saved)


def _interrupt_at(trainer: Trainer, step: int) -> None:
    """Deliver a real SIGTERM once ``step`` steps are done, as a scheduler would."""
    original = trainer.train_step

    def step_then_signal(*args):
        out = original(*args)
        if trainer.step + 1 == step:
            signal.raise_signal(signal.SIGTERM)
        return out

    trainer.train_step = step_then_signal


@pytest.mark.parametrize("ahead", ["never", "always"])
def test_interrupted_and_resumed_equals_uninterrupted(tiny_recipe, tmp_path, ahead):
    """Also with the teacher one batch ahead: the checkpoint must record the batch trained on, not the one fetched."""
    recipe = tiny_recipe(steps=8, save_every=100, teacher_ahead=ahead)  # only the signal and the end save
    train(recipe, tmp_path / "straight", progress=False)

    first = Trainer(recipe, tmp_path / "resumed", progress=False)
    _interrupt_at(first, 5)
    assert first.run() == {"stopped_at": 5}
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "step_000005"
    with pytest.raises(ConfigError, match="already has checkpoints"):
        Trainer(recipe, tmp_path / "resumed", progress=False)
    train(recipe, tmp_path / "resumed", resume=True, progress=False)

    a = load_tensors(tmp_path / "straight" / "student" / "open_clip_model.safetensors")
    b = load_tensors(tmp_path / "resumed" / "student" / "open_clip_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged from the uninterrupted one"
    losses = [r.split(",") for r in (tmp_path / "resumed" / "metrics.csv").read_text().splitlines()[1:]]
    assert [int(r[0]) for r in losses] == list(range(1, 9))


def test_teacher_ahead_changes_speed_not_maths(tiny_recipe, tmp_path):
    """The teacher run one batch ahead in a second thread (issue 20) gives the serial loop's losses and weights, bit
    for bit, and auto keeps it off where it has no core of its own or under step hooks."""
    runs, cpus = {}, os.sched_getaffinity(0)
    for ahead in ("never", "always"):
        trainer = Trainer(tiny_recipe(steps=5, teacher_ahead=ahead), tmp_path / ahead, progress=False)
        assert type(trainer.feed).__name__ == {"never": "SerialFeed", "always": "AheadFeed"}[ahead]
        trainer.run()
        assert os.sched_getaffinity(0) == cpus  # the student lane's pinning is undone when the run ends
        runs[ahead] = load_tensors(tmp_path / ahead / "student" / "open_clip_model.safetensors")
    a, b = runs["never"], runs["always"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [list(csv.DictReader((tmp_path / r / "metrics.csv").open())) for r in runs]
    kept = [[{k: v for k, v in row.items() if k in ("step", "epoch") or k.endswith("loss")} for row in r] for r in rows]
    assert kept[0] == kept[1] and len(kept[0]) == 5 and "affinity_loss" in kept[0][0]

    from clipslim.train.ahead import ahead_wanted, usable_cpus

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert ahead_wanted("auto", cpu, True, 1, 0, 1) == (len(usable_cpus()) >= 2)
        assert not ahead_wanted("auto", gpu, True, 1, 0, 1) and not ahead_wanted("auto", cpu, True, 1, 1, 1)
        assert not ahead_wanted("always", cpu, True, 2, 0, 1) and not ahead_wanted("always", cpu, False, 1, 0, 1)
        torch.set_num_threads(len(usable_cpus()))
        assert not ahead_wanted("auto", cpu, True, 1, 0, 1)  # every core already busy with the main thread's ops
    finally:
        torch.set_num_threads(threads)


def test_checkpoint_keeps_latest_and_ignores_partial(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    train(tiny_recipe(steps=6, save_every=2, keep_checkpoints=2), run, progress=False)
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_000004", "step_000006"]
    (run / "checkpoints" / ".tmp-step_000008").mkdir()  # a crash mid-write leaves this behind
    assert latest_checkpoint(run / "checkpoints").name == "step_000006"


def test_missing_data_is_one_line_error(tiny_recipe, tmp_path):
    from clipslim.recipe import recipe_from_dict

    recipe = tiny_recipe()
    bad = recipe_from_dict({"teacher": "tiny-teacher", "student": {"arch": "tiny-student"},
                            "data": {"train": str(tmp_path / "nope")}, "objectives": {"clip": 1.0}})  # fmt: skip
    with pytest.raises(ValueError, match="nope"):
        train(bad, tmp_path / "run", progress=False)
    assert recipe.train.steps == 6


def test_sigterm_to_the_process_group_saves_and_exits_cleanly(tiny_shapes, tmp_path):
    """What Ctrl-C or `pkill -f` does: every process of the run (main and DataLoader worker) gets the signal."""
    import os
    import subprocess
    import sys
    import time

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: sig\nstudent: {arch: tiny-student}\n"
        f"data: {{train: {tiny_shapes / 'train'}, num_workers: 1}}\n"
        "objectives: {clip: 1.0}\ntrain: {steps: 100000, batch_size: 32, log_every: 1, save_every: 100000}\n"
    )
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "clipslim.cli", "train", str(recipe), "--out", str(run), "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (run / "metrics.csv").is_file() and len((run / "metrics.csv").read_text().splitlines()) > 3
    ):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert '"stopped_at"' in out
    assert latest_checkpoint(run / "checkpoints") is not None


class _NanAt:
    """A test objective: InfoNCE whose loss turns NaN on chosen calls (steps)."""

    bad: set[int] = set()
    calls = 0


@pytest.fixture
def nan_objective():
    from clipslim.objectives import OBJECTIVES, Objective
    from clipslim.objectives.clip import info_nce

    class NanAt(Objective):
        name = "nan_at_test"

        def forward(self, student, teacher, batch):
            _NanAt.calls += 1
            loss = info_nce(student.image, student.text, student.logit_scale)
            return {"nan_at_test_loss": loss * float("nan") if _NanAt.calls in _NanAt.bad else loss}

    OBJECTIVES["nan_at_test"] = NanAt
    _NanAt.calls = 0
    yield _NanAt
    del OBJECTIVES["nan_at_test"]


def _nan_recipe(tiny_shapes, **train):
    from clipslim.recipe import recipe_from_dict

    return recipe_from_dict(
        {
            "student": {"arch": "tiny-student"},
            "data": {"train": str(tiny_shapes / "train"), "num_workers": 0},
            "objectives": {"nan_at_test": 1.0},
            "train": {"batch_size": 32, "warmup": 1, **train},
        }  # fmt: skip
    )


def test_a_non_finite_step_is_skipped_and_counted(tiny_shapes, tmp_path, nan_objective):
    nan_objective.bad = {3}
    trainer = Trainer(_nan_recipe(tiny_shapes, steps=5), tmp_path / "run", progress=False)
    snapshots = {}
    original = trainer.train_step

    def watched(*args):
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        out = original(*args)
        snapshots[trainer.step + 1] = (before, out)
        return out

    trainer.train_step = watched
    results = trainer.run()
    before, out = snapshots[3]
    assert "bad_step" in out and results["bad_steps"] == 1
    after_bad_step = snapshots[4][0]
    assert all(torch.equal(before[k], after_bad_step[k]) for k in before), "a NaN step must not touch the weights"
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
    assert not any(torch.equal(snapshots[4][0][k], snapshots[5][0][k]) for k in ["student.visual.proj"])


def test_consecutive_non_finite_steps_stop_with_the_term_named(tiny_shapes, tmp_path, nan_objective):
    from clipslim.config import RunError

    nan_objective.bad = set(range(3, 100))
    recipe = _nan_recipe(tiny_shapes, steps=20, max_bad_steps=3, save_every=2)
    with pytest.raises(RunError, match=r"3 non-finite steps in a row \(non-finite: nan_at_test_loss\)"):
        train(recipe, tmp_path / "run", progress=False)
    kept = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert kept is not None and kept.name == "step_000002"  # the last good checkpoint is intact
    assert all(torch.isfinite(v).all() for v in load_tensors(kept / "model.safetensors").values())


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_optimizer_implementations_make_the_same_update(impl):
    """The default fused AdamW (issue 20) changes speed, not maths: three steps equal the per-tensor loop."""
    from clipslim.recipe import TrainSection
    from clipslim.train.loop import make_optimizer

    def run(name: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
        opt = make_optimizer(model, TrainSection(optimizer=name, lr=0.05))
        for step in range(3):
            opt.zero_grad()
            model(torch.tensor([[1, 2, step + 3]])).square().mean().backward()
            opt.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    ref, got = run("loop"), run(impl)
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)


def test_teacher_ahead_failing_fetch_keeps_the_position_of_the_last_trained_batch():
    """A data error while fetching batch t+1 ahead stops the run before batch t is trained: the position a checkpoint
    records must still be the one after batch t-1, or a resume would skip batch t."""
    from types import SimpleNamespace

    from clipslim.train.ahead import AheadFeed

    class Stream(SimpleNamespace):
        def next(self):
            if self.pos == self.fail_at:
                raise ValueError("bad data")
            self.pos += 1
            return {"i": self.pos}

    stream = Stream(epoch=0, pos=0, skipped={}, fail_at=3, _it=None)
    feed = AheadFeed(stream, lambda batch: batch["i"] * 10, contextlib.nullcontext, pin=False)
    try:
        assert feed.next() == ({"i": 1}, 10) and feed.position().pos == 1
        assert feed.next() == ({"i": 2}, 20) and feed.position().pos == 2
        with pytest.raises(ValueError, match="bad data"):
            feed.next()  # batch 3 would be handed out after fetching batch 4 ahead, which fails
        assert feed.position().pos == 2
    finally:
        feed.close()
