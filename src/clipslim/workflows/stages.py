"""Multi-stage progressive distillation (and auto inheritance) as one recipe and one command.

A recipe with ``stages:`` runs each stage as a normal run directory ``OUT/NN-<stage>/`` whose student starts from
the previous stage's student (the first from ``student.init``, e.g. the teacher): by the manual rule
(``init: inherit``), by importance (``init: importance:<method>``), or as is (``init: continue``). A stage with an
``l0:`` section trains hard-concrete masks and, when it ends, its ``student/`` folder is replaced by the fused,
smaller dense model, so the next stage starts from that. TinyCLIP's schedules are stage lists:
manual 100% -> 75% -> 50%, auto sparsity 0 -> 0.25 -> 0.5 -> 0.75.

Rerunning is safe: a stage whose ``results.json`` exists (for l0 stages: with the fused model recorded) is skipped;
a stage with checkpoints resumes; a stage directory holding another recipe is an error.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, to_dict
from ..inherit import l0 as _l0  # noqa: F401  (registers the l0_sparsity objective)
from ..io import atomic_write_json, atomic_write_text, read_mapping
from ..recipe import Recipe, StageSection, recipe_from_dict, recipe_to_yaml

log = logging.getLogger(__name__)

__all__ = ["run_stages", "stage_recipe"]


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _stage_arch(recipe: Recipe, stage: StageSection, config_dir: Path) -> str:
    """The stage's architecture name; ``model_cfg`` overrides are written and registered with open_clip."""
    if not stage.model_cfg:
        return stage.arch
    import open_clip

    base = open_clip.get_model_config(stage.arch)
    if base is None:
        raise ConfigError(f"stages.{stage.name}.arch: unknown architecture '{stage.arch}'")
    name = f"{recipe.name}-{stage.name}"
    path = config_dir / f"{name}.json"
    atomic_write_json(path, _deep_merge(base, stage.model_cfg))
    open_clip.add_model_config(path)
    return name


def _spec_arch(spec: str) -> str:
    """Architecture name of a model spec, without loading it (folders record it in open_clip_config.json)."""
    folder = Path(spec.removeprefix("local-dir:"))
    if folder.is_dir():
        config = folder / "open_clip_config.json"
        return read_mapping(config).get("arch", folder.name) if config.is_file() else folder.name
    return spec.partition(":")[0]


def stage_recipe(recipe: Recipe, index: int, source: str, config_dir: Path) -> Recipe:
    """The plain (single-run) recipe of stage ``index`` whose student starts from model spec ``source``."""
    stage = recipe.stages[index]
    data = to_dict(recipe)
    data.update(name=f"{recipe.name}-{stage.name}", stages=[])
    if stage.steps:
        data["train"]["steps"] = stage.steps
    if stage.init == "continue":
        data["student"].update(arch=_spec_arch(source), init=source, inherit_from=None)
    else:
        data["student"].update(arch=_stage_arch(recipe, stage, config_dir), init=stage.init, inherit_from=source)
    if stage.l0 is not None:
        data["objectives"] = {**data["objectives"], "l0_sparsity": {"weight": 1.0, **to_dict(stage.l0)}}
    try:
        return recipe_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"stages.{stage.name}: {err}") from err


def _check_same_recipe(run_dir: Path, recipe: Recipe) -> None:
    saved = run_dir / "recipe.yaml"
    if saved.is_file() and saved.read_text() != recipe_to_yaml(recipe):
        raise ConfigError(f"{run_dir} holds a run of a different recipe; remove it or pick another --out")


