"""Hostile but realistic inputs, each answered in one line (issue 18).

``ROWS`` is the table: what goes wrong, what clipslim does, and the words its one line must contain. Most rows run
the real CLI in-process (``clipslim.cli.main``) and expect exit code 2 with exactly one line on stderr; rows with
``rc=0`` expect the job to finish and say what it did about the problem in one warning line. Full and read-only
disks are simulated by patching (CI runs as root, so chmod does not bind). README's "What happens when things go
wrong" is written from this table; ``test_readme_lists_every_row`` keeps the two together.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import seeded_model

from clipslim.cli import main
from clipslim.config import ConfigError, RunError
from clipslim.data import teacher_cache as tc
from clipslim.data.loader import resolve_shards
from clipslim.export import export_open_clip
from clipslim.train.checkpoint import checkpoint_problem, latest_checkpoint
from clipslim.train.guard import DivergenceGuard

README = Path(__file__).parent.parent / "README.md"


@dataclass
class Row:
    name: str
    what: str
    """The bad input, as the README's table says it."""
    does: str
    """What clipslim does, as the README's table says it."""
    expect: list[str]
    """Words the one line must contain."""
    rc: int
    setup: Callable[[Env], list[str] | Callable[[], Any]]
    check: Callable[[Env], None] | None = None


ROWS: list[Row] = []


def row(what: str, does: str, expect: list[str], rc: int = 2, check: Callable[[Env], None] | None = None):
    def register(fn: Callable[[Env], Any]) -> Callable[[Env], Any]:
        ROWS.append(Row(fn.__name__, what, does, expect, rc, fn, check))
        return fn

    return register


# ---------------------------------------------------------------- the world a row runs in


def recipe_dict(shapes: Path, **train: Any) -> dict[str, Any]:
    return {
        "name": "hostile",
        "teacher": "tiny-teacher",
        "student": {"arch": "tiny-student", "init": "inherit"},
        "data": {"train": str(shapes / "train"), "num_workers": 0},
        "objectives": {"clip": 1.0, "affinity": {"weight": 1.0, "teacher_scale": 50.0}},
        "train": {"steps": 4, "batch_size": 32, "warmup": 1, "log_every": 1, "save_every": 2, **train},
    }


@dataclass
class Env:
    tmp: Path
    shapes: Path
    request: pytest.FixtureRequest
    monkeypatch: pytest.MonkeyPatch
    made: dict[str, Any] = field(default_factory=dict)

    def recipe(self, data: Any = None, **train: Any) -> str:
        path = self.tmp / f"r{len(self.made)}.yaml"
        self.made[path.name] = path
        body = recipe_dict(self.shapes, **train) if data is None else data
        path.write_text(body if isinstance(body, str) else yaml.safe_dump(body))
        return str(path)

    def run_copy(self) -> Path:
        """A copy of a finished 4-step run (checkpoints at steps 2 and 4)."""
        out = self.tmp / "run"
        shutil.copytree(self.request.getfixturevalue("done_run"), out)
        return out

    def resume(self, run: Path, *extra: str) -> list[str]:
        return ["train", str(run / "recipe.yaml"), "--out", str(run), "--resume", "--quiet", *extra]

    def cache(self) -> tuple[Path, str]:
        """A copy of a teacher cache of the tiny train split, and its teacher's spec (a folder)."""
        cache_dir, teacher = self.request.getfixturevalue("cache")
        out = self.tmp / "cache"
        shutil.copytree(cache_dir, out)
        return out, teacher

    def edit_manifest(self, edit: Callable[[dict], None]) -> Path:
        cache_dir, _ = self.cache()
        path = cache_dir / tc.MANIFEST
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))
        return cache_dir

    def open_cache(self, cache_dir: Path) -> Callable[[], Any]:
        mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
        return lambda: tc.open_teacher_cache(cache_dir, self.shapes / "train", image_size=32, mean=mean, std=std)


