"""Teacher cache: the teacher's embeddings computed once, read back during training (MobileCLIP's dataset
reinforcement), so distillation costs about as much as plain student training.

Layout of a cache directory::

    manifest.json                         teacher id, dataset fingerprint, augmentation config, dims, dtype
    <shard>.tar.teacher.safetensors       one sidecar per shard: for its N samples, K stored augmentations each
        image      [N, K, D]   teacher image embedding of each augmented view (fp16/bf16, L2-normalised)
        text       [N, C, D]   teacher text embedding of each caption (C = most captions of a sample; padded)
        n_text     [N]         captions of each sample
        aug_box/aug_flip/aug_jitter/aug_seed   the K augmentations' parameters (see clipslim.data.augment)
        metadata: sample keys, shard fingerprint, cache id

Captions: the sample's text plus the strings in its json ``captions`` list (e.g. synthetic captions).

Training picks one stored augmentation and one caption per sample and epoch from (seed, epoch, shard, key), replays
the augmentation on the decoded image (bit-exact: the student sees the teacher's pixels) and puts the embeddings in
the batch as ``teacher_image`` / ``teacher_text``. Sidecars are written atomically when a shard is done, so a
crashed caching run resumes at the first shard without a complete sidecar.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..config import ConfigError, build, to_dict
from ..io import WriteError, atomic_write_json, check_number, read_json, save_tensors, write_periodic
from ..models import weights_fingerprint
from ..outputs import embed_dim
from .augment import AugmentConfig, Replay, pack, sample_params, unpack
from .loader import (
    DataError,
    SkipCounter,
    SkipStats,
    check_bad_fraction,
    num_samples,
    parse_sample,
    resolve_shards,
    stream_seed_of,
    tar_samples,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SUFFIX = ".teacher.safetensors"
VERSION = 1
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
EMB_KEYS = ("image", "text")


class CacheError(DataError):
    """A teacher cache that cannot be used for this run; the one-line message names the file and the mismatch."""


# ---------------------------------------------------------------- identities


def shard_fingerprint(path: str | Path) -> str:
    """Size plus a hash of the first and last 64 KiB: tells a different or rewritten shard without reading it."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(65536))
        f.seek(max(0, size - 65536))
        h.update(f.read())
    return h.hexdigest()[:16]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def captions_of(caption: str, meta: dict[str, Any]) -> list[str]:
    """The sample's caption, then any extra captions listed under ``captions`` in its json."""
    extra = meta.get("captions")
    extra = [c.strip() for c in extra if isinstance(c, str) and c.strip()] if isinstance(extra, list) else []
    return [caption, *extra]


def sidecar_path(root: str | Path, shard: str) -> Path:
    return Path(root) / f"{Path(shard).name}{SUFFIX}"


# ---------------------------------------------------------------- writer