def _fuse_stage(recipe: Recipe, run_dir: Path, results: dict[str, Any], built: Any = None) -> dict[str, Any]:
    """Replace the stage's ``student/`` by the fused dense model and record it in ``results.json``."""
    from ..eval.run import evaluate_shapes
    from ..export import export_open_clip
    from ..inherit.l0 import fuse_l0
    from ..models import count_params, load_model
    from ..train.checkpoint import latest_checkpoint, load_checkpoint
    from ..train.setup import build

    if built is None:  # crashed between the end of training and fusing: the final checkpoint has everything
        built = build(recipe, torch.device("cpu"))
        load_checkpoint(latest_checkpoint(run_dir / "checkpoints"), built.distiller, None)
    b = built.student
    fused, cfg, report = fuse_l0(b.model, built.distiller.objectives["l0_sparsity"], b.model_cfg)
    tmp, final = run_dir / ".student-fused.tmp", run_dir / "student"
    shutil.rmtree(tmp, ignore_errors=True)
    export_open_clip(
        fused, cfg, tmp, preprocess_cfg=b.preprocess_cfg, arch=f"{recipe.name}-fused",
        extra={"recipe": recipe.name, "fused": report},
    )  # fmt: skip
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if recipe.data.eval:
        report["eval"] = evaluate_shapes(load_model(str(final)), recipe.data.eval, progress=False)
    results = {**results, **count_params(fused).as_dict(), "fused": report}
    atomic_write_json(run_dir / "results.json", results)
    log.info("%s: fused to %s non-embedding params (target %s)", recipe.name, *[report[k] for k in (
        "params_non_embedding", "target_params_non_embedding")])  # fmt: skip
    return results


def _run_stage(recipe: Recipe, stage: StageSection, run_dir: Path, progress: bool) -> dict[str, Any] | None:
    """Results of one stage (skipped when finished, resumed when checkpointed); None when interrupted."""
    from ..train.checkpoint import latest_checkpoint
    from ..train.loop import Trainer

    _check_same_recipe(run_dir, recipe)
    done = run_dir / "results.json"
    if done.is_file():
        results = read_mapping(done)
        if stage.l0 is None or "fused" in results:
            log.info("%s: finished earlier, skipping", recipe.name)
            return results
        return _fuse_stage(recipe, run_dir, results)
    resume = latest_checkpoint(run_dir / "checkpoints") is not None
    trainer = Trainer(recipe, run_dir, resume=resume, progress=progress)
    results = trainer.run()
    if "stopped_at" in results:
        return None
    if stage.l0 is not None:
        results = _fuse_stage(recipe, run_dir, results, trainer.built)
    return results


def _brief(results: dict[str, Any]) -> dict[str, Any]:
    ev = (results.get("fused") or {}).get("eval") or results.get("eval") or {}
    return {
        "steps": results.get("steps"),
        "params": results.get("params"),
        "params_non_embedding": results.get("params_non_embedding"),
        "zeroshot_heldout_acc1": (ev.get("zeroshot_heldout") or {}).get("acc1"),
        "zeroshot_seen_acc1": (ev.get("zeroshot_seen") or {}).get("acc1"),
    }


def _table(rows: list[dict[str, Any]]) -> str:
    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    lines = ["| stage | steps | params (non-emb.) | held-out top-1 | seen top-1 |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['steps']} | {r['params_non_embedding']:,} | {pct(r['zeroshot_heldout_acc1'])} "
            f"| {pct(r['zeroshot_seen_acc1'])} |"
        )
    return "\n".join(lines) + "\n"


def run_stages(recipe: Recipe, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Run every stage of ``recipe`` under ``out``; returns ``{"stages": [...], "student": final spec}``
    (``{"stopped_in": stage}`` when a stop signal interrupted a stage; rerun to resume)."""
    if not recipe.stages:
        raise ConfigError("stages: the recipe has no stages (use `clipslim train` for a single run)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "recipe.yaml", recipe_to_yaml(recipe))
    source, rows = recipe.student.init, []
    for i, stage in enumerate(recipe.stages):
        log.info("stage %d/%d: %s (from %s)", i + 1, len(recipe.stages), stage.name, source)
        run_dir = out / f"{i + 1:02d}-{stage.name}"
        results = _run_stage(stage_recipe(recipe, i, source, out / "configs"), stage, run_dir, progress)
        if results is None:
            return {"stopped_in": stage.name}
        rows.append({"stage": stage.name, "run_dir": str(run_dir), **_brief(results)})
        source = str(run_dir / "student")
    summary = {"recipe": recipe.name, "stages": rows, "student": source}
    atomic_write_json(out / "stages.json", summary)
    atomic_write_text(out / "stages.md", _table(rows))
    return summary
