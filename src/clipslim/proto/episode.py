"""ProtoCLIP episodes: which samples, their projected features, and the prototypes built from them.

An episode is the next ``episode_steps`` training batches. ProtoCLIP samples an episode of dataset indices and then
trains on exactly those; here the training stream is already a seeded, reproducible sequence, so the episode is
read from a *mirror* of it (same loader arguments, same position) one episode ahead. Every sample the trainer sees
in the episode was clustered, and labels are found by sample key. Under torchrun each rank extracts its own
batches, rank 0 clusters the gathered features, and labels and centroids are broadcast.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..distributed import current_env
from ..hooks import StepContext
from .cluster import back_translate, key_hash, kmeans, lookup

log = logging.getLogger(__name__)

Project = Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]
"""batch -> (z_I, z_T): projected, L2-normalised student features of one batch, without gradient."""


def cluster_labels(
    z_image: torch.Tensor,
    z_text: torch.Tensor,
    external: torch.Tensor | None,
    *,
    k: int,
    seed: int,
    niter: int = 20,
    nredo: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k-means per modality (and on the external features): labels [n, 3] (image, text, external) and centroids.

    ``external`` rows that are NaN (sample not in the cache) take no part in the external clustering (label -1),
    as does every row when there is no external teacher.
    """
    c_image, y_image = kmeans(z_image, k, seed=seed, niter=niter, nredo=nredo)
    c_text, y_text = kmeans(z_text, k, seed=seed + 1, niter=niter, nredo=nredo)
    y_ext = torch.full_like(y_image, -1)
    if external is not None:
        has = ~external.isnan().any(dim=1)
        if has.any():
            _, y_ext[has] = kmeans(external[has], k, seed=seed + 2, niter=niter, nredo=nredo)
    return torch.stack([y_image, y_text, y_ext], dim=1), c_image, c_text


def assemble(
    ids: torch.Tensor,
    z_image: torch.Tensor,
    z_text: torch.Tensor,
    labels: torch.Tensor,
    c_image: torch.Tensor,
    c_text: torch.Tensor,
    *,
    k: int,
    external: bool,
) -> dict[str, torch.Tensor]:
    """PBT centroids and the key -> labels table (first occurrence of a repeated key wins) of one episode."""
    out = {
        "image_centroids": c_image,
        "text_centroids": c_text,
        "image_from_text": back_translate(z_image, labels[:, 1], k),
        "text_from_image": back_translate(z_text, labels[:, 0], k),
    }
    if external:
        out["image_from_external"] = back_translate(z_image, labels[:, 2], k)
        out["text_from_external"] = back_translate(z_text, labels[:, 2], k)
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    out["key_hash"], out["labels"] = sorted_ids[first], labels[order[first]]
    return out


def cluster_episode(
    ids: torch.Tensor, z_image: torch.Tensor, z_text: torch.Tensor, external: torch.Tensor | None, **kw: Any
) -> dict[str, torch.Tensor]:
    """One process's whole episode: :func:`cluster_labels` then :func:`assemble`."""
    labels, c_image, c_text = cluster_labels(z_image, z_text, external, **kw)
    return assemble(ids, z_image, z_text, labels, c_image, c_text, k=kw["k"], external=external is not None)


