"""Loaders for webdataset shards and CSV files that skip bad samples, count them by kind, and never crash.

Real image-text data always has some rot: truncated downloads, zero-byte images, empty or mis-encoded captions.
A distillation run must survive it *and* report it, so every dropped sample is tallied by kind. The tally lives in
the process that reads the data (a DataLoader worker, or the main process) and is drained into each batch's
``"skipped"`` dict by the collate function, which runs in that same process; summing ``batch["skipped"]`` over an
epoch gives the totals, whatever ``num_workers`` is.

Counts are never lost at the end of a stream: each process holds its last batch back until its stream ends and adds
what was skipped after it. With ``train=True`` (``drop_last``) the dropped tail's skip counts land in the final batch
too. Only a process that yields no batch at all (e.g. a worker whose shards are all broken) cannot report; it logs a
warning instead.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import random
import signal
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

SKIP_KINDS = (
    "undecodable_image",
    "missing_image",
    "missing_caption",
    "empty_caption",
    "bad_caption_encoding",
    "truncated_member",
    "read_error",
    "missing_shard",
    "oversized_caption",
    "oversized_image",
    "tiny_image",
    "not_in_keep_list",
)
LEFT_OUT_KINDS = ("not_in_keep_list",)
"""Samples the recipe chose to leave out (``data.keep_list``, e.g. from `clipslim dedup`), not bad data: counted like
the others, but never towards the bad fraction."""
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "image")
CAPTION_KEYS = ("txt", "text", "caption")
TRUNCATION_MARKERS = ("unexpected end of data", "truncated header", "empty header", "end of file")
CSV_COLUMNS = ("filepath", "caption")
MAX_CAPTION_BYTES = 16_384
"""Longer captions are junk (scraped page text); the tokenizer would keep only the first 77 tokens anyway."""
MAX_IMAGE_PIXELS = 64_000_000
"""Decompression-bomb guard: images are refused from their header, before any pixels are decoded."""
MIN_IMAGE_SIDE = 8
"""Images thinner than this (tracking pixels, 1x1 placeholders) carry nothing to learn from."""


class Replayer(Protocol):
    """A teacher cache as the loader sees it (:class:`clipslim.data.teacher_cache.TeacherCache`): replays a stored
    augmentation per sample and adds the teacher's embeddings to each batch."""

    def replay(self, shard: str, key: str, image: Image.Image, caption: str, meta: dict, *, seed: str) -> dict: ...

    def collate(self, samples: list[dict[str, Any]], base: Callable[[list[dict]], dict]) -> dict[str, Any]: ...


class DataError(ValueError):
    """A data path or file that cannot be used at all; the one-line message names it."""


