"""k-means (faiss) and prototypical back translation (PBT), the two pieces of a ProtoCLIP episode.

Both work on plain tensors so they can be checked against hand-computed cases; nothing here knows about models.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import faiss
import numpy as np
import torch


def faiss_has_gpu() -> bool:
    """faiss-cpu has no GPU build; a faiss-gpu install reports its devices."""
    return getattr(faiss, "get_num_gpus", lambda: 0)() > 0


def kmeans(
    x: torch.Tensor, k: int, *, seed: int, niter: int = 20, nredo: int = 1, gpu: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [k, d], labels [n]) of ``x`` [n, d]; deterministic for a seed.

    faiss needs at least k points: with fewer it clusters into n and the missing centroids stay zero (ProtoCLIP's
    padding), so callers always get k rows. NaN features are zeroed first, as ProtoCLIP does.
    """
    data = np.ascontiguousarray(torch.nan_to_num(x.detach().float().cpu(), nan=0.0).numpy())
    n, d = data.shape
    if n == 0:
        raise ValueError("kmeans: no points to cluster")
    k_eff = min(k, n)
    faiss.omp_set_num_threads(torch.get_num_threads())  # faiss's own OpenMP pool must not oversubscribe torch's
    km = faiss.Kmeans(
        d, k_eff, niter=niter, nredo=nredo, seed=seed, verbose=False, min_points_per_centroid=1,
        gpu=faiss_has_gpu() if gpu is None else gpu,
    )  # fmt: skip
    km.train(data)
    _, labels = km.index.search(data, 1)
    centroids = torch.zeros(k, d)
    centroids[:k_eff] = torch.from_numpy(km.centroids)
    return centroids, torch.from_numpy(labels.reshape(-1)).long()


def back_translate(features: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """PBT: row j is the mean of ``features`` over the samples whose (other-modality) label is j.

    Empty clusters (and label -1) get a zero row, like ProtoCLIP; rows are not re-normalised (ProtoCLIP does not).
    """
    keep = labels >= 0
    feats, labs = features[keep].float(), labels[keep]
    sums = torch.zeros(k, features.shape[1], dtype=feats.dtype, device=features.device)
    sums.index_add_(0, labs, feats)
    counts = torch.bincount(labs, minlength=k).clamp(min=1).to(feats.dtype)
    return sums / counts[:, None]


def key_hash(keys: Iterable[str]) -> torch.Tensor:
    """Stable 63-bit ids of sample keys (tensors can be buffers and be broadcast; strings cannot)."""
    ids = [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") >> 1 for k in keys]
    return torch.tensor(ids, dtype=torch.long)


def lookup(table: torch.Tensor, values: torch.Tensor, query: torch.Tensor, missing: int = -1) -> torch.Tensor:
    """``values[i]`` where ``table[i] == query`` for each query id (``table`` sorted ascending), else ``missing``."""
    if table.numel() == 0:
        return torch.full(query.shape + values.shape[1:], missing, dtype=values.dtype, device=values.device)
    pos = torch.searchsorted(table, query).clamp(max=table.numel() - 1)
    found = table[pos] == query
    out = values[pos].clone()
    out[~found] = missing
    return out
