"""`clipslim inherit`: build a student from a teacher's weights, write it as an open_clip folder (+ inherit.json)
and, given shapes-style data, report its accuracy right after inheritance."""

from __future__ import annotations

from pathlib import Path

from ..inherit.importance import METHODS, calibration_batches, inherit_importance, parse_init
from ..inherit.manual import InheritError


def inherit_to_folder(
    teacher: str,
    student_arch: str,
    strategy: str,
    out: str | Path,
    *,
    data: str | Path | None = None,
    calib_batches: int = 4,
    preprocess: str = "teacher",
) -> dict:
    """``clipslim inherit``: build ``student_arch`` from model spec ``teacher`` by ``manual`` or
    ``importance:<method>``, export it to ``out`` (open_clip folder + ``inherit.json``) and, with a shapes-style
    ``data`` folder, report its zero-shot accuracy right after inheritance (calibration batches come from
    ``data/train``). ``preprocess="teacher"`` gives the student the teacher's normalisation and resize rule (its
    weights expect them); ``"own"`` keeps the student config's."""
    from ..eval.run import evaluate_shapes
    from ..export import export_open_clip
    from ..inherit.manual import inherit_manual
    from ..io import atomic_write_json
    from ..models import adopt_preprocess, load_model, weights_fingerprint

    start = parse_init(strategy, "--strategy")
    if not start.inherits:
        raise InheritError(f"--strategy: expected manual or importance:<{'|'.join(METHODS)}>, got '{strategy}'")
    method = start.method
    source, student = load_model(teacher), load_model(student_arch)
    if start.kind == "inherit":
        report = inherit_manual(source.model, student.model)
    else:
        batches = None
        if method != "magnitude":
            if data is None:
                raise InheritError(f"--data: importance:{method} needs calibration data (a shapes-style folder)")
            batches = calibration_batches(Path(data) / "train", source, calib_batches)
        report = inherit_importance(source.model, student.model, method=method, calib_batches=batches)
    report.update(teacher=teacher, student=student_arch, strategy=strategy)
    report["preprocess_adopted"] = adopt_preprocess(student, source) if preprocess == "teacher" else {}
    report["preprocess"] = {k: student.preprocess_cfg.get(k) for k in ("size", "mean", "std", "interpolation")}
    out = Path(out)
    provenance = {"spec": teacher, "weights_sha256_16": weights_fingerprint(source.model)}
    export_open_clip(
        student.model, student.model_cfg, out, preprocess_cfg=student.preprocess_cfg, arch=student.arch,
        extra={"inherited_from": teacher, "strategy": strategy, "teacher": provenance},
    )  # fmt: skip
    if data is not None and (Path(data) / "eval").is_dir():
        report["eval"] = evaluate_shapes(student, data, progress=False)
    atomic_write_json(out / "inherit.json", report)
    return report
