"""Build and load CLIP models through stock open_clip.

A model *spec* names where a model comes from, the way a user would say it:

- ``ViT-B-32``                     architecture only, random init
- ``ViT-B-32:laion2b_s34b_b79k``   architecture + open_clip pretrained tag (downloads on a connected machine)
- ``shapes-teacher:demo``          architecture + a tag that clipslim ships (the embedded demo teacher)
- ``shapes-teacher:/x/ckpt.safetensors`` (or ``.pt``)  architecture + local weights file
- ``/x/run/export`` or ``local-dir:/x/run/export``    a hub-format folder (``open_clip_config.json`` + weights)
- ``hf-hub:org/repo``              open_clip's hub schema (needs a network)
- ``hf:/x/clip``                   a local Hugging Face ``transformers`` CLIP folder (converted, see deploy/hf.py)

clipslim registers its small configs (``model_configs/*.json``) with open_clip's own registry on import, so the
same names work in stock ``open_clip.create_model`` once ``clipslim`` is imported.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from .io import read_mapping

CONFIG_DIR = Path(__file__).parent / "model_configs"
ASSETS_DIR = Path(__file__).parent / "assets"
# Tags that clipslim ships itself: (arch, tag) -> hub-format folder inside the package.
SHIPPED_TAGS: dict[tuple[str, str], Path] = {("shapes-teacher", "demo"): ASSETS_DIR / "shapes-teacher"}
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")

_registered = False


class ModelSpecError(ValueError):
    """A model spec that cannot be resolved; the message names the spec and what is wrong."""


def register_configs() -> None:
    """Add clipslim's model configs to open_clip's registry (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


register_configs()


@dataclass
class ClipBundle:
    """A model with everything needed to feed it: transforms, tokenizer, and the config that rebuilds it."""

    model: nn.Module
    preprocess_train: Any
    preprocess_val: Any
    tokenizer: Any
    arch: str
    spec: str
    model_cfg: dict[str, Any] = field(default_factory=dict)
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ResolvedSpec:
    """open_clip arguments a spec resolves to."""

    model_name: str  # what open_clip.create_model receives (may carry 'local-dir:' / 'hf-hub:')
    pretrained: str | None
    arch: str  # readable architecture name


def _is_hub_folder(path: Path) -> bool:
    return path.is_dir() and (path / "open_clip_config.json").is_file()


def resolve_spec(spec: str) -> ResolvedSpec:
    """Turn a user spec into open_clip arguments, failing early with a one-line message."""
    spec = spec.strip()
    if not spec:
        raise ModelSpecError("empty model spec")
    if spec.startswith("hf-hub:"):
        return ResolvedSpec(spec, None, spec)
    if spec.startswith("local-dir:") or Path(spec).is_dir():
        folder = Path(spec.removeprefix("local-dir:"))
        if not _is_hub_folder(folder):
            raise ModelSpecError(f"model folder {folder} has no open_clip_config.json")
        return ResolvedSpec(f"local-dir:{folder}", None, folder.name)
    arch, _, tag = spec.partition(":")
    if not tag and Path(spec).suffix in WEIGHT_SUFFIXES:
        raise ModelSpecError(f"weights file {spec} needs an architecture: write ARCH:{spec}")
    if "/" in arch or "\\" in arch or arch.startswith((".", "~")):
        raise ModelSpecError(f"model path not found: {spec} (expected a hub-format folder or ARCH:WEIGHTS_FILE)")
    if open_clip.get_model_config(arch) is None:
        raise ModelSpecError(f"unknown architecture '{arch}' in model spec '{spec}' (see `clipslim models`)")
    if not tag:
        return ResolvedSpec(arch, None, arch)
    if (arch, tag) in SHIPPED_TAGS:
        folder = SHIPPED_TAGS[(arch, tag)]
        if not _is_hub_folder(folder):
            raise ModelSpecError(f"shipped weights for '{spec}' are missing from {folder}")
        return ResolvedSpec(f"local-dir:{folder}", None, arch)
    if Path(tag).suffix in WEIGHT_SUFFIXES:
        if not Path(tag).is_file():
            raise ModelSpecError(f"weights file not found: {tag}")
        return ResolvedSpec(arch, tag, arch)
    if tag not in open_clip.list_pretrained_tags_by_model(arch):
        raise ModelSpecError(f"'{tag}' is neither a pretrained tag of {arch} nor a weights file")
    return ResolvedSpec(arch, tag, arch)


def _read_folder_cfg(model_name: str) -> dict[str, Any]:
    if not model_name.startswith("local-dir:"):
        return {}
    return read_mapping(Path(model_name.removeprefix("local-dir:")) / "open_clip_config.json")


EXTENSIONS = {
    "hf_loader": "clipslim.deploy.hf:load_hf",
    "token_pruning": "clipslim.tokens.prune:load_token_pruning",
}
"""Loaders that live with the method that writes the format; this leaf reaches them by name, on use, so it imports
no upper layer (see docs/ARCHITECTURE.md)."""


def _extension(name: str) -> Any:
    module, _, attr = EXTENSIONS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def load_model(
    spec: str, device: str | torch.device = "cpu", precision: str = "fp32", tokenizers: str | None = None
) -> ClipBundle:
    """Build a CLIP model from a spec with stock open_clip, with its transforms and tokenizer (a Hugging Face
    tokenizer is read from ``tokenizers`` or $CLIPSLIM_TOKENIZERS when given, see :func:`load_tokenizer`)."""
    if spec.strip().startswith("hf:"):  # a transformers CLIP folder, converted (deploy/hf.py)
        return _extension("hf_loader")(spec.strip(), device=device, precision=precision)
    resolved = resolve_spec(spec)
    with quiet_random_init():
        try:
            model, pre_train, pre_val = open_clip.create_model_and_transforms(
                resolved.model_name, pretrained=resolved.pretrained, device=device, precision=precision
            )
        except Exception as err:  # open_clip, safetensors and torch.load raise many types for one cause: bad input
            raise ModelSpecError(f"could not load model '{spec}': {err}") from err
    folder_cfg = _read_folder_cfg(resolved.model_name)
    if folder_cfg:  # a folder written by `clipslim prune-tokens` reloads pruned (token_pruning.json beside it)
        _extension("token_pruning")(model, resolved.model_name.removeprefix("local-dir:"))
    model_cfg = folder_cfg.get("model_cfg") or open_clip.get_model_config(resolved.model_name) or {}
    arch = folder_cfg.get("arch", resolved.arch)
    tokenizer = load_tokenizer(resolved.model_name, model_cfg, tokenizers, spec)
    preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    return ClipBundle(model, pre_train, pre_val, tokenizer, arch, spec, model_cfg, preprocess_cfg)


TOKENIZERS_ENV = "CLIPSLIM_TOKENIZERS"
"""A folder of local Hugging Face tokenizers, ``<folder>/<hf_tokenizer_name>/`` (e.g. ``timm/ViT-B-16-SigLIP/``):
SigLIP-style configs name a hub tokenizer, which a machine without the hub cannot fetch."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json")


def load_tokenizer(model_name: str, model_cfg: dict[str, Any], tokenizers: str | None = None, spec: str = "") -> Any:
    """open_clip's tokenizer for a model; one that names a hub tokenizer is read from ``tokenizers`` (or
    $CLIPSLIM_TOKENIZERS) when set, and a failure is one line naming the tokenizer and how to give a local copy."""
    text_cfg = model_cfg.get("text_cfg", {})
    name = text_cfg.get("hf_tokenizer_name")
    root = tokenizers or os.environ.get(TOKENIZERS_ENV)
    try:
        if not name or model_name.startswith("local-dir:") or not root:
            return open_clip.get_tokenizer(model_name)  # a hub folder carries its tokenizer files itself
        from open_clip.tokenizer import HFTokenizer

        kwargs = {"context_length": text_cfg.get("context_length", 77), **text_cfg.get("tokenizer_kwargs", {})}
        folder = str(local_tokenizer_dir(root, name))
        return HFTokenizer(folder, tokenizer_mode=text_cfg.get("tokenizer_mode"), **kwargs)
    except ModelSpecError:
        raise
    except Exception as err:  # transformers raises OSError/ValueError/... for one cause: files not reachable
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelSpecError(
            f"tokenizer '{name or model_name}' of model '{spec or model_name}' could not be loaded ({reason}): put its "
            f"files ({', '.join(TOKENIZER_FILES[:2])}) in DIR/{name or '<name>'}/ and pass tokenizers: DIR in the "
            f"recipe (--set tokenizers=DIR) or set {TOKENIZERS_ENV}=DIR"
        ) from err


def local_tokenizer_dir(root: str | Path, name: str) -> Path:
    """``root/<name>`` (or ``root/<org>--<repo>``, or ``root`` itself when it holds tokenizer files)."""
    for folder in (Path(root) / name, Path(root) / name.replace("/", "--"), Path(root)):
        if any((folder / f).is_file() for f in TOKENIZER_FILES):
            return folder
    raise ModelSpecError(
        f"tokenizer '{name}' not found under {root} (looked for {Path(root) / name}/tokenizer.json): copy the "
        f"tokenizer's files there, or unset {TOKENIZERS_ENV} / tokenizers to fetch it from the hub"
    )


NORMALISATION_KEYS = ("mean", "std", "interpolation", "resize_mode", "fill_color")
"""What a student inherits of its teacher's preprocessing; the image size stays the student's own."""


def adopt_preprocess(student: ClipBundle, source: ClipBundle) -> dict[str, list[Any]]:
    """Give ``student`` the normalisation and resize rule ``source`` was trained with (its weights came from there),
    rebuilding its transforms; returns ``{key: [old, new]}`` for what changed. The model's ``visual.preprocess_cfg``
    changes too, so an export carries it and stock open_clip feeds the student what its weights expect."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    old = dict(student.preprocess_cfg)
    new = {**old, **{k: source.preprocess_cfg[k] for k in NORMALISATION_KEYS if k in source.preprocess_cfg}}
    changed = {k: [old.get(k), new[k]] for k in NORMALISATION_KEYS if _plain(old.get(k)) != _plain(new.get(k))}
    if changed:
        cfg = PreprocessCfg(**{k: v for k, v in new.items() if k in PreprocessCfg.__dataclass_fields__})
        student.preprocess_train = image_transform_v2(cfg, is_train=True)
        student.preprocess_val = image_transform_v2(cfg, is_train=False)
        student.preprocess_cfg = new
        student.model.visual.preprocess_cfg = new
    return changed


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, list | tuple) else value


