"""Pick a token-compression schedule for a compute budget from short trial runs (an "optimal acceleration
schedule" search).

1. Cost model: time the recipe's real training step (teacher, both towers, optimizer) at every (dropout, patch
   scale) setting the candidates use, interleaved, relative to the uncompressed step.
2. Budget: ``budget × train.steps`` uncompressed-step equivalents. A schedule with mean relative cost ``c`` affords
   ``budget × train.steps / c`` steps.
3. Trials: each candidate trains at ``trial_fraction`` of the budget (so each trial costs the same compute) and is
   scored by zero-shot top-1 on labelled images from the training shards (the eval split stays unseen).
4. The winner is written as a recipe whose ``train.steps`` fills the whole budget.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..io import atomic_write_json, atomic_write_text
from ..recipe import Recipe, recipe_to_yaml
from ..tokens.schedule import TokenPhase, TokenSection

log = logging.getLogger(__name__)

Setting = tuple[float, int]


def candidates() -> dict[str, TokenSection]:
    """The schedules tried: none, constant dropout, aggressive-early decays, patch scaling early."""
    p = TokenPhase
    return {
        "none": TokenSection(),
        "drop50": TokenSection(schedule=[p(1.0, 0.5)]),
        "drop75": TokenSection(schedule=[p(1.0, 0.75)]),
        "drop75-50-0": TokenSection(schedule=[p(0.5, 0.75), p(0.8, 0.5), p(1.0, 0.0)]),
        "drop50-0": TokenSection(schedule=[p(0.7, 0.5), p(1.0, 0.0)]),
        "patch2-0": TokenSection(schedule=[p(0.5, 0.0, 2), p(1.0, 0.0)]),
    }


def settings_of(schedules: dict[str, TokenSection]) -> list[Setting]:
    found = {(ph.patch_dropout, ph.patch_scale) for s in schedules.values() for ph in s.phases()}
    return sorted(found | {(0.0, 1)})


def step_costs(recipe: Recipe, settings: list[Setting], run_dir: Path, rounds: int = 6) -> dict[Setting, float]:
    """Median step time of each setting relative to (0.0, 1), timed round-robin on the recipe's real step."""
    from ..train.loop import Trainer

    probe = copy.deepcopy(recipe)
    probe.tokens = TokenSection()
    probe.data.eval = None
    trainer = Trainer(probe, run_dir, progress=False)
    hook = next(h for h in trainer.built.hooks if hasattr(h, "compression"))
    batch = trainer.stream.next()
    times: dict[Setting, list[float]] = {s: [] for s in settings}
    for r in range(rounds + 1):
        for s in settings:
            hook.compression.set(*s)
            t0 = _now(trainer.device)
            trainer.train_step(batch)
            if r:  # the first round warms up
                times[s].append(_now(trainer.device) - t0)
    base = statistics.median(times[(0.0, 1)])
    return {s: statistics.median(v) / base for s, v in times.items()}


def _now(device: torch.device) -> float:
    import time

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def steps_for(section: TokenSection, costs: dict[Setting, float], budget_steps: float) -> int:
    """Steps that fit ``budget_steps`` uncompressed-step equivalents under ``section``'s mean cost."""
    return max(1, int(budget_steps / section.mean_cost(costs)))


@torch.no_grad()
def validation_accuracy(student_dir: Path, data_dir: str, samples: int = 512) -> float:
    """Zero-shot top-1 of an exported student on labelled images of the training shards (not the eval split)."""
    from ..inherit.blocks import ValidationSet
    from ..models import load_model

    bundle = load_model(str(student_dir))
    model = bundle.model.eval()
    val = ValidationSet.from_data(bundle, data_dir, max_samples=samples)
    images = F.normalize(torch.cat([model.encode_image(x) for x in val.images.split(256)]), dim=-1)
    text = F.normalize(model.encode_text(val.prompts), dim=-1).view(val.n_classes, -1, images.shape[1])
    classes = F.normalize(text.mean(1), dim=-1)
    return float(((images @ classes.t()).argmax(1) == val.labels).float().mean())


def _trial(recipe: Recipe, name: str, section: TokenSection, steps: int, out: Path, progress: bool) -> dict[str, Any]:
    from ..train.checkpoint import latest_checkpoint
    from ..train.loop import train

    trial = copy.deepcopy(recipe)
    trial.name, trial.tokens = f"{recipe.name}-{name}", section
    eval_dir = trial.data.eval
    trial.data.eval = None  # selection must not see the eval split
    trial.train = dataclasses.replace(trial.train, steps=steps, eval_every=0, save_every=max(steps, 1),
                                      warmup=min(trial.train.warmup, max(1, steps // 5)))  # fmt: skip
    run_dir = out / name
    if not (run_dir / "student").is_dir():  # finished trials are reused, interrupted ones resume
        train(trial, run_dir, resume=latest_checkpoint(run_dir / "checkpoints") is not None, progress=progress)
    return {"name": name, "steps": steps, "val_acc1": validation_accuracy(run_dir / "student", str(eval_dir))}


def search_schedule(
    recipe: Recipe, out: str | Path, *, budget: float = 1.0, trial_fraction: float = 0.25,
    schedules: dict[str, TokenSection] | None = None, progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Try each schedule at ``trial_fraction`` of the budget; write the best as ``out/recipe.yaml``."""
    if not recipe.data.eval:
        raise ConfigError("data.eval: the schedule search needs a shapes-style folder for class names and prompts")
    if budget <= 0 or not 0 < trial_fraction <= 1:
        raise ConfigError(
            f"budget/trial_fraction: need budget > 0 and 0 < trial_fraction <= 1, got {budget}/{trial_fraction}"
        )
    out = Path(out)
    schedules = schedules or candidates()
    costs = step_costs(recipe, settings_of(schedules), out / "probe")
    budget_steps = budget * recipe.train.steps
    trials = []
    for name, section in schedules.items():
        steps = steps_for(section, costs, trial_fraction * budget_steps)
        trials.append({**_trial(recipe, name, section, steps, out / "trials", progress),
                       "mean_cost": section.mean_cost(costs)})  # fmt: skip
        log.info("trial %s: %d steps, val top-1 %.3f", name, steps, trials[-1]["val_acc1"])
    best = max(trials, key=lambda t: t["val_acc1"])
    chosen = copy.deepcopy(recipe)
    chosen.tokens = schedules[best["name"]]
    chosen.train = dataclasses.replace(chosen.train, steps=steps_for(chosen.tokens, costs, budget_steps))
    atomic_write_text(out / "recipe.yaml", recipe_to_yaml(chosen))
    result = {"budget_steps": budget_steps, "costs": {f"{d}@{s}x": c for (d, s), c in costs.items()},
              "trials": trials, "best": best["name"], "best_steps": chosen.train.steps}  # fmt: skip
    atomic_write_json(out / "search.json", result)
    return result
