"""Loaders: batch format, bad samples skipped and counted by kind (in workers too), CSV input, determinism."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image

import clipslim.models  # noqa: F401  (registers tiny-teacher with open_clip)
from clipslim.data import DataError, SkipStats, make_loader, num_samples, resolve_shards, write_shapes
from clipslim.data.shapes import generate_sample

INJECTED = {
    "undecodable_image": 2,
    "missing_caption": 1,
    "empty_caption": 1,
    "bad_caption_encoding": 1,
    "missing_image": 1,
    "truncated_member": 1,
}


@pytest.fixture(scope="module")
def clip() -> tuple:
    _, pre_train, pre_val = open_clip.create_model_and_transforms("tiny-teacher")
    return pre_train, pre_val, open_clip.get_tokenizer("tiny-teacher")


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, n_train=240, n_eval=70, shard_size=60, workers=0, progress=False)
    return root


def good_sample(key: str, seed: int, size: int = 64) -> dict:
    image, caption, meta = generate_sample(np.random.default_rng(seed), "train", size)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {"__key__": key, "png": buf.getvalue(), "txt": caption.encode(), "json": json.dumps(meta).encode()}


def write_tar(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)


def truncate_inside(path: Path, key: str, offset: int) -> None:
    """Cut the tar `offset` bytes after the start of the header of `key`'s first member."""
    data = path.read_bytes()
    path.write_bytes(data[: data.index(key.encode()) + offset])


@pytest.fixture(scope="module")
def corrupt_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str]]:
    root = tmp_path_factory.mktemp("corrupt")
    good = {f"a{i}": good_sample(f"a{i}", i) for i in range(6)} | {
        f"b{i}": good_sample(f"b{i}", 10 + i) for i in range(6)
    }
    good |= {f"c{i}": good_sample(f"c{i}", 20 + i) for i in range(3)}
    bad_a = [
        good_sample("bad-bytes", 1) | {"png": b"definitely not a png"},
        good_sample("bad-zero", 2) | {"png": b""},
        {k: v for k, v in good_sample("bad-notxt", 3).items() if k != "txt"},
    ]
    bad_b = [
        good_sample("bad-empty", 4) | {"txt": b"  \n\t"},
        good_sample("bad-latin1", 5) | {"txt": "a red caf\xe9".encode("latin-1")},
        {k: v for k, v in good_sample("bad-nopng", 6).items() if k != "png"},
    ]
    a = [good[f"a{i}"] for i in range(6)]
    write_tar(root / "part-a.tar", a[:2] + bad_a[:2] + a[2:4] + bad_a[2:] + a[4:])
    write_tar(root / "part-b.tar", [good[f"b{i}"] for i in range(6)] + bad_b)  # bad samples at the very end
    write_tar(root / "part-c.tar", [good[f"c{i}"] for i in range(3)] + [good_sample("c-cut", 7)])
    truncate_inside(root / "part-c.tar", "c-cut", 512 + 600)  # inside the png data of the last sample
    return root, set(good)


