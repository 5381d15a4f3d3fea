"""One training loop for CPU, one GPU, or many processes under torchrun (DDP; nothing distributed without it).

AdamW with warmup + cosine, autocast on GPU, gradient clipping, the teacher frozen under no_grad, atomic
checkpoints with exact resume, a progress bar with loss and pairs/s, a CSV log, periodic evaluation, and on the
last step an open_clip-loadable export of the student plus a results JSON.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import ConfigError, RunError
from ..distributed import DistEnv, broadcast_flag, cleanup, env_from_torchrun, init_distributed, wrap_ddp
from ..eval.mfu import MfuMeter
from ..hooks import StepContext
from ..io import WriteError, atomic_write_json, atomic_write_text, ensure_dir, read_mapping, write_periodic
from ..recipe import Recipe, TrainSection, recipe_changes, recipe_to_yaml
from .accum import accumulated_backward
from .ahead import AheadFeed, SerialFeed, ahead_wanted
from .checkpoint import latest_checkpoint, no_checkpoint, resume_checkpoint, save_checkpoint
from .guard import DivergenceGuard
from .memory import apply_memory_options
from .metrics_log import CsvLog
from .setup import Built, build, pick_device, teacher_source

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's rule: no weight decay on gains, biases, norms and the logit scale."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "bias" in name or "ln" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(module: nn.Module, cfg: TrainSection) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with the implementation ``cfg.optimizer`` names (auto: fused)."""
    impl = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}.get(cfg.optimizer)
    if impl is None:  # auto: the fused kernel where torch has one (CPU, CUDA), torch's own default elsewhere
        impl = {"fused": True} if {p.device.type for p in module.parameters()} <= {"cpu", "cuda"} else {}
    return torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **impl)


