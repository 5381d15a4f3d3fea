"""`clipslim dedup`: a keep-list without near-duplicate images (teacher image embeddings, faiss).

Train on it with ``data.keep_list: LIST`` in a recipe (or ``--set data.keep_list=LIST``).
"""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dedup",
        help="find near-duplicate images by teacher embedding and write a keep-list for data.keep_list",
        description="Embeds every image with the teacher, visits samples in data order and drops one when an earlier "
        "kept sample among its k nearest neighbours has cosine >= T. Writes the kept keys to LIST (one per line) and "
        "a report (counts, how many dropped samples share their kept twin's caption or class, example pairs) to "
        "LIST.report.json. Exact copies have cosine 1 up to float rounding: use T < 1. Needs the 'proto' extra "
        "(faiss).",
    )
    p.add_argument("--teacher", required=True, help="teacher model spec, e.g. shapes-teacher:demo")
    p.add_argument("--data", required=True, help="webdataset shard dir, .tar, brace pattern or CSV")
    p.add_argument("--threshold", type=float, required=True, metavar="T", help="near-duplicate cosine, e.g. 0.98")
    p.add_argument("--out", required=True, metavar="LIST", help="keep-list file to write")
    p.add_argument("--k", type=int, default=32, help="neighbours searched per sample")
    p.add_argument("--batch-size", type=int, default=256, help="images per teacher forward")
    p.add_argument("--examples", type=int, default=6, help="example pairs in the report")
    p.add_argument("--report", help="report path (default: LIST.report.json)")
    p.add_argument("--device", default="auto")
    p.set_defaults(fn=cmd_dedup)


def cmd_dedup(args: argparse.Namespace) -> None:
    import torch

    from ..workflows.dedup import dedup, summary_lines

    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    report = dedup(
        args.teacher, args.data, args.threshold, args.out, k=args.k, batch_size=args.batch_size, device=device,
        examples=args.examples, report_path=args.report,
    )  # fmt: skip
    print("\n".join(summary_lines(report)))