def run_epoch(loader: torch.utils.data.DataLoader) -> tuple[list[dict], SkipStats]:
    stats, batches = SkipStats(), []
    for batch in loader:
        stats.add(batch["skipped"])
        batches.append(batch)
    return batches, stats


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_batch_format(shapes_dir: Path, clip: tuple) -> None:
    pre_train, _, tokenizer = clip
    batches, stats = run_epoch(make_loader(shapes_dir / "train", pre_train, tokenizer, 32, train=True))
    assert len(batches) == 240 // 32 and stats.summary() == "no bad samples"
    batch = batches[0]
    assert batch["image"].shape == (32, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (32, 16) and batch["text"].dtype == torch.int64
    assert len(batch["key"]) == len(batch["meta"]) == 32 and batch["skipped"] == {}
    assert {"objects", "cls", "heldout", "n_objects"} <= set(batch["meta"][0])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_skipped_and_counted(corrupt_dir: tuple[Path, set[str]], clip: tuple, num_workers: int) -> None:
    root, good = corrupt_dir
    _, pre_val, tokenizer = clip
    loader = make_loader(root, pre_val, tokenizer, 4, train=False, num_workers=num_workers)
    batches, stats = run_epoch(loader)
    assert sorted(keys_of(batches)) == sorted(good)
    assert stats.counts == INJECTED
    assert stats.summary().startswith("skipped 7 bad samples: undecodable_image=2, ")


def test_counts_survive_drop_last(corrupt_dir: tuple[Path, set[str]], clip: tuple) -> None:
    root, good = corrupt_dir
    pre_train, _, tokenizer = clip
    batches, stats = run_epoch(make_loader(root, pre_train, tokenizer, 2, train=True, num_workers=2))
    assert all(len(b["key"]) == 2 for b in batches) and len(set(keys_of(batches))) == len(keys_of(batches))
    assert stats.counts == INJECTED  # skips in a dropped tail are still reported, in the last batch
    # Unshuffled: 6 good then 3 bad; batch 4 keeps b0-b3 and drops b4, b5 and the 3 skips seen after b3.
    loader = make_loader(root / "part-b.tar", pre_train, tokenizer, 4, train=True, shuffle_buffer=1)
    batches, stats = run_epoch(loader)
    assert keys_of(batches) == ["b0", "b1", "b2", "b3"]
    assert stats.counts == {"empty_caption": 1, "bad_caption_encoding": 1, "missing_image": 1}


def test_worker_without_batches_reports_its_skips(corrupt_dir: tuple[Path, set[str]], clip: tuple, caplog) -> None:
    """A training reader that yields no full batch (here 3 good samples, batch 4, drop_last) passes its skips on as
    a skips-only item, which the trainer counts; an eval reader keeps its partial batch, which carries them."""
    pre_train, pre_val, tokenizer = clip
    batches, stats = run_epoch(make_loader(corrupt_dir[0] / "part-c.tar", pre_train, tokenizer, 4, train=True))
    assert batches == [{"skipped": {"truncated_member": 1}}] and stats.counts == {"truncated_member": 1}
    batches, stats = run_epoch(make_loader(corrupt_dir[0] / "part-c.tar", pre_val, tokenizer, 4, train=False))
    assert len(batches) == 1 and stats.counts == {"truncated_member": 1}  # a partial batch carries them


@pytest.mark.parametrize("offset", [100, 512 + 5, 1024 + 100, 1536 + 50, -1])
def test_truncated_shard_counts_once(tmp_path: Path, clip: tuple, offset: int) -> None:
    """Wherever a shard is cut inside its last sample, that sample counts once and the earlier ones all arrive."""
    _, pre_val, tokenizer = clip
    path = tmp_path / "cut.tar"
    write_tar(path, [good_sample(f"k{i}", i) for i in range(3)] + [good_sample("last", 9)])
    data = path.read_bytes()
    if offset < 0:  # inside the caption, the last member
        offset = data.index(b"last.txt") - data.index(b"last.json") + 512 + 3
    truncate_inside(path, "last", offset)
    batches, stats = run_epoch(make_loader(path, pre_val, tokenizer, 2, train=False))
    assert keys_of(batches) == ["k0", "k1", "k2"] and stats.counts == {"truncated_member": 1}


def test_unreadable_shard_is_a_read_error(tmp_path: Path, clip: tuple) -> None:
    _, pre_val, tokenizer = clip
    write_tar(tmp_path / "a.tar", [good_sample("k0", 0)])
    (tmp_path / "b.tar").write_bytes(b"\x07" * 2048)
    batches, stats = run_epoch(make_loader(tmp_path, pre_val, tokenizer, 2, train=False))
    assert keys_of(batches) == ["k0"] and stats.counts == {"read_error": 1}


def test_decompression_bomb_is_refused(tmp_path: Path, clip: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    _, pre_val, tokenizer = clip
    write_tar(tmp_path / "a.tar", [good_sample("small", 0, size=32), good_sample("big", 1, size=64)])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 64x64 only warns (< 2x), which must count as well
    batches, stats = run_epoch(make_loader(tmp_path, pre_val, tokenizer, 2, train=False))
    assert keys_of(batches) == ["small"] and stats.counts == {"oversized_image": 1}


def test_csv_loader(tmp_path: Path, clip: tuple) -> None:
    _, pre_val, tokenizer = clip
    (tmp_path / "img").mkdir()
    for i in range(4):
        generate_sample(np.random.default_rng(i), "eval")[0].save(tmp_path / "img" / f"{i}.png")
    rows = [
        "filepath,caption",
        "img/0.png,a red circle",
        f'{tmp_path / "img" / "1.png"},"a blue star, on the left"',
        "img/2.png,   ",
        "img/3.png",
        "img/missing.png,a ghost",
        "img/1.png,a blue star again",
    ]
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    batches, stats = run_epoch(make_loader(csv_path, pre_val, tokenizer, 2, train=False))
    assert keys_of(batches) == ["img/0.png", str(tmp_path / "img" / "1.png"), "img/1.png"]
    assert stats.counts == {"empty_caption": 1, "missing_caption": 1, "missing_image": 1}
    assert batches[0]["image"].shape == (2, 3, 32, 32) and batches[-1]["text"].shape == (1, 16)
    assert batches[0]["meta"] == [{}, {}]
    assert num_samples(csv_path) == 6


def test_csv_without_columns_is_a_data_error(tmp_path: Path, clip: tuple) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("path,text\na.png,hi\n")
    with pytest.raises(DataError, match="bad.csv.*missing filepath,caption"):
        make_loader(path, clip[1], clip[2], 2, train=False)


@pytest.mark.parametrize("name", ["nowhere", "nowhere.tar", "nowhere.csv", "nowhere/s-{000000..000003}.tar"])
def test_missing_path_is_a_data_error(tmp_path: Path, clip: tuple, name: str) -> None:
    with pytest.raises(DataError, match="data path not found") as err:
        make_loader(tmp_path / name, clip[1], clip[2], 2, train=False)
    assert str(tmp_path / name) in str(err.value)


def test_resolve_shards(shapes_dir: Path) -> None:
    train = shapes_dir / "train"
    shards = resolve_shards(train)
    assert [Path(s).name for s in shards] == [f"shapes-train-00000{i}.tar" for i in range(4)]
    assert resolve_shards(f"{train}/shapes-train-{{000001..000002}}.tar") == shards[1:3]
    assert resolve_shards(shards[0]) == shards[:1]
    with pytest.raises(DataError, match="no .tar shards"):
        resolve_shards(shapes_dir)


def test_num_samples(shapes_dir: Path, tmp_path: Path) -> None:
    assert num_samples(shapes_dir / "train") == 240 and num_samples(shapes_dir / "eval") == 70
    assert num_samples(shapes_dir / "eval" / "shapes-eval-000001.tar") == 10
    assert num_samples(f"{shapes_dir}/train/shapes-train-{{000000..000001}}.tar") == 120
    (shapes_dir / "train" / "sizes.json").rename(tmp_path / "sizes.json")  # info.json alone covers whole splits
    try:
        assert num_samples(shapes_dir / "train") == 240
        assert num_samples(shapes_dir / "train" / "shapes-train-000000.tar") is None
    finally:
        (tmp_path / "sizes.json").rename(shapes_dir / "train" / "sizes.json")
    assert num_samples(tmp_path / "nowhere") is None


def _signature(batches: list[dict]) -> list[tuple]:
    return [(tuple(b["key"]), b["image"].sum().item(), b["text"].sum().item()) for b in batches]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_order_is_reproducible(shapes_dir: Path, clip: tuple, num_workers: int) -> None:
    pre_train, _, tokenizer = clip

    def epoch(e: int) -> list[dict]:
        loader = make_loader(
            shapes_dir / "train", pre_train, tokenizer, 16, train=True, epoch=e, num_workers=num_workers
        )
        return run_epoch(loader)[0]

    first, again, other = epoch(0), epoch(0), epoch(1)
    assert _signature(first) == _signature(again)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again, strict=True))
    assert keys_of(first) != keys_of(other) and keys_of(first)[:16] != sorted(keys_of(first))[:16]


