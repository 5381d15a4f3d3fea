"""Cached teacher: replay is bit-exact, mismatches are refused, caching resumes, cached training = online on the
same pixels (and resumes exactly)."""

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import seeded_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clipslim.config import ConfigError
from clipslim.data import teacher_cache as tc
from clipslim.data.augment import AugmentConfig, AugParams, Replay, pack, sample_params, unpack
from clipslim.data.loader import make_loader
from clipslim.distiller import CachedTeacher, OnlineTeacher, encode
from clipslim.export import export_open_clip
from clipslim.io import load_tensors
from clipslim.models import load_model
from clipslim.recipe import recipe_from_dict
from clipslim.train import Trainer, train

K = 3


@pytest.fixture(scope="module")
def teacher_spec(tmp_path_factory) -> str:
    """A fixed tiny teacher as a hub folder, so every load gives the same weights."""
    b = seeded_model("tiny-teacher")
    out = tmp_path_factory.mktemp("teacher") / "tiny-teacher"
    export_open_clip(b.model, b.model_cfg, out, arch="tiny-teacher")
    return str(out)


@pytest.fixture(scope="module")
def cached(tiny_shapes, teacher_spec, tmp_path_factory):
    """(cache dir, pixels the teacher saw per (shard, key) as [K, 3, H, W]) for the tiny train split."""
    seen: list[torch.Tensor] = []
    original = tc._embed

    def recording(teacher, pixels, captions, device):
        seen.extend(pixels)
        return original(teacher, pixels, captions, device)

    out = tmp_path_factory.mktemp("cache")
    tc._embed = recording
    try:
        summary = tc.cache_teacher(
            teacher_spec, tiny_shapes / "train", out, tc.CacheOptions(K, batch_size=40), progress=False
        )
    finally:
        tc._embed = original
    assert summary["samples"] == 256 and summary["cached_now"] == 4
    views, i = {}, 0
    for shard in sorted((tiny_shapes / "train").glob("*.tar")):
        with safe_open(str(tc.sidecar_path(out, shard)), "pt") as f:
            for key in json.loads(f.metadata()["keys"]):
                views[(shard.name, key)] = torch.stack(seen[i : i + K])
                i += K
    assert i == len(seen)
    return out, views