@dataclass
class CacheOptions:
    augmentations: int = 4
    """K: stored augmentations per image."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    batch_size: int = 256
    """Samples per teacher forward (each gives K images)."""
    dtype: str = "fp16"

    def validate(self) -> None:
        if self.augmentations < 1 or self.batch_size < 1:
            raise ValueError(
                f"--augmentations and --batch-size must be >= 1 (got {self.augmentations}, {self.batch_size})"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got {self.dtype}")
        self.augment.validate("augment")


def _tar_shards(data: str | Path) -> list[str]:
    if str(data).lower().endswith(".csv"):
        raise CacheError(f"{data}: a teacher cache needs webdataset .tar shards, not a CSV")
    shards = resolve_shards(data)
    names = [Path(s).name for s in shards]
    if len(set(names)) != len(names):
        raise CacheError(f"{data}: shard file names must be unique (sidecars are named after them)")
    return shards


def make_manifest(teacher: Any, spec: str, data: str | Path, shards: list[str], opts: CacheOptions) -> dict[str, Any]:
    """Everything a cache depends on; ``cache_id`` hashes it, so any change makes old sidecars stale."""
    model = teacher.model
    bias = getattr(model, "logit_bias", None)
    pre = teacher.preprocess_cfg
    size = pre.get("size", teacher.model_cfg.get("vision_cfg", {}).get("image_size"))
    size = size[0] if isinstance(size, (list, tuple)) else size
    present = [s for s in shards if Path(s).is_file()]
    body = {
        "version": VERSION,
        "teacher": {
            "spec": spec, "arch": teacher.arch, "fingerprint": weights_fingerprint(model),
            "logit_scale": float(model.logit_scale.exp()), "logit_bias": None if bias is None else float(bias),
        },
        "dataset": {
            "path": str(data),
            "shards": {Path(s).name: shard_fingerprint(s) for s in present},
        },
        "image": {"size": int(size), "mean": list(pre["mean"]), "std": list(pre["std"])},
        "augment": {**to_dict(opts.augment), "count": opts.augmentations, "seed": opts.seed},
        "embed_dim": int(embed_dim(model)),
        "dtype": opts.dtype,
    }  # fmt: skip
    body["dataset"]["fingerprint"] = _digest(body["dataset"]["shards"])
    return {**body, "cache_id": _digest(body)}


def _claim(out: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest, or check that an existing one describes the same cache (resume)."""
    path = out / MANIFEST
    if path.is_file():
        old = read_manifest(out)
        if old.get("cache_id") != manifest["cache_id"]:
            diff = [k for k in ("teacher", "dataset", "image", "augment", "dtype") if old.get(k) != manifest[k]]
            raise CacheError(
                f"{out} holds a teacher cache with a different {'/'.join(diff) or 'version'}; "
                "pick another --out or delete it"
            )
        return
    atomic_write_json(path, manifest)


def _sidecar_done(path: Path, manifest: dict[str, Any]) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("cache_id") == manifest["cache_id"]
    except Exception:  # absent, truncated or foreign: (re)compute it
        return False


@torch.no_grad()
def _embed(teacher: Any, pixels: list[torch.Tensor], captions: list[str], device: torch.device) -> tuple:
    model = teacher.model
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        image = model.encode_image(torch.stack(pixels).to(device), normalize=True).float()
        text = model.encode_text(torch.as_tensor(teacher.tokenizer(captions)).long().to(device), normalize=True).float()
    return image.cpu(), text.cpu()


class _ShardWriter:
    """Collects one shard's rows, runs the teacher batch by batch, and writes the sidecar at the end."""

    def __init__(self, teacher: Any, shard: str, opts: CacheOptions, replay: Replay, device: torch.device) -> None:
        self.teacher, self.shard, self.opts, self.replay, self.device = teacher, shard, opts, replay, device
        self.keys: list[str] = []
        self.params: list[list] = []
        self.image: list[torch.Tensor] = []
        self.text: list[list[torch.Tensor]] = []
        self.pending: list[tuple[str, Image.Image, list[str]]] = []

    def add(self, key: str, image: Image.Image, captions: list[str]) -> int:
        self.pending.append((key, image, captions))
        return self.flush() if len(self.pending) >= self.opts.batch_size else 0

    def flush(self) -> int:
        """Teacher forward over the pending samples' K views and captions; returns samples done."""
        k, name = self.opts.augmentations, Path(self.shard).name
        pixels, captions = [], []
        for key, image, caps in self.pending:
            seeds = [stream_seed_of(self.opts.seed, name, key, j) for j in range(k)]
            params = [sample_params(self.opts.augment, image.width, image.height, s) for s in seeds]
            pixels += [self.replay.apply(image, p) for p in params]
            captions += caps
            self.keys.append(key)
            self.params.append(params)
        image_emb, text_emb = _embed(self.teacher, pixels, captions, self.device)
        self.image += list(image_emb.view(len(self.pending), k, -1))
        self.text += list(text_emb.split([len(c) for _, _, c in self.pending]))
        done, self.pending = len(self.pending), []
        return done

    def save(self, path: Path, manifest: dict[str, Any], skipped: dict[str, int]) -> int:
        n, dim = len(self.keys), manifest["embed_dim"]
        n_text = [len(t) for t in self.text]
        text = torch.zeros(n, max(n_text, default=1), dim)
        for i, t in enumerate(self.text):
            text[i, : len(t)] = t
        image = torch.stack(self.image) if n else torch.zeros(0, self.opts.augmentations, dim)
        if not (torch.isfinite(image).all() and torch.isfinite(text).all()):
            raise CacheError(f"{self.shard}: the teacher gave NaN/inf embeddings; refusing to cache them")
        dtype = DTYPES[self.opts.dtype]
        tensors = {"image": image.to(dtype), "text": text.to(dtype), "n_text": torch.tensor(n_text, dtype=torch.int16)}
        tensors.update(pack(self.params) if n else _empty_params(self.opts.augmentations))
        meta = {"cache_id": manifest["cache_id"], "shard": Path(self.shard).name, "keys": json.dumps(self.keys)}
        meta["skipped"] = json.dumps(skipped)
        save_tensors(path, tensors, metadata=meta)
        return path.stat().st_size