def test_random_transforms_leave_global_rng_alone(shapes_dir: Path, clip: tuple) -> None:
    pre_train, _, tokenizer = clip
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_epoch(make_loader(shapes_dir / "eval", pre_train, tokenizer, 16, train=True))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("train", [False, True])
def test_workers_split_shards_without_duplicates(shapes_dir: Path, clip: tuple, train: bool) -> None:
    pre_train, _, tokenizer = clip
    all_keys = {f"train-{i:08d}" for i in range(240)}
    keys = keys_of(
        run_epoch(make_loader(shapes_dir / "train", pre_train, tokenizer, 16, train=train, num_workers=2))[0]
    )
    assert len(keys) == len(set(keys))
    if train:  # each of the two workers may drop up to 15 samples of its tail
        assert set(keys) <= all_keys and len(keys) >= 240 - 2 * 15
    else:
        assert set(keys) == all_keys


def test_rank_split(shapes_dir: Path, clip: tuple) -> None:
    _, pre_val, tokenizer = clip
    parts = [
        set(
            keys_of(
                run_epoch(make_loader(shapes_dir / "train", pre_val, tokenizer, 32, train=False, rank=r, world_size=2))[
                    0
                ]
            )
        )
        for r in range(2)
    ]
    assert not parts[0] & parts[1] and len(parts[0] | parts[1]) == 240
    with pytest.raises(DataError, match="cannot be split"):
        make_loader(shapes_dir / "eval", pre_val, tokenizer, 2, train=False, rank=2, world_size=3)