def _open(cache_dir, data, **kw):
    args = {"image_size": 32, "mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711)}
    return tc.open_teacher_cache(cache_dir, data, **{**args, **kw})


# ---------------------------------------------------------------- augmentation


def test_params_are_a_pure_function_of_the_seed_and_pack_roundtrips():
    cfg = AugmentConfig(scale=(0.3, 1.0), flip=0.5, brightness=0.4, contrast=0.3, saturation=0.2)
    draws = [[sample_params(cfg, 50, 40, seed * 10 + j) for j in range(2)] for seed in range(30)]
    assert draws[7][1] == sample_params(cfg, 50, 40, 71)
    flat = [p for row in draws for p in row]
    assert all(0 <= p.top and p.top + p.height <= 40 and 0 <= p.left and p.left + p.width <= 50 for p in flat)
    assert len({p.flip for p in flat}) == 2 and len({(p.height, p.width) for p in flat}) > 10
    assert all(torch.tensor(p.jitter, dtype=torch.float16).tolist() == list(p.jitter) for p in flat)  # fp16-exact
    packed = pack(draws)
    assert [unpack(packed, i, j) for i in range(30) for j in range(2)] == flat


def test_replay_applies_crop_flip_and_jitter():
    from PIL import Image

    img = Image.new("RGB", (8, 8), (100, 50, 20))
    img.putpixel((0, 0), (255, 255, 255))
    replay = Replay(AugmentConfig(), 8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    same = replay.apply(img, AugParams(0, 0, 8, 8, False, (1.0, 1.0, 1.0), 0))
    assert same[:, 0, 0].tolist() == [1.0, 1.0, 1.0] and same[0, 4, 4].item() == pytest.approx(100 / 255)
    flipped = replay.apply(img, AugParams(0, 0, 8, 8, True, (1.0, 1.0, 1.0), 0))
    assert flipped[:, 0, 7].tolist() == [1.0, 1.0, 1.0]
    darker = replay.apply(img, AugParams(0, 0, 8, 8, False, (0.5, 1.0, 1.0), 0))
    assert darker[0, 4, 4].item() == pytest.approx(50 / 255)


# ---------------------------------------------------------------- replay


def test_replayed_images_equal_the_cached_ones(cached, tiny_shapes, teacher_spec):
    cache_dir, views = cached
    cache = _open(cache_dir, tiny_shapes / "train")
    teacher = load_model(teacher_spec).model.eval()
    picked = set()
    for epoch in (0, 1):
        loader = make_loader(
            tiny_shapes / "train", None, load_model("tiny-student").tokenizer, 64, train=True, epoch=epoch,
            teacher_cache=cache,
        )  # fmt: skip
        for batch in loader:
            for i, key in enumerate(batch["key"]):
                shard = next(s for s, k in views if k == key)
                k, _ = cache.choice(f"0:{epoch}", shard, key, 1)
                picked.add((key, epoch, k))
                assert torch.equal(batch["image"][i], views[(shard, key)][k]), f"{key} view {k} differs"
            with torch.no_grad():
                again = teacher.encode_image(batch["image"], normalize=True)
            torch.testing.assert_close(batch["teacher_image"].float(), again, atol=2e-3, rtol=0)
            assert batch["teacher_image"].dtype == torch.float16 and batch["teacher_text"].shape == (64, 32)
    assert {k for *_, k in picked} == set(range(K))
    changed = {key for key, e, k in picked if e == 0} & {
        key for key, e, k in picked if e == 1 and (key, 0, k) not in picked
    }
    assert changed, "the stored view picked for a sample never changes between epochs"


def test_a_student_normalised_otherwise_gets_the_cached_crops_its_own_way(cached, tiny_shapes):
    """The manifest records what the *teacher* read; the student replays the same crop with its own mean/std."""
    cache_dir, views = cached
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    cache = _open(cache_dir, tiny_shapes / "train", mean=mean, std=std)
    teacher_mean, teacher_std = (torch.tensor(cache.manifest["image"][k])[:, None, None] for k in ("mean", "std"))
    loader = make_loader(
        tiny_shapes / "train", None, load_model("tiny-student").tokenizer, 64, train=True, teacher_cache=cache
    )
    batch = next(iter(loader))
    for i, key in enumerate(batch["key"]):
        shard = next(s for s, k in views if k == key)
        k, _ = cache.choice("0:0", shard, key, 1)
        raw_teacher = views[(shard, key)][k] * teacher_std + teacher_mean
        raw_student = batch["image"][i] * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
        torch.testing.assert_close(raw_student, raw_teacher, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- refusals


def test_mismatches_are_refused_with_one_line(cached, tiny_shapes, tmp_path):
    cache_dir, _ = cached
    train_dir = tiny_shapes / "train"
    cases = []

    def refused(match, fn):
        with pytest.raises(tc.CacheError, match=match) as err:
            fn()
        assert "\n" not in str(err.value)
        cases.append(match)

    refused("no manifest.json", lambda: _open(tmp_path, train_dir))
    refused("for teacher .*recipe names tiny-other", lambda: _open(cache_dir, train_dir, teacher="tiny-other"))
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(next(train_dir.glob("*.tar")), other / "renamed.tar")
    refused("another dataset.*no renamed.tar", lambda: _open(cache_dir, other))
    changed = tmp_path / "changed"
    changed.mkdir()
    first = sorted(train_dir.glob("*.tar"))[0]
    data = bytearray(first.read_bytes())
    data[600] ^= 1
    (changed / first.name).write_bytes(bytes(data))
    refused("another dataset.*changed since", lambda: _open(cache_dir, changed))
    other_weights = seeded_model("tiny-teacher").model
    torch.nn.init.zeros_(other_weights.text_projection)
    cache = _open(cache_dir, train_dir)
    refused("other weights", lambda: tc.check_teacher_weights(cache, other_weights))

    broken = tmp_path / "broken"
    shutil.copytree(cache_dir, broken)
    side = sorted(broken.glob(f"*{tc.SUFFIX}"))
    side[0].unlink()
    refused("sidecar missing", lambda: _open(broken, train_dir))
    shutil.copy(tc.sidecar_path(cache_dir, first), side[0])
    side[1].write_bytes(side[1].read_bytes()[:-100])
    refused("truncated or corrupt sidecar", lambda: _open(broken, train_dir))
    shutil.copy(tc.sidecar_path(cache_dir, side[1].name.removesuffix(tc.SUFFIX)), side[1])
    tensors = load_file(str(side[2]))
    with safe_open(str(side[2]), "pt") as f:
        meta = f.metadata()
    tensors["text"][3, 0, 5] = float("nan")
    save_file(tensors, str(side[2]), metadata=meta)
    refused("NaN/inf in stored text", lambda: _open(broken, train_dir))
    shutil.rmtree(broken)
    refused(
        "different teacher/augment",
        lambda: tc.cache_teacher(
            "tiny-teacher", train_dir, cache_dir, tc.CacheOptions(K, AugmentConfig(flip=0.5)), progress=False
        ),
    )
    assert len(cases) == 9


def test_recipe_accepts_a_cache_instead_of_a_teacher():
    base = {
        "student": {"arch": "tiny-student"},
        "data": {"train": "x", "teacher_cache": "c"},
        "objectives": {"affinity": 1.0, "icl": 1.0},
    }
    assert recipe_from_dict(base).teacher is None
    with pytest.raises(ConfigError, match="data.teacher_cache: needs .tar shards and augment: false"):
        recipe_from_dict({**base, "data": {"train": "x", "teacher_cache": "c", "augment": True}})
    with pytest.raises(ConfigError, match="teacher: required by objective"):
        recipe_from_dict({**base, "data": {"train": "x"}})


# ---------------------------------------------------------------- resume of caching


def test_caching_resumes_after_a_crash(cached, tiny_shapes, teacher_spec, tmp_path, monkeypatch):
    cache_dir, _ = cached
    original, calls = tc._cache_shard, []

    def crash_on_third(*args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(args[1])
        return original(*args, **kw)

    monkeypatch.setattr(tc, "_cache_shard", crash_on_third)
    opts = tc.CacheOptions(K, batch_size=40)
    with pytest.raises(KeyboardInterrupt):
        tc.cache_teacher(teacher_spec, tiny_shapes / "train", tmp_path, opts, progress=False)
    done = sorted(tmp_path.glob(f"*{tc.SUFFIX}"))
    assert len(done) == 2 and not list(tmp_path.glob(".*.tmp"))
    stamps = {p.name: p.stat().st_mtime_ns for p in done}
    monkeypatch.setattr(tc, "_cache_shard", original)
    summary = tc.cache_teacher(teacher_spec, tiny_shapes / "train", tmp_path, opts, progress=False)
    assert (summary["resumed_done"], summary["cached_now"], summary["samples"]) == (2, 2, 128)
    assert {p.name: p.stat().st_mtime_ns for p in done} == stamps, "finished shards were recomputed"
    for p in sorted(cache_dir.glob(f"*{tc.SUFFIX}")):  # the resumed cache equals one written in one go
        a, b = load_file(str(tmp_path / p.name)), load_file(str(p))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- training


def _recipe(tiny_shapes, cache_dir, teacher_spec, **train):
    return recipe_from_dict(
        {
            "name": "cached",
            "teacher": teacher_spec,
            "student": {"arch": "tiny-student", "init": "inherit"},
            "data": {"train": str(tiny_shapes / "train"), "num_workers": 0, "teacher_cache": str(cache_dir)},
            "objectives": {"affinity": {"weight": 1.0, "teacher_scale": 50.0}},
            "train": {"steps": 3, "batch_size": 32, "warmup": 1, "log_every": 1, "save_every": 100, **train},
        }
    )


def _affinity_reference(student, teacher, scale_t: float) -> torch.Tensor:
    """½[CE(sm(τ_t I_t T_tᵀ), τ_s I_s T_sᵀ) + CE(sm(τ_t T_t I_tᵀ), τ_s T_s I_sᵀ)], written out."""
    p = (scale_t * teacher.image @ teacher.text.T).softmax(1)
    q = (scale_t * teacher.text @ teacher.image.T).softmax(1)
    s = student.logit_scale * student.image @ student.text.T
    i2t = -(p * s.log_softmax(1)).sum(1).mean()
    t2i = -(q * s.T.log_softmax(1)).sum(1).mean()
    return 0.5 * (i2t + t2i)


def test_cached_training_equals_online_teacher_on_the_same_pixels(cached, tiny_shapes, teacher_spec, tmp_path):
    cache_dir, _ = cached
    recipe = _recipe(tiny_shapes, cache_dir, teacher_spec)
    trainer = Trainer(recipe, tmp_path / "cached", progress=False)
    assert trainer.built.teacher is None and isinstance(trainer.teacher, CachedTeacher)  # the teacher never runs
    online = OnlineTeacher(load_model(teacher_spec).model)
    trainer._prepare_run_dir()
    for _ in range(3):
        batch = trainer.stream.next()
        ref_teacher = online(batch)
        with torch.no_grad():
            expected = _affinity_reference(
                encode(trainer.model.student, batch["image"], batch["text"]), ref_teacher, 50
            )
        out = trainer.train_step(batch)
        trainer.step += 1
        assert out["affinity_loss"].item() == pytest.approx(expected.item(), rel=2e-3)
        assert out["affinity_loss"].item() != pytest.approx(float(torch.log(torch.tensor(32.0))), rel=1e-3)


def test_cached_training_resumes_exactly(cached, tiny_shapes, teacher_spec, tmp_path):
    cache_dir, _ = cached
    recipe = _recipe(tiny_shapes, cache_dir, teacher_spec, steps=6, batch_size=64)  # 4 batches/epoch: crosses one
    train(recipe, tmp_path / "straight", progress=False)
    first = Trainer(recipe, tmp_path / "resumed", progress=False)
    original = first.train_step

    def step_then_sigterm(*args):
        out = original(*args)
        if first.step + 1 == 5:  # stop inside the second epoch
            signal.raise_signal(signal.SIGTERM)
        return out

    first.train_step = step_then_sigterm
    assert first.run() == {"stopped_at": 5}
    train(recipe, tmp_path / "resumed", resume=True, progress=False)
    a = load_tensors(tmp_path / "straight" / "student" / "open_clip_model.safetensors")
    b = load_tensors(tmp_path / "resumed" / "student" / "open_clip_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed cached run diverged"


def test_cli_caches_and_reports(tiny_shapes, teacher_spec, tmp_path, capsys):
    from clipslim.cli import main

    shard = sorted((tiny_shapes / "train").glob("*.tar"))[0]
    assert (
        main(
            [
                "cache-teacher",
                "--teacher",
                teacher_spec,
                "--data",
                str(shard),
                "-k",
                "2",
                "--out",
                str(tmp_path),
                "--quiet",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 64 and summary["bytes_per_sample"] > 2 * 32 * 2
    assert (
        main(["cache-teacher", "--teacher", teacher_spec, "--data", str(tmp_path / "nope"), "--out", str(tmp_path)])
        == 2
    )
    assert "data path not found" in capsys.readouterr().err
    assert Path(tmp_path / tc.MANIFEST).is_file()


def test_several_captions_and_ranks_caching_their_own_shards(teacher_spec, tmp_path):
    """Extra captions in the json are cached and picked per epoch; two ranks together write the whole cache."""
    import io

    import webdataset as wds
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for s in range(2):
        with wds.TarWriter(str(data / f"multi-{s}.tar")) as w:
            for i in range(6):
                png = io.BytesIO()
                Image.new("RGB", (40, 36), (40 * i, 90, 200 - 30 * s)).save(png, format="PNG")
                extra = [f"caption {j} of image {s}-{i}" for j in range(i % 3)]
                w.write(
                    {
                        "__key__": f"{s}-{i}",
                        "png": png.getvalue(),
                        "txt": f"image {s}-{i}",
                        "json": json.dumps({"captions": extra}),
                    }
                )
    opts = tc.CacheOptions(2, batch_size=4)
    for rank in (1, 0):
        summary = tc.cache_teacher(teacher_spec, data, tmp_path / "c", opts, rank=rank, world_size=2, progress=False)
        assert (summary["shards"], summary["cached_now"], summary["samples"]) == (1, 1, 6)
    cache = _open(tmp_path / "c", data)
    teacher = load_model(teacher_spec)
    seen = {}
    for epoch in range(4):
        loader = make_loader(data, None, teacher.tokenizer, 12, train=False, epoch=epoch, teacher_cache=cache)
        batch = next(iter(loader))
        with torch.no_grad():
            again = teacher.model.encode_text(batch["text"], normalize=True)
        torch.testing.assert_close(batch["teacher_text"].float(), again, atol=2e-3, rtol=0)
        for key, text in zip(batch["key"], batch["text"], strict=True):
            seen.setdefault(key, set()).add(tuple(text.tolist()))
    assert len(seen) == 12 and max(len(v) for v in seen.values()) > 1  # several captions in use
    assert all(len(v) == 1 for k, v in seen.items() if int(k[-1]) % 3 == 0)  # no extras: always the txt


def test_every_embedding_objective_trains_from_the_cache(cached, tiny_shapes, teacher_spec, tmp_path):
    cache_dir, _ = cached
    recipe = _recipe(tiny_shapes, cache_dir, teacher_spec, steps=2)
    recipe.teacher = None  # no teacher at all: dims and scale come from the manifest
    recipe.student.init = "random"
    recipe.objectives = {name: 1.0 for name in ("affinity", "feature", "icl", "gradient", "fusion", "masked_feature")}
    trainer = Trainer(recipe, tmp_path / "all", progress=False)
    trainer._prepare_run_dir()
    out = trainer.train_step(trainer.stream.next())
    losses = {k: v.item() for k, v in out.items() if k.endswith("_loss")}
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(v)) and v > 0 for v in losses.values()), losses


def test_positives_are_mined_from_cached_embeddings(cached, tiny_shapes, teacher_spec, tmp_path):
    from clipslim.config import build
    from clipslim.objectives.positives import PositivesConfig, mine

    cache_dir, _ = cached
    positives = {"cascade": [{"view": "image", "top_k": 4}, {"view": "text", "threshold": 0.5}]}
    recipe = recipe_from_dict(
        {
            "student": {"arch": "tiny-student"},  # no teacher at all: only the cache
            "data": {"train": str(tiny_shapes / "train"), "num_workers": 0, "teacher_cache": str(cache_dir)},
            "objectives": {"clip": {"weight": 1.0, "positives": positives}, "cross_kd": 1.0},
            "train": {"steps": 2, "batch_size": 32, "warmup": 1, "log_every": 1, "save_every": 100},
        }
    )
    trainer = Trainer(recipe, tmp_path / "pos", progress=False)
    assert isinstance(trainer.teacher, CachedTeacher)  # clip's teacher-mined positives make the cache run
    trainer._prepare_run_dir()
    batch = trainer.stream.next()
    out = trainer.train_step(batch)
    mined = mine(build(PositivesConfig, positives, "p"), batch["text"], trainer.teacher(batch), None)
    assert out["clip_positives"].item() == pytest.approx(mined.positives.sum(1).float().mean().item() - 1)
    assert out["clip_positives"].item() > 0
    assert 0 <= out["clip_mine_recall_1_image"].item() <= 1 and torch.isfinite(out["cross_kd_loss"])
