"""Messy web data through every command that reads data: bad samples are skipped, counted by kind and printed; too
many bad ones stop the run with a one-line error and keep what was trained."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from clipslim.cli import main
from clipslim.data.shapes import generate_sample

# what the messy shards hold, by the kind each sample must be counted as
EXPECTED = {
    "undecodable_image": 2,
    "missing_image": 1,
    "missing_caption": 1,
    "empty_caption": 1,
    "bad_caption_encoding": 1,
    "oversized_caption": 1,
    "tiny_image": 1,
    "oversized_image": 1,
    "truncated_member": 1,
    "missing_shard": 1,
}


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG whose header claims width x height pixels (1.2 GB decoded) with almost no data: a decompression bomb."""
    data = bytearray(_png(Image.new("RGB", (1, 1))))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def sample(key: str, seed: int, split: str = "train", **override: bytes | None) -> dict:
    image, caption, meta = generate_sample(np.random.default_rng(seed), split, 32)
    out = {"__key__": key, "png": _png(image), "txt": caption.encode(), "json": json.dumps(meta).encode()}
    out.update(override)
    return {k: v for k, v in out.items() if v is not None}


def messy_samples(split: str) -> list[dict]:
    return [
        sample("bytes", 1, split, png=b"definitely not a png"),
        sample("zero", 2, split, png=None, jpg=b""),  # a zero-byte image file
        sample("noimage", 10, split, png=None),
        sample("nocap", 3, split, txt=None),
        sample("empty", 4, split, txt=b" \n\t"),
        sample("latin1", 5, split, txt="a red caf\xe9".encode("latin-1")),
        sample("huge-caption", 6, split, txt=b"a red circle " * 80_000),  # ~1 MB
        sample("one-pixel", 7, split, png=_png(Image.new("RGB", (1, 1)))),
        sample("bomb", 8, split, png=bomb_png()),
    ]


def write_messy(split_dir: Path, split: str) -> None:
    """Add a shard of bad samples and a shard cut short inside its last sample to a folder of good shards."""
    with wds.TarWriter(str(split_dir / "messy-000.tar"), encoder=False) as w:
        for s in messy_samples(split):
            w.write(s)
    cut = split_dir / "messy-001.tar"
    with wds.TarWriter(str(cut), encoder=False) as w:
        w.write(sample("last", 9, split))
    data = cut.read_bytes()
    cut.write_bytes(data[: data.index(b"last.png") + 512 + 100])  # inside the image bytes of the only sample


@pytest.fixture(scope="module")
def messy(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("messy")
    shutil.copytree(tiny_shapes, root, dirs_exist_ok=True)
    for split in ("train", "eval"):
        (root / split / "sizes.json").unlink(missing_ok=True)
        write_messy(root / split, split)
    return root


def train_pattern(root: Path) -> str:
    """All shards as a brace list with one more that does not exist (a shard lost in transfer)."""
    names = sorted(p.name for p in (root / "train").glob("*.tar")) + ["gone-000.tar"]
    return f"{root}/train/{{{','.join(names)}}}"


def recipe_file(tmp_path: Path, root: Path, **data: object) -> Path:
    recipe = {
        "name": "messy",
        "student": {"arch": "tiny-student"},
        "data": {"train": train_pattern(root), "eval": str(root), "num_workers": 0, **data},
        "objectives": {"clip": 1.0},
        "train": {"steps": 8, "batch_size": 32, "warmup": 1, "save_every": 3, "log_every": 1, "device": "cpu"},
    }
    path = tmp_path / "messy.yaml"
    path.write_text(json.dumps(recipe))
    return path


def test_bomb_fixture_is_a_real_png_header() -> None:
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bomb_png()))