def lr_at(step: int, cfg: TrainSection) -> float:
    """Linear warmup to ``lr`` then cosine to zero at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, progress)))


class BatchStream:
    """Endless batches over epochs, with a position (epoch, batch index) that a checkpoint can restore."""

    def __init__(self, built: Built, recipe: Recipe, device: torch.device, env: DistEnv) -> None:
        self.recipe, self.device, self.built, self.env = recipe, device, built, env
        self.epoch, self.pos = 0, 0
        self.batches = 0  # full batches delivered in this epoch (pos also counts skip-only items)
        self.skipped: dict[str, int] = {}
        self.good = 0  # samples delivered since the start (or the resume), for the bad-fraction check
        self.skipped_at_start: dict[str, int] = {}
        self._it: Iterator[dict[str, Any]] | None = None

    def _loader(self) -> Iterator[dict[str, Any]]:
        from ..data.loader import iterate, make_loader

        d = self.recipe.data
        preprocess, tokenizer = self.built.loader_transforms(d.augment)
        return iterate(
            make_loader(
                d.train, preprocess, tokenizer, self.recipe.train.batch_size, train=True,
                seed=self.recipe.train.seed, epoch=self.epoch, num_workers=d.num_workers,
                rank=self.env.rank, world_size=self.env.world_size, teacher_cache=self.built.teacher_cache,
                keep_list=d.keep_list,
            )
        )  # fmt: skip

    def _count(self, batch: dict[str, Any]) -> None:
        """Tally skipped samples; past the first 4 batches, too many bad ones stop the run (data.max_bad_fraction)."""
        from ..data.loader import check_bad_fraction

        for kind, n in batch.get("skipped", {}).items():
            self.skipped[kind] = self.skipped.get(kind, 0) + n
        self.good += len(batch.get("image", ()))
        if self.good >= 4 * self.recipe.train.batch_size:
            fresh = {k: v - self.skipped_at_start.get(k, 0) for k, v in self.skipped.items()}
            check_bad_fraction(
                fresh, self.good, self.recipe.data.max_bad_fraction, f"data.train ({self.recipe.data.train})"
            )

    def close(self) -> None:
        """Shut the DataLoader's workers down now rather than whenever the iterator is collected: they ignore
        SIGTERM, so a worker kept alive by a stray reference would block interpreter exit."""
        if self._it is not None:
            shutdown = getattr(self._it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self._it = None

    def open(self) -> None:
        """Start the loader (and fork its workers) now. Workers forked inside the first, FLOP-counted step inherit
        the counting mode of the forking thread and run every transform through it (several times slower)."""
        if self._it is None:
            self._it = self._loader()

    def restore(self, epoch: int, pos: int, skipped: dict[str, int]) -> None:
        """Re-open epoch ``epoch`` and skip the ``pos`` batches already trained on."""
        self.epoch, self.skipped = epoch, dict(skipped)
        self.skipped_at_start = dict(skipped)
        self._it = self._loader()
        self.batches = sum("image" in next(self._it) for _ in range(pos))
        self.pos = pos

    def next(self) -> dict[str, Any]:
        while True:
            if self._it is None:
                self._it = self._loader()
            try:
                batch = next(self._it)
            except StopIteration:
                if self.batches == 0:
                    break
                self._it, self.epoch, self.pos, self.batches = None, self.epoch + 1, 0, 0
                continue
            self.pos += 1
            self._count(batch)
            if "image" not in batch:  # only the skip counts of a reader that had no full batch
                continue
            self.batches += 1
            return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        raise ConfigError(
            f"data.train: {self.recipe.data.train} gave no full batch of {self.recipe.train.batch_size} pairs "
            f"(skipped: {self.skipped or 'none'})"
        )


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to save a checkpoint and stop cleanly instead of dying mid-step."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not in the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.requested = True
        log.warning("signal %d: saving a checkpoint and stopping after this step", signum)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


@dataclass
class Precision:
    autocast: Any
    scaler: torch.amp.GradScaler | None
    dtype: torch.dtype = torch.float32  # of the matmuls: the MFU's peak is measured in it


def make_precision(name: str, device: torch.device) -> Precision:
    if device.type != "cuda" or name == "fp32":
        return Precision(contextlib.nullcontext, None)
    dtype = torch.bfloat16 if name == "bf16" or (name == "auto" and torch.cuda.is_bf16_supported()) else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return Precision(lambda: torch.autocast("cuda", dtype=dtype), scaler, dtype)


class Trainer:
    """Owns one run directory: ``recipe.yaml``, ``metrics.csv``, ``checkpoints/``, ``student/``, ``results.json``."""

    def __init__(
        self, recipe: Recipe, run_dir: str | Path, *, resume: bool = False, progress: bool = True, force: bool = False
    ) -> None:
        self.recipe, self.cfg = recipe, recipe.train
        self.run_dir, self.progress = Path(run_dir), progress
        self.ckpt_dir = self.run_dir / "checkpoints"
        latest = latest_checkpoint(self.ckpt_dir)
        if latest is not None and not resume:
            raise ConfigError(f"run dir {self.run_dir} already has checkpoints: pass --resume, or pick another --out")
        if resume and latest is None and any(self.ckpt_dir.glob("step_*")):
            raise no_checkpoint(self.ckpt_dir)
        self.resume_from = latest if resume else None
        self.previous_recipe = self._check_resume_recipe(force) if self.resume_from is not None else None
        self.env = env_from_torchrun()
        self.device = init_distributed(self.env, pick_device(self.cfg.device))
        seed_everything(self.cfg.seed)
        self.built = build(recipe, self.device)
        self.summary = self.built.summary(recipe)
        apply_memory_options(self.built, self.cfg, self.device)  # after the summary: it hashes fp32 teacher weights
        self.model = self.built.distiller
        self.forward = wrap_ddp(self.model, self.device)  # DDP also syncs every objective's extras
        self.teacher = teacher_source(self.built)  # online, cached (no teacher forward) or None
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.precision = make_precision(self.cfg.precision, self.device)
        self.stream = BatchStream(self.built, recipe, self.device, self.env)
        self.feed = self._feed()
        self.metrics = CsvLog(self.run_dir / "metrics.csv")
        self.evals = CsvLog(self.run_dir / "evals.csv")
        if self.resume_from is None:  # a fresh start (e.g. after a crash before the first checkpoint) logs anew
            self.metrics.rows, self.evals.rows = [], []
        self.step = 0
        self.bad_steps, self.bad_streak = 0, 0
        self.mfu_meter: MfuMeter | None = None  # made when the loop starts: the peak probe is for runs that train
        self.guard = DivergenceGuard(
            self.cfg.batch_size * self.env.world_size, self.cfg.warmup, self.cfg.divergence_steps, self.cfg.lr
        )

    def _feed(self) -> SerialFeed:
        """Serial batches, or the online teacher one batch ahead in a second thread (train.teacher_ahead)."""
        online = self.teacher is not None and self.built.teacher_cache is None
        hooks, world = len(self.built.hooks), self.env.world_size
        if not ahead_wanted(self.cfg.teacher_ahead, self.device, online, self.cfg.accum_freq, hooks, world):
            return SerialFeed(self.stream)
        log.info("the teacher runs one batch ahead in a second thread (train.teacher_ahead: never turns it off)")
        assert self.teacher is not None
        return AheadFeed(self.stream, self.teacher, self.precision.autocast, pin=self.device.type == "cpu")

    def _check_resume_recipe(self, force: bool) -> str | None:
        """The stored recipe.yaml when the new recipe differs from it (kept as recipe.prev.yaml), else None. A
        different teacher, student or data is refused unless ``force``: the checkpoint was trained from them."""
        stored = self.run_dir / "recipe.yaml"
        if not stored.is_file():
            return None
        identity, other = recipe_changes(read_mapping(stored), self.recipe)
        if identity and not force:
            raise ConfigError(
                f"{stored}: --resume with a different {'; '.join(identity)}; pass --force to resume anyway, or pick "
                "another --out"
            )
        if not identity and not other:
            return None
        log.warning("resuming with a changed recipe (%s); the previous one is kept as recipe.prev.yaml",
                    "; ".join(identity + other))  # fmt: skip
        return stored.read_text(encoding="utf-8")

    def _prepare_run_dir(self) -> None:
        if self.env.is_main:
            self._write_run_files()
        if self.resume_from is not None:
            self._resume()

    def _write_run_files(self) -> None:
        ensure_dir(self.run_dir)
        if self.previous_recipe is not None:
            atomic_write_text(self.run_dir / "recipe.prev.yaml", self.previous_recipe)
        atomic_write_text(self.run_dir / "recipe.yaml", recipe_to_yaml(self.recipe))
        log.info("%s", format_summary(self.summary))
        if self.built.inherit_report is not None:
            atomic_write_json(self.run_dir / "inherit.json", self.built.inherit_report)

    def _resume(self) -> None:
        """Restore the newest checkpoint that loads; damaged newer ones are passed over, in one line."""
        self.resume_from, state, notes = resume_checkpoint(self.ckpt_dir, self.model, self.optimizer)
        if notes:
            log.warning("resuming from %s (passed over: %s)", self.resume_from.name, "; ".join(notes))
        self.step = state["step"]
        self.bad_steps = state.get("bad_steps", 0)
        self.stream.restore(state["epoch"], state["pos"], state.get("skipped", {}))
        self.metrics.truncate_after(self.step)
        self.evals.truncate_after(self.step)
        log.info("resumed from %s at step %d", self.resume_from, self.step)

    def train_step(self, batch: dict[str, Any], teacher_out: Any = None) -> dict[str, torch.Tensor]:
        """One optimizer step on ``batch``; ``teacher_out``: the teacher's outputs when already computed."""
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        scaler = self.precision.scaler
        if self.cfg.accum_freq > 1:  # the whole contrastive batch in micro-batches (train/accum.py)
            k, autocast = self.cfg.accum_freq, self.precision.autocast
            out = accumulated_backward(self.forward, self.model, self.teacher, batch, k, autocast, scaler)
        else:
            with self.precision.autocast():
                if teacher_out is None and self.teacher is not None:
                    teacher_out = self.teacher(batch)
                out = self.forward(batch, teacher_out)
            (scaler.scale(out["loss"]) if scaler else out["loss"]).backward()  # even non-finite: DDP ranks in step
        loss = out["loss"]
        if scaler:
            scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip or float("inf")
        out["grad_norm"] = nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        out["lr"] = torch.tensor(lr)
        # fp16's loss scaler skips overflowing steps itself; otherwise a non-finite gradient means a bad step.
        bad = not torch.isfinite(loss) or (scaler is None and not torch.isfinite(out["grad_norm"]))
        if broadcast_flag(bool(bad)):
            self.optimizer.zero_grad(set_to_none=True)
            out["bad_step"] = torch.tensor(1.0)
            return out
        if scaler:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.clamp_logit_scale()
        return out

    def step_context(self) -> StepContext:
        """What hooks see before a step (never the trainer itself)."""
        where = self.feed.position()  # after the last batch trained on
        return StepContext(
            step=self.step, total_steps=self.cfg.steps, seed=self.cfg.seed, run_dir=self.run_dir, device=self.device,
            autocast=self.precision.autocast, student=self.built.distiller.student, teacher=self.built.teacher,
            data=self.recipe.data.train, progress=self.progress, is_main=self.env.is_main,
            position=(where.epoch, where.pos), open_stream=self._open_stream,
        )  # fmt: skip

    def _open_stream(self, position: tuple[int, int]) -> BatchStream:
        # A weak proxy: a strong self.built held by a hook's stream would close a reference cycle (built -> distiller
        # -> objective -> stream -> built) that keeps the loader's workers alive after the run, and workers that
        # ignore SIGTERM then block interpreter exit.
        stream = BatchStream(weakref.proxy(self.built), self.recipe, self.device, self.env)
        stream.restore(*position, {})
        return stream

    def _count_bad(self, out: dict[str, torch.Tensor]) -> None:
        """Skip-and-count non-finite steps; stop with the culprit terms named after max_bad_steps in a row."""
        if "bad_step" not in out:
            self.bad_streak = 0
            return
        self.bad_steps += 1
        self.bad_streak += 1
        terms = sorted(k for k, v in out.items() if k.endswith("_loss") and not torch.isfinite(v).all())
        log.warning("step %d skipped: non-finite %s", self.step, ", ".join(terms) or "gradients")
        if self.bad_streak >= self.cfg.max_bad_steps:
            kept = latest_checkpoint(self.ckpt_dir)
            raise RunError(
                f"stopped at step {self.step}: {self.bad_streak} non-finite steps in a row "
                f"(non-finite: {', '.join(terms) or 'gradients'}); last good checkpoint: {kept or 'none yet'}"
            )

    def save(self, required: bool = True) -> None:
        """Write a checkpoint. A failed periodic one (``required=False``, e.g. disk full) is logged and training goes
        on with the previous checkpoint intact; a failed final or on-signal one stops with a RunError."""
        if not self.env.is_main:  # every rank holds the same weights; one writes them
            return
        where = self.feed.position()  # the last batch trained on, not one fetched ahead
        state = {"epoch": where.epoch, "pos": where.pos, "skipped": where.skipped}
        state["bad_steps"] = self.bad_steps
        try:
            save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer, state, self.cfg.keep_checkpoints)
        except WriteError as err:
            kept = latest_checkpoint(self.ckpt_dir)
            msg = f"checkpoint at step {self.step} not written ({err}); last good checkpoint: {kept or 'none yet'}"
            if required:
                raise RunError(msg) from err
            log.error("%s; training goes on and retries at the next save", msg)

    def evaluate(self, final: bool = False) -> dict[str, Any] | None:
        """Evaluate on data.eval and log a row to evals.csv (a periodic row that cannot be written is logged)."""
        if not self.recipe.data.eval or not self.env.is_main:
            return None
        from ..eval.run import evaluate_shapes

        b = self.built.student
        results = evaluate_shapes(b, self.recipe.data.eval, device=str(self.device), progress=False)
        row = {"step": self.step, **_flat_eval(results)}
        if final:
            self.evals.append(row)
        else:
            write_periodic(lambda: self.evals.append(row), f"evals.csv row at step {self.step}")
        return results

    def run(self) -> dict[str, Any]:
        """Train to ``train.steps`` (or until a stop signal), then export and evaluate the student."""
        self._prepare_run_dir()
        try:
            with _StopFlag() as stop:
                self._loop_saving_on_data_error(stop)
                if stop.requested:
                    self.save()
                    return {"stopped_at": self.step}
            return self.finish()
        finally:
            self.feed.close()
            self.stream.close()
            cleanup()

    def _loop_saving_on_data_error(self, stop: _StopFlag) -> None:
        """Too much bad data stops the run, but the steps trained so far are good: keep them in a checkpoint."""
        from ..data.loader import DataError

        try:
            self._loop(stop)
        except DataError as err:
            if self.step and self.step != (self._saved_step() or 0):
                self.save(required=False)
            kept = latest_checkpoint(self.ckpt_dir) if self.env.is_main else None
            where = f"checkpoint {kept.name} kept, --resume continues" if kept else "no checkpoint saved yet"
            raise DataError(f"{err} [stopped at step {self.step}; {where}]") from err

    def _saved_step(self) -> int | None:
        latest = latest_checkpoint(self.ckpt_dir)
        return int(latest.name.removeprefix("step_")) if latest else None

    def _loop(self, stop: _StopFlag) -> None:
        show = self.progress and self.env.is_main
        bar = tqdm(total=self.cfg.steps, initial=self.step, disable=not show, desc=self.recipe.name)
        try:
            self._steps(stop, bar)
        finally:
            bar.close()  # before any error is printed, so the two do not share a line

    def _steps(self, stop: _StopFlag, bar: tqdm) -> None:
        tick, pairs = time.perf_counter(), 0
        if self.cfg.eval_every and self.step == 0:
            self.evaluate()  # the starting point: what inheritance alone gives
        self.stream.open()  # before the counted step: see BatchStream.open
        measured = self._start_mfu()
        while self.step < self.cfg.steps:
            if broadcast_flag(stop.requested):  # a signal to any rank stops all of them at the same step
                stop.requested = True
                break
            if self.built.hooks:
                ctx = self.step_context()
                for hook in self.built.hooks:
                    hook.before_step(ctx)
            with measured():
                out = self.train_step(*self.feed.next(more=self.step + 1 < self.cfg.steps))
            self.step += 1
            self._count_bad(out)
            self._watch(out)
            pairs += self.cfg.batch_size * self.env.world_size
            if self.env.is_main and (self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps):
                rate = pairs / max(time.perf_counter() - tick, 1e-9)
                tick, pairs = time.perf_counter(), 0
                row = {
                    "step": self.step,
                    "epoch": self.feed.position().epoch,
                    "pairs_per_s": round(rate, 1),
                    **_terms(out),
                }
                row.update(self._mfu_column())
                write_periodic(lambda row=row: self.metrics.append(row), f"metrics.csv row at step {self.step}")
                bar.set_postfix(loss=f"{row['loss']:.4f}", pairs_s=f"{rate:.0f}")
            if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.cfg.steps:
                self.evaluate()
            if self.step % self.cfg.save_every == 0 and self.step < self.cfg.steps and not self.bad_streak:
                self.save(required=False)
            bar.update(1)

    def _start_mfu(self) -> Callable[[], contextlib.AbstractContextManager[None]]:
        """A context for each step; the matmul peak is probed here, once, so that only runs that train pay for it."""
        if self.cfg.mfu and self.env.is_main:
            lanes = 2 if isinstance(self.feed, AheadFeed) and self.device.type == "cpu" else 1
            self.mfu_meter = MfuMeter(self.device, self.precision.dtype, lanes)
        return self.mfu_meter.step if self.mfu_meter else contextlib.nullcontext

    def _mfu_column(self) -> dict[str, float]:
        value = self.mfu_meter.take() if self.mfu_meter else None
        return {} if value is None else {"mfu": value}

    def _watch(self, out: dict[str, torch.Tensor]) -> None:
        """Feed the divergence guard (main process only); a finding is one warning line, kept for results.json."""
        if self.env.is_main and self.guard.patience and "bad_step" not in out:
            message = self.guard.observe(self.step, _terms(out))
            if message:
                log.warning("%s", message)

    def _check_skipped_steps(self) -> None:
        """A student trained on (almost) no steps is not worth exporting: stop with one line, checkpoint kept."""
        bad, limit = self.bad_steps, self.cfg.max_bad_step_fraction
        if self.step and (bad >= self.step or bad > limit * self.step):
            kept = latest_checkpoint(self.ckpt_dir) if self.env.is_main else None
            raise RunError(
                f"{bad} of {self.step} steps were skipped as non-finite (more than train.max_bad_step_fraction "
                f"{limit:g}): nothing exported; likely causes: a NaN teacher or cache, train.lr {self.cfg.lr:g} too "
                f"high; last checkpoint: {kept or 'none'}"
            )

    def finish(self) -> dict[str, Any]:
        self.save()
        self._check_skipped_steps()
        if not self.env.is_main:
            return {"rank": self.env.rank, "steps": self.step}
        return self._export_and_report()

    def _export_and_report(self) -> dict[str, Any]:
        from ..export import export_open_clip
        from ..models import count_params

        b = self.built.student
        export_open_clip(
            b.model, b.model_cfg, self.run_dir / "student", preprocess_cfg=b.preprocess_cfg, arch=b.arch,
            extra={"recipe": self.recipe.name, "step": self.step, "teacher": _provenance(self.summary["teacher"])},
        )  # fmt: skip
        results: dict[str, Any] = {"recipe": self.recipe.name, "steps": self.step, **count_params(b.model).as_dict()}
        results["run"] = self.summary | ({"mfu": self.mfu_meter.summary()} if self.mfu_meter else {})
        results["skipped"] = self.stream.skipped
        results["bad_steps"] = self.bad_steps
        results["warnings"] = self.guard.messages
        results["eval"] = self.evaluate(final=True)
        atomic_write_json(self.run_dir / "results.json", results)
        skipped = sum(self.stream.skipped.values())
        log.info("skipped %d bad training samples %s", skipped, self.stream.skipped or "")
        return results


