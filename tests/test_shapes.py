"""The shapes generator: determinism, split rules, caption/token limits, and that pixels match the words."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import open_clip
import pytest
import webdataset as wds

from clipslim.data import shapes
from clipslim.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    FILL_WORDS,
    HELDOUT,
    OOD_FILLS,
    PAIR_CAPTIONS,
    PALETTE,
    PARTIAL_CAPTIONS,
    POSITIONS,
    SHAPES,
    SINGLE_CAPTIONS,
    SIZES,
    TEMPLATES,
    TRAIN_FILLS,
    caption_for,
    classnames,
    generate_sample,
    jitter_colour,
    load_info,
    partial_caption,
    read_lines,
    render,
    write_shapes,
)

ARGS = dict(n_train=300, n_eval=128, seed=0, shard_size=100, image_size=64, progress=False)


def read_samples(paths: list[Path]) -> list[dict]:
    return list(wds.DataPipeline(wds.SimpleShardList([str(p) for p in paths]), wds.tarfile_to_samples()))


def shard_paths(root: Path, split: str) -> list[Path]:
    return sorted((root / split).glob("*.tar"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, workers=2, **ARGS)  # the parallel path; compared with the serial path below
    return root


def test_classnames_and_heldout_combos() -> None:
    names = classnames()
    assert len(names) == 64 == len(set(names))
    assert names[:2] == ["red circle", "red square"] and names[8] == "green circle"
    assert len(HELDOUT) == 12
    assert all(c in COLOURS and s in SHAPES for c, s in HELDOUT)
    for colour in COLOURS:  # every colour and shape keeps several training partners
        assert sum((colour, s) not in HELDOUT for s in SHAPES) >= 6
    for shape in SHAPES:
        assert sum((c, shape) not in HELDOUT for c in COLOURS) >= 6
    assert len(TEMPLATES) == 4 and all(t.count("{}") == 1 for t in TEMPLATES)
    assert len(SINGLE_CAPTIONS) >= 12 and len(PAIR_CAPTIONS) >= 6
    assert not set(TRAIN_FILLS) & set(OOD_FILLS)


def _pair(c1: str, s1: str, z1: str, p1: str, c2: str, s2: str, z2: str, p2: str) -> list[dict[str, str]]:
    return [dict(colour=c1, shape=s1, size=z1, position=p1), dict(colour=c2, shape=s2, size=z2, position=p2)]


def _all_captions() -> list[str]:
    """Every single-object caption, plus pair captions over all 64x64 combos and, with the longest words, every
    size/layout (CLIP's BPE splits at spaces, so token counts add up word by word)."""
    out = []
    for t in range(len(SINGLE_CAPTIONS)):
        for c in COLOURS:
            for s in SHAPES:
                for z in SIZES:
                    for f in FILL_WORDS:
                        out += [
                            caption_for([dict(colour=c, shape=s, size=z, position=p, fill=f)], t) for p in POSITIONS
                        ]
    for t in range(len(PARTIAL_CAPTIONS)):
        out += [partial_caption(dict(colour=c, shape=s, size="small", position="bottom", fill="outline"), t)
                for c in COLOURS for s in SHAPES]  # fmt: skip
    layouts = [("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top")]
    for t in range(len(PAIR_CAPTIONS)):
        out += [caption_for(_pair(c1, s1, "small", "left", c2, s2, "large", "right"), t) for c1 in COLOURS
                for s1 in SHAPES for c2 in COLOURS for s2 in SHAPES]  # fmt: skip
        for z1 in SIZES:
            for z2 in SIZES:
                out += [
                    caption_for(_pair("orange", "hexagon", z1, a, "purple", "hexagon", z2, b), t) for a, b in layouts
                ]
    return out


def test_every_caption_fits_context_16() -> None:
    captions = _all_captions()
    assert len(captions) > 50000
    bpe = open_clip.tokenizer.SimpleTokenizer()
    longest = max(captions, key=lambda c: len(bpe.encode(c)))
    assert len(bpe.encode(longest)) <= 14, longest
    # open_clip writes EOT into the last slot when it truncates, so check the real position on the longest one.
    tokens = open_clip.get_tokenizer("ViT-B-32")([longest])[0]
    eot = int(tokens.argmax())  # EOT has the highest id in CLIP's vocabulary
    assert eot == len(bpe.encode(longest)) + 1 and eot < 16


def test_sample_meta_matches_caption_and_train_rules() -> None:
    rng = np.random.default_rng(1)
    n_pairs = n_partial = 0
    for _ in range(200):
        image, caption, meta = generate_sample(rng, "train")
        if meta["partial_caption"]:  # names the shape or the colour, never both
            n_partial += 1
            words = caption.split()
            first = meta["objects"][0]
            assert meta["n_objects"] == 1 and (first["colour"] in words) != (first["shape"] in words), caption
            continue
        assert image.size == (64, 64) and image.mode == "RGB"
        json.dumps(meta)
        assert meta["n_objects"] == len(meta["objects"]) in (1, 2)
        n_pairs += meta["n_objects"] == 2
        words = caption.replace(",", "").split()
        for obj in meta["objects"]:
            assert (obj["colour"], obj["shape"]) not in HELDOUT
            assert obj["colour"] in words and obj["shape"] in words, caption
            assert obj["fill"] in TRAIN_FILLS
        first = meta["objects"][0]
        if meta["n_objects"] == 2:
            phrases = [caption.index(f"{o['colour']} {o['shape']}") for o in meta["objects"]]
            assert phrases == sorted(phrases)  # the primary object is named first
        assert classnames()[meta["cls"]] == f"{first['colour']} {first['shape']}"
        assert meta["heldout"] is False and meta["ood"] is False
        assert not any(word in caption for word in (*OOD_FILLS, "striped"))
    assert 30 <= n_pairs <= 90 and 15 <= n_partial <= 60  # ~30% pairs, ~17% partial captions


def test_eval_samples_cover_heldout() -> None:
    rng = np.random.default_rng(2)
    held = [generate_sample(rng, "eval", cls=c)[2] for c in range(64)]
    assert [m["cls"] for m in held] == list(range(64))
    assert sum(m["heldout"] for m in held) == 12
    assert all(m["n_objects"] == 1 for m in held)
    with pytest.raises(ValueError, match="unknown split"):
        generate_sample(rng, "test")


def _nearest_name(rgb: np.ndarray) -> str:
    return min(COLOURS, key=lambda c: float(np.abs(np.mean(PALETTE[c], axis=0) - rgb).sum()))


def test_colour_jitter_stays_inside_its_name() -> None:
    """Shades vary within a name (not one fixed RGB) but are always nearest to their own name's centre."""
    rng = np.random.default_rng(0)
    for colour in COLOURS:
        draws = np.array([jitter_colour(rng, colour) for _ in range(300)], dtype=float)
        assert draws.std(0).max() > 3, colour  # jittered
        assert {_nearest_name(d) for d in draws} == {colour}


def _patch_mean(colour: str, shape: str = "circle") -> np.ndarray:
    obj = dict(colour=colour, shape=shape, size="large", position="center", fill="solid")
    pixels = np.asarray(render([obj], np.random.default_rng(0), 64), dtype=float)
    return np.median(pixels[29:35, 29:35].reshape(-1, 3), axis=0)


def test_pixels_show_the_named_colour() -> None:
    red, blue, white, black = (_patch_mean(c) for c in ("red", "blue", "white", "black"))
    assert red[0] > 160 and red[1] < 80 and red[2] < 80
    assert blue[2] > 160 and blue[0] < 90
    assert white.min() > 215 and black.max() < 60
    for colour in COLOURS:
        assert _nearest_name(_patch_mean(colour)) == colour


def _mask(shape: str, fill: str = "solid", seed: int = 0) -> np.ndarray:
    obj = dict(colour="red", shape=shape, size="large", position="center", fill=fill)
    return np.asarray(shapes._object_mask(obj, np.random.default_rng(seed), 64)) > 127


def test_shapes_have_distinct_masks() -> None:
    masks = {shape: _mask(shape) for shape in SHAPES}
    assert masks["ring"][32, 32] == 0 and masks["circle"][32, 32] == 1
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.9, (a, b, iou)  # circle vs hexagon is the closest pair (~0.85)


def test_style_randomisation() -> None:
    """Rotation, scale, outline, ood patterns, backgrounds, distractors and blur all occur."""
    triangles = [_mask("triangle", seed=s) for s in range(6)]
    assert len({m.tobytes() for m in triangles}) == 6  # rotated / scaled / moved differently
    solid, outline = _mask("square"), _mask("square", "outline")
    assert outline.sum() < 0.6 * solid.sum() and outline[32, 32] == 0
    for fill in OOD_FILLS:
        patterned = _mask("square", fill)
        assert 0.25 * solid.sum() < patterned.sum() < 0.85 * solid.sum(), fill
    rng = np.random.default_rng(3)
    styles = [generate_sample(rng, "train")[2]["style"] for _ in range(200)]
    assert {s["background"] for s in styles} == set(BACKGROUNDS)
    assert 0.1 < np.mean([s["blur"] > 0 for s in styles]) < 0.35
    assert any(s["lines"] for s in styles) and any(s["specks"] for s in styles)


def test_written_dataset_layout(dataset: Path) -> None:
    info = load_info(dataset)
    assert info["splits"] == {
        "train": {"num_samples": 300, "num_shards": 3},
        "eval": {"num_samples": 128, "num_shards": 2},
        "ood": {"num_samples": 64, "num_shards": 1},
    }
    assert info["name"] == "shapes" and info["version"] == 3 and len(info["heldout"]) == 12
    assert info["ood_fills"] == list(OOD_FILLS)
    assert [p.name for p in shard_paths(dataset, "train")] == [f"shapes-train-00000{i}.tar" for i in range(3)]
    assert read_lines(dataset / "classnames.txt") == classnames()
    assert tuple(read_lines(dataset / "templates.txt")) == TEMPLATES
    assert json.loads((dataset / "eval" / "sizes.json").read_text()) == {
        "shapes-eval-000000.tar": 100,
        "shapes-eval-000001.tar": 28,
    }
    assert not list(dataset.rglob("*.tmp"))


def test_train_split_never_shows_heldout(dataset: Path) -> None:
    samples = read_samples(shard_paths(dataset, "train"))
    assert len(samples) == 300 and len({s["__key__"] for s in samples}) == 300
    for s in samples:
        meta = json.loads(s["json"])
        assert all((o["colour"], o["shape"]) not in HELDOUT for o in meta["objects"])
        assert all(o["fill"] in TRAIN_FILLS for o in meta["objects"])
        assert s["png"][:8] == b"\x89PNG\r\n\x1a\n" and s["txt"].decode().strip()


def test_eval_split_alternates_heldout_and_seen(dataset: Path) -> None:
    metas = [json.loads(s["json"]) for s in read_samples(shard_paths(dataset, "eval"))]
    assert len(metas) == 128 and all(m["n_objects"] == 1 and not m["ood"] and not m["partial_caption"] for m in metas)
    assert [m["heldout"] for m in metas] == [i % 2 == 0 for i in range(128)]  # half the split is held-out
    held = Counter(m["cls"] for m in metas if m["heldout"])
    assert len(held) == 12 and max(held.values()) - min(held.values()) <= 1
    assert len({m["cls"] for m in metas if not m["heldout"]}) == 52
    assert all(o["fill"] in TRAIN_FILLS for m in metas for o in m["objects"])


def test_ood_split_is_balanced_and_only_unseen_fills(dataset: Path) -> None:
    samples = read_samples(shard_paths(dataset, "ood"))
    metas = [json.loads(s["json"]) for s in samples]
    assert len(metas) == 64 and Counter(m["cls"] for m in metas) == Counter(range(64))
    assert all(m["ood"] and m["n_objects"] == 1 and m["objects"][0]["fill"] in OOD_FILLS for m in metas)
    assert {m["objects"][0]["fill"] for m in metas} == set(OOD_FILLS)
    assert sum(m["heldout"] for m in metas) == 12
    assert not any(w in s["txt"].decode() for s in samples for w in FILL_WORDS.values())


def test_deterministic_bytes_and_seed_sensitivity(dataset: Path, tmp_path: Path) -> None:
    write_shapes(tmp_path / "same", workers=0, **ARGS)
    for split in ("train", "eval", "ood"):
        for a, b in zip(shard_paths(dataset, split), shard_paths(tmp_path / "same", split), strict=True):
            assert a.read_bytes() == b.read_bytes()
    write_shapes(tmp_path / "other", workers=0, **(ARGS | {"seed": 1, "n_train": 100, "n_eval": 0}))
    first = "train/shapes-train-000000.tar"
    assert (tmp_path / "other" / first).read_bytes() != (dataset / first).read_bytes()


def test_cached_when_parameters_match_and_regenerated_otherwise(tmp_path: Path) -> None:
    args = ARGS | {"n_train": 30, "n_eval": 10, "shard_size": 10}
    info = write_shapes(tmp_path, workers=0, **args)
    shard = tmp_path / "train" / "shapes-train-000002.tar"
    stamp = shard.stat().st_mtime_ns
    assert write_shapes(tmp_path, workers=0, **args) == info
    assert shard.stat().st_mtime_ns == stamp
    smaller = write_shapes(tmp_path, workers=0, **(args | {"n_train": 15}))
    assert smaller["splits"]["train"] == {"num_samples": 15, "num_shards": 2}
    assert not shard.exists()  # stale shards of the bigger run are gone, so a directory glob is exact
    assert len(read_samples(shard_paths(tmp_path, "train"))) == 15


def test_shard_seeding_is_independent() -> None:
    """A shard's content depends only on (seed, split, shard), which is what makes parallel writing safe."""
    a = list(shapes.shard_samples("train", 1, 100, 3, 0, 64))
    b = list(shapes.shard_samples("train", 1, 100, 3, 0, 64))
    c = list(shapes.shard_samples("train", 2, 100, 3, 0, 64))
    assert a == b and a[0]["png"] != c[0]["png"]
    assert a[0]["__key__"] == "train-00000100"


def test_free_colour_samples_name_only_the_shape_and_avoid_heldout_colours() -> None:
    rng = np.random.default_rng(3)
    free = [s for s in (generate_sample(rng, "train", free=0.6) for _ in range(150)) if s[2].get("free_colour")]
    assert 40 < len(free) < 110  # 0.6 of the ~70% single-object samples
    for _image, caption, meta in free:
        obj = meta["objects"][0]
        assert meta["cls"] == -1 and not meta["heldout"] and obj["colour"] == "free"
        assert obj["shape"] in caption and not any(c in caption.split() for c in COLOURS)
        banned = [np.array(shade) for c, s in HELDOUT if s == obj["shape"] for shade in PALETTE[c]]
        assert all(np.linalg.norm(np.array(obj["rgb"]) - b) >= shapes.FREE_COLOUR_MARGIN for b in banned)
    # the object is painted in its free colour: the centre of a large solid one shows it
    obj = dict(colour="free", rgb=[30, 200, 190], shape="square", size="large", position="center", fill="solid")
    pixels = np.asarray(render([obj], np.random.default_rng(0)))
    assert np.abs(pixels[30:34, 30:34].reshape(-1, 3).mean(0) - obj["rgb"]).max() < 15


def test_free_colour_changes_train_shards_only(tmp_path: Path) -> None:
    args = ARGS | {"n_train": 40, "n_eval": 20, "shard_size": 20}
    plain = write_shapes(tmp_path / "plain", workers=0, **args)
    free = write_shapes(tmp_path / "free", workers=0, free_colour=0.5, **args)
    assert "free_colour" not in plain and free["free_colour"] == 0.5
    for split in ("eval", "ood"):
        for a, b in zip(shard_paths(tmp_path / "plain", split), shard_paths(tmp_path / "free", split), strict=True):
            assert a.read_bytes() == b.read_bytes()
    train = [json.loads(s["json"]) for s in read_samples(shard_paths(tmp_path / "free", "train"))]
    assert any(m.get("free_colour") for m in train)
    with pytest.raises(ValueError, match="free_colour"):
        write_shapes(tmp_path / "bad", workers=0, free_colour=1.5, **args)