def _empty_params(k: int) -> dict[str, torch.Tensor]:
    return {
        "aug_box": torch.zeros(0, k, 4, dtype=torch.int32), "aug_flip": torch.zeros(0, k, dtype=torch.uint8),
        "aug_jitter": torch.zeros(0, k, 3, dtype=torch.float16), "aug_seed": torch.zeros(0, k, dtype=torch.int64),
    }  # fmt: skip


def _cache_shard(teacher: Any, shard: str, path: Path, manifest: dict, opts: CacheOptions, bar: tqdm) -> tuple:
    replay = Replay(opts.augment, manifest["image"]["size"], manifest["image"]["mean"], manifest["image"]["std"])
    device = next(teacher.model.parameters()).device
    writer = _ShardWriter(teacher, shard, opts, replay, device)
    counter = SkipCounter()
    for sample in tar_samples([{"url": shard}], counter):
        parsed = parse_sample(sample)
        if isinstance(parsed, str):
            counter.bump(parsed)
            continue
        image, caption, meta = parsed
        bar.update(writer.add(str(sample.get("__key__", "")), image, captions_of(caption, meta)))
    if writer.pending:
        bar.update(writer.flush())
    skipped = counter.drain()
    if not writer.keys:  # training skips the same samples, so an empty sidecar is all it needs
        log.warning("%s: no usable samples (%s)", shard, skipped or "empty shard")
    return len(writer.keys), writer.save(path, manifest, skipped), skipped


def cache_teacher(
    teacher: str,
    data: str | Path,
    out: str | Path,
    opts: CacheOptions,
    *,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    max_bad_fraction: float = 0.1,
) -> dict[str, Any]:
    """Cache ``teacher``'s embeddings of K stored augmentations per sample of ``data`` into ``out``.

    Rank r of world_size caches shards r, r + world_size, ... (file order); every rank writes the same manifest.
    Shards whose sidecar is already complete are skipped, so re-running after a crash resumes. Bad samples are
    skipped and counted by kind; more than ``max_bad_fraction`` of them stops with a DataError after the shard in
    progress (finished sidecars stay).
    """
    from ..models import load_model

    opts.validate()
    shards = _tar_shards(data)
    bundle = load_model(teacher, device=device)
    bundle.model.eval().requires_grad_(False)
    out = Path(out)
    manifest = make_manifest(bundle, teacher, data, shards, opts)
    _claim(out, manifest)
    mine = [s for s in shards[rank::world_size] if Path(s).is_file()]
    skipped = (
        {"missing_shard": len(shards[rank::world_size]) - len(mine)}
        if len(mine) < len(shards[rank::world_size])
        else {}
    )
    todo = [s for s in mine if not _sidecar_done(sidecar_path(out, s), manifest)]
    counts = [num_samples(s) for s in todo]
    total = None if None in counts else sum(c or 0 for c in counts)
    bar = tqdm(total=total, unit="img", desc=f"cache-teacher x{opts.augmentations}", disable=not progress)
    start, samples, size = time.perf_counter(), 0, 0
    failed: list[str] = []
    with logging_redirect_tqdm():
        for shard in todo:
            tick = time.perf_counter()
            done = write_periodic(
                lambda shard=shard: _cache_shard(bundle, shard, sidecar_path(out, shard), manifest, opts, bar),
                f"sidecar of {shard}", "re-run to cache it",
            )  # fmt: skip
            if done is None:
                failed.append(str(sidecar_path(out, shard)))
                continue
            n, nbytes, bad = done
            samples, size, took = samples + n, size + nbytes, time.perf_counter() - tick
            skipped = {k: skipped.get(k, 0) + bad.get(k, 0) for k in {*skipped, *bad}}
            if samples + sum(skipped.values()) >= 1000:  # fewer samples: the fraction is noise (checked at the end)
                check_bad_fraction(skipped, samples, max_bad_fraction, f"cache-teacher --data {data}")
            bar.set_postfix(views_s=f"{n * opts.augmentations / max(took, 1e-9):.0f}")
            log.info("%s: %d samples x %d views in %.1fs", Path(shard).name, n, opts.augmentations, took)
    bar.close()
    if failed:
        raise WriteError(
            f"{len(failed)} of {len(todo)} sidecars not written (first: {failed[0]}); free space and re-run "
            "`clipslim cache-teacher` with the same options to cache just those"
        )
    if skipped:
        log.warning("%s", SkipStats(skipped).summary())
        check_bad_fraction(skipped, samples, max_bad_fraction, f"cache-teacher --data {data} (sidecars written)")
    seconds = time.perf_counter() - start
    return {
        "out": str(out), "rank": rank, "shards": len(mine), "cached_now": len(todo),
        "resumed_done": len(mine) - len(todo), "samples": samples, "seconds": round(seconds, 2),
        "views_per_s": round(samples * opts.augmentations / max(seconds, 1e-9), 1),
        "bytes": size, "bytes_per_sample": round(size / samples, 1) if samples else None, "skipped": skipped,
    }  # fmt: skip


