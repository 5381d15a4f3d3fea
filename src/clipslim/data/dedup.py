"""Near-duplicate detection on embeddings (faiss): keep one sample of each group of near-duplicates.

Training on many near-copies of one image over-fits to it and wastes steps (the on-road detection paper skips
similar samples for this reason). Given L2-normalised embeddings (a teacher's image embeddings), samples are visited
in data order: a sample is dropped when one of its k nearest neighbours with cosine >= threshold was visited before
it and kept, so every dropped sample has a kept near-duplicate and no two kept samples among each other's k nearest
neighbours are that close. Each sample's k nearest neighbours come from an exact inner-product search, so memory
stays linear in the number of samples; a sample with more than k near-duplicates is counted as ``saturated`` (raise k
to see them all).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Duplicates:
    keep: np.ndarray
    """bool [n]: the samples to keep."""
    pairs: list[tuple[int, int, float]]
    """(kept sample, dropped sample, cosine): each dropped sample with its most similar earlier kept one."""
    saturated: int
    """Samples whose k-th neighbour is still >= threshold: they may have more near-duplicates than were seen."""


def neighbours(embeddings: np.ndarray, k: int, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Cosine and index of each sample's k nearest other samples, [n, k] each (exact inner-product search)."""
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n = x.shape[0]
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    width = min(k + 1, n)
    sims, idx = np.empty((n, width), np.float32), np.empty((n, width), np.int64)
    for start in range(0, n, chunk):
        sims[start : start + chunk], idx[start : start + chunk] = index.search(x[start : start + chunk], width)
    own = idx == np.arange(n)[:, None]  # the sample itself; an exact copy may come first, so drop it by index
    own[own.sum(1) == 0, -1] = True  # self not in the list (ties beyond k+1): drop the last one instead
    keep = ~own
    return sims[keep].reshape(n, width - 1), idx[keep].reshape(n, width - 1)


def near_duplicates(embeddings: np.ndarray, threshold: float, k: int = 32) -> Duplicates:
    """Greedy in data order; see the module docstring."""
    n = embeddings.shape[0]
    if n == 0:
        return Duplicates(np.ones(0, bool), [], 0)
    sims, idx = neighbours(embeddings, k)
    close = sims >= threshold
    earlier = close & (idx < np.arange(n)[:, None])
    keep = np.ones(n, bool)
    pairs = []
    for j in np.flatnonzero(earlier.any(1)):  # only samples with a close earlier neighbour can be dropped
        kept = [(float(s), int(i)) for s, i in zip(sims[j][earlier[j]], idx[j][earlier[j]], strict=True) if keep[i]]
        if kept:
            keep[j] = False
            s, i = max(kept)
            pairs.append((i, int(j), s))
    saturated = int(close[:, -1].sum()) if sims.shape[1] else 0
    return Duplicates(keep, pairs, saturated)