def _all_gather(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every rank's rows in rank order (equal row counts: every rank reads the same number of full batches)."""
    x = x.to(device)
    parts = [torch.empty_like(x) for _ in range(current_env().world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts).cpu()


def _broadcast(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device).contiguous()
    dist.broadcast(x, src=0)
    return x.cpu()


def gather_ids(ids: torch.Tensor) -> torch.Tensor:
    """Key ids of the global batch in rank order, matching the gathered student embeddings."""
    if not current_env().enabled:
        return ids
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else ids.device
    return _all_gather(ids, device).to(ids.device)


class EpisodeBuilder:
    """Reads each episode from a mirror of the trainer's batch stream and clusters it (rank 0) for all ranks."""

    def __init__(self, k: int, niter: int, nredo: int, external: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.k, self.niter, self.nredo, self.external = k, niter, nredo, external
        self.mirror: Any = None
        self.timings: list[dict[str, float]] = []
        """Per episode: seconds spent reading + extracting features and clustering (+ gather/broadcast)."""

    def _sync_mirror(self, ctx: StepContext) -> None:
        if self.mirror is None or (self.mirror.epoch, self.mirror.pos) != ctx.position:
            if self.mirror is not None:
                self.mirror.close()
            self.mirror = ctx.open_stream(ctx.position)  # first episode or after a resume: at the trainer's position

    @torch.no_grad()
    def extract(self, ctx: StepContext, steps: int, project: Project) -> tuple[torch.Tensor, ...]:
        """Key ids and projected features of the next ``steps`` batches this rank will train on."""
        self._sync_mirror(ctx)
        ids, zi, zt = [], [], []
        for _ in tqdm(range(steps), desc="proto episode", leave=False, disable=not (ctx.progress and ctx.is_main)):
            batch = self.mirror.next()
            with ctx.autocast():
                a, b = project(batch)
            ids.append(key_hash(batch["key"]))
            zi.append(a.float().cpu())
            zt.append(b.float().cpu())
        return torch.cat(ids), torch.cat(zi), torch.cat(zt)

    def close(self) -> None:
        """Stop the mirror's loader workers (after the last episode of a run)."""
        if self.mirror is not None:
            self.mirror.close()
        self.mirror = None

    def external_rows(self, ids: torch.Tensor) -> torch.Tensor | None:
        if self.external is None:
            return None
        table, feats = self.external
        idx = lookup(table, torch.arange(table.numel()), ids)
        rows = feats[idx.clamp(min=0)].clone()
        rows[idx < 0] = float("nan")
        return rows

    def build(self, ctx: StepContext, steps: int, project: Project, seed: int) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        ids, z_image, z_text = self.extract(ctx, steps, project)
        t1 = time.perf_counter()
        env = current_env()
        if not env.enabled:
            out = cluster_episode(
                ids, z_image, z_text, self.external_rows(ids), k=self.k, seed=seed, niter=self.niter, nredo=self.nredo
            )
        else:
            out = self._build_distributed(ctx.device, ids, z_image, z_text, seed)
        t2 = time.perf_counter()
        self.timings.append({"extract_s": t1 - t0, "cluster_s": t2 - t1, "samples": float(ids.numel())})
        log.info("proto episode: %d samples, extract %.2fs, cluster %.2fs", ids.numel(), t1 - t0, t2 - t1)
        return out

    def _build_distributed(
        self, device: torch.device, ids: torch.Tensor, z_image: torch.Tensor, z_text: torch.Tensor, seed: int
    ) -> dict[str, torch.Tensor]:
        """k-means once on rank 0; labels and centroids broadcast; PBT recomputed (identically) on every rank."""
        ids, z_image, z_text = (_all_gather(x, device) for x in (ids, z_image, z_text))
        ext = self.external_rows(ids)
        if current_env().is_main:
            y, c_image, c_text = cluster_labels(
                z_image, z_text, ext, k=self.k, seed=seed, niter=self.niter, nredo=self.nredo
            )
        else:
            y = torch.empty(ids.numel(), 3, dtype=torch.long)
            c_image, c_text = torch.empty(self.k, z_image.shape[1]), torch.empty(self.k, z_text.shape[1])
        y, c_image, c_text = _broadcast(y, device), _broadcast(c_image, device), _broadcast(c_text, device)
        return assemble(ids, z_image, z_text, y, c_image, c_text, k=self.k, external=ext is not None)


def default_cache_path(run_dir: Path, encoder: str) -> Path:
    return Path(run_dir) / f"external_{encoder}.safetensors"
