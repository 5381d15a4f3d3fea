"""MFU: a training step's FLOPs against a hand count, CPU attention counted, the log column, weights untouched.

No timing asserts: only that the logged fraction is a plausible number.
"""

from __future__ import annotations

import csv
import json

import torch
from torch import nn

from clipslim.cli import main
from clipslim.eval.mfu import count_flops, flop_counter, matmul_peak
from clipslim.io import load_tensors
from clipslim.recipe import recipe_from_dict
from clipslim.train import Trainer, train


def _hand_count_tiny_student_step(batch: int) -> int:
    """tiny-student (see tests/test_bench.py): 32 px, patch 16 -> 5 tokens; text 16 tokens; width 32, 2 layers each,
    MLP 128, heads of 32 channels in all, embed 32; CLIP loss: one batch x batch logits matmul."""
    patch = 2 * 4 * (3 * 16 * 16) * 32
    image_layer = 2 * 5 * 32 * 96 + 2 * (2 * 5 * 5 * 32) + 2 * 5 * 32 * 32 + 2 * (2 * 5 * 32 * 128)
    text_layer = 2 * 16 * 32 * 96 + 2 * (2 * 16 * 16 * 32) + 2 * 16 * 32 * 32 + 2 * (2 * 16 * 32 * 128)
    per_pair = patch + 2 * image_layer + 2 * 32 * 32 + 2 * text_layer + 2 * 32 * 32
    forward = batch * per_pair + 2 * batch * batch * 32
    # backward is twice the forward, except the patch conv: images need no gradient, only its weight does
    return 3 * forward - batch * patch


def test_training_step_flops_match_hand_count(tiny_shapes, tmp_path):
    recipe = recipe_from_dict(
        {
            "name": "flops", "student": {"arch": "tiny-student"}, "objectives": {"clip": 1.0},
            "data": {"train": str(tiny_shapes / "train"), "num_workers": 0},
            "train": {"steps": 1, "batch_size": 8, "mfu": False},
        }
    )  # fmt: skip
    trainer = Trainer(recipe, tmp_path / "run", progress=False)
    batch = trainer.stream.next()
    with flop_counter() as counter:
        trainer.train_step(batch)
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    assert "aten._scaled_dot_product_flash_attention_for_cpu_backward" in ops  # the CPU kernels are counted
    assert counter.get_total_flops() == _hand_count_tiny_student_step(8)
    trainer.stream.close()


def test_fused_inference_attention_is_counted():
    attn, x = nn.MultiheadAttention(32, 4, batch_first=True).eval(), torch.randn(2, 10, 32)
    with torch.no_grad(), flop_counter() as counter:
        attn(x, x, x, need_weights=False)
    assert "aten._native_multi_head_attention" in {str(op) for op in counter.get_flop_counts()["Global"]}
    assert counter.get_total_flops() == 2 * 2 * 10 * 32 * 96 + 4 * 2 * 10 * 10 * 32 + 2 * 2 * 10 * 32 * 32
    assert count_flops(lambda: attn(x, x, x, need_weights=False))[1] == counter.get_total_flops()


def test_peak_probe_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    assert matmul_peak("cpu", torch.float64, seconds=0.01) > 0
    assert torch.equal(state, torch.get_rng_state())


def test_mfu_column_logged_and_weights_unchanged(tiny_recipe, tmp_path):
    on = train(tiny_recipe(steps=4, log_every=2), tmp_path / "on", progress=False)
    train(tiny_recipe(steps=4, log_every=2, mfu=False), tmp_path / "off", progress=False)
    a = load_tensors(tmp_path / "on" / "student" / "open_clip_model.safetensors")
    b = load_tensors(tmp_path / "off" / "student" / "open_clip_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "counting FLOPs changed the weights"
    with open(tmp_path / "on" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [0 < float(r["mfu"]) <= 1.5 for r in rows] == [True, True]
    assert "mfu" not in (tmp_path / "off" / "metrics.csv").read_text().splitlines()[0]
    stored = json.loads((tmp_path / "on" / "results.json").read_text())["run"]["mfu"]
    assert stored == on["run"]["mfu"] and stored["flops_per_step"] > 0 and stored["matmul_peak_flops_per_s"] > 0
    assert stored["timed_steps"] == 3  # the counted first step is not timed


def test_cli_bench_train_step_line_and_json(tiny_shapes, tmp_path, capsys):
    recipe, out = tmp_path / "r.yaml", tmp_path / "bench.json"
    recipe.write_text(
        f"name: step\nstudent: {{arch: tiny-student}}\ndata: {{train: {tiny_shapes / 'train'}, num_workers: 0}}\n"
        "objectives: {clip: 1.0}\ntrain: {batch_size: 8}\n"
    )
    assert main(["bench", "--train", str(recipe), "--quick", "--repeats", "2", "--out", str(out)]) == 0
    step = json.loads(out.read_text())["train_step"]
    assert step["flops_per_step"] == _hand_count_tiny_student_step(8) and step["batch_size"] == 8
    assert step["mfu"] > 0 and step["mfu_with_data"] > 0 and step["matmul_peak_flops_per_s"] > 0
    assert "MFU" in capsys.readouterr().out
    assert main(["bench"]) != 0 and "give --model and/or --train" in capsys.readouterr().err


def test_teacher_ahead_counts_the_same_flops_against_two_lanes(tiny_recipe, tmp_path):
    """With the teacher one batch ahead in a second thread, the counted step still holds exactly one teacher forward
    (the first one runs on the counting thread; the thread's ahead forward is not seen), and the peak is for 2 lanes."""
    serial = train(tiny_recipe(steps=3, teacher_ahead="never"), tmp_path / "serial", progress=False)["run"]["mfu"]
    ahead = train(tiny_recipe(steps=3, teacher_ahead="always"), tmp_path / "ahead", progress=False)["run"]["mfu"]
    assert ahead["flops_per_step"] == serial["flops_per_step"] > 0
    assert (serial["lanes"], ahead["lanes"]) == (1, 2)


def test_loader_starts_before_the_counted_step(tiny_recipe, tmp_path, monkeypatch):
    """Loader workers forked inside the FLOP-counted first step would inherit the counting mode and run every
    transform through it (the teacher-ahead loop then waited on them: docs/LOG.md, issue 20)."""
    import contextlib

    from clipslim.eval import mfu as mfu_module
    from clipslim.train import Trainer

    seen, original = [], mfu_module.MfuMeter.step

    @contextlib.contextmanager
    def step(self):
        if self.flops_per_step is None:
            seen.append(trainer.stream._it is not None)
        with original(self):
            yield

    monkeypatch.setattr(mfu_module.MfuMeter, "step", step)
    trainer = Trainer(tiny_recipe(steps=2), tmp_path / "run", progress=False)
    trainer.run()
    assert seen == [True]
