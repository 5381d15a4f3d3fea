"""`clipslim cache-teacher`: compute a teacher's embeddings once, for K replayable augmentations per image.

Train from the cache with ``data.teacher_cache: DIR`` in a recipe (see recipes/mobileclip_cached.yaml). Under
torchrun each rank caches its own shards into the same DIR; re-running after a crash resumes.
"""

from __future__ import annotations

import argparse
import json


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache-teacher",
        help="store teacher embeddings of K replayable augmentations per sample (no teacher in training)",
    )
    p.add_argument("--teacher", required=True, help="teacher model spec, e.g. shapes-teacher:demo")
    p.add_argument("--data", required=True, help="webdataset shard dir, .tar or brace pattern")
    p.add_argument("--augmentations", "-k", type=int, default=4, help="stored augmentations per image (default 4)")
    p.add_argument("--out", required=True, help="cache directory (manifest.json + one sidecar per shard)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per teacher forward")
    p.add_argument("--seed", type=int, default=0, help="augmentation seed")
    p.add_argument("--scale", type=float, nargs=2, default=(0.9, 1.0), metavar=("MIN", "MAX"), help="crop area")
    p.add_argument("--flip", type=float, default=0.0, help="horizontal flip probability (captions may say left/right)")
    p.add_argument(
        "--jitter", type=float, nargs=3, default=(0.1, 0.1, 0.1), metavar=("B", "C", "S"),
        help="brightness, contrast, saturation jitter strengths",
    )  # fmt: skip
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--max-bad-fraction", type=float, default=0.1,
        help="stop with an error when more than this fraction of samples is unusable (finished shards stay cached)",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_cache_teacher)


def cmd_cache_teacher(args: argparse.Namespace) -> None:
    from ..data.augment import AugmentConfig
    from ..data.teacher_cache import CacheOptions, cache_teacher
    from ..distributed import env_from_torchrun

    env = env_from_torchrun()
    device = args.device
    if device == "auto":
        import torch

        device = f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu"
    b, c, s = args.jitter
    augment = AugmentConfig(scale=tuple(args.scale), flip=args.flip, brightness=b, contrast=c, saturation=s)
    opts = CacheOptions(args.augmentations, augment, args.seed, args.batch_size, args.dtype)
    summary = cache_teacher(
        args.teacher, args.data, args.out, opts, device=device, rank=env.rank, world_size=env.world_size,
        progress=not args.quiet, max_bad_fraction=args.max_bad_fraction,
    )  # fmt: skip
    print(json.dumps(summary))
