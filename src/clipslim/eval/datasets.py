"""Eval sets beyond shapes: ImageFolder classification and CSV / webdataset retrieval, plus the task runner.

``--data PATH`` is recognised by its layout:

- shapes-style folder (``eval/*.tar`` + ``classnames.txt``, optional ``ood/*.tar``): zero-shot (held-out / seen /
  ood), retrieval (instance and class-level R@1), linear probe;
- ImageFolder (``root/<class>/*.png|jpg``, or ``root/train/<class>`` + ``root/test|val/<class>``): zero-shot on the
  test split (or the whole folder), linear probe from train to test. Class names are the folder names, or the
  lines of ``classnames.txt`` matched to the folders *by name* (any order; ``_``/``-`` read as spaces), or
  ``folder<TAB>class name`` lines; templates come from ``--templates FILE``, ``templates.txt`` (``{}`` or ``{c}``
  placeholders) or ``DEFAULT_TEMPLATES``;
- a root with ``classification/`` (an ImageFolder as above) and/or ``retrieval.csv``: both, from one ``--data``;
  ``classnames.txt`` / ``templates.txt`` are looked for in the root, then in ``classification/``;
- ``.csv`` (``filepath,caption``; repeated filepaths are several captions of one image) or webdataset shards
  (image + ``txt``, one caption per line): retrieval.

The datasets here yield what CLIP_benchmark's metric functions expect (``(image, label)`` with ``.classes``;
``(image, [captions])``), so the parity test feeds the very same loaders to both implementations.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from clipslim.data.loader import (
    IMAGE_KEYS,
    DataError,
    SkipCounter,
    SkipStats,
    caption_text,
    check_bad_fraction,
    first_field,
    open_image,
    read_csv_rows,
    resolve_shards,
    tar_samples,
)
from clipslim.eval.linear_probe import linear_probe
from clipslim.eval.retrieval import class_retrieval_metrics, retrieval_metrics
from clipslim.eval.run import (
    RECALL_KS,
    classification_masks,
    encode_batches,
    encode_shapes_eval,
    evaluate_features,
)
from clipslim.eval.zeroshot import autocast_ctx, build_classifier, zeroshot_metrics

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# The 7-template ensemble the CLIP authors recommend for ImageNet (CLIP's Prompt_Engineering notebook).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "itap of a {c}.",
    "a bad photo of the {c}.",
    "a origami {c}.",
    "a photo of the large {c}.",
    "a {c} in a video game.",
    "art of the {c}.",
    "a photo of the small {c}.",
)
TASKS = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe")
TASK_ALIASES = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval", "lp": "linear_probe"}
TEST_SPLITS = ("test", "val")


def parse_tasks(text: str) -> list[str]:
    """``zeroshot,retrieval,linear_probe`` (or CLIP_benchmark's full names) -> canonical task names."""
    tasks = []
    for name in (t.strip() for t in text.split(",") if t.strip()):
        task = TASK_ALIASES.get(name, name)
        if task not in TASKS:
            raise ValueError(f"unknown task '{name}' (choose from {', '.join([*TASK_ALIASES, *TASKS])})")
        tasks.append(task)
    return list(dict.fromkeys(tasks))


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text") from err


def _open_rgb(data: bytes | Path, skipped: dict[str, int]) -> Image.Image | None:
    """The RGB image, or None after counting why it is unusable (same kinds and guards as training data)."""
    try:
        raw = data if isinstance(data, bytes) else data.read_bytes()
    except OSError:
        kind: Image.Image | str = "read_error"
    else:
        kind = open_image(raw)
    if isinstance(kind, str):
        skipped[kind] = skipped.get(kind, 0) + 1
        return None
    return kind


def _load(source: bytes | Path, skipped: dict[str, int], transform: Callable | None) -> Any:
    """The transformed image, or None (counted in ``skipped``) when it cannot be used."""
    image = _open_rgb(source, skipped)
    return image if image is None or transform is None else transform(image)


def _drop_bad(batch: list[tuple[Any, Any]]) -> Any:
    """Collate without the samples whose image could not be used (counted by the dataset); None if none is left."""
    good = [b for b in batch if b[0] is not None]
    return default_collate(good) if good else None


# ---------------------------------------------------------------- ImageFolder


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_folder_splits(root: str | Path) -> dict[str, Path]:
    """``{"test": dir}`` for a plain ImageFolder, plus ``"train"`` when ``root/train`` + ``root/test|val`` exist."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data path not found: {root}")
    test = next((root / s for s in TEST_SPLITS if (root / s).is_dir()), None)
    if (root / "train").is_dir() and test is not None:
        return {"train": root / "train", "test": test}
    return {"test": root}


def _find(dirs: Sequence[str | Path], name: str) -> Path | None:
    """The first ``dir/name`` that exists."""
    return next((Path(d) / name for d in dirs if (Path(d) / name).is_file()), None)


def _plain(name: str) -> str:
    return name.replace("_", " ")


def _norm(name: str) -> str:
    """A class or folder name for matching: lower case, ``_``/``-`` as spaces, single spaces."""
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


def match_classnames(path: Path, folders: Sequence[str]) -> list[str]:
    """Class names for ``folders`` (sorted order) from ``classnames.txt``, matched by name, never by position.

    Lines are either class names that equal the folder names up to case and ``_``/``-``/spaces (in any order), or
    ``folder<TAB>class name``. A line order that differs from the folder order used to mislabel every image.
    """
    lines = _read_lines(path)
    if len(lines) != len(folders):
        raise DataError(f"{path}: {len(lines)} class names for {len(folders)} class folders")
    if all("\t" in line for line in lines):
        pairs = [line.split("\t", 1) for line in lines]
        by_folder = {folder.strip(): name.strip() for folder, name in pairs}
    else:
        by_folder = {}
        index = {_norm(f): f for f in folders}
        for line in lines:
            by_folder.setdefault(index.get(_norm(line), ""), line)
    missing = [f for f in folders if f not in by_folder]
    if missing:
        raise DataError(
            f"{path}: class folder '{missing[0]}' has no matching line ({len(missing)} unmatched); lines must name "
            "the folders (any order) or be 'folder<TAB>class name'"
        )
    return [by_folder[f] for f in folders]


def read_templates(path: str | Path) -> list[str]:
    """Prompt templates, one per line, each with a ``{}`` or ``{c}`` placeholder for the class name."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"templates file not found: {path}")
    lines = _read_lines(path)
    bad = [i for i, line in enumerate(lines, 1) if "{}" not in line and "{c}" not in line]
    if not lines or bad:
        where = f"line {bad[0]} has no {{}} or {{c}} placeholder" if bad else "no templates"
        raise DataError(f"{path}: {where}")
    return lines


class ImageFolderSet(Dataset):
    """``(image, label)`` pairs of ``root/<class>/*``; ``classes`` and ``templates`` as CLIP_benchmark names them.

    ``meta_dir`` is where ``classnames.txt`` / ``templates.txt`` are looked for (the dataset root for split folders).
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable | None = None,
        meta_dir: str | Path | Sequence[str | Path] | None = None,
    ):
        self.root, self.transform = Path(root), transform
        self.skipped: dict[str, int] = {}  # bad images, counted as they are read (num_workers=0)
        metas = [self.root] if meta_dir is None else [meta_dir] if isinstance(meta_dir, str | Path) else meta_dir
        dirs = _class_dirs(self.root)
        if not dirs:
            raise DataError(f"{self.root}: no class folders (expected root/<class>/*.png|jpg)")
        self.folders = [d.name for d in dirs]
        names = _find(metas, "classnames.txt")
        self.classes = match_classnames(names, self.folders) if names else [_plain(f) for f in self.folders]
        templates = _find(metas, "templates.txt")
        self.templates = read_templates(templates) if templates else list(DEFAULT_TEMPLATES)
        files = [(f, label) for label, d in enumerate(dirs) for f in sorted(d.iterdir())]
        self.samples = [(f, label) for f, label in files if f.suffix.lower() in IMAGE_SUFFIXES]
        if not self.samples:
            raise DataError(f"{self.root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, label = self.samples[i]
        return _load(path, self.skipped, self.transform), label

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]


# ---------------------------------------------------------------- retrieval sets


def _csv_items(path: Path, skipped: dict[str, int]) -> list[tuple[Path, list[str]]]:
    groups: dict[Path, list[str]] = {}
    for filepath, caption in read_csv_rows(path):
        image = Path(filepath or "")
        image = image if image.is_absolute() else path.parent / image
        if not filepath or not image.is_file():
            skipped["missing_image"] = skipped.get("missing_image", 0) + 1
        elif not (caption or "").strip():
            skipped["empty_caption"] = skipped.get("empty_caption", 0) + 1
        else:
            groups.setdefault(image, []).append(caption.strip())
    return list(groups.items())


def _wds_items(data: str | Path, skipped: dict[str, int]) -> list[tuple[bytes, list[str]]]:
    counter, items = SkipCounter(), []
    for sample in tar_samples([{"url": s} for s in resolve_shards(data)], counter):
        image = first_field(sample, IMAGE_KEYS)
        text, ok = caption_text(sample) if image is not None else ("missing_image", False)
        if not ok:
            counter.bump(text)
            continue
        items.append((bytes(image), [line.strip() for line in text.splitlines() if line.strip()]))
    for kind, n in counter.drain().items():
        skipped[kind] = skipped.get(kind, 0) + n
    return items


class RetrievalSet(Dataset):
    """``(image, [captions])`` per image from a CSV or webdataset shards; bad rows are skipped and counted.

    Webdataset image bytes are held in memory (eval sets are small); CSV images are read on access.
    """

    def __init__(self, data: str | Path, transform: Callable | None = None):
        self.transform, self.skipped = transform, {}
        is_csv = str(data).lower().endswith(".csv")
        self.items = _csv_items(Path(data), self.skipped) if is_csv else _wds_items(data, self.skipped)
        if not self.items:
            raise DataError(f"{data}: no usable image-caption samples")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, list[str]]:
        source, captions = self.items[i]
        return _load(source, self.skipped, self.transform), captions

    @staticmethod
    def collate(batch: Sequence[tuple[torch.Tensor, list[str]]]) -> tuple[torch.Tensor, list[list[str]]]:
        """Images stacked, captions kept as one list per image (CLIP_benchmark's ``image_captions_collate_fn``);
        samples whose image was unusable are left out, and a batch with none left is None."""
        good = [b for b in batch if b[0] is not None]
        return (torch.stack([b[0] for b in good]), [b[1] for b in good]) if good else None


# ---------------------------------------------------------------- detection


@dataclass
class EvalData:
    """An eval set recognised from its path: ``kind`` is ``shapes``, ``imagefolder``, ``retrieval`` or ``combined``
    (a root with ``classification/`` and/or ``retrieval.csv``)."""

    kind: str
    path: Path | str
    name: str
    splits: dict[str, Path] = field(default_factory=dict)
    retrieval: Path | None = None
    """The retrieval CSV of a combined root."""
    meta_dirs: tuple[Path, ...] = ()
    """Where classnames.txt / templates.txt are looked for, in order (default: the data path)."""

    @property
    def tasks(self) -> tuple[str, ...]:
        """Tasks this set supports (a linear probe needs a training split)."""
        if self.kind == "retrieval":
            return ("zeroshot_retrieval",)
        if self.kind == "shapes":
            return TASKS
        folder = ("zeroshot_classification", "linear_probe") if "train" in self.splits else ("zeroshot_classification",)
        return (folder if self.splits else ()) + (("zeroshot_retrieval",) if self.retrieval else ())

    @property
    def default_tasks(self) -> tuple[str, ...]:
        return tuple(t for t in self.tasks if t != "linear_probe")


def is_shapes_folder(path: Path) -> bool:
    return path.is_dir() and (path / "classnames.txt").is_file() and (path / "eval").is_dir()


def open_eval_data(path: str | Path) -> EvalData:
    """Recognise an eval set; one-line error naming the path when it is none of the supported layouts."""
    text = str(path)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(text.split("{")[0]).stem or "data").strip("_") or "data"
    p = Path(text)
    if is_shapes_folder(p):
        return EvalData("shapes", p, name)
    if text.lower().endswith(".csv") and not p.is_file():
        raise DataError(f"data path not found: {text}")
    if text.lower().endswith(".csv") or "{" in text or p.suffix == ".tar" or (p.is_dir() and any(p.glob("*.tar"))):
        return EvalData("retrieval", text, name)
    if p.is_dir() and ((p / "classification").is_dir() or (p / "retrieval.csv").is_file()):
        folder, csv = p / "classification", p / "retrieval.csv"
        splits = image_folder_splits(folder) if folder.is_dir() else {}
        return EvalData("combined", p, name, splits, csv if csv.is_file() else None, (p, folder))
    if p.is_dir():
        return EvalData("imagefolder", p, name, image_folder_splits(p))
    raise DataError(f"data path not found or not an eval set: {text}")


# ---------------------------------------------------------------- encoding


@torch.no_grad()
def encode_images(
    model: nn.Module, loader: Iterable, device: str | torch.device = "cpu", amp: bool = False, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image features and labels of an ``(image, label)`` loader, in eval mode."""
    was_training, feats, labels = model.training, [], []
    model.eval()
    try:
        for batch in tqdm(loader, desc="images", unit="batch", disable=not progress, leave=False):
            if batch is None:
                continue
            images, target = batch
            with autocast_ctx(device, amp):
                emb = model.encode_image(images.to(device))
            feats.append(F.normalize(emb.float(), dim=-1).cpu())
            labels.append(torch.as_tensor(target).long())
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def encode_retrieval(
    model: nn.Module,
    tokenizer: Callable,
    loader: Iterable,
    device: str | torch.device = "cpu",
    amp: bool = False,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image features, caption features, caption -> image index) of an ``(images, [[captions]])`` loader."""
    was_training, images_out, texts_out, t2i, base = model.training, [], [], [], 0
    model.eval()
    try:
        for batch in tqdm(loader, desc="retrieval", unit="batch", disable=not progress, leave=False):
            if batch is None:
                continue
            images, captions = batch
            flat = [c for caps in captions for c in caps]
            t2i += [base + i for i, caps in enumerate(captions) for _ in caps]
            base += len(captions)
            with autocast_ctx(device, amp):
                img, txt = model.encode_image(images.to(device)), model.encode_text(tokenizer(flat).to(device))
            images_out.append(F.normalize(img.float(), dim=-1).cpu())
            texts_out.append(F.normalize(txt.float(), dim=-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(images_out), torch.cat(texts_out), torch.tensor(t2i, dtype=torch.long)


# ---------------------------------------------------------------- task runner


@dataclass
class RunOptions:
    """How to run the tasks: batch size, device, mixed precision (None: on for CUDA), few-shot ks (-1: all)."""

    batch_size: int = 256
    device: str = "cpu"
    amp: bool | None = None
    fewshot_ks: Sequence[int] = (-1,)
    progress: bool = True
    seed: int = 0
    max_bad_fraction: float = 0.1
    """More bad (skipped) samples than this fraction make the numbers meaningless: stop with an error instead."""
    templates: Sequence[str] | None = None
    """Zero-shot prompt templates for every classification set (``--templates FILE``); None: the set's own."""

    @property
    def use_amp(self) -> bool:
        return torch.device(self.device).type == "cuda" if self.amp is None else self.amp


def lp_key(k: int) -> str:
    """Result key of a linear probe: ``linear_probe`` (all training rows) or ``linear_probe_k{k}`` (few-shot)."""
    return "linear_probe" if k < 0 else f"linear_probe_k{k}"


def _probes(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], opts: RunOptions):
    return {lp_key(k): linear_probe(*train, *test, fewshot_k=k, seed=opts.seed) for k in opts.fewshot_ks}


def _flat_zeroshot(results: dict[str, Any]) -> dict[str, Any]:
    """Shapes' zero-shot groups as one flat CLIP_benchmark metrics dict: all in-distribution classes, then
    ``heldout_``/``seen_``/``ood_`` (``ood_acc1`` is None and ``ood_n`` 0 on a folder without an ood split)."""
    flat = dict(results["zeroshot_all"])
    for split in ("heldout", "seen", "ood"):
        flat.update({f"{split}_{k}": v for k, v in results[f"zeroshot_{split}"].items()})
    return flat


def _labelled(features: Any) -> tuple[torch.Tensor, torch.Tensor]:
    mask = classification_masks(features.meta)["all"]
    labels = torch.tensor([m.get("cls", -1) for m in features.meta], dtype=torch.long)
    return features.image[mask], labels[mask]


def _shapes_tasks(bundle: Any, data: EvalData, tasks: Sequence[str], opts: RunOptions) -> dict[str, Any]:
    from clipslim.data.loader import make_loader
    from clipslim.data.shapes import read_lines

    model, root, out = bundle.model.to(opts.device), Path(data.path), {}

    def encode(split: str) -> Any:
        loader = make_loader(str(root / split), bundle.preprocess_val, bundle.tokenizer, opts.batch_size, train=False)
        return encode_batches(model, loader, device=opts.device, amp=opts.use_amp, progress=opts.progress)

    feats = encode_shapes_eval(bundle, root, opts.batch_size, opts.device, opts.use_amp, opts.progress)
    skipped = dict(feats.skipped)
    if {"zeroshot_classification", "zeroshot_retrieval"} & set(tasks):
        names = read_lines(root / "classnames.txt")
        templates = list(opts.templates or read_lines(root / "templates.txt"))
        clf = build_classifier(model, bundle.tokenizer, names, templates, device=opts.device, amp=opts.use_amp)
        res = evaluate_features(feats, clf.cpu())
        if "zeroshot_classification" in tasks:
            out["zeroshot_classification"] = {**_flat_zeroshot(res), "n_classes": len(names), "templates": templates}
        if "zeroshot_retrieval" in tasks:
            out["zeroshot_retrieval"] = res["retrieval"]
    if "linear_probe" in tasks:
        train = encode("train")
        skipped = {k: skipped.get(k, 0) + train.skipped.get(k, 0) for k in {*skipped, *train.skipped}}
        x_train, y_train = _labelled(train)
        x_test, y_test = _labelled(feats)
        seen = torch.isin(y_test, y_train)  # held-out classes have no training images: a probe cannot know them
        out.update(_probes((x_train, y_train), (x_test[seen], y_test[seen]), opts))
    good = len(feats.image) + (len(train.image) if "linear_probe" in tasks else 0)
    return {"tasks": out, "skipped": skipped, "good": good}


def _folder_features(bundle: Any, folder: ImageFolderSet, opts: RunOptions) -> tuple[torch.Tensor, torch.Tensor]:
    loader = DataLoader(folder, batch_size=opts.batch_size, num_workers=0, collate_fn=_drop_bad)
    return encode_images(bundle.model, loader, device=opts.device, amp=opts.use_amp, progress=opts.progress)


def _imagefolder_tasks(bundle: Any, data: EvalData, tasks: Sequence[str], opts: RunOptions) -> dict[str, Any]:
    bundle.model.to(opts.device)
    meta = data.meta_dirs or (Path(data.path),)
    test = ImageFolderSet(data.splits["test"], bundle.preprocess_val, meta_dir=meta)
    x_test, y_test = _folder_features(bundle, test, opts)
    out: dict[str, Any] = {}
    if "zeroshot_classification" in tasks:
        templates = list(opts.templates or test.templates)
        clf = build_classifier(bundle.model, bundle.tokenizer, test.classes, templates, opts.device, opts.use_amp)
        metrics = zeroshot_metrics(x_test, y_test, clf.cpu())
        out["zeroshot_classification"] = {**metrics, "n_classes": len(test.classes), "templates": templates}
    if "linear_probe" in tasks:
        train = ImageFolderSet(data.splits["train"], bundle.preprocess_val, meta_dir=meta)
        if train.folders != test.folders:
            raise DataError(f"{data.path}: train and {data.splits['test'].name} have different class folders")
        train_xy = _folder_features(bundle, train, opts)
        out.update(_probes(train_xy, (x_test, y_test), opts))
        skipped = {k: test.skipped.get(k, 0) + train.skipped.get(k, 0) for k in {*test.skipped, *train.skipped}}
        return {"tasks": out, "skipped": skipped, "good": len(x_test) + len(train_xy[0])}
    return {"tasks": out, "skipped": dict(test.skipped), "good": len(x_test)}


def caption_labels(captions: Sequence[Sequence[str]]) -> torch.Tensor | None:
    """A class per image from its captions (images whose captions are the same set share a class), or None when
    no two images share one: then class-level recall would equal instance recall."""
    keys = [frozenset(" ".join(c.lower().rstrip(".").split()) for c in caps) for caps in captions]
    ids: dict[frozenset[str], int] = {}
    labels = [ids.setdefault(k, len(ids)) for k in keys]
    return torch.tensor(labels) if len(ids) < len(labels) else None


def _retrieval_tasks(bundle: Any, data: EvalData, tasks: Sequence[str], opts: RunOptions) -> dict[str, Any]:
    model = bundle.model.to(opts.device)
    ds = RetrievalSet(data.path, bundle.preprocess_val)
    loader = DataLoader(ds, batch_size=opts.batch_size, num_workers=0, collate_fn=RetrievalSet.collate)
    captions: list[list[str]] = []

    def tap(batches: Iterable) -> Iterable:  # the captions of the images actually encoded (bad ones are dropped)
        for batch in batches:
            captions.extend(batch[1] if batch is not None else [])
            yield batch

    img, txt, t2i = encode_retrieval(model, bundle.tokenizer, tap(loader), opts.device, opts.use_amp, opts.progress)
    metrics = {**retrieval_metrics(img, txt, t2i, ks=RECALL_KS), "n": len(img), "n_captions": len(txt)}
    labels = caption_labels(captions)
    if labels is not None:  # captions repeat: say whether the top item at least shows the right thing
        metrics.update(class_retrieval_metrics(img, txt, t2i, labels), n_classes=int(labels.max()) + 1)
    return {"tasks": {"zeroshot_retrieval": metrics}, "skipped": dict(ds.skipped), "good": len(img)}


def _combined_tasks(bundle: Any, data: EvalData, tasks: Sequence[str], opts: RunOptions) -> dict[str, Any]:
    """classification/ as an ImageFolder and retrieval.csv as a retrieval set, merged into one result."""
    parts = []
    folder_tasks = [t for t in tasks if t != "zeroshot_retrieval"]
    if folder_tasks:
        parts.append(_imagefolder_tasks(bundle, data, folder_tasks, opts))
    if "zeroshot_retrieval" in tasks:
        csv = EvalData("retrieval", data.retrieval, data.name)
        parts.append(_retrieval_tasks(bundle, csv, ["zeroshot_retrieval"], opts))
    skipped: dict[str, int] = {}
    for part in parts:
        for kind, n in part["skipped"].items():
            skipped[kind] = skipped.get(kind, 0) + n
    tasks_out = {k: v for part in parts for k, v in part["tasks"].items()}
    return {"tasks": tasks_out, "skipped": skipped, "good": sum(part["good"] for part in parts)}


_RUNNERS = {
    "shapes": _shapes_tasks,
    "imagefolder": _imagefolder_tasks,
    "retrieval": _retrieval_tasks,
    "combined": _combined_tasks,
}


def evaluate_data(
    bundle: Any, data: EvalData | str | Path, tasks: Sequence[str] | None = None, opts: RunOptions | None = None
) -> dict[str, Any]:
    """Run ``tasks`` (default: the set's cheap ones) of a ``ClipBundle`` on one eval set, encoding each split once.

    Returns ``{"tasks": {key: metrics}, "skipped": counts}``; keys are task names, few-shot probes ``lp_key(k)``.
    """
    data = data if isinstance(data, EvalData) else open_eval_data(data)
    tasks = list(data.default_tasks if tasks is None else tasks)
    unsupported = [t for t in tasks if t not in data.tasks]
    if unsupported:
        raise DataError(f"{data.path}: {data.kind} data does not support {', '.join(unsupported)}")
    opts = opts or RunOptions()
    result = _RUNNERS[data.kind](bundle, data, tasks, opts)
    check_bad_fraction(result["skipped"], result.pop("good"), opts.max_bad_fraction, f"eval data {data.path}")
    if result["skipped"]:
        log.warning("%s: %s", data.path, SkipStats(dict(result["skipped"])).summary())
    return result
