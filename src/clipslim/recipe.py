"""Recipes: one YAML file says what to train, from what, with which loss terms.

```yaml
name: demo-distill
teacher: shapes-teacher:demo
student: {arch: shapes-student-50, init: inherit}
data: {train: .data/shapes/train, eval: .data/shapes}
objectives: {clip: 0.0, affinity: {weight: 1.0, teacher_scale: 50}}
train: {steps: 400, batch_size: 128, lr: 1.0e-3}
```
Everything is checked by :func:`load_recipe` before any compute starts.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import ConfigError, build, to_dict
from .inherit.importance import InitSpec, parse_init
from .inherit.l0 import L0Section
from .io import kind_of, read_yaml, yaml_reason
from .registry import ObjectiveConfig, get_objective, parse_config
from .tokens.schedule import TokenSection

RECIPES_DIR = Path(__file__).parent / "recipes"


def recipe_names() -> list[str]:
    """Names of the recipes shipped with clipslim (``clipslim recipes``)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(name: str) -> Path:
    """A recipe path, or the name of a recipe shipped with clipslim (``clipslim recipes`` lists them)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"recipe not found: {name} (neither a file nor one of: {', '.join(recipe_names())})")


@dataclass
class StudentSection:
    arch: str = ""
    """open_clip architecture of the student (e.g. shapes-student-50, ViT-S-32)."""
    init: str = "random"
    """random | inherit (TinyCLIP manual rule from the teacher) | importance:<magnitude|activation|gradient>
    (importance-ranked heads/channels/layers) | a model spec to start from."""
    inherit_from: str | None = None
    """Model spec that inherit / importance:* copy from (default: the teacher); multi-stage runs set it to the
    previous stage's student."""
    calib_batches: int = 4
    """Calibration batches from data.train for importance:activation / importance:gradient."""
    preprocess: Literal["teacher", "own"] = "teacher"
    """An inheriting student reads images the way the model it inherits from was trained (teacher: its mean/std,
    interpolation and resize rule, at the student's own image size); own: keep the student config's."""

    def validate(self, where: str) -> None:
        if not self.arch:
            raise ConfigError(f"{where}.arch: required (an open_clip architecture name)")
        if self.calib_batches < 1:
            raise ConfigError(f"{where}.calib_batches: must be >= 1, got {self.calib_batches}")
        if self.init == "continue":
            raise ConfigError(f"{where}.init: 'continue' is for a stage; a student starts random, inherit, ...")
        parse_init(self.init, f"{where}.init")

    @property
    def start(self) -> InitSpec:
        """``init`` parsed (by the one parser, :func:`clipslim.inherit.importance.parse_init`)."""
        return parse_init(self.init, "student.init")

    @property
    def inherits(self) -> bool:
        """Whether init copies slices of another model (the teacher or ``inherit_from``)."""
        return self.start.inherits


@dataclass
class DataSection:
    train: str = ""
    """Training pairs: webdataset shard dir / .tar / brace pattern, or a CSV (filepath,caption)."""
    eval: str | None = None
    """A shapes-style eval dir (eval/*.tar + classnames.txt + templates.txt) for zero-shot and retrieval."""
    num_workers: int = 1
    augment: bool = False
    """Use open_clip's random-crop training transform instead of the deterministic eval transform."""
    teacher_cache: str | None = None
    """A directory written by `clipslim cache-teacher` for these shards: training replays its stored augmentations
    and reads the teacher's embeddings instead of running the teacher (MobileCLIP's dataset reinforcement)."""
    keep_list: str | None = None
    """A file of sample keys to train on, one per line (e.g. `clipslim dedup --out`); other samples are skipped and
    counted as ``not_in_keep_list``, never as bad data."""
    max_bad_fraction: float = 0.1
    """Stop with an error when more than this fraction of the samples read so far were skipped as bad (after the
    first 4 batches): a run on mostly broken data would train on almost nothing and look fine."""

    def validate(self, where: str) -> None:
        if not self.train:
            raise ConfigError(f"{where}.train: required (path to training shards or CSV)")
        if self.num_workers < 0:
            raise ConfigError(f"{where}.num_workers: must be >= 0, got {self.num_workers}")
        if self.teacher_cache is not None and (self.augment or self.train.lower().endswith(".csv")):
            raise ConfigError(f"{where}.teacher_cache: needs .tar shards and augment: false (the cache has the views)")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"{where}.max_bad_fraction: must be in [0, 1], got {self.max_bad_fraction}")