def test_train_skips_counts_and_reports_every_kind(messy: Path, tmp_path: Path, caplog) -> None:
    """256 good pairs, batch 32: 8 steps read exactly one epoch, so every bad sample is counted exactly once."""
    out = tmp_path / "run"
    assert main(["train", str(recipe_file(tmp_path, messy)), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 8 and results["skipped"] == EXPECTED
    assert f"skipped {sum(EXPECTED.values())} bad training samples" in caplog.text
    assert results["eval"]["skipped"] == {k: v for k, v in EXPECTED.items() if k != "missing_shard"}


def test_too_many_bad_samples_stop_with_one_line_and_keep_the_work(messy: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code = main(["train", str(recipe_file(tmp_path, messy, max_bad_fraction=0.0)), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "data.train" in err and "were bad" in err and "limit 0%" in err
    stopped = int(err.split("stopped at step ")[1].split(";")[0])
    assert f"checkpoint step_{stopped:06d} kept, --resume continues" in err
    state = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert 3 <= stopped < 8 and state["step"] == stopped  # checked from the 4th batch on; trained steps are saved


def test_eval_skips_counts_and_prints(messy: Path, tmp_path: Path, caplog) -> None:
    code = main(["eval", "--model", "tiny-student", "--data", str(messy), "--out", str(tmp_path), "--task", "zeroshot"])
    assert code == 0
    doc = json.loads(next(tmp_path.glob("*zeroshot_classification.json")).read_text())
    assert doc["skipped"] == {k: v for k, v in EXPECTED.items() if k != "missing_shard"}
    assert f"skipped {sum(EXPECTED.values()) - 1} bad samples" in caplog.text


def test_eval_bad_fraction_limit(messy: Path, capsys) -> None:
    code = main(["eval", "--model", "tiny-student", "--data", str(messy), "--max-bad-fraction", "0.01"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar's last refresh
    assert code == 2 and err.startswith("clipslim eval: error: eval data") and "were bad" in err


def test_image_folder_with_broken_files(tmp_path: Path, caplog) -> None:
    """ImageFolder eval sets skip and count broken files instead of failing the whole evaluation."""
    for c in ("circle", "square"):
        (tmp_path / c).mkdir()
        for i in range(10):  # 2 bad of 22: under the default 10% limit
            (tmp_path / c / f"{i}.png").write_bytes(_png(Image.new("RGB", (32, 32), (20 * i, 0, 0))))
    (tmp_path / "circle" / "bad.png").write_bytes(b"")
    (tmp_path / "square" / "bomb.png").write_bytes(bomb_png())
    code = main(["eval", "--model", "tiny-student", "--data", str(tmp_path), "--out", str(tmp_path / "res")])
    assert code == 0
    doc = json.loads(next((tmp_path / "res").glob("*.json")).read_text())
    assert doc["skipped"] == {"undecodable_image": 1, "oversized_image": 1}


def test_export_of_a_corrupt_weights_file_is_one_line(tmp_path: Path, capsys) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"\x00" * 100)
    code = main(["export", "--model", f"tiny-student:{weights}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "w.safetensors" in err
    assert not (tmp_path / "out").exists()


def test_cache_teacher_skips_counts_and_trains(messy: Path, tmp_path: Path, capsys) -> None:
    """cache-teacher over the same messy shards: bad samples counted, then a cached run over them trains."""
    cache = tmp_path / "cache"
    argv = ["cache-teacher", "--teacher", "tiny-teacher", "--data", train_pattern(messy), "--out", str(cache)]
    assert main([*argv, "-k", "2", "--quiet", "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped"] == EXPECTED and summary["samples"] == 256
    recipe = recipe_file(tmp_path, messy, teacher_cache=str(cache))
    spec = json.loads(recipe.read_text())
    spec["objectives"] = {"affinity": 1.0}
    recipe.write_text(json.dumps(spec))
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["skipped"] == EXPECTED


def test_cache_teacher_bad_fraction_limit(messy: Path, tmp_path: Path, capsys) -> None:
    argv = ["cache-teacher", "--teacher", "tiny-teacher", "--data", str(messy / "train"), "--out", str(tmp_path / "c")]
    assert main([*argv, "--max-bad-fraction", "0", "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("clipslim cache-teacher: error: cache-teacher --data") and "were bad" in err