def _provenance(teacher: dict[str, Any] | None) -> dict[str, Any] | None:
    """What an exported student records of its teacher: enough to find the exact weights again."""
    return None if teacher is None else {"spec": teacher["spec"], "weights_sha256_16": teacher.get("weights")}


def format_summary(summary: dict[str, Any]) -> str:
    """The start-of-run block: each model's spec, size and the pixels/tokens it reads, then data and objectives."""
    lines = ["run:"]
    for role in ("teacher", "student"):
        m = summary.get(role)
        if m is None:
            continue
        params = f"{m['params'] / 1e6:.2f}M params" if "params" in m else f"cached in {m.get('cache')}"
        lines.append(
            f"  {role:8s} {m['spec']} ({params}); images {_size(m)} px, mean {_nums(m.get('mean'))} std "
            f"{_nums(m.get('std'))}" + (f"; {m['tokenizer']} ctx {m['context_length']}" if "tokenizer" in m else "")
        )
    terms = ", ".join(f"{k} {v:g}" for k, v in summary["objectives"].items())
    lines.append(f"  data     {summary['data']}; {summary['steps']} steps x {summary['batch_size']}")
    lines.append(f"  loss     {terms} (teacher: {summary['teacher_source']})")
    return "\n".join(lines)


def _size(m: dict[str, Any]) -> str:
    size = m.get("image_size") or m.get("size")
    return "x".join(map(str, size)) if isinstance(size, list) else str(size)


def _nums(values: Any) -> str:
    return "?" if values is None else "/".join(f"{v:.3g}" for v in values)


def _terms(out: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: round(float(v.detach()), 6) for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}


def _flat_eval(results: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for group in ("zeroshot_heldout", "zeroshot_seen", "zeroshot_ood", "retrieval"):
        for key, value in (results.get(group) or {}).items():
            if key != "n":
                flat[f"{group}/{key}"] = value
    return flat


def train(
    recipe: Recipe, run_dir: str | Path, *, resume: bool = False, progress: bool = True, force: bool = False
) -> dict[str, Any]:
    """Run a recipe into ``run_dir``; with ``resume`` continue from its latest complete checkpoint (``force``: even
    with a different teacher, student or data than the one it was trained with)."""
    return Trainer(recipe, run_dir, resume=resume, progress=progress, force=force).run()
