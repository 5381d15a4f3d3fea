"""``clipslim plan``: which student fits my latency, size or memory budget, measured on this device."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="measure candidate students of a teacher: size, FLOPs, speed, training memory, accuracy; Pareto set",
        description="For each candidate student (clipslim's shipped configs that inherit from the teacher, plus "
        "width x depth fractions of the teacher) measure on this device: params, GFLOPs per image, images/s and "
        "batch-1 latency, peak memory of a distillation step at --batch with an online or a cached teacher, with "
        "and without gradient checkpointing, and (with --data) zero-shot top-1 right after manual inheritance. "
        "Marks the Pareto set and what fits the budget; writes OUT/plan.json and OUT/plan.png. On CPU, memory is "
        "traced on fake tensors (the real step's ops and shapes, no arithmetic; --memory-probe run runs it).",
    )
    p.add_argument("--teacher", required=True, help="teacher model spec (arch, arch:tag, hub folder, ...)")
    p.add_argument("--students", nargs="+", metavar="S",
                   help="config names and/or WIDTHxDEPTH fractions of the teacher, e.g. ViT-B-32-half 0.5x0.5 "
                   "(default: the shipped configs that inherit from the teacher, 0.75x0.5, 0.5x0.5)")  # fmt: skip
    p.add_argument("--image-size", type=int, help="students' input size (default: the teacher's)")
    p.add_argument("--batch", type=int, default=32, help="training batch for memory; throughput batch for images/s")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-ms", type=float, help="batch-1 image latency budget in ms")
    budget.add_argument("--budget-params", type=_count, help="total parameter budget, e.g. 40M or 4e7")
    p.add_argument("--data", help="eval set (shapes folder, image folder) for zero-shot after inheritance")
    p.add_argument("--out", default="runs/plan", help="output folder (default runs/plan)")
    p.add_argument("--seconds", type=float, default=2.0, help="timing budget per measurement after a warm-up call")
    p.add_argument("--memory-probe", choices=("trace", "run"), default="trace",
                   help="trace: fake-tensor trace of the step (fast; CPU); run: a real step")  # fmt: skip
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 stalls less behind other jobs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_plan)


def _count(text: str) -> float:
    units = {"K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9}
    text = text.strip()
    try:
        return float(text[:-1]) * units[text[-1].upper()] if text[-1:].upper() in units else float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a count like 40M or 4e7, got '{text}'") from err


def cmd_plan(args: argparse.Namespace) -> None:
    import torch

    from ..workflows.plan import PlanOptions, plan
    from ..workflows.plan_report import plan_table

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    opts = PlanOptions(
        image_size=args.image_size, batch=args.batch, device=args.device, budget_ms=args.budget_ms,
        budget_params=args.budget_params, data=args.data, seconds=args.seconds, memory_probe=args.memory_probe,
        progress=not args.no_progress,
    )  # fmt: skip
    result = plan(args.teacher, args.students, args.out, opts)
    print(plan_table(result))
    print(f"wrote {args.out}/plan.json")
