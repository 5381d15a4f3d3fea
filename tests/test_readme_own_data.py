"""The README's "Your own teacher and your own data" walk-through, run command by command on tiny stand-ins: a
32 px teacher folder, a CSV of image-caption pairs, the tiny shapes shards, a 4-class image folder."""

from __future__ import annotations

import csv
import re
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipslim.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def readme_commands() -> list[str]:
    """The first bash block under the section heading, continuation lines joined, comments dropped."""
    text = README.read_text().split("### Your own teacher and your own data", 1)[1]
    block = re.search(r"```bash\n(.*?)```", text, re.S)[1].replace("\\\n", " ")
    return [line.strip() for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _pairs(root: Path) -> None:
    """``root/eval/<colour>/*.png`` (zero-shot) and ``root/train.csv`` (64 pairs over the same images)."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, rgb in COLOURS.items():
        (root / "eval" / name).mkdir(parents=True)
        for i in range(4):
            noise = torch.randint(-20, 21, (32, 32, 3), generator=gen)
            pixels = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8).numpy()
            path = root / "eval" / name / f"{i}.png"
            Image.fromarray(pixels).save(path)
            rows += [(str(path), f"a photo of something {name}"), (str(path), f"{name} colour")] * 4
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([("filepath", "caption"), *rows])


def stand_ins(tmp: Path, shards: Path) -> list[tuple[str, str]]:
    """README path or setting -> tiny stand-in, applied in order."""
    return [
        ("ViT-B-32:laion2b_s34b_b79k", "tiny-teacher"),
        ("ViT-B-32-half", "tiny-student"),
        ("/models/", f"{tmp}/models/"),
        ("/data/shards", str(shards)),
        ("/data/", f"{tmp}/data/"),
        ("runs/", f"{tmp}/runs/"),
        ("--out my-student", f"--out {tmp}/my-student"),
        ("local-dir:my-student", f"local-dir:{tmp}/my-student"),
        ("--batch 32", "--batch 4 --seconds 0.02 --no-progress"),
        ("train.batch_size=32", "train.batch_size=16"),
        ("train.steps=2000", "train.steps=2 --set train.warmup=1 --set data.num_workers=0 --quiet"),
    ]


def _run(command: str) -> None:
    argv = shlex.split(command)
    if argv[0] == "python":
        exec(argv[argv.index("-c") + 1], {})
        return
    assert argv[0] == "clipslim"
    assert main(argv[1:]) in (0, None), command


@pytest.mark.slow  # eight commands end to end on tiny models: ~20 s on 2 CPU cores
def test_readme_walkthrough_runs_on_tiny_stand_ins(tiny_shapes, tmp_path, capsys):
    _pairs(tmp_path / "data")
    commands = readme_commands()
    assert [c.split()[1] for c in commands if c.startswith("clipslim")] == [
        "export", "plan", "inherit", "train", "cache-teacher", "train", "eval", "export",
    ]  # fmt: skip
    for command in commands:
        for old, new in stand_ins(tmp_path, tiny_shapes / "train"):
            command = command.replace(old, new)
        _run(command)
    assert (tmp_path / "runs" / "plan" / "plan.json").is_file()
    assert (tmp_path / "runs" / "my-student-cached" / "student" / "open_clip_config.json").is_file()
    assert (tmp_path / "my-student" / "open_clip_config.json").is_file()
    assert "zeroshot_classification" in capsys.readouterr().out
