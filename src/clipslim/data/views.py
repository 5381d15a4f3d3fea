"""Each model reads its own pixels and tokens from one decoded sample.

A teacher from elsewhere was trained with its own image size, resize rule and mean/std (OpenAI CLIP, SigLIP 0.5/0.5,
MobileCLIP 0/1) and often its own tokenizer; fed the student's tensors it is silently wrong. A :class:`Views`
decodes each image once and returns one tensor per *distinct* transform: models whose preprocessing is equal share
a tensor, so the common case (teacher and student configured alike) costs nothing extra.

Training augmentation keeps one geometry for all models: the random crop box is drawn once (with the student's
crop rule, from the same RNG draws the student's own transform would make, so the student's tensor is unchanged)
and every model resizes that box to its own size with its own interpolation and normalisation. Without
augmentation each model runs its own deterministic eval transform.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image


@dataclass(frozen=True)
class ModelView:
    """What one model reads: a batch key for its pixels and tokens, and the transforms/tokenizer that make them."""

    name: str
    image_key: str
    text_key: str
    train_transform: Callable[[Image.Image], torch.Tensor]
    eval_transform: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[Sequence[str]], Any]
    pixels_id: tuple
    """Equal ids mean equal pixels (same size, resize rule, interpolation, mean/std): the tensor is shared."""
    tokens_id: tuple
    """Equal ids mean equal token ids (same tokenizer and context length)."""


class ViewError(ValueError):
    """A transform this module cannot split into shared geometry + per-model pixels; the message names it."""


def _split_crop(transform: Callable) -> tuple[T.RandomResizedCrop, list[Callable]]:
    """open_clip's training transform: ``Compose([RandomResizedCrop, ...rest])`` -> (the crop, the rest)."""
    steps = list(getattr(transform, "transforms", []))
    if not steps or not isinstance(steps[0], T.RandomResizedCrop):
        raise ViewError(f"training transform {transform!r} does not start with RandomResizedCrop")
    return steps[0], steps[1:]


class _CropTo:
    """Apply a crop box drawn elsewhere at this model's size and interpolation (RandomResizedCrop's own call)."""

    def __init__(self, crop: T.RandomResizedCrop, rest: list[Callable]) -> None:
        self.crop, self.rest = crop, rest

    def __call__(self, image: Image.Image, box: tuple[int, int, int, int]) -> torch.Tensor:
        c = self.crop
        out = TF.resized_crop(image, *box, c.size, c.interpolation, antialias=c.antialias)
        for step in self.rest:
            out = step(out)
        return out


class Views:
    """Picklable per-sample transform: ``image -> {batch key: tensor}``, one entry per distinct pixel transform.

    The first view is the student's: its key is ``"image"`` and, with ``augment``, its crop rule draws the shared box.
    """

    def __init__(self, views: Sequence[ModelView], augment: bool) -> None:
        if not views:
            raise ValueError("Views needs at least the student's view")
        self.augment = augment
        self.keys: dict[tuple, str] = {}  # pixels_id -> batch key of the tensor that serves it
        self.makers: dict[str, Callable] = {}
        for view in views:
            if view.pixels_id in self.keys:
                continue
            self.keys[view.pixels_id] = view.image_key
            self.makers[view.image_key] = (
                _CropTo(*_split_crop(view.train_transform)) if augment else view.eval_transform
            )
        first = views[0].train_transform
        self.box_rule = _split_crop(first)[0] if augment else None

    def key_for(self, view: ModelView) -> str:
        """The batch key that holds this model's pixels (shared with an equal view)."""
        return self.keys[view.pixels_id]

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        if self.box_rule is None:
            return {key: make(image) for key, make in self.makers.items()}
        box = self.box_rule.get_params(image, self.box_rule.scale, self.box_rule.ratio)
        return {key: make(image, box) for key, make in self.makers.items()}


class Tokenizers:
    """Picklable ``captions -> {batch key: token ids}``, one entry per distinct tokenizer."""

    def __init__(self, views: Sequence[ModelView]) -> None:
        self.keys: dict[tuple, str] = {}
        self.makers: dict[str, Callable] = {}
        for view in views:
            if view.tokens_id not in self.keys:
                self.keys[view.tokens_id] = view.text_key
                self.makers[view.text_key] = view.tokenizer

    def key_for(self, view: ModelView) -> str:
        return self.keys[view.tokens_id]

    def __call__(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        return {key: torch.as_tensor(tok(list(captions))).long() for key, tok in self.makers.items()}


def pixels_id(bundle: Any) -> tuple:
    """What decides a model's pixels: open_clip's preprocess config (size, resize rule, interpolation, mean/std)."""
    cfg = dict(bundle.preprocess_cfg or {})
    if not cfg:
        return ("unknown", id(bundle))  # nothing to compare: never shared
    return tuple((k, _hashable(cfg[k])) for k in sorted(cfg))


def tokens_id(bundle: Any) -> tuple:
    """What decides a model's token ids: tokenizer class, context length and (for HF tokenizers) its name."""
    tok = bundle.tokenizer
    inner = getattr(tok, "tokenizer", None)
    return (type(tok).__module__, type(tok).__qualname__, getattr(tok, "context_length", None),
            getattr(inner, "name_or_path", None))  # fmt: skip


def _hashable(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(round(v, 8) if isinstance(v, float) else _hashable(v) for v in value)
    return value


def model_view(bundle: Any, name: str, image_key: str, text_key: str) -> ModelView:
    """The view of a loaded model (a :class:`clipslim.models.ClipBundle`)."""
    return ModelView(
        name, image_key, text_key, bundle.preprocess_train, bundle.preprocess_val, bundle.tokenizer,
        pixels_id(bundle), tokens_id(bundle),
    )  # fmt: skip