@pytest.fixture(scope="module")
def done_run(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("done")
    (work / "r.yaml").write_text(yaml.safe_dump(recipe_dict(tiny_shapes)))
    assert main(["train", str(work / "r.yaml"), "--out", str(work / "run"), "--quiet"]) == 0
    return work / "run"


@pytest.fixture(scope="module")
def cache(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    teacher = tmp_path_factory.mktemp("teacher") / "tiny-teacher"
    b = seeded_model("tiny-teacher")
    export_open_clip(b.model, b.model_cfg, teacher, arch="tiny-teacher")
    out = tmp_path_factory.mktemp("cache")
    tc.cache_teacher(str(teacher), tiny_shapes / "train", out, tc.CacheOptions(1, batch_size=128), progress=False)
    return out, str(teacher)


@pytest.fixture
def env(tiny_shapes: Path, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Env:
    monkeypatch.chdir(tmp_path)
    return Env(tmp_path, tiny_shapes, request, monkeypatch)


def failing_disk(env: Env, under: Path, code: int, when: Callable[[], bool] = lambda: True) -> None:
    """Every new file or folder under ``under`` fails like a full (ENOSPC) or read-only (EROFS) disk."""
    import clipslim.io

    real_mkstemp, real_mkdir = clipslim.io.tempfile.mkstemp, Path.mkdir

    def hit(path: Any) -> bool:
        return Path(path).resolve().is_relative_to(under.resolve()) and when()

    def mkstemp(*args: Any, dir: Any = None, **kwargs: Any) -> Any:
        if dir is not None and hit(dir):
            raise OSError(code, os.strerror(code), str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    def mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
        if not self.exists() and hit(self):
            raise OSError(code, os.strerror(code), str(self))
        return real_mkdir(self, *args, **kwargs)

    env.monkeypatch.setattr(clipslim.io.tempfile, "mkstemp", mkstemp)
    env.monkeypatch.setattr(Path, "mkdir", mkdir)


# ---------------------------------------------------------------- recipes and overrides


@row("a `--set` value that is not YAML (`train.steps=[`)", "one line naming the key; nothing runs",
     ["--set train.steps: value '[' is not a plain YAML value"])  # fmt: skip
def set_not_yaml(env: Env) -> list[str]:
    return ["train", env.recipe(), "--quiet", "--set", "train.steps=["]


def _no_payload(env: Env) -> None:
    assert not (env.tmp / "PWNED").exists(), "a YAML tag ran code"


@row("a `!!python` tag in a `--set` value or a recipe", "refused by the safe YAML loader, one line naming the key "
     "or file; the tag never runs", ["--set train.steps", "could not determine a constructor"],
     check=_no_payload)  # fmt: skip
def set_python_tag(env: Env) -> list[str]:
    return ["train", env.recipe(), "--quiet", "--set", 'train.steps=!!python/object/apply:os.system ["touch PWNED"]']


@row("a tagged recipe file", "one line naming the file and line", ["not valid YAML", "could not determine a "
     "constructor", "at line 1"], check=_no_payload)  # fmt: skip
def recipe_python_tag(env: Env) -> list[str]:
    return ["train", "--quiet", env.recipe('name: !!python/object/apply:os.system ["touch PWNED"]\n')]


@row("`train.device=tpu9`", "one line naming the field and the accepted devices",
     ["train.device: expected auto, cpu, cuda, cuda:N or mps, got 'tpu9'"])  # fmt: skip
def unknown_device(env: Env) -> list[str]:
    return ["train", env.recipe(), "--quiet", "--set", "train.device=tpu9"]


@row("a YAML list as a recipe", "one line: a recipe is a mapping",
     ["a recipe is a mapping (name:, student:, ...), got a list"])  # fmt: skip
def recipe_is_a_list(env: Env) -> list[str]:
    return ["train", "--quiet", env.recipe("- name: x\n- teacher: y\n")]


@row("a YAML scalar (a number) as a recipe", "one line: a recipe is a mapping",
     ["a recipe is a mapping", "got a number"])  # fmt: skip
def recipe_is_a_scalar(env: Env) -> list[str]:
    return ["train", "--quiet", env.recipe("42\n")]


# ---------------------------------------------------------------- data


@row("a shard glob that matches nothing (`train/*.tar` globs are accepted, like brace lists)",
     "one line naming the pattern; the failure comes before any checkpoint and says so",
     ["data path not found", "(no .tar file matches)", "stopped at step 0; no checkpoint saved yet"])  # fmt: skip
def glob_matches_nothing(env: Env) -> list[str]:
    data = recipe_dict(env.shapes)
    data["data"]["train"] = str(env.shapes / "train" / "nothing-*.tar")
    return ["train", env.recipe(data), "--quiet"]


@row("a CSV where every image path is missing", "one line with the real counts (not `skipped: none`)",
     ["gave no full batch of 32 pairs", "skipped: {'missing_image': 40}"])  # fmt: skip
def csv_all_missing(env: Env) -> list[str]:
    csv = env.tmp / "pairs.csv"
    csv.write_text("filepath,caption\n" + "".join(f"gone/{i}.png,a red circle\n" for i in range(40)))
    data = recipe_dict(env.shapes)
    data["data"]["train"] = str(csv)
    return ["train", env.recipe(data), "--quiet"]


# ---------------------------------------------------------------- checkpoints and resume


def _finished_from_fallback(env: Env) -> None:
    run = env.tmp / "run"
    assert json.loads((run / "results.json").read_text())["steps"] == 4
    assert latest_checkpoint(run / "checkpoints").name == "step_000004"
    assert checkpoint_problem(run / "checkpoints" / "step_000004") is None  # rewritten whole


@row("a truncated newest checkpoint (`model.safetensors` cut short), then `--resume`",
     "resume walks back to the newest complete checkpoint, says which in one line, and finishes (exit 0)",
     ["resuming from step_000002", "step_000004: model.safetensors truncated"], rc=0,
     check=_finished_from_fallback)  # fmt: skip
def truncated_newest_checkpoint(env: Env) -> list[str]:
    run = env.run_copy()
    weights = run / "checkpoints" / "step_000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return env.resume(run)


@row("`latest.json` that is not JSON", "ignored with one line naming the file; the step folders are what resume "
     "trusts", ["latest.json: not valid JSON", "ignored"], rc=0)  # fmt: skip
def latest_json_not_json(env: Env) -> list[str]:
    run = env.run_copy()
    (run / "checkpoints" / "latest.json").write_text('{"step": 4, "dir": ')
    return env.resume(run)


def _resumed_inside(env: Env) -> None:
    assert json.loads((env.tmp / "run" / "results.json").read_text())["steps"] == 4


@row("`latest.json` pointing outside the run (`\"dir\": \"../../..\"`)", "never followed: one line, and resume "
     "uses the run's own newest checkpoint", ["latest.json.dir: '../../..' points outside", "ignored"], rc=0,
     check=_resumed_inside)  # fmt: skip
def latest_json_outside(env: Env) -> list[str]:
    run = env.run_copy()
    (run / "checkpoints" / "latest.json").write_text('{"step": 4, "dir": "../../.."}')
    return env.resume(run)


class _Payload:
    def __reduce__(self) -> tuple:
        return (os.system, ("touch PWNED",))


@row("a malicious `optim.pt` (a pickle that runs code) given to `--resume`", "refused without running it: one "
     "line naming the file and what to do", ["step_000004/optim.pt: refused, it holds more than plain tensors",
     "delete this checkpoint directory"], check=_no_payload)  # fmt: skip
def malicious_optim(env: Env) -> list[str]:
    run = env.run_copy()
    torch.save({"optimizer": _Payload(), "rng": torch.get_rng_state()}, run / "checkpoints/step_000004/optim.pt")
    return env.resume(run)


@row("every checkpoint damaged, then `--resume`", "one line listing what is wrong with each",
     ["no complete checkpoint to resume from", "step_000004: model.safetensors truncated",
      "step_000002: model.safetensors truncated"])  # fmt: skip
def every_checkpoint_damaged(env: Env) -> list[str]:
    run = env.run_copy()
    for weights in (run / "checkpoints").glob("step_*/model.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])
    return env.resume(run)


@row("`--resume` with another teacher, student or data than the run was trained with",
     "refused in one line listing the differences, unless `--force` (the old recipe is then kept as "
     "`recipe.prev.yaml`)", ["recipe.yaml: --resume with a different teacher: 'tiny-teacher' -> 'tiny-student'",
     "pass --force"])  # fmt: skip
def resume_other_teacher(env: Env) -> list[str]:
    run = env.run_copy()
    return env.resume(run, "--set", "teacher=tiny-student")


@row("a `metrics.csv` with a row that has no step, then `--resume`", "one line naming the file and line",
     ["metrics.csv: line 3: no numeric step ('oops')"])  # fmt: skip
def metrics_csv_garbled(env: Env) -> list[str]:
    run = env.run_copy()
    (run / "metrics.csv").write_text("step,loss\n1,3.9\noops,3.8\n")
    return env.resume(run)


# ---------------------------------------------------------------- full and read-only disks


def _periodic_failure_went_on(env: Env) -> None:
    steps = sorted(p.name for p in (env.tmp / "run" / "checkpoints").glob("step_*"))
    assert steps == ["step_000004"] and (env.tmp / "run" / "student").is_dir()


@row("a full disk during a periodic checkpoint (`torch.save` raises `RuntimeError`, not `OSError`)",
     "one line naming the checkpoint; training goes on and the next save retries",
     ["checkpoint at step 2 not written", "unexpected pos", "training goes on"], rc=0,
     check=_periodic_failure_went_on)  # fmt: skip
def full_disk_periodic_checkpoint(env: Env) -> list[str]:
    real, calls = torch.save, []

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(f)
        if len(calls) == 1:  # the step-2 checkpoint
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        real(obj, f, *args, **kwargs)

    env.monkeypatch.setattr(torch, "save", save)
    return ["train", env.recipe(), "--out", str(env.tmp / "run"), "--quiet"]


@row("a read-only output folder from the start", "one line naming the folder; nothing runs",
     ["could not write", "ro/run", "Read-only file system"])  # fmt: skip
def read_only_from_start(env: Env) -> list[str]:
    failing_disk(env, env.tmp / "ro", errno.EROFS)
    return ["train", env.recipe(), "--out", str(env.tmp / "ro" / "run"), "--quiet"]


def _mid_run_kept_step_2(env: Env) -> None:
    assert latest_checkpoint(env.tmp / "run" / "checkpoints").name == "step_000002"
    assert not (env.tmp / "run" / "student").exists()


@row("the output folder turning read-only mid-run", "metrics rows and periodic checkpoints that fail are logged "
     "and training goes on; the final checkpoint cannot be skipped: one line naming it and the last good one",
     ["checkpoint at step 4 not written", "Read-only file system", "last good checkpoint", "step_000002"],
     check=_mid_run_kept_step_2)  # fmt: skip
def read_only_mid_run(env: Env) -> list[str]:
    from clipslim.train.loop import Trainer

    state = {"read_only": False}
    real = Trainer.train_step

    def step(self: Trainer, *args: object) -> dict:
        state["read_only"] = self.step >= 2  # steps 1-2 and the step-2 checkpoint are written normally
        return real(self, *args)

    env.monkeypatch.setattr(Trainer, "train_step", step)
    failing_disk(env, env.tmp / "run", errno.EROFS, when=lambda: state["read_only"])
    return ["train", env.recipe(), "--out", str(env.tmp / "run"), "--quiet"]


@row("a full disk when the student is exported", "one line naming the file; the checkpoints stay",
     ["could not write", "run/student", "No space left on device"])  # fmt: skip
def full_disk_at_export(env: Env) -> list[str]:
    run = env.run_copy()
    failing_disk(env, run / "student", errno.ENOSPC)
    shutil.rmtree(run / "student")
    return env.resume(run)


# ---------------------------------------------------------------- training that learns nothing


@pytest.fixture(autouse=True)
def nan_objective() -> Any:
    from clipslim.objectives import OBJECTIVES, Objective
    from clipslim.objectives.clip import info_nce

    class AlwaysNan(Objective):
        name = "always_nan_test"

        def forward(self, student: Any, teacher: Any, batch: dict) -> dict:
            return {"always_nan_test_loss": info_nce(student.image, student.text, student.logit_scale) * math.nan}

    OBJECTIVES["always_nan_test"] = AlwaysNan
    yield
    del OBJECTIVES["always_nan_test"]


def _nothing_exported(env: Env) -> None:
    run = env.tmp / "run"
    assert not (run / "student").exists() and not (run / "results.json").exists()


@row("every step skipped as non-finite (e.g. a NaN teacher scale), fewer than `train.max_bad_steps` in a row",
     "exit 2 and nothing exported once more than `train.max_bad_step_fraction` (default 25%) of the steps were "
     "skipped", ["3 of 3 steps were skipped as non-finite", "nothing exported"], check=_nothing_exported)  # fmt: skip
def every_step_skipped(env: Env) -> list[str]:
    data = recipe_dict(env.shapes, steps=3)
    data["objectives"] = {"always_nan_test": 1.0}
    return ["train", env.recipe(data), "--out", str(env.tmp / "run"), "--quiet"]


@row("`train.lr=10` (the largest allowed): the loss collapses to chance level", "one warning line with the step "
     "and the likely cause, also kept in results.json", ["clip_loss has sat at chance level (log 32 = 3.466)",
     "train.lr 10 too high"], rc=0)  # fmt: skip
def lr_collapse(env: Env) -> list[str]:
    data = recipe_dict(env.shapes, steps=5, lr=10.0, divergence_steps=3, save_every=100)
    data["teacher"], data["student"], data["objectives"] = None, {"arch": "tiny-student"}, {"clip": 1.0}
    return ["train", env.recipe(data), "--out", str(env.tmp / "run"), "--quiet"]


# ---------------------------------------------------------------- teacher caches


@row("a cache `manifest.json` missing a key", "one line naming the file and the dotted key",
     ["manifest.json: teacher.logit_scale: required key missing"])  # fmt: skip
def manifest_missing_key(env: Env) -> list[str]:
    cache_dir = env.edit_manifest(lambda m: m["teacher"].pop("logit_scale"))
    data = recipe_dict(env.shapes)
    data["teacher"], data["student"] = None, {"arch": "tiny-student"}
    data["data"]["teacher_cache"], data["objectives"] = str(cache_dir), {"affinity": 1.0}
    return ["train", env.recipe(data), "--quiet"]


@row("a cache logit scale of 1e6", "refused: it must be finite and in (0, 1000]",
     ["manifest.json: teacher.logit_scale: must be in (0, 1000], got 1000000.0"])  # fmt: skip
def manifest_huge_scale(env: Env) -> Callable[[], Any]:
    return env.open_cache(env.edit_manifest(lambda m: m["teacher"].update(logit_scale=1e6)))


@row("a NaN cache logit scale", "refused: it must be finite",
     ["teacher.logit_scale: expected a finite number, got nan"])  # fmt: skip
def manifest_nan_scale(env: Env) -> Callable[[], Any]:
    return env.open_cache(env.edit_manifest(lambda m: m["teacher"].update(logit_scale=math.nan)))


@row("a hand-edited cache manifest (another `teacher.spec`)", "refused: `cache_id` hashes the manifest, so an edit "
     "no longer matches", ["edited after caching (cache_id does not match its contents)"])  # fmt: skip
def manifest_spec_edited(env: Env) -> Callable[[], Any]:
    return env.open_cache(env.edit_manifest(lambda m: m["teacher"].update(spec="tiny-student")))


@row("a cache `manifest.json` that is not JSON", "one line naming the file", ["manifest.json: not valid JSON"])
def manifest_not_json(env: Env) -> Callable[[], Any]:
    cache_dir, _ = env.cache()
    (cache_dir / tc.MANIFEST).write_text("{")
    return env.open_cache(cache_dir)


@row("a recipe naming a teacher whose weights are not the cached ones (even when the student does not inherit)",
     "the teacher is loaded once to compare its weight hash: one line", ["cache made with other weights"])  # fmt: skip
def cache_other_teacher_weights(env: Env) -> list[str]:
    cache_dir, teacher = env.cache()
    other = seeded_model("tiny-teacher")
    torch.nn.init.zeros_(other.model.text_projection)
    shutil.copytree(teacher, env.tmp / "teacher-backup")
    env.request.addfinalizer(lambda: (shutil.rmtree(teacher), shutil.copytree(env.tmp / "teacher-backup", teacher)))
    export_open_clip(other.model, other.model_cfg, teacher, arch="tiny-teacher")
    data = recipe_dict(env.shapes)
    data["teacher"], data["student"] = teacher, {"arch": "tiny-student"}
    data["data"]["teacher_cache"], data["objectives"] = str(cache_dir), {"affinity": 1.0}
    return ["train", env.recipe(data), "--quiet"]


def _other_sidecars_written(env: Env) -> None:
    assert len(list((env.tmp / "new-cache").glob(f"*{tc.SUFFIX}"))) == 1


@row("a full disk while caching teacher embeddings", "the shard is logged and skipped, the others are cached; the "
     "job ends with one line counting what to re-run", ["1 of 2 sidecars not written", "re-run `clipslim "
     "cache-teacher`"], check=_other_sidecars_written)  # fmt: skip
def full_disk_while_caching(env: Env) -> list[str]:
    import clipslim.io

    data = env.tmp / "two"
    data.mkdir()
    for shard in sorted((env.shapes / "train").glob("*.tar"))[:2]:
        shutil.copy(shard, data)
    real, calls = clipslim.io.save_file, []

    def save_file(tensors: dict, path: str, metadata: Any = None) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(tensors, path, metadata=metadata)

    env.monkeypatch.setattr(clipslim.io, "save_file", save_file)
    _, teacher = env.request.getfixturevalue("cache")
    return ["cache-teacher", "--teacher", teacher, "--data", str(data), "--out", str(env.tmp / "new-cache"), "-k", "1",
            "--device", "cpu", "--quiet"]  # fmt: skip


# ---------------------------------------------------------------- files other commands read


@row("`report` on a run whose `results.json` is not an object", "one line naming the file",
     ["results.json: expected a JSON object, got list"])  # fmt: skip
def report_results_not_object(env: Env) -> list[str]:
    run = env.tmp / "fake-run"
    run.mkdir()
    (run / "results.json").write_text("[1, 2]")
    return ["report", str(run), "--out", str(env.tmp / "report"), "--no-measure"]


@row("`report` on a run whose `recipe.yaml` carries a `!!python` tag", "one line naming the file; the tag never "
     "runs", ["recipe.yaml: not valid YAML (could not determine a constructor"], check=_no_payload)  # fmt: skip
def report_tagged_recipe(env: Env) -> list[str]:
    run = env.tmp / "fake-run"
    run.mkdir()
    (run / "results.json").write_text('{"params": 5}')
    (run / "recipe.yaml").write_text('teacher: !!python/object/apply:os.system ["touch PWNED"]\n')
    return ["report", str(run), "--out", str(env.tmp / "report"), "--no-measure"]


@row("a `token_pruning.json` with an unknown key", "one line naming the file and the key",
     ["token_pruning.json: config.keep: unknown key (known: after_block, keep_ratio"])  # fmt: skip
def token_pruning_unknown_key(env: Env) -> list[str]:
    b = seeded_model("tiny-student")
    folder = export_open_clip(b.model, b.model_cfg, env.tmp / "pruned", arch="tiny-student")
    (folder / "token_pruning.json").write_text('{"config": {"keep": 0.5}}')
    return ["export", "--model", str(folder), "--out", str(env.tmp / "exported")]


# ---------------------------------------------------------------- the table, run


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("clipslim")]


@pytest.mark.parametrize("case", ROWS, ids=[r.name for r in ROWS])
def test_hostile_input(case: Row, env: Env, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    action = case.setup(env)
    if callable(action):  # a library call: the exception clipslim's CLI would print
        with pytest.raises((ConfigError, RunError, ValueError, OSError)) as raised:  # what the CLI catches
            action()
        line = str(raised.value)
        assert "\n" not in line
    else:
        code = main(action)
        err = capsys.readouterr().err.strip()
        assert code == case.rc, err[-2000:]
        if case.rc:  # log lines may come first; the error is one line, the last
            errors = [line for line in err.splitlines() if f"clipslim {action[0]}: error: " in line]
            assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
            line = errors[0]
        else:
            said = [w for w in _warnings(caplog) if case.expect[0] in w]
            assert len(said) == 1 and "\n" not in said[0], _warnings(caplog)
            line = said[0]
    missing = [part for part in case.expect if part not in line]
    assert not missing, f"{missing} not in: {line}"
    if case.check is not None:
        case.check(env)


def test_readme_lists_every_row() -> None:
    """README's "What happens when things go wrong" is written from ROWS."""
    section = README.read_text().split("### What happens when things go wrong")[1].split("\n### ")[0]
    missing = [r.name for r in ROWS if r.what not in section or r.does not in section]
    assert not missing, f"rows missing from the README table: {missing}"


# ---------------------------------------------------------------- the same policies, below the CLI


def test_resume_with_force_keeps_the_previous_recipe(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    run = env.run_copy()
    assert main(env.resume(run, "--set", "student.init=random", "--force")) == 0
    assert yaml.safe_load((run / "recipe.prev.yaml").read_text())["student"]["init"] == "inherit"
    assert yaml.safe_load((run / "recipe.yaml").read_text())["student"]["init"] == "random"
    said = [w for w in _warnings(caplog) if w.startswith("resuming with a changed recipe")]
    assert len(said) == 1 and "student.init: 'inherit' -> 'random'" in said[0], _warnings(caplog)


def test_shard_globs_and_braces_resolve(tiny_shapes: Path) -> None:
    train = tiny_shapes / "train"
    every = sorted(str(p) for p in train.glob("*.tar"))
    assert resolve_shards(train / "*.tar") == every
    assert resolve_shards(train / "shapes-train-00000[12].tar") == every[1:3]
    assert resolve_shards(f"{train}/{{shapes-train-000000,shapes-train-00000[23]}}.tar") == [every[0], *every[2:]]


def test_a_damaged_state_json_is_passed_over(env: Env) -> None:
    run = env.run_copy()
    (run / "checkpoints" / "step_000004" / "state.json").write_text('{"step": 4}')
    assert checkpoint_problem(run / "checkpoints" / "step_000004") == (
        "state.json.epoch: expected an integer >= 0, got None"
    )
    assert latest_checkpoint(run / "checkpoints").name == "step_000002"


def test_divergence_guard_reports_a_tenfold_jump_once() -> None:
    guard = DivergenceGuard(batch_size=32, warmup=2, patience=5, lr=0.5)
    said = [guard.observe(step, {"loss": 1.0 if step < 15 else 12.0}) for step in range(1, 20)]
    assert [s for s in said if s] == [
        "step 15: loss jumped 12x (1 -> 12); likely cause: train.lr 0.5 too high (try 10x lower, or a longer "
        "train.warmup)"
    ]


def test_write_policy_is_one_error_class(tmp_path: Path) -> None:
    """A failed write is one WriteError naming the path, whatever raised underneath (OSError, torch's RuntimeError)."""
    from clipslim.io import WriteError, atomic_write

    def torch_full(path: Path) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    with pytest.raises(WriteError, match=r"could not write .*x.pt: \[enforce fail"):
        atomic_write(tmp_path / "x.pt", torch_full)
    assert list(tmp_path.iterdir()) == []  # the temp file is gone
