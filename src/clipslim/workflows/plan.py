"""``clipslim plan``: measure, don't model (Ansor's rule, applied to choosing a student).

For each candidate student of a teacher: size, FLOPs per image, images/s and batch-1 latency timed on this device,
peak training memory of a distillation step at batch B (online teacher or cached teacher, each with and without
gradient checkpointing) and, given eval data, zero-shot accuracy right after manual inheritance. Marks the Pareto
set (speed against accuracy, or against non-embedding parameters as a capacity proxy without data) and what fits a
latency or size budget; writes ``plan.json`` and ``plan.png``.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..distiller import CachedTeacher, Distiller, OnlineTeacher
from ..eval.bench import count_cost, image_hw, machine_info
from ..eval.datasets import RunOptions, evaluate_data, open_eval_data
from ..eval.plan_probe import model_bytes, step_peak, time_bounded
from ..inherit.manual import InheritError, inherit_manual
from ..io import atomic_write_json
from ..models import ClipBundle, adopt_preprocess, count_params, load_model
from ..outputs import embed_dim
from ..recipe import Recipe, TrainSection
from ..train.loop import make_optimizer
from .plan_candidates import Candidate, resolve_students

log = logging.getLogger(__name__)
MEMORY_VARIANTS = {"online": (True, False), "online_ckpt": (True, True), "cached": (False, False),
                   "cached_ckpt": (False, True)}  # fmt: skip
"""Column -> (teacher runs in the step, student gradient checkpointing)."""


@dataclass
class PlanOptions:
    image_size: int | None = None  # students' input size; None: the teacher's
    batch: int = 32  # training batch for memory, and the throughput batch for images/s
    device: str = "cpu"
    budget_ms: float | None = None  # batch-1 image latency budget
    budget_params: float | None = None  # total parameter budget
    data: str | None = None  # eval set for zero-shot right after inheritance
    seconds: float = 2.0  # timing budget per measurement (after one warm-up call)
    memory_probe: str = "trace"  # trace (fake tensors, CPU) | run (a real step)
    objectives: tuple[str, ...] = ("affinity",)
    progress: bool = True

    def check(self) -> None:
        if self.batch < 1 or self.seconds <= 0:
            raise ValueError(f"--batch must be >= 1 and --seconds > 0 (got {self.batch}, {self.seconds})")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"--image-size must be >= 1, got {self.image_size}")
        if any(b is not None and b <= 0 for b in (self.budget_ms, self.budget_params)):
            raise ValueError("--budget-ms / --budget-params must be > 0")
        if self.memory_probe not in ("trace", "run"):
            raise ValueError(f"--memory-probe: expected trace or run, got '{self.memory_probe}'")
        if self.data is not None and "zeroshot_classification" not in open_eval_data(self.data).tasks:
            raise ValueError(f"--data {self.data}: no classification split for zero-shot accuracy")


# ---------------------------------------------------------------- measurements


@torch.inference_mode()
def measure_speed(bundle: ClipBundle, opts: PlanOptions) -> dict[str, Any]:
    """GFLOPs per image, batch-1 latency (ms) and images/s at ``opts.batch``, image encoder in eval mode.

    The figures are the best timed call (as ``report`` keeps each model's best): on a shared machine the slower
    calls measure the neighbours; the medians are kept beside them."""
    model, (h, w) = bundle.model.to(opts.device).eval(), image_hw(bundle)
    one = torch.randn(1, 3, h, w, device=opts.device)
    many = torch.randn(opts.batch, 3, h, w, device=opts.device)
    flops = count_cost(lambda: model.encode_image(one), model)[0]
    b1 = time_bounded(lambda: model.encode_image(one), opts.seconds / 2, opts.device, min_calls=3)
    bn = time_bounded(lambda: model.encode_image(many), opts.seconds, opts.device)
    return {"gflops_per_image": flops / 1e9, "latency_ms_b1": 1e3 * min(b1), "images_per_s": opts.batch / min(bn),
            "latency_ms_b1_median": 1e3 * statistics.median(b1),
            "images_per_s_median": opts.batch / statistics.median(bn), "timed_calls": [len(b1), len(bn)]}  # fmt: skip


@dataclass(frozen=True)
class StepShape:
    """What one distillation step feeds: batch, each model's pixels and tokens, the teacher's outputs."""

    batch: int
    student_hw: tuple[int, int]
    student_ctx: int
    teacher_hw: tuple[int, int]
    teacher_ctx: int
    teacher_dim: int
    teacher_scale: float
    device: str


def _batch(shape: StepShape, online: bool) -> dict[str, torch.Tensor]:
    b, dev = shape.batch, shape.device
    batch = {"image": torch.randn(b, 3, *shape.student_hw, device=dev),
             "text": torch.randint(1, 1000, (b, shape.student_ctx), device=dev)}  # fmt: skip
    if online:
        batch["teacher_pixels"] = torch.randn(b, 3, *shape.teacher_hw, device=dev)
        batch["teacher_tokens"] = torch.randint(1, 1000, (b, shape.teacher_ctx), device=dev)
    else:
        batch["teacher_image"] = torch.randn(b, shape.teacher_dim, device=dev, dtype=torch.float16)
        batch["teacher_text"] = torch.randn(b, shape.teacher_dim, device=dev, dtype=torch.float16)
    return batch


def distill_steps(models: Sequence[nn.Module], shape: StepShape, objectives: Sequence[str], ckpt: bool) -> None:
    """Two training steps as the trainer runs them (teacher under no_grad, AdamW, grads set to None), so the
    optimizer state made in the first is resident during the second: the steady-state peak."""
    student, teacher = models[0], (models[1] if len(models) > 1 else None)
    student.train()
    student.set_grad_checkpointing(ckpt)
    specs = Recipe(objectives={name: 1.0 for name in objectives}).objective_specs()
    distiller = Distiller(student, specs, shape.teacher_dim)
    if torch.device(shape.device).type != "cpu":  # the objectives' extras; fake models cannot be moved
        distiller.objectives.to(shape.device)
    optimizer = make_optimizer(distiller, TrainSection())
    source = (
        OnlineTeacher(teacher, "teacher_pixels", "teacher_tokens") if teacher else CachedTeacher(shape.teacher_scale)
    )
    for _ in range(2):
        batch = _batch(shape, teacher is not None)
        distiller(batch, source(batch))["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    student.set_grad_checkpointing(False)
    student.eval()


def measure_memory(student: ClipBundle, teacher: ClipBundle, opts: PlanOptions) -> dict[str, Any]:
    """Peak bytes of a distillation step per :data:`MEMORY_VARIANTS`, counting the weights that stay resident
    (student; teacher when it runs in the step) plus everything the steps create."""
    shape = StepShape(
        opts.batch, image_hw(student), _ctx(student), image_hw(teacher), _ctx(teacher), embed_dim(teacher.model),
        float(teacher.model.logit_scale.detach().exp()), opts.device,
    )  # fmt: skip
    out: dict[str, Any] = {}
    for column, (online, ckpt) in MEMORY_VARIANTS.items():
        models = [student.model, teacher.model] if online else [student.model]
        step = partial(distill_steps, shape=shape, objectives=opts.objectives, ckpt=ckpt)
        peak, method = step_peak(step, models, opts.device, trace=opts.memory_probe == "trace")
        out[column] = sum(model_bytes(m) for m in models) + peak
        out["method"] = method
    return out


def _ctx(bundle: ClipBundle) -> int:
    return int(getattr(bundle.tokenizer, "context_length", None) or bundle.model_cfg["text_cfg"]["context_length"])


def measure_zeroshot(bundle: ClipBundle, opts: PlanOptions) -> dict[str, Any]:
    res = evaluate_data(bundle, opts.data, ["zeroshot_classification"], RunOptions(device=opts.device, progress=False))
    metrics = res["tasks"]["zeroshot_classification"]
    return {k: metrics.get(k) for k in ("acc1", "acc5", "heldout_acc1") if metrics.get(k) is not None}


# ---------------------------------------------------------------- rows


def teacher_row(teacher: ClipBundle, spec: str, opts: PlanOptions) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": spec,
        "role": "teacher",
        "source": "teacher",
        **count_params(teacher.model).as_dict(),
    }
    row.update(measure_speed(teacher, opts))
    if opts.data:
        row["zeroshot"] = measure_zeroshot(teacher, opts)
    return row


def student_row(cand: Candidate, teacher: ClipBundle, opts: PlanOptions) -> dict[str, Any]:
    """Build, inherit (with data), evaluate, time, then trace memory: the order that leaves the weights untouched
    for each measurement that reads them."""
    torch.manual_seed(0)
    student = load_model(cand.name, device=opts.device)
    row: dict[str, Any] = {"name": cand.name, "role": "student", "source": cand.source, "config": cand.cfg}
    row.update(count_params(student.model).as_dict())
    if opts.data:
        row.update(_inherited_zeroshot(student, teacher, opts))
    row.update(measure_speed(student, opts))
    memory = measure_memory(student, teacher, opts)
    row["memory_method"] = memory.pop("method")
    row["train_memory_bytes"] = memory
    return row


def _inherited_zeroshot(student: ClipBundle, teacher: ClipBundle, opts: PlanOptions) -> dict[str, Any]:
    try:
        inherit_manual(teacher.model, student.model)
    except InheritError as err:
        return {"inherit": f"refused: {err}"}
    adopt_preprocess(student, teacher)
    return {"inherit": "manual", "zeroshot": measure_zeroshot(student, opts)}


# ---------------------------------------------------------------- selection


def _merit(row: dict[str, Any], by_accuracy: bool) -> float:
    return (row.get("zeroshot") or {}).get("acc1", float("-inf")) if by_accuracy else row["params_non_embedding"]


def mark_pareto(rows: list[dict[str, Any]], by_accuracy: bool) -> None:
    """``pareto``: no other student is at least as fast and as good (accuracy, or capacity) and better in one."""
    for row in rows:
        speed, merit = row["images_per_s"], _merit(row, by_accuracy)
        row["pareto"] = not any(
            o is not row
            and o["images_per_s"] >= speed
            and _merit(o, by_accuracy) >= merit
            and (o["images_per_s"] > speed or _merit(o, by_accuracy) > merit)
            for o in rows
        )


def mark_budget(rows: list[dict[str, Any]], opts: PlanOptions) -> None:
    """``fits``: inside ``--budget-ms`` (batch-1 latency) or ``--budget-params`` (total parameters); None without."""
    for row in rows:
        if opts.budget_ms is not None:
            row["fits"] = row["latency_ms_b1"] <= opts.budget_ms
        elif opts.budget_params is not None:
            row["fits"] = row["params"] <= opts.budget_params
        else:
            row["fits"] = None


# ---------------------------------------------------------------- the job


def plan(teacher_spec: str, students: list[str] | None, out: str | Path, opts: PlanOptions) -> dict[str, Any]:
    """``clipslim plan``: every candidate measured on this device; ``plan.json`` (+ ``plan.png``) in ``out``."""
    opts.check()
    start, out = time.perf_counter(), Path(out)
    teacher = load_model(teacher_spec, device=opts.device)
    teacher.model.eval()
    cands = resolve_students(students, teacher.model, teacher.arch, teacher.model_cfg, opts.image_size, out)
    bar = tqdm(total=len(cands) + 1, desc="plan", unit="model", disable=not opts.progress)
    bar.set_postfix_str(f"teacher {teacher_spec}")
    rows = [teacher_row(teacher, teacher_spec, opts)]
    bar.update()
    for cand in cands:
        bar.set_postfix_str(cand.name)
        rows.append(student_row(cand, teacher, opts))
        bar.update()
    bar.close()
    result = _result(teacher_spec, rows, opts, time.perf_counter() - start)
    atomic_write_json(out / "plan.json", result)
    _plot(result, out / "plan.png")
    return result


def _result(teacher: str, rows: list[dict[str, Any]], opts: PlanOptions, wall: float) -> dict[str, Any]:
    studs = [r for r in rows if r["role"] == "student"]
    by_accuracy = bool(opts.data) and all("zeroshot" in r for r in studs)
    mark_pareto(studs, by_accuracy)
    mark_budget(studs, opts)
    options = {k: v for k, v in asdict(opts).items() if k != "progress"}
    return {"teacher": teacher, "options": options, "machine": machine_info(opts.device),
            "pareto_axes": ["images_per_s", "zeroshot acc1" if by_accuracy else "params_non_embedding"],
            "wall_s": round(wall, 1), "rows": rows}  # fmt: skip


def _plot(result: dict[str, Any], path: Path) -> None:
    from .plan_report import plot_plan

    try:
        plot_plan(result, path)
    except ModuleNotFoundError as err:
        log.warning("plan.png skipped: the 'plots' extra is not installed (missing %s)", err.name)