def describe(bundle: ClipBundle) -> dict[str, Any]:
    """What a run feeds a model and how big it is: printed at the start of a run and stored in its results."""
    pre = bundle.preprocess_cfg
    size = pre.get("size") or bundle.model_cfg.get("vision_cfg", {}).get("image_size")
    tok = bundle.tokenizer
    return {
        "spec": bundle.spec, "arch": bundle.arch, **count_params(bundle.model).as_dict(),
        "image_size": _plain(size), "mean": _plain(pre.get("mean")), "std": _plain(pre.get("std")),
        "interpolation": pre.get("interpolation"), "resize_mode": pre.get("resize_mode"),
        "tokenizer": type(tok).__name__, "context_length": getattr(tok, "context_length", None),
    }  # fmt: skip


def weights_fingerprint(model: nn.Module) -> str:
    """Hash of a model's weights: two specs naming the same weights agree, retrained weights do not."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def config_summary(arch: str) -> dict[str, Any]:
    """Params and input size of an open_clip config, built on the meta device (no memory, no weights)."""
    cfg = open_clip.get_model_config(arch) or {}
    size = cfg.get("vision_cfg", {}).get("image_size")
    row: dict[str, Any] = {"arch": arch, "image_size": size, "embed_dim": cfg.get("embed_dim")}
    row["context_length"] = cfg.get("text_cfg", {}).get("context_length", 77)
    try:
        with quiet_random_init(), torch.device("meta"):
            model = open_clip.create_model(arch, device="meta")
    except Exception as err:  # e.g. a timm or HF tower whose package is not installed
        return {**row, "error": str(err).splitlines()[0] if str(err) else type(err).__name__}
    return {**row, **count_params(model).as_dict()}


class quiet_random_init:
    """open_clip warns on every random init; that is the normal case for a student, so hide it."""

    def __enter__(self) -> None:
        self._level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().setLevel(self._level)


@dataclass(frozen=True)
class ParamCount:
    total: int
    non_embedding: int  # without the token embedding, which dominates small CLIPs but costs no FLOPs

    def as_dict(self) -> dict[str, int]:
        return {"params": self.total, "params_non_embedding": self.non_embedding}


def count_params(model: nn.Module) -> ParamCount:
    total = sum(p.numel() for p in model.parameters())
    emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    return ParamCount(total, total - emb)
