"""CoOp prompt tuning for any native open_clip / clipslim model: learned context, frozen towers, noisy labels.

The class prompts are ``[V1]…[Vm] {classname}.``: the ``m`` context vectors are the only trained tensor; class names
and both towers stay fixed (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022, unified
context). The vectors replace the token embeddings of ``m`` placeholder words through a forward hook on the text
tower's ``token_embedding``, so the rest of the text forward is stock open_clip code and the end-of-text pooling
still finds its token.

Training reads cached image features (the image tower is frozen and the eval transform deterministic, so each image
is encoded once); a step runs the text tower on the ``C`` class prompts only. For the robustness study,
:func:`symmetric_noise` flips an exact fraction of labels to a uniformly drawn *other* class. The unsupervised mode
(UPL-style) trains on the model's own zero-shot predictions: per class the ``k`` most confident images (at least
``min_confidence``), so every class gets at most ``k`` pseudo-labels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .inherit.manual import InheritError, text_tower
from .io import load_tensors, save_tensors

__all__ = [
    "PromptLearner",
    "TuneConfig",
    "load_prompts",
    "pseudo_labels",
    "save_prompts",
    "symmetric_noise",
    "tune_prompts",
]

PLACEHOLDER = "X"


@dataclass
class TuneConfig:
    """Prompt-tuning options (defaults: a few hundred Adam steps, enough on 16 shots x 52 classes)."""

    n_ctx: int = 4
    init: str | None = "a photo of a"
    """Words whose token embeddings start the context (their count must be ``n_ctx``); None: N(0, 0.02)."""
    steps: int = 300
    lr: float = 2e-3
    batch_size: int = 128
    weight_decay: float = 0.0
    seed: int = 0

    def validate(self, where: str = "prompt") -> None:
        if self.n_ctx < 1:
            raise ValueError(f"{where}.n_ctx: expected >= 1, got {self.n_ctx}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"{where}: steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"{where}.lr: expected > 0, got {self.lr}")
        if self.init is not None and len(self.init.split()) != self.n_ctx:
            raise ValueError(f"{where}.init: '{self.init}' has {len(self.init.split())} words, n_ctx is {self.n_ctx}")


class PromptLearner(nn.Module):
    """``m`` learned context vectors for a frozen CLIP; ``forward(image_features) -> logits [N, C]``.

    The CLIP model is held by reference (not a submodule): the learner's state dict is the context alone.
    """

    def __init__(
        self, model: nn.Module, tokenizer: Any, classnames: Sequence[str], n_ctx: int = 4, init: str | None = None
    ) -> None:
        super().__init__()
        if not classnames:
            raise ValueError("prompt: need at least one class name")
        try:
            embedding = text_tower(model).module.token_embedding
        except (InheritError, AttributeError) as err:
            raise ValueError(f"prompt: the model's text tower is not a native open_clip one ({err})") from err
        object.__setattr__(self, "_embedding", embedding)  # references, not submodules: the state is the context
        object.__setattr__(self, "model", model.eval().requires_grad_(False))
        self.classnames, self.n_ctx = list(classnames), n_ctx
        placeholder = " ".join([PLACEHOLDER] * n_ctx)
        self.register_buffer("tokens", tokenizer([f"{placeholder} {name}." for name in self.classnames]), False)
        self._check_fit(placeholder)
        self.ctx = nn.Parameter(self._init_ctx(tokenizer, init))

    def _check_fit(self, placeholder: str) -> None:
        """Every prompt must fit the context length with its end-of-text token (truncation would lose the name)."""
        full = [n for n, t in zip(self.classnames, self.tokens, strict=True) if t[-1] != 0]
        if full:
            raise ValueError(
                f"prompt: '{placeholder} {full[0]}.' does not fit the context length {self.tokens.shape[1]}"
            )

    def _init_ctx(self, tokenizer: Any, init: str | None) -> torch.Tensor:
        weight = self._embedding.weight
        if init is None:
            gen = torch.Generator().manual_seed(0)
            return torch.randn(self.n_ctx, weight.shape[1], generator=gen).to(weight) * 0.02
        ids = tokenizer([init])[0, 1 : 1 + self.n_ctx].to(weight.device)
        return weight[ids].detach().clone()

    def _inject(self, module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx.to(out.dtype).unsqueeze(0).expand(out.shape[0], -1, -1)
        return torch.cat([out[:, :1], ctx, out[:, 1 + self.n_ctx :]], dim=1)

    def text_features(self) -> torch.Tensor:
        """L2-normalised class embeddings ``[C, d]`` of the prompts with the current context."""
        handle = self._embedding.register_forward_hook(self._inject)
        try:
            return F.normalize(self.model.encode_text(self.tokens), dim=-1)
        finally:
            handle.remove()

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        scale = self.model.logit_scale.exp().detach()
        return scale * F.normalize(image_features, dim=-1) @ self.text_features().t()


def tune_prompts(
    learner: PromptLearner, features: torch.Tensor, labels: torch.Tensor, cfg: TuneConfig, progress: bool = False
) -> list[float]:
    """Train the context by cross-entropy on (image feature, label) rows; returns the loss per step."""
    cfg.validate()
    labels = torch.as_tensor(labels).long()
    if len(features) != len(labels) or not len(labels):
        raise ValueError(f"prompt: {len(features)} features for {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= len(learner.classnames):
        raise ValueError(f"prompt: labels must lie in [0, {len(learner.classnames)})")
    device = learner.ctx.device
    features, labels = features.to(device), labels.to(device)
    opt = torch.optim.AdamW([learner.ctx], lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for step in tqdm(range(cfg.steps), desc="prompt", disable=not progress, leave=False):
        rows = torch.randint(len(labels), (min(cfg.batch_size, len(labels)),), generator=gen).to(device)
        for group in opt.param_groups:  # cosine decay, as CoOp
            group["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * step / cfg.steps))
        loss = F.cross_entropy(learner(features[rows]), labels[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def predict(learner: PromptLearner, features: torch.Tensor) -> torch.Tensor:
    return learner(features.to(learner.ctx.device)).argmax(dim=1).cpu()


def symmetric_noise(
    labels: torch.Tensor, rate: float, classes: Sequence[int] | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip exactly ``round(rate * n)`` labels, each to a uniformly drawn different class; returns (noisy, flipped).

    ``classes``: the label set to draw from (default: the classes present in ``labels``).
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate: expected a fraction in [0, 1], got {rate}")
    labels = torch.as_tensor(labels).long().cpu()
    pool = torch.as_tensor(sorted(set(classes if classes is not None else labels.tolist())), dtype=torch.long)
    if rate > 0 and len(pool) < 2:
        raise ValueError("noise rate: label noise needs at least two classes")
    gen = torch.Generator().manual_seed(seed)
    n_flip = int(round(rate * len(labels)))
    rows = torch.randperm(len(labels), generator=gen)[:n_flip]
    noisy = labels.clone()
    for r in rows.tolist():
        others = pool[pool != labels[r]]
        noisy[r] = others[torch.randint(len(others), (1,), generator=gen)]
    flipped = torch.zeros(len(labels), dtype=torch.bool)
    flipped[rows] = True
    return noisy, flipped


def pseudo_labels(logits: torch.Tensor, k: int, min_confidence: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced pseudo-labels: per predicted class, its ``k`` most confident rows with p >= min_confidence.

    Returns (row indices, labels), rows sorted by index.
    """
    if k < 1:
        raise ValueError(f"pseudo-labels: k must be >= 1, got {k}")
    probs = logits.float().softmax(dim=1)
    conf, pred = probs.max(dim=1)
    rows = []
    for c in pred.unique().tolist():
        candidates = torch.nonzero((pred == c) & (conf >= min_confidence)).flatten()
        order = torch.argsort(conf[candidates], descending=True, stable=True)
        rows.append(candidates[order[:k]])
    keep = torch.cat(rows).sort().values if rows else torch.empty(0, dtype=torch.long)
    return keep, pred[keep]


