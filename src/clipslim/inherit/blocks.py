"""Direct block pruning: what is each residual block worth? Skip it (the block becomes the identity) and measure the
zero-shot accuracy drop on a validation set; greedily remove the least harmful block, re-measure, repeat until a
target depth (or latency); export the shallower model, which stock open_clip loads (fewer ``layers``).

Ties in accuracy, common on small validation sets, are broken by fidelity: the mean cosine similarity between the
pruned and the full model's image embeddings and class embeddings, so a block that changes nothing goes first.
Skipping a vision block re-encodes only the images and a text block only the class prompts (features are cached
per set of removed blocks of each tower).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .manual import InheritError, TowerSelection, inherit_selected, tower_blocks, tower_geometry, tower_pairs

log = logging.getLogger(__name__)

__all__ = ["ValidationSet", "block_latency", "greedy_prune", "pruned_model", "skipping"]

BlockId = tuple[str, int]  # ("visual" | "text", block index)


class _Skip(nn.Module):
    """A residual block replaced by the identity (keeps answering open_clip's dtype query for the stack)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def get_weight_dtype(self) -> torch.dtype:
        return self.dtype

    def forward(self, q_x: torch.Tensor, k_x: Any = None, v_x: Any = None, attn_mask: Any = None) -> torch.Tensor:
        return q_x


@contextlib.contextmanager
def skipping(model: nn.Module, blocks: Iterable[BlockId]) -> Iterator[None]:
    """Temporarily run ``model`` with the given blocks skipped."""
    towers = {t.kind: t for t, _ in tower_pairs(model, model)}
    saved = []
    try:
        for kind, i in blocks:
            resblocks = tower_blocks(towers[kind])
            saved.append((resblocks, i, resblocks[i]))
            resblocks[i] = _Skip(next(resblocks[i].parameters()).dtype)
        yield
    finally:
        for resblocks, i, block in reversed(saved):
            resblocks[i] = block


@dataclass
class ValidationSet:
    """Labelled single-object images and the tokenised class prompts (``n_classes * n_templates`` rows)."""

    images: torch.Tensor
    labels: torch.Tensor
    prompts: torch.Tensor
    n_classes: int

    @classmethod
    def from_data(
        cls, bundle: Any, data_dir: str | Path, shards: str | Path | None = None, max_samples: int = 512
    ) -> ValidationSet:
        """Up to ``max_samples`` labelled images of ``shards`` (default: ``data_dir/train``, so the eval split stays
        untouched) and the prompts of ``data_dir``'s ``classnames.txt`` x ``templates.txt``."""
        from ..data.loader import make_loader
        from ..data.shapes import read_lines
        from ..eval.zeroshot import fill_template

        data_dir = Path(data_dir)
        shards = shards or data_dir / "train"
        images, labels = [], []
        for batch in make_loader(str(shards), bundle.preprocess_val, bundle.tokenizer, 256, train=False):
            keep = [i for i, m in enumerate(batch["meta"]) if m.get("cls", -1) >= 0 and m.get("n_objects", 1) == 1]
            images.append(batch["image"][keep])
            labels += [batch["meta"][i]["cls"] for i in keep]
            if len(labels) >= max_samples:
                break
        if not labels:
            raise InheritError(f"validation shards {shards} hold no labelled single-object images")
        classnames, templates = read_lines(data_dir / "classnames.txt"), read_lines(data_dir / "templates.txt")
        prompts = bundle.tokenizer([fill_template(t, c) for c in classnames for t in templates])
        images_t = torch.cat(images)[:max_samples]
        return cls(images_t, torch.tensor(labels[:max_samples]), prompts, len(classnames))


class _Scorer:
    """Validation accuracy and fidelity of the model with a set of blocks skipped, with per-tower caches."""

    def __init__(self, model: nn.Module, val: ValidationSet, batch_size: int = 256) -> None:
        self.model, self.val, self.batch_size = model.eval(), val, batch_size
        self.device = next(model.parameters()).device
        self._images: dict[frozenset, torch.Tensor] = {}
        self._classes: dict[frozenset, torch.Tensor] = {}
        self.full = self.score(set())

    @torch.no_grad()
    def _encode(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        parts = [fn(x[i : i + self.batch_size].to(self.device)) for i in range(0, len(x), self.batch_size)]
        return F.normalize(torch.cat(parts).float(), dim=-1).cpu()

    def image_features(self, removed: frozenset) -> torch.Tensor:
        if removed not in self._images:
            with skipping(self.model, removed):
                self._images[removed] = self._encode(self.model.encode_image, self.val.images)
        return self._images[removed]

    def classifier(self, removed: frozenset) -> torch.Tensor:
        if removed not in self._classes:
            with skipping(self.model, removed):
                text = self._encode(self.model.encode_text, self.val.prompts)
            self._classes[removed] = F.normalize(text.view(self.val.n_classes, -1, text.shape[-1]).mean(1), dim=-1)
        return self._classes[removed]

    def score(self, removed: set[BlockId]) -> tuple[float, float]:
        """(top-1 accuracy, fidelity: mean cosine to the full model's image and class embeddings)."""
        vis = frozenset(b for b in removed if b[0] == "visual")
        txt = frozenset(b for b in removed if b[0] == "text")
        images, classes = self.image_features(vis), self.classifier(txt)
        acc = ((images @ classes.t()).argmax(1) == self.val.labels).double().mean().item()
        full_i, full_c = self.image_features(frozenset()), self.classifier(frozenset())
        fidelity = ((images * full_i).sum(1).mean() + (classes * full_c).sum(1).mean()).item() / 2
        return acc, fidelity


def greedy_prune(
    model: nn.Module,
    val: ValidationSet,
    *,
    target_depth: int | None = None,
    target_latency_ms: float | None = None,
    latency_ms: Callable[[set[BlockId]], float] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Remove the least harmful block (highest validation accuracy once skipped, then fidelity) until the total
    depth of both towers is ``target_depth`` or ``latency_ms(removed) <= target_latency_ms``; each tower keeps at
    least one block. Returns the single-block table (drop when each block alone is skipped), the removal history
    and the kept block indices per tower."""
    if (target_depth is None) == (target_latency_ms is None):
        raise InheritError("block pruning needs exactly one of target_depth / target_latency_ms")
    if target_latency_ms is not None and latency_ms is None:
        raise InheritError("target_latency_ms needs a latency_ms function")
    depth = {t.kind: tower_geometry(t).layers for t, _ in tower_pairs(model, model)}
    if target_depth is not None and not len(depth) <= target_depth <= sum(depth.values()):
        raise InheritError(f"target_depth: must be between {len(depth)} and {sum(depth.values())}, got {target_depth}")
    all_blocks = [(kind, i) for kind, n in depth.items() for i in range(n)]
    scorer = _Scorer(model, val)
    single = [_row(b, scorer.score({b}), scorer.full) for b in all_blocks]
    removed: list[BlockId] = []
    history = [{"removed": 0, "block": None, "depth": len(all_blocks), "val_acc1": scorer.full[0], "fidelity": 1.0}]
    bar = tqdm(total=(len(all_blocks) - target_depth) if target_depth else None, disable=not progress, desc="blocks")
    while not _reached(len(all_blocks) - len(removed), removed, target_depth, target_latency_ms, latency_ms):
        left = {k: n - sum(1 for r in removed if r[0] == k) for k, n in depth.items()}
        candidates = [b for b in all_blocks if b not in removed and left[b[0]] > 1]
        if not candidates:
            break
        scores = {b: scorer.score({*removed, b}) for b in candidates}
        best = max(candidates, key=lambda b: scores[b])
        removed.append(best)
        history.append({"removed": len(removed), "depth": len(all_blocks) - len(removed), **_row(best, scores[best])})
        bar.update(1)
    bar.close()
    kept = {k: [i for i in range(n) if (k, i) not in removed] for k, n in depth.items()}
    return {"single_block": single, "history": history, "removed": [f"{k}.{i}" for k, i in removed], "kept": kept}


def _row(block: BlockId, score: tuple[float, float], full: tuple[float, float] | None = None) -> dict[str, Any]:
    row = {"block": f"{block[0]}.{block[1]}", "val_acc1": score[0], "fidelity": score[1]}
    if full is not None:
        row["drop"] = full[0] - score[0]
    return row


def _reached(depth: int, removed: list, target_depth: int | None, target_ms: float | None, latency: Any) -> bool:
    if target_depth is not None:
        return depth <= target_depth
    return latency(set(removed)) <= target_ms


def pruned_model(model: nn.Module, model_cfg: dict[str, Any], kept: dict[str, list[int]]) -> tuple[nn.Module, dict]:
    """A fresh stock open_clip model holding only the ``kept`` blocks of each tower, and its config."""
    import copy

    from .l0 import build_clip

    cfg = copy.deepcopy(model_cfg)
    cfg["vision_cfg"]["layers"] = len(kept["visual"])
    cfg["text_cfg"]["layers"] = len(kept["text"])
    small = build_clip(cfg)
    selections = {}
    for tower, _ in tower_pairs(model, model):
        g = tower_geometry(tower)
        layers = kept[tower.kind]
        selections[tower.kind] = TowerSelection(
            layers, list(range(g.width)), [list(range(g.heads))] * len(layers),
            [list(range(g.mlp_width))] * len(layers), list(range(g.embed_dim)),
        )  # fmt: skip
    inherit_selected(model, small, selections)
    return small.train(model.training), cfg


def block_latency(model: nn.Module, image_size: int, context_length: int) -> Callable[[set[BlockId]], float]:
    """Milliseconds per (image + caption) at batch 64 with the given blocks skipped."""
    from ..eval.speed import encoder_throughput

    def latency(removed: set[BlockId]) -> float:
        with skipping(model, removed):
            r = encoder_throughput(model, image_size, context_length, batch=64, repeats=3, warmup=1)
        return 1000.0 / r["images_per_s"] + 1000.0 / r["captions_per_s"]

    return latency
