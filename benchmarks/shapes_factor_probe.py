"""Where a model fails on the held-out colour × shape combinations: its image features or its text side (issue 16).

Two readings on the shapes eval split, for one model:

- the zero-shot errors on held-out images: how many keep the right colour, the right shape, or name a seen class;
- "analogy" class embeddings for the held-out classes, t(c, s) = mean over seen c', s' of t(c, s') + t(c', s) −
  t(c', s'): if they beat the text tower's own embeddings, the text side is what fails to compose.

    python benchmarks/shapes_factor_probe.py --model shapes-teacher:demo --data .data/shapes
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clipslim.data.shapes import HELDOUT, SHAPES, read_lines
from clipslim.eval.run import _meta_tensor, classification_masks, encode_shapes_eval
from clipslim.eval.zeroshot import build_classifier
from clipslim.io import atomic_write_json
from clipslim.models import load_model

N = len(SHAPES)


def _acc(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return round(100 * float((pred == labels).float().mean()), 2)


def error_kinds(pred: torch.Tensor, labels: torch.Tensor, heldout_classes: set[int]) -> dict[str, float]:
    """Shares (%) of the wrong predictions that keep the colour, keep the shape, or name a held-out class."""
    wrong = pred != labels
    p, y = pred[wrong], labels[wrong]
    return {
        "errors": int(wrong.sum()),
        "right_colour": _acc(p // N, y // N),
        "right_shape": _acc(p % N, y % N),
        "predicts_heldout_class": round(100 * sum(int(c) in heldout_classes for c in p) / max(1, len(p)), 2),
    }


def analogy_classifier(text: torch.Tensor, heldout: set[tuple[int, int]]) -> torch.Tensor:
    """(64, D) class embeddings whose held-out rows are built from seen rows by analogy."""
    grid = text.reshape(N, N, -1)
    out = grid.clone()
    for c, s in heldout:
        terms = [
            grid[c, s2] + grid[c2, s] - grid[c2, s2]
            for c2 in range(N)
            for s2 in range(N)
            if not {(c, s2), (c2, s), (c2, s2)} & heldout
        ]
        out[c, s] = torch.stack(terms).mean(0)
    return F.normalize(out.reshape(N * N, -1), dim=-1)


def run(model: str, data: str) -> dict[str, Any]:
    bundle = load_model(model)
    bundle.model.eval()
    names, templates = read_lines(Path(data) / "classnames.txt"), read_lines(Path(data) / "templates.txt")
    feats = encode_shapes_eval(bundle, data, progress=False)
    masks = classification_masks(feats.meta)
    labels = _meta_tensor(feats.meta, "cls", -1, torch.long)
    with torch.no_grad():
        classifier = build_classifier(bundle.model, bundle.tokenizer, names, templates).float()
    text = classifier.T if classifier.shape[0] != N * N else classifier
    image = F.normalize(feats.image.float(), dim=-1)
    held, seen = masks["heldout"], masks["seen"]
    pred = (image @ text.T).argmax(1)
    heldout_classes = {int(c) for c in labels[held].unique()}
    pairs = {(names.index(f"{c} {s}") // N, names.index(f"{c} {s}") % N) for c, s in HELDOUT}
    analogy = (image @ analogy_classifier(text, pairs).T).argmax(1)
    return {
        "model": model,
        "zeroshot": {k: _acc(pred[m], labels[m]) for k, m in masks.items()},
        "heldout_errors": error_kinds(pred[held], labels[held], heldout_classes),
        "analogy_text": {"heldout": _acc(analogy[held], labels[held]), "seen": _acc(analogy[seen], labels[seen])},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes-teacher:demo")
    p.add_argument("--data", default=".data/shapes")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    torch.set_num_threads(1)
    result = run(args.model, args.data)
    if args.json:
        atomic_write_json(args.json, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