# ---------------------------------------------------------------- reader


@dataclass
class _Table:
    rows: dict[str, int]
    tensors: dict[str, torch.Tensor]


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The cache's manifest, every field checked (see :func:`check_manifest`); errors name the file and key."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{root}: no {MANIFEST} (not a teacher cache; write one with `clipslim cache-teacher`)")
    try:
        manifest = read_json(path)
    except ConfigError as err:
        raise CacheError(str(err)) from err
    if not isinstance(manifest, dict):
        raise CacheError(f"{path}: expected a JSON object")
    if manifest.get("version") != VERSION:
        raise CacheError(f"{path}: cache version {manifest.get('version')}, this clipslim reads {VERSION}")
    check_manifest(manifest, path)
    return manifest


MANIFEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "cache_id": str, "teacher.spec": str, "teacher.arch": str, "teacher.fingerprint": str,
    "teacher.logit_scale": (int, float), "dataset.path": str, "dataset.shards": dict, "image.size": int,
    "image.mean": list, "image.std": list, "augment.count": int, "augment.seed": int, "embed_dim": int, "dtype": str,
}  # fmt: skip
"""Every key a cache reader uses, with its type."""
MAX_LOGIT_SCALE = 1000.0
"""CLIP clamps its learned scale at 100; a cached scale far past that (or NaN) is a forged or broken manifest."""


def _field(manifest: dict[str, Any], dotted: str, where: Path) -> Any:
    node: Any = manifest
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise CacheError(f"{where}: {dotted}: required key missing")
        node = node[part]
    return node


