"""Near-duplicate skipping: the greedy keep rule on constructed embeddings, `clipslim dedup` finding planted copies
in a tiny shard set, and the loader's keep-list stage (counted, never as bad data)."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from clipslim.cli import main
from clipslim.data.dedup import near_duplicates
from clipslim.data.loader import DataError, SkipStats, check_bad_fraction, make_loader, read_keep_list
from clipslim.data.shapes import shard_samples
from clipslim.models import load_model
from clipslim.recipe import recipe_from_dict

TEACHER = "shapes-teacher:demo"  # trained: distinct shapes images stay below cosine 0.92 on this set


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_greedy_keeps_the_first_of_each_group():
    rng = np.random.default_rng(0)
    x = _unit(rng.normal(size=(8, 32)))
    x[5] = x[1]  # exact copy of 1
    x[6] = _unit(x[1:2] + 0.02 * rng.normal(size=(1, 32)))[0]  # near copy of 1
    x[7] = _unit(x[3:4] + 0.02 * rng.normal(size=(1, 32)))[0]  # near copy of 3
    found = near_duplicates(x, threshold=0.95, k=4)
    assert found.keep.tolist() == [True, True, True, True, True, False, False, False]
    assert [(i, j) for i, j, _ in found.pairs] == [(1, 5), (1, 6), (3, 7)]
    assert found.pairs[0][2] == pytest.approx(1.0, abs=1e-5) and all(s >= 0.95 for *_, s in found.pairs)
    assert found.saturated == 0
    assert near_duplicates(x, threshold=0.95, k=1).saturated == 5  # 1, 3, 5, 6, 7: their one neighbour is close
    assert near_duplicates(x, threshold=0.9999, k=4).keep.sum() == 7  # only the exact copy goes


def _edit_one_pixel(png: bytes) -> bytes:
    img = Image.open(io.BytesIO(png)).convert("RGB")
    img.putpixel((0, 0), (255, 0, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """24 distinct shapes samples in one shard; a second shard with an exact copy of train-3, a one-pixel edit of it
    and an exact copy of train-10 (same captions)."""
    out = tmp_path_factory.mktemp("planted")
    samples = list(shard_samples("train", 0, 0, 24, 0, 32))
    with wds.TarWriter(str(out / "a.tar"), encoder=False) as w:
        for s in samples:
            w.write(s)
    copies = [
        {**samples[3], "__key__": "copy-of-3"},
        {**samples[3], "__key__": "edit-of-3", "png": _edit_one_pixel(samples[3]["png"])},
        {**samples[10], "__key__": "copy-of-10"},
    ]
    with wds.TarWriter(str(out / "b.tar"), encoder=False) as w:
        for s in copies:
            w.write(s)
    return out


def test_dedup_command_finds_the_planted_copies(planted, tmp_path, capsys):
    keep = tmp_path / "keep.txt"
    args = ["dedup", "--teacher", TEACHER, "--data", str(planted), "--threshold", "0.97", "--out", str(keep)]
    assert main([*args, "--device", "cpu"]) == 0
    kept = read_keep_list(keep)
    assert len(kept) == 24 and not kept & {"copy-of-3", "edit-of-3", "copy-of-10"}
    report = json.loads((tmp_path / "keep.txt.report.json").read_text())
    assert (report["samples"], report["kept"], report["dropped"]) == (27, 24, 3)
    pairs = {(e["kept"], e["dropped"]) for e in report["examples"]}
    assert pairs == {("train-00000003", "copy-of-3"), ("train-00000003", "edit-of-3"), ("train-00000010", "copy-of-10")}
    assert report["dropped_same_caption"] == 3 and report["dropped_same_class"] == report["dropped_labelled"]
    printed = capsys.readouterr().out
    assert "27 samples: kept 24, dropped 3" in printed and "dropped edit-of-3" in printed


def test_dedup_refuses_repeated_keys(planted, tmp_path, capsys):
    data = tmp_path / "twice"
    data.mkdir()
    for name in ("a.tar", "a2.tar"):
        (data / name).write_bytes((planted / "a.tar").read_bytes())
    args = ["dedup", "--teacher", TEACHER, "--data", str(data), "--threshold", "0.97", "--out", str(tmp_path / "k")]
    assert main([*args, "--device", "cpu"]) == 2
    assert "occurs more than once; a keep-list needs unique keys" in capsys.readouterr().err


def test_loader_keeps_only_listed_keys_and_counts_the_rest(planted, tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("# dedup output\ntrain-00000001\n\ntrain-00000005\ncopy-of-10\n")
    bundle = load_model("tiny-student")
    batches = list(make_loader(str(planted), bundle.preprocess_val, bundle.tokenizer, 8, train=False, keep_list=keep))
    assert sorted(k for b in batches for k in b["key"]) == ["copy-of-10", "train-00000001", "train-00000005"]
    stats = SkipStats()
    for b in batches:
        stats.add(b["skipped"])
    assert stats.counts == {"not_in_keep_list": 24} and stats.total == 0
    assert stats.summary() == "no bad samples; 24 left out by the keep list"
    check_bad_fraction(stats.counts, 3, 0.1, "data")  # left out on purpose: not bad data


def test_keep_list_errors_and_recipe_field(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(DataError, match="no keys"):
        read_keep_list(empty)
    with pytest.raises(DataError, match="cannot read it"):
        read_keep_list(tmp_path / "missing.txt")
    data = {"train": "x", "keep_list": "keep.txt"}
    recipe = recipe_from_dict({"student": {"arch": "tiny-student"}, "data": data, "objectives": {"clip": 1}})
    assert recipe.data.keep_list == "keep.txt"