@dataclass
class SkipStats:
    """Counts of skipped samples by kind, summed over batches (``stats.add(batch["skipped"])``)."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, other: dict[str, int]) -> None:
        for kind, n in other.items():
            if n:
                self.counts[kind] = self.counts.get(kind, 0) + n

    @property
    def total(self) -> int:
        """Bad samples skipped (not those left out on purpose, see ``LEFT_OUT_KINDS``)."""
        return sum(n for k, n in self.counts.items() if k not in LEFT_OUT_KINDS)

    def summary(self) -> str:
        left_out = sum(self.counts.get(k, 0) for k in LEFT_OUT_KINDS)
        tail = f"; {left_out} left out by the keep list" if left_out else ""
        if not self.total:
            return "no bad samples" + tail
        bad = [(k, n) for k, n in self.counts.items() if k not in LEFT_OUT_KINDS]
        kinds = sorted(bad, key=lambda kv: (-kv[1], kv[0]))
        noun = "sample" if self.total == 1 else "samples"
        return f"skipped {self.total} bad {noun}: " + ", ".join(f"{k}={n}" for k, n in kinds) + tail


def check_bad_fraction(skipped: dict[str, int], good: int, limit: float, where: str) -> None:
    """Raise a one-line DataError when more than ``limit`` of the samples read (good + skipped) were bad."""
    stats = SkipStats(dict(skipped))
    total = good + stats.total
    if total and stats.total / total > limit:
        raise DataError(
            f"{where}: {stats.total} of {total} samples read were bad ({stats.total / total:.0%} > limit {limit:.0%}; "
            f"{stats.summary().removeprefix('skipped ')}); fix or drop the broken files, or raise the limit"
        )


class SkipCounter:
    """Per-process tally of skipped samples; each DataLoader worker holds its own copy."""

    def __init__(self) -> None:
        self.pending: Counter[str] = Counter()

    def bump(self, kind: str) -> None:
        self.pending[kind] += 1

    def drain(self) -> dict[str, int]:
        out = dict(self.pending)
        self.pending.clear()
        return out


# ---------------------------------------------------------------- paths


def _is_pattern(text: str) -> bool:
    return "{" in text and "}" in text


def is_csv_path(data: str | Path) -> bool:
    return str(data).lower().endswith(".csv")


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _expand(text: str) -> list[str]:
    """Brace expansion, then each glob replaced by the sorted .tar files it matches (a glob lists what exists, so
    only brace-listed names can be missing)."""
    out: list[str] = []
    for part in braceexpand(text) if _is_pattern(text) else [text]:
        matches = sorted(p for p in glob.glob(part) if p.endswith(".tar") and Path(p).is_file())
        out += matches if _is_glob(part) else [part]
    return list(dict.fromkeys(out))


def resolve_shards(data: str | Path) -> list[str]:
    """Shard paths of a directory (its *.tar, sorted), a single .tar, a brace pattern or a glob (``train/*.tar``,
    ``{a,b}/*.tar``)."""
    text = str(data)
    if _is_pattern(text) or (_is_glob(text) and not Path(text).exists()):
        expanded = _expand(text)
        found = [p for p in expanded if Path(p).is_file()]
        if not found:
            raise DataError(f"data path not found: {text} (no .tar file matches)")
        if len(found) < len(expanded):  # kept in the list: the reader counts each as a missing_shard
            log.warning("%s: %d of %d shards are missing", text, len(expanded) - len(found), len(expanded))
        return expanded
    path = Path(text)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise DataError(f"no .tar shards in {path}")
        return shards
    if path.is_file():
        if path.suffix != ".tar":
            raise DataError(f"not a .tar shard, shard directory, brace pattern or .csv: {path}")
        return [str(path)]
    raise DataError(f"data path not found: {path}")


def read_csv_rows(path: Path) -> list[tuple[str, str | None]]:
    """(filepath, caption) rows of a CSV with a header; a missing cell reads as None."""
    if not path.is_file():
        raise DataError(f"data path not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
            missing = [c for c in CSV_COLUMNS if c not in reader.fieldnames]
            if missing:
                raise DataError(f"{path}: CSV needs columns {','.join(CSV_COLUMNS)} (missing {','.join(missing)})")
            return [(row["filepath"], row["caption"]) for row in reader]
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: CSV is not UTF-8 ({err.reason} at byte {err.start})") from err
    except csv.Error as err:
        raise DataError(f"{path}: malformed CSV ({err})") from err


def _sizes_json_count(shards: list[str]) -> int | None:
    """Sum of per-shard counts from sizes.json files next to the shards (open_clip's convention)."""
    total = 0
    cache: dict[Path, dict[str, Any]] = {}
    for shard in shards:
        parent = Path(shard).parent
        if parent not in cache:
            try:
                cache[parent] = json.loads((parent / "sizes.json").read_text())
            except (OSError, ValueError):
                return None
        n = cache[parent].get(Path(shard).name)
        if not isinstance(n, int):
            return None
        total += n
    return total


def _info_json_count(shards: list[str]) -> int | None:
    """Split size from a shapes-style parent info.json, when the shards are that whole split."""
    parent = Path(shards[0]).parent
    try:
        split = json.loads((parent.parent / "info.json").read_text())["splits"][parent.name]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if all(Path(s).parent == parent for s in shards) and len(set(shards)) == split.get("num_shards"):
        return split.get("num_samples")
    return None


def num_samples(data: str | Path) -> int | None:
    """Number of samples (bad ones included) if known without reading the shards, else None."""
    if is_csv_path(data):
        return len(read_csv_rows(Path(data)))
    try:
        shards = resolve_shards(data)
    except DataError:
        return None
    n = _sizes_json_count(shards)
    return n if n is not None else _info_json_count(shards)


# ---------------------------------------------------------------- pipeline stages (run inside the reading process)


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


def stream_seed_of(*parts: object) -> int:
    """A 63-bit seed from readable parts; string seeding is stable across processes and runs."""
    return random.Random(":".join(map(str, parts))).getrandbits(63)


def first_field(sample: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((sample[k] for k in keys if k in sample), None)


def _is_complete(sample: dict[str, Any]) -> bool:
    return first_field(sample, IMAGE_KEYS) is not None and first_field(sample, CAPTION_KEYS) is not None


def _tar_error_kind(exn: BaseException) -> str:
    text = str(exn.args[0]) if exn.args else ""
    if isinstance(exn, EOFError) or any(marker in text for marker in TRUNCATION_MARKERS):
        return "truncated_member"
    return "read_error"


def _missing_end_marker(url: str) -> bool:
    """tarfile takes a header cut short for a clean end of archive, so check the POSIX invariant instead: a local
    .tar is a whole number of 512-byte blocks and ends with two zero blocks."""
    path = Path(url)
    if path.suffix != ".tar" or not path.is_file():
        return False  # remote or compressed: trust the reader
    size = path.stat().st_size
    if size % 512:
        return True
    with open(path, "rb") as f:
        f.seek(max(0, size - 1024))
        return f.read() != bytes(1024)


def _shard_damage(url: str, errors: list[BaseException]) -> str | None:
    """The skip kind of a shard that raised or lacks its end marker (counted once per shard), else None."""
    if errors:
        log.warning("%s: %s", url, errors[0])
        return _tar_error_kind(errors[0])
    if _missing_end_marker(url):
        log.warning("%s: truncated (no end-of-archive marker)", url)
        return "truncated_member"
    return None


def tar_samples(shards: Iterable[dict[str, Any]], counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """webdataset's tar reader, one shard at a time, so a broken shard counts once (tarfile often raises twice)
    and the incomplete sample it ends on is dropped as part of that damage rather than counted again."""
    for shard in shards:
        if "://" not in shard["url"] and not Path(shard["url"]).is_file():
            counter.bump("missing_shard")
            continue
        errors: list[BaseException] = []

        def keep_going(exn: BaseException, errors: list[BaseException] = errors) -> bool:
            errors.append(exn)
            return True

        held = None
        for sample in wds.tarfile_samples([dict(shard)], handler=keep_going):
            if held is not None:
                yield held
            held = sample
        kind = _shard_damage(shard["url"], errors)
        if kind is not None:
            counter.bump(kind)
            held = held if held is not None and _is_complete(held) else None
        if held is not None:
            yield held


def _csv_samples(rows: Iterable[tuple[str, str | None]], base: Path, counter: SkipCounter) -> Iterator[dict]:
    for filepath, caption in rows:
        path = Path(filepath or "")
        path = path if path.is_absolute() else base / path
        try:
            data = path.read_bytes() if filepath else None
        except (FileNotFoundError, IsADirectoryError):
            data = None
        except OSError:
            counter.bump("read_error")
            continue
        if data is None:
            counter.bump("missing_image")
            continue
        yield {"__key__": filepath, "image": data} | ({} if caption is None else {"txt": caption})


def read_keep_list(path: str | Path) -> frozenset[str]:
    """Sample keys to train on, one per line (blank lines and ``#`` comments ignored), as `clipslim dedup` writes."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"keep list {path}: cannot read it ({err})") from err
    keys = frozenset(s for line in lines if (s := line.strip()) and not s.startswith("#"))
    if not keys:
        raise DataError(f"keep list {path}: no keys (it would leave out every sample)")
    return keys


def _keep_only(src: Iterator[dict], keep: frozenset[str], counter: SkipCounter) -> Iterator[dict]:
    """Drop samples whose key is not in the keep list, before any decoding; each counts as ``not_in_keep_list``."""
    for sample in src:
        if str(sample.get("__key__", "")) in keep:
            yield sample
        else:
            counter.bump("not_in_keep_list")


def _seeded_shuffle(src: Iterator[dict], bufsize: int, seed: str) -> Iterator[dict]:
    """Buffer shuffle whose RNG is seeded per worker at iteration time, so every worker's order is reproducible."""
    rng = random.Random(stream_seed_of(seed, _worker_id()))
    yield from wds.shuffle(bufsize, initial=bufsize, rng=rng)(src)


def open_image(data: bytes) -> Image.Image | str:
    """The RGB image, or the skip kind; the size is checked from the header before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    return "oversized_image"
                if min(img.size) < MIN_IMAGE_SIDE:
                    return "tiny_image"
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "oversized_image"
    except Exception:  # PIL raises OSError, ValueError, SyntaxError, ... on bad input
        return "undecodable_image"


def _meta(raw: Any) -> dict[str, Any]:
    """The sample's json meta; unreadable meta is not worth dropping a sample for, so it reads as {}."""
    try:
        meta = json.loads(raw) if raw is not None else {}
    except (ValueError, TypeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def caption_text(sample: dict[str, Any]) -> tuple[str, bool]:
    """``(stripped caption, True)``, or ``(skip kind, False)`` when the caption is missing, oversized, not UTF-8 or
    empty; shared by training, caching and eval readers so they skip the same samples for the same reasons."""
    raw = first_field(sample, CAPTION_KEYS)
    if raw is None:
        return "missing_caption", False
    if len(raw) > MAX_CAPTION_BYTES:
        return "oversized_caption", False
    try:
        caption = (raw if isinstance(raw, str) else bytes(raw).decode("utf-8")).strip()
    except UnicodeDecodeError:
        return "bad_caption_encoding", False
    return (caption, True) if caption else ("empty_caption", False)


def parse_sample(sample: dict[str, Any]) -> tuple[Image.Image, str, dict[str, Any]] | str:
    """(RGB image, caption, meta), or the skip kind explaining why the sample is unusable."""
    data = first_field(sample, IMAGE_KEYS)
    if data is None:
        return "missing_image"
    caption, ok = caption_text(sample)
    if not ok:
        return caption
    image = open_image(data)
    if isinstance(image, str):
        return image
    return image, caption, _meta(sample.get("json"))


class _TorchRngStream:
    """A private CPU RNG stream for random transforms: a train epoch is reproducible, images included, even with
    num_workers=0, without reseeding or advancing the caller's global torch RNG."""

    def __init__(self, seed: int) -> None:
        self.state = torch.Generator().manual_seed(seed).get_state()

    def run(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        outer = torch.get_rng_state()
        torch.set_rng_state(self.state)
        try:
            return fn(arg)
        finally:
            self.state = torch.get_rng_state()
            torch.set_rng_state(outer)


def _decode(
    src: Iterator[dict], preprocess: Callable, counter: SkipCounter, seed: str | None
) -> Iterator[dict[str, Any]]:
    rng = None if seed is None else _TorchRngStream(stream_seed_of(seed, _worker_id(), "transforms"))
    for sample in src:
        parsed = parse_sample(sample)
        if isinstance(parsed, str):
            counter.bump(parsed)
            continue
        image, caption, meta = parsed
        pixels = preprocess(image) if rng is None else rng.run(preprocess, image)
        pixels = pixels if isinstance(pixels, dict) else {"image": pixels}  # several models: one tensor per view
        yield {**pixels, "caption": caption, "key": str(sample.get("__key__", "")), "meta": meta}


def _decode_cached(src: Iterator[dict], cache: Replayer, counter: SkipCounter, seed: str) -> Iterator[dict]:
    """Cached-teacher mode: the student sees the stored augmentation's pixels, which the teacher saw when caching."""
    for sample in src:
        parsed = parse_sample(sample)
        if isinstance(parsed, str):
            counter.bump(parsed)
            continue
        yield cache.replay(str(sample.get("__url__", "")), str(sample.get("__key__", "")), *parsed, seed=seed)


def _collate(samples: list[dict[str, Any]], tokenizer: Callable, counter: SkipCounter) -> dict[str, Any]:
    """Runs where the samples were decoded, so draining the counter here attributes skips to this batch.

    Every tensor field of a sample (``image``, and each other model's pixels) is stacked; a tokenizer that returns a
    dict (one entry per distinct tokenizer, see :mod:`clipslim.data.views`) adds each as its own key."""
    tensors = {k: torch.stack([s[k] for s in samples]) for k, v in samples[0].items() if torch.is_tensor(v)}
    tokens = tokenizer([s["caption"] for s in samples])
    tokens = tokens if isinstance(tokens, dict) else {"text": torch.as_tensor(tokens).long()}
    return {
        **tensors,
        **tokens,
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
        "skipped": counter.drain(),
    }


def _flush_tail(
    batches: Iterator[dict[str, Any]], counter: SkipCounter, skips_only: bool = False
) -> Iterator[dict[str, Any]]:
    """Hold each batch back by one so skips after the last batch (or in a dropped tail) are added to it. A reader
    that made no batch at all yields ``{"skipped": ...}`` alone when ``skips_only`` (training counts it), so a
    dataset where every sample is bad reports what was wrong rather than "skipped: none"."""
    counter.drain()  # forget tallies of an earlier, abandoned pass in this process
    last = None
    for batch in batches:
        if last is not None:
            yield last
        last = batch
    leftover = counter.drain()
    if last is None:
        if leftover and skips_only:
            yield {"skipped": leftover}
        elif leftover:
            log.warning("a data worker yielded no batch; its skips are lost: %s", SkipStats(leftover).summary())
        return
    for kind, n in leftover.items():
        last["skipped"][kind] = last["skipped"].get(kind, 0) + n
    yield last


# ---------------------------------------------------------------- loader


def _tar_source(data: str | Path, order: random.Random | None, rank: int, world_size: int, workers: int) -> list[Any]:
    shards = resolve_shards(data)
    if order is not None:
        order.shuffle(shards)
    mine = shards[rank::world_size]
    if not mine:
        raise DataError(f"{data}: {len(shards)} shards cannot be split over {world_size} ranks")
    if workers > len(mine):
        log.warning("%s: %d shards for %d workers; %d workers will idle", data, len(mine), workers, workers - len(mine))
    return [wds.SimpleShardList(mine), wds.split_by_worker]


def _csv_source(data: str | Path, order: random.Random | None, rank: int, world_size: int) -> list[Any]:
    rows = read_csv_rows(Path(data))
    if order is not None:
        order.shuffle(rows)
    return [partial(iter, rows[rank::world_size]), wds.split_by_worker]


def make_loader(
    data: str | Path,
    preprocess: Callable,
    tokenizer: Callable,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int = 1000,
    teacher_cache: Replayer | None = None,
    keep_list: str | Path | None = None,
) -> DataLoader:
    """One epoch of batches ``{"image", "text", "key", "meta", "skipped"}`` from shards or a CSV.

    ``train``: shard (or row) order from ``Random(seed * 1000 + epoch)``, a seeded sample shuffle buffer and
    seeded random transforms, ``drop_last``; the same (data, seed, epoch, num_workers) give identical batches.
    A training reader that made no full batch yields ``{"skipped": ...}`` alone, so its skip counts are not lost.
    Otherwise file order (interleaved batch by batch across workers) and the last partial batch is kept.
    ``rank``/``world_size`` take every world_size-th shard (or row) for distributed runs without touching
    torch.distributed.
    ``teacher_cache``: ``preprocess`` is replaced by replaying the stored augmentation that (seed, epoch) picks for
    each sample, and batches also hold the teacher's ``teacher_image`` / ``teacher_text`` embeddings.
    ``keep_list``: a file of sample keys (:func:`read_keep_list`); other samples are skipped as ``not_in_keep_list``.
    """
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size (got {batch_size}, {rank}, {world_size})")
    counter = SkipCounter()
    order = random.Random(seed * 1000 + epoch) if train else None
    stream_seed = f"{seed}:{epoch}:{rank}" if train else None
    if is_csv_path(data):
        stages = _csv_source(data, order, rank, world_size)
        stages.append(partial(_csv_samples, base=Path(data).parent, counter=counter))
    else:
        stages = _tar_source(data, order, rank, world_size, num_workers)
        stages.append(partial(tar_samples, counter=counter))
    if keep_list is not None:
        stages.append(partial(_keep_only, keep=read_keep_list(keep_list), counter=counter))
    if not is_csv_path(data) and stream_seed is not None and shuffle_buffer > 1:
        stages.append(partial(_seeded_shuffle, bufsize=shuffle_buffer, seed=stream_seed))
    decode = partial(_decode, preprocess=preprocess, counter=counter, seed=stream_seed)
    collate = partial(_collate, tokenizer=tokenizer, counter=counter)
    if teacher_cache is not None:
        decode = partial(_decode_cached, cache=teacher_cache, counter=counter, seed=f"{seed}:{epoch}")
        collate = partial(teacher_cache.collate, base=collate)
    stages += [
        decode,
        wds.batched(batch_size, collation_fn=collate, partial=not train),
        partial(_flush_tail, counter=counter, skips_only=train),
    ]
    # DataLoader draws its workers' base seed from this generator, not from (and advancing) the global torch RNG.
    generator = torch.Generator().manual_seed(stream_seed_of(seed, epoch, rank, "loader"))
    pipeline = wds.DataPipeline(*stages)
    return DataLoader(
        pipeline, batch_size=None, num_workers=num_workers, persistent_workers=False, generator=generator,
        worker_init_fn=_leave_stop_signals_to_main,
    )  # fmt: skip


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _leave_stop_signals_to_main(worker_id: int) -> None:
    """Ctrl-C or a scheduler's SIGTERM reaches the whole process group; a worker that died of it would crash the
    trainer before it saves. Workers ignore both: the main process saves, then shuts its workers down. A signal that
    arrived since the fork is pending (see :func:`iterate`): ignoring it drops it, then the mask is lifted."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def iterate(loader: DataLoader) -> Iterator[Any]:
    """``iter(loader)`` with SIGINT/SIGTERM blocked while it forks its workers: a worker inherits the mask, so a
    group signal that lands before :func:`_leave_stop_signals_to_main` runs waits instead of killing it (workers
    are re-forked every epoch, so that window recurs). The main process gets its own copy once the mask is back."""
    if not loader.num_workers:
        return iter(loader)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