def test_skip_stats_summary() -> None:
    stats = SkipStats({})
    assert stats.summary() == "no bad samples" and stats.total == 0
    stats.add({"empty_caption": 1, "undecodable_image": 2})
    stats.add({"undecodable_image": 0})
    assert stats.total == 3
    assert stats.summary() == "skipped 3 bad samples: undecodable_image=2, empty_caption=1"


class _WorkerSignals(torch.utils.data.IterableDataset):
    """Yields what a worker sees: whether SIGTERM is still blocked there, and whether it ignores SIGTERM."""

    def __iter__(self):
        import signal

        blocked = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        yield {"blocked": blocked, "ignored": signal.getsignal(signal.SIGTERM) == signal.SIG_IGN}


def _signalled_before_init(worker_id: int) -> None:
    """A group SIGTERM that lands between the fork and the worker's init (workers are re-forked every epoch)."""
    import os
    import signal

    from clipslim.data.loader import _leave_stop_signals_to_main

    os.kill(os.getpid(), signal.SIGTERM)
    _leave_stop_signals_to_main(worker_id)


@pytest.mark.parametrize("guarded", [True, False])
def test_a_stop_signal_before_a_worker_inits_does_not_kill_it(guarded: bool) -> None:
    from clipslim.data.loader import iterate

    loader = torch.utils.data.DataLoader(
        _WorkerSignals(), batch_size=None, num_workers=1, worker_init_fn=_signalled_before_init
    )
    if not guarded:  # the plain iter() this guards against: the worker dies of the signal
        with pytest.raises(RuntimeError, match="exited unexpectedly|killed by signal"):
            list(iter(loader))
        return
    (seen,) = list(iterate(loader))
    assert seen == {"blocked": False, "ignored": True}  # ignored, and the mask lifted after init