def check_manifest(manifest: dict[str, Any], where: Path) -> None:
    """Types and ranges of every field, then integrity: ``cache_id`` hashes the rest, so a hand-edited manifest
    (another teacher spec, a changed logit scale) no longer matches and is refused."""
    for dotted, kind in MANIFEST_FIELDS.items():
        value = _field(manifest, dotted, where)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise CacheError(f"{where}: {dotted}: expected {getattr(kind, '__name__', 'a number')}, got {value!r}")
    try:
        check_number(manifest["teacher"]["logit_scale"], "teacher.logit_scale", 0.0, MAX_LOGIT_SCALE)
        bias = manifest["teacher"].get("logit_bias")
        if bias is not None:
            check_number(bias, "teacher.logit_bias", -math.inf, math.inf)
        for key in ("mean", "std"):
            for i, value in enumerate(manifest["image"][key]):
                check_number(value, f"image.{key}[{i}]", -math.inf if key == "mean" else 0.0, math.inf)
        build(AugmentConfig, _augment_fields(manifest), "augment")
    except ConfigError as err:
        raise CacheError(f"{where}: {err}") from err
    if manifest["augment"]["count"] < 1 or manifest["embed_dim"] < 1 or manifest["dtype"] not in DTYPES:
        raise CacheError(f"{where}: augment.count/embed_dim/dtype out of range")
    if _digest({k: v for k, v in manifest.items() if k != "cache_id"}) != manifest["cache_id"]:
        raise CacheError(
            f"{where}: edited after caching (cache_id does not match its contents); re-run `clipslim cache-teacher`"
        )


def _load_sidecar(path: Path, manifest: dict[str, Any]) -> _Table:
    """Read and check one sidecar: present, complete, this cache's, consistent shapes, finite embeddings."""
    if not path.is_file():
        raise CacheError(f"{path}: sidecar missing (caching did not finish? re-run `clipslim cache-teacher`)")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as err:
        raise CacheError(f"{path}: truncated or corrupt sidecar ({str(err).splitlines()[0]})") from err
    if meta.get("cache_id") != manifest["cache_id"]:
        raise CacheError(f"{path}: sidecar belongs to another cache (cache_id {meta.get('cache_id')})")
    try:
        keys = json.loads(meta.get("keys", "[]"))
    except ValueError as err:
        raise CacheError(f"{path}: metadata 'keys' is not JSON ({err})") from err
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CacheError(f"{path}: metadata 'keys' must be a list of sample keys")
    if not {"image", "text", "n_text"} <= tensors.keys():
        raise CacheError(f"{path}: missing tensors (needs image, text, n_text)")
    k, d = manifest["augment"]["count"], manifest["embed_dim"]
    if tensors["image"].shape != (len(keys), k, d) or tensors["text"].shape[::2] != (len(keys), d):
        raise CacheError(f"{path}: embedding shapes {tuple(tensors['image'].shape)} do not match the manifest")
    for name in EMB_KEYS:
        if not torch.isfinite(tensors[name]).all():
            raise CacheError(f"{path}: NaN/inf in stored {name} embeddings")
    return _Table({key: i for i, key in enumerate(keys)}, tensors)


class TeacherCache:
    """A validated cache, read lazily shard by shard; picklable into DataLoader workers (tables are dropped)."""

    def __init__(
        self, root: str | Path, manifest: dict[str, Any], max_tables: int = 8, student: dict[str, Any] | None = None
    ) -> None:
        """``student``: the student's ``{"size", "mean", "std"}``. The manifest's ``image`` is what the *teacher* read
        when caching; the student sees the same crop, resized and normalised its own way (default: the teacher's)."""
        self.root, self.manifest, self.max_tables = Path(root), manifest, max_tables
        img = student or manifest["image"]
        self.replayer = Replay(
            build(AugmentConfig, _augment_fields(manifest), "augment"), img["size"], img["mean"], img["std"]
        )
        self._tables: OrderedDict[str, _Table] = OrderedDict()

    @property
    def augmentations(self) -> int:
        return int(self.manifest["augment"]["count"])

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["embed_dim"])

    @property
    def logit_scale(self) -> float:
        return float(self.manifest["teacher"]["logit_scale"])

    @property
    def logit_bias(self) -> float | None:
        return self.manifest["teacher"]["logit_bias"]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tables": OrderedDict()}

    def table(self, shard: str) -> _Table:
        name = Path(shard).name
        if name not in self._tables:
            self._tables[name] = _load_sidecar(sidecar_path(self.root, name), self.manifest)
            if len(self._tables) > self.max_tables:
                self._tables.popitem(last=False)
        self._tables.move_to_end(name)
        return self._tables[name]

    def choice(self, seed: str, shard: str, key: str, n_text: int) -> tuple[int, int]:
        """(augmentation, caption) that epoch ``seed`` ("<seed>:<epoch>") uses for a sample: a pure function."""
        rng = random.Random(f"{seed}:{Path(shard).name}:{key}")
        return rng.randrange(self.augmentations), rng.randrange(n_text)

    def replay(self, shard: str, key: str, image: Image.Image, caption: str, meta: dict, *, seed: str) -> dict:
        """The training sample: replayed pixels of the chosen stored augmentation, its caption, teacher embeddings."""
        t = self.table(shard)
        row = t.rows.get(key)
        if row is None:
            raise CacheError(
                f"{sidecar_path(self.root, shard)}: no entry for sample '{key}' (cache made for other data?)"
            )
        n_text = int(t.tensors["n_text"][row])
        k, c = self.choice(seed, shard, key, n_text)
        captions = captions_of(caption, meta)
        if len(captions) != n_text:
            raise CacheError(f"{Path(shard).name}/{key}: {len(captions)} captions, the cache has {n_text}")
        pixels = self.replayer.apply(image, unpack(t.tensors, row, k))
        return {
            "image": pixels, "caption": captions[c], "key": key, "meta": meta,
            "teacher_image": t.tensors["image"][row, k], "teacher_text": t.tensors["text"][row, c],
        }  # fmt: skip

    def collate(self, samples: list[dict[str, Any]], base: Callable[[list[dict]], dict]) -> dict[str, Any]:
        batch = base(samples)  # stacks every tensor field, teacher_image / teacher_text included
        missing = [name for name in ("teacher_image", "teacher_text") if name not in batch]
        if missing:
            raise CacheError(f"{self.root}: replayed samples lack {', '.join(missing)}")
        return batch