def save_prompts(learner: PromptLearner, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the context as safetensors; class names and options travel in the metadata."""
    meta = {"classnames": json.dumps(learner.classnames), "n_ctx": str(learner.n_ctx)}
    meta["clipslim"] = json.dumps(extra or {})
    return save_tensors(path, {"ctx": learner.ctx}, metadata=meta)


def load_prompts(path: str | Path, model: nn.Module, tokenizer: Any) -> PromptLearner:
    """A :class:`PromptLearner` for ``model`` with the context and class names stored in ``path``."""
    from safetensors import safe_open

    tensors = load_tensors(path)
    if "ctx" not in tensors:
        raise ValueError(f"{path}: no 'ctx' tensor (not a prompt file)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "classnames" not in meta:
        raise ValueError(f"{path}: metadata lacks 'classnames' (not a prompt file)")
    classnames = json.loads(meta["classnames"])
    learner = PromptLearner(model, tokenizer, classnames, n_ctx=int(tensors["ctx"].shape[0]))
    width = learner.ctx.shape[1]
    if tensors["ctx"].shape[1] != width:
        raise ValueError(f"{path}: context width {tensors['ctx'].shape[1]} does not match the model's {width}")
    with torch.no_grad():
        learner.ctx.copy_(tensors["ctx"].to(learner.ctx))
    return learner


# ---------------------------------------------------------------- labelled data as cached features


@dataclass
class LabelledFeatures:
    """L2-normalised image features with class labels; ``heldout`` marks shapes' held-out (unseen) classes."""

    features: torch.Tensor
    labels: torch.Tensor
    classnames: list[str]
    templates: list[str]
    heldout: torch.Tensor | None = None


class LabelledCSV(torch.utils.data.Dataset):
    """``filepath,label`` rows (paths relative to the CSV); classes are ``classnames`` or the sorted labels."""

    def __init__(self, path: str | Path, transform: Any, classnames: Sequence[str] | None = None) -> None:
        import csv

        self.path, self.transform = Path(path), transform
        if not self.path.is_file():
            raise FileNotFoundError(f"CSV not found: {self.path}")
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"filepath", "label"} <= set(rows[0]):
            raise ValueError(f"{self.path}: expected a header with 'filepath' and 'label' columns")
        self.classes = list(classnames) if classnames else sorted({r["label"] for r in rows})
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted({r["label"] for r in rows} - set(index))
        if unknown:
            raise ValueError(f"{self.path}: label '{unknown[0]}' is not one of the classes")
        self.samples = [(self.path.parent / r["filepath"], index[r["label"]]) for r in rows]
        self.templates = ["a photo of a {}."]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