@dataclass
class TrainSection:
    steps: int = 100
    batch_size: int = 128
    """Per process; under torchrun the global batch is batch_size × processes."""
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    optimizer: Literal["auto", "fused", "foreach", "loop"] = "auto"
    """AdamW implementation (same update rule): auto picks the fused kernel, 5-6x faster than the per-tensor loop on
    the demo student whose 49408-row token embedding is most of its parameters (docs/LOG.md, issue 20)."""
    fast_attention: bool = True
    """Run open_clip's self-attention batch-first with one q/k/v GEMM (same parameters and maths, see
    clipslim.attention); false keeps nn.MultiheadAttention's own path."""
    teacher_ahead: Literal["auto", "always", "never"] = "auto"
    """Run the online teacher on the next batch in a second thread while the student trains on this one (same
    outputs and data order; clipslim.train.ahead). On a CPU the student's thread keeps one half of the cores and the
    teacher's thread and the loader's workers the other (1.85x open_clip_train's step on the demo job, docs/LOG.md).
    auto: on a CPU with a spare core (2 × torch threads ≤ cores), one process, no step hooks; never with
    accum_freq > 1."""
    grad_clip: float | None = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on a GPU that has it (else fp16 + loss scaling), fp32 on CPU."""
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    mfu: bool = True
    """Log model FLOPs utilisation: an ``mfu`` column in metrics.csv and run.mfu in results.json (the first step's
    FLOPs counted as it runs, which changes no weight, and a ~0.5 s matmul-peak probe at start)."""
    save_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int = 0
    """Evaluate on data.eval every N steps (0: only at the end)."""
    max_bad_steps: int = 5
    """A step with a non-finite loss or gradient is skipped and counted; this many in a row stop the run."""
    max_bad_step_fraction: float = 0.25
    """A run that skipped more than this fraction of its steps (or every step) ends with an error and exports
    nothing: its student learned from too little to be worth using."""
    divergence_steps: int = 20
    """Warn when a contrastive loss sits at chance level, log(batch), this many steps in a row after warm-up (0:
    off); a sudden 10x loss jump is reported too (see clipslim.train.guard)."""
    local_loss: bool = False
    """Under torchrun: contrastive terms use local queries × global keys (same gradients, less memory)."""
    accum_freq: int = 1
    """Split each batch into this many micro-batches but keep the whole batch in every contrastive term (open_clip's
    accum_freq: embeddings cached without grad, each micro-batch recomputed with grad; see clipslim.train.accum)."""
    grad_checkpointing: bool = False
    """Recompute the student's activations in the backward pass (open_clip set_grad_checkpointing): less memory."""
    teacher_precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Keep the frozen teacher's weights in this dtype (bf16/fp16 halve its memory; meant for a GPU)."""

    def validate(self, where: str) -> None:
        for name in ("steps", "batch_size", "log_every", "save_every", "keep_checkpoints", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr: must be > 0, got {self.lr}")
        if self.warmup < 0 or self.eval_every < 0:
            raise ConfigError(f"{where}.warmup/eval_every: must be >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{where}.betas: expected two numbers in [0, 1), got {list(self.betas)}")
        if not self.eps > 0 or not self.weight_decay >= 0:
            raise ConfigError(f"{where}.eps/weight_decay: must be > 0 / >= 0, got {self.eps} / {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"{where}.grad_clip: must be > 0 or null (off), got {self.grad_clip}")
        if not math.isfinite(self.lr) or self.lr > 10:
            raise ConfigError(f"{where}.lr: must be a finite number <= 10, got {self.lr}")
        if not 0.0 <= self.max_bad_step_fraction <= 1.0 or self.divergence_steps < 0:
            raise ConfigError(f"{where}.max_bad_step_fraction/divergence_steps: must be in [0, 1] / >= 0")
        if self.accum_freq < 1 or self.batch_size % self.accum_freq:
            raise ConfigError(f"{where}.accum_freq: must be >= 1 and divide batch_size {self.batch_size}")
        if not DEVICE.fullmatch(self.device):
            raise ConfigError(f"{where}.device: expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}")


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass
class StageSection:
    """One stage of a multi-stage recipe: a normal run whose student starts from the previous stage's student."""

    name: str = ""
    arch: str = ""
    """Student architecture of this stage ('' with init: continue keeps the previous stage's)."""
    model_cfg: dict[str, Any] | None = None
    """Overrides merged into arch's open_clip config, e.g. {vision_cfg: {width: 128}} (registered per stage)."""
    init: str = "inherit"
    """inherit | importance:<method> (from the previous stage's student; the start model for the first stage) |
    continue (the previous student as is, e.g. to prune it with l0)."""
    steps: int = 0
    """Training steps of this stage (0: train.steps)."""
    l0: L0Section | None = None
    """Train L0 masks in this stage and fuse them into a smaller dense student at its end."""

    def validate(self, where: str) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{where}.name: required, letters/digits/-/_ only, got {self.name!r}")
        start = parse_init(self.init, f"{where}.init")
        if start.kind not in ("inherit", "importance", "continue"):
            raise ConfigError(f"{where}.init: expected inherit, importance:<method> or continue, got {self.init!r}")
        if self.init != "continue" and not self.arch:
            raise ConfigError(f"{where}.arch: required when init is {self.init}")
        if self.init == "continue" and (self.arch or self.model_cfg):
            raise ConfigError(f"{where}.arch: init 'continue' keeps the previous architecture; drop arch/model_cfg")
        if self.steps < 0:
            raise ConfigError(f"{where}.steps: must be >= 0, got {self.steps}")


@dataclass
class ObjectiveSpec:
    name: str
    weight: float
    cfg: ObjectiveConfig


@dataclass
class Recipe:
    name: str = "run"
    description: str = ""
    teacher: str | None = None
    """Teacher model spec (arch, arch:tag, arch:/path/weights, hub folder); frozen, eval mode, no grad."""
    student: StudentSection = field(default_factory=StudentSection)
    data: DataSection = field(default_factory=DataSection)
    objectives: dict[str, Any] = field(default_factory=dict)
    """name -> weight, or name -> {weight: w, <options>}. A weight of 0 turns the term off entirely."""
    train: TrainSection = field(default_factory=TrainSection)
    tokens: TokenSection | None = None
    """Training-time token compression (patch dropout / patch scaling) on a schedule; see clipslim.tokens."""
    tokenizers: str | None = None
    """Folder of local Hugging Face tokenizers, ``<folder>/<hf_tokenizer_name>/`` (e.g. a SigLIP teacher's
    ``timm/ViT-B-16-SigLIP/``), for machines without the hub; default: $CLIPSLIM_TOKENIZERS, else the hub."""
    overrides: list[str] = field(default_factory=list)
    """The ``--set`` overrides this recipe was loaded with: a record of how the run differs from the file."""
    stages: list[StageSection] = field(default_factory=list)
    """Multi-stage recipe (run with `clipslim stages`): each stage is a run whose student starts from the previous
    stage's student; the first stage starts from student.init (a model spec, e.g. the teacher)."""

    def objective_specs(self) -> list[ObjectiveSpec]:
        """Typed objectives with non-zero weight, in recipe order."""
        specs = []
        for name, value in self.objectives.items():
            where = f"objectives.{name}"
            options = dict(value) if isinstance(value, dict) else {"weight": value}
            weight = options.pop("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise ConfigError(f"{where}.weight: expected a number >= 0, got {weight!r}")
            try:
                cls = get_objective(name)
            except KeyError as err:
                raise ConfigError(f"{where}: {err.args[0]}") from err
            cfg = parse_config(cls, options, where)
            if weight > 0:
                specs.append(ObjectiveSpec(name, float(weight), cfg))
        return specs

    def validate(self, where: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name) or ".." in self.name:
            raise ConfigError(f"name: letters, digits, '.', '-', '_' only (it names the run dir), got {self.name!r}")
        specs = self.objective_specs()
        if not specs:
            raise ConfigError("objectives: at least one objective needs a weight > 0")
        needs = [s.name for s in specs if get_objective(s.name).reads_teacher(s.cfg)]
        if needs and not (self.teacher or self.data.teacher_cache):
            raise ConfigError(f"teacher: required by objective(s) {', '.join(needs)} (or data.teacher_cache)")
        if self.student.inherits and not (self.teacher or self.student.inherit_from):
            raise ConfigError(f"student.init: '{self.student.init}' needs a teacher or student.inherit_from")
        if self.stages:
            self._validate_stages()

    def _validate_stages(self) -> None:
        if self.student.init in ("random", "inherit") or self.student.inherits:
            raise ConfigError("student.init: a multi-stage recipe starts from a model spec (e.g. the teacher)")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stages: stage names must be unique, got {names}")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["train.steps=20", "objectives.clip=0"]`` -> nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{pair}': expected KEY=VALUE, e.g. train.steps=20")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} was set to a plain value by an earlier --set")
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: value {raw!r} is not a plain YAML value ({yaml_reason(err)})") from err
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


IDENTITY_KEYS = ("teacher", "student", "objectives", "tokens", "stages")
"""Overrides of these change *what* is trained, so they also change the run's name (data paths, steps, seeds and
other training settings do not)."""


def run_name(name: str, overrides: list[str]) -> str:
    """``demo-distill`` + ``--set teacher=/x/elsewhere`` -> ``demo-distill_teacher-elsewhere``: a run of a recipe
    with another teacher, student or loss is not filed under the recipe's own name."""
    parts = []
    for pair in overrides:
        key, _, value = pair.partition("=")
        if key.split(".")[0] in IDENTITY_KEYS:
            value = Path(value.rstrip("/")).name if "/" in value else value
            parts.append(re.sub(r"[^A-Za-z0-9._-]+", "-", f"{key.removeprefix('objectives.')}-{value}").strip("-."))
    if not parts:
        return name
    suffix = "_".join(parts)
    if len(suffix) > 60:
        suffix = suffix[:40] + "-" + hashlib.sha256(suffix.encode()).hexdigest()[:8]
    return f"{name}_{suffix}"


def recipe_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    """Build and validate a recipe; ``overrides`` (``--set``) are applied, recorded, and name the run (see
    :func:`run_name`) unless they set ``name`` themselves."""
    overrides = list(overrides or [])
    if not isinstance(data, dict):
        raise ConfigError(f"recipe: expected a mapping (name:, student:, ...), got {kind_of(data)}")
    merged = _merge(data, parse_overrides(overrides))
    if overrides:
        merged["overrides"] = [*merged.get("overrides", []), *overrides]
        if not any(o.startswith("name=") for o in overrides) and isinstance(merged.get("name", "run"), str):
            merged["name"] = run_name(merged.get("name", "run"), overrides)
    return build(Recipe, merged, "recipe")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a YAML recipe; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping (name:, student:, ...), got {kind_of(data)}")
    try:
        return recipe_from_dict(data, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


RESUME_IDENTITY = ("teacher", "student", "data.train", "data.teacher_cache", "stages")
"""What a resumed run may not change without ``--force``: the checkpoint was trained from them."""


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return {k.removesuffix("."): v for k, v in out.items()}


def recipe_changes(stored: dict[str, Any], recipe: Recipe) -> tuple[list[str], list[str]]:
    """Dotted fields that differ between a run's stored recipe.yaml and ``recipe``, as ``field: old -> new``:
    (those that change what the checkpoint was trained from, the others)."""
    old, new = _flatten(stored), _flatten(to_dict(recipe))
    changed = sorted(k for k in {*old, *new} if k != "overrides" and old.get(k) != new.get(k))
    described = {k: f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed}
    identity = [described[k] for k in changed if any(k == p or k.startswith(f"{p}.") for p in RESUME_IDENTITY)]
    return identity, [described[k] for k in changed if described[k] not in identity]