def _augment_fields(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in manifest["augment"].items() if k not in ("count", "seed")}


def open_teacher_cache(
    root: str | Path,
    data: str | Path,
    *,
    image_size: int,
    mean: list[float] | tuple[float, ...],
    std: list[float] | tuple[float, ...],
    teacher: str | None = None,
) -> TeacherCache:
    """Open a cache for training on ``data`` after checking it fits: same dataset shards (by fingerprint), same
    teacher spec (when the recipe names one), and every sidecar the run will read present, complete and finite.
    Errors are one line naming the file and the mismatch. The teacher's embeddings were made from the teacher's own
    pixels (size and normalisation in the manifest); replay gives the student the same crop at its own ``image_size``
    and ``mean``/``std``."""
    manifest = read_manifest(root)
    where = Path(root) / MANIFEST
    if teacher and teacher != manifest["teacher"]["spec"]:
        raise CacheError(f"{where}: cache made for teacher {manifest['teacher']['spec']}, recipe names {teacher}")
    img = manifest["image"]
    if img["size"] != image_size or any(
        abs(a - b) > 1e-6 for a, b in zip([*img["mean"], *img["std"]], [*mean, *std], strict=True)
    ):
        log.info(
            "teacher cache: teacher read %d px, mean/std %s/%s; the student reads the same crops at %d px, %s/%s",
            img["size"], img["mean"], img["std"], image_size, list(mean), list(std),
        )  # fmt: skip
    cached = manifest["dataset"]["shards"]
    for shard in _tar_shards(data):
        name = Path(shard).name
        if not Path(shard).is_file():
            continue  # the loader counts it as missing
        if name not in cached:
            raise CacheError(f"{where}: cache made for another dataset ({manifest['dataset']['path']}): no {name}")
        if shard_fingerprint(shard) != cached[name]:
            raise CacheError(f"{where}: cache made for another dataset: {shard} changed since it was cached")
        _load_sidecar(sidecar_path(root, name), manifest)
    return TeacherCache(root, manifest, student={"size": image_size, "mean": list(mean), "std": list(std)})


def check_teacher_weights(cache: TeacherCache, model: torch.nn.Module) -> None:
    """When the teacher is loaded anyway (to inherit the student from it), its weights must be the cached ones."""
    if weights_fingerprint(model) != cache.manifest["teacher"]["fingerprint"]:
        raise CacheError(
            f"{cache.root / MANIFEST}: cache made with other weights for {cache.manifest['teacher']['spec']}"
        )