def _shapes_split(bundle: Any, root: Path, split: str, max_images: int | None, opts: dict[str, Any]):
    from .data.loader import make_loader
    from .data.shapes import read_lines
    from .eval.run import classification_masks, encode_batches

    loader = make_loader(str(root / split), bundle.preprocess_val, bundle.tokenizer, opts["batch_size"], train=False)
    batches = _take_images(loader, max_images)
    feats = encode_batches(bundle.model, batches, device=opts["device"], progress=opts["progress"])
    mask = classification_masks(feats.meta)["all"]  # labelled single-object images
    labels = torch.tensor([m.get("cls", -1) for m in feats.meta], dtype=torch.long)[mask]
    heldout = torch.tensor([bool(m.get("heldout", False)) for m in feats.meta])[mask]
    names, templates = read_lines(root / "classnames.txt"), read_lines(root / "templates.txt")
    return LabelledFeatures(feats.image[mask], labels, names, templates, heldout)


def _take_images(batches: Any, max_images: int | None):
    seen = 0
    for batch in batches:
        if max_images is not None and seen >= max_images:
            return
        yield batch
        seen += len(batch["image"])


def labelled_features(
    bundle: Any,
    data: str | Path,
    split: str,
    *,
    max_images: int | None = None,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = False,
) -> LabelledFeatures:
    """Encode a labelled split once: a shapes folder (``train``/``eval``), an ImageFolder (``train``/``test``
    subfolders, or the folder itself) or a ``filepath,label`` CSV (``split`` ignored)."""
    from torch.utils.data import DataLoader, Subset

    from .eval.datasets import ImageFolderSet, encode_images, image_folder_splits, is_shapes_folder

    path = Path(data)
    bundle.model.to(device)
    opts = {"batch_size": batch_size, "device": device, "progress": progress}
    if is_shapes_folder(path):
        return _shapes_split(bundle, path, split, max_images, opts)
    if path.suffix.lower() == ".csv":
        ds: Any = LabelledCSV(path, bundle.preprocess_val)
        names, templates = ds.classes, ds.templates
    elif path.is_dir():
        splits = image_folder_splits(path)
        folder = splits.get(split) or splits.get("test" if split in ("eval", "val") else split) or splits["test"]
        ds = ImageFolderSet(folder, bundle.preprocess_val, meta_dir=path)
        names, templates = ds.classes, ds.templates
    else:
        raise FileNotFoundError(f"data not found or not a labelled set: {data}")
    if max_images is not None:
        ds = Subset(ds, range(min(max_images, len(ds))))
    loader = DataLoader(ds, batch_size=batch_size, num_workers=0)
    x, y = encode_images(bundle.model, loader, device=device, progress=progress)
    return LabelledFeatures(x, y, list(names), list(templates))
