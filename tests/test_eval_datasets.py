"""ImageFolder / CSV / webdataset eval sets, the task runner, `clipslim eval`, and parity with CLIP_benchmark."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import DataLoader

from clipslim.cli import main
from clipslim.data.loader import DataError
from clipslim.data.shapes import classnames, generate_sample
from clipslim.eval import datasets as eval_datasets
from clipslim.eval.datasets import (
    DEFAULT_TEMPLATES,
    ImageFolderSet,
    RetrievalSet,
    RunOptions,
    caption_labels,
    evaluate_data,
    open_eval_data,
    parse_tasks,
)
from clipslim.eval.retrieval import class_retrieval_metrics, retrieval_metrics
from clipslim.models import load_model

CLASSES = (0, 9, 18, 27, 36, 45)  # six shapes classes with distinct colours and shapes
TEMPLATES = ("a {c}.", "a photo of a {c}.")
QUIET = RunOptions(batch_size=8, progress=False)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("tiny-student")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """root/train/<class>/ (5 each), root/test/<class>/ (4 each), templates.txt; 32 px shapes images."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("test", 4)):
        for c in CLASSES:
            d = root / split / classnames()[c].replace(" ", "_")
            d.mkdir(parents=True)
            for i in range(n):
                generate_sample(rng, "eval", 32, cls=c)[0].save(d / f"{i}.png")
    (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root


@pytest.fixture(scope="module")
def captions_csv(folder) -> Path:
    """Two captions per test image, plus a missing image and an empty caption that must be skipped."""
    rows = ["filepath,caption"]
    for path in sorted((folder / "test").glob("*/*.png")):
        name = path.parent.name.replace("_", " ")
        rows += [
            f"test/{path.parent.name}/{path.name},a {name}",
            f"test/{path.parent.name}/{path.name},a photo of a {name}",
        ]
    rows += ["test/nope.png,a ghost", f"test/{path.parent.name}/{path.name},"]
    csv = folder / "captions.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def test_open_eval_data_recognises_layouts(folder, captions_csv, tiny_shapes, tmp_path):
    assert open_eval_data(tiny_shapes).kind == "shapes"
    data = open_eval_data(folder)
    assert data.kind == "imagefolder" and set(data.splits) == {"train", "test"} and "linear_probe" in data.tasks
    plain = open_eval_data(folder / "test")
    assert plain.splits == {"test": folder / "test"} and plain.tasks == ("zeroshot_classification",)
    assert open_eval_data(captions_csv).kind == "retrieval"
    assert open_eval_data(tiny_shapes / "eval").kind == "retrieval"  # a folder of shards
    with pytest.raises(DataError, match="missing"):
        open_eval_data(tmp_path / "missing")
    with pytest.raises(DataError, match=r"not found: .*gone\.csv"):
        open_eval_data(tmp_path / "gone.csv")


def test_parse_tasks_aliases_and_errors():
    assert parse_tasks("zeroshot, retrieval,linear_probe,zeroshot") == [
        "zeroshot_classification",
        "zeroshot_retrieval",
        "linear_probe",
    ]
    with pytest.raises(ValueError, match="unknown task 'captioning'"):
        parse_tasks("captioning")


def test_image_folder_classnames_and_templates(folder, tmp_path):
    ds = ImageFolderSet(folder / "test", meta_dir=folder)
    assert ds.classes == [classnames()[c] for c in sorted(CLASSES, key=lambda c: classnames()[c].replace(" ", "_"))]
    assert ds.templates == list(TEMPLATES) and len(ds) == 24 and ds.targets.count(0) == 4
    assert ImageFolderSet(folder / "test").templates == list(DEFAULT_TEMPLATES)
    custom = tmp_path / "custom"
    (custom / "b").mkdir(parents=True)
    (custom / "a").mkdir()
    (custom / "classnames.txt").write_text("apple\n")
    with pytest.raises(DataError, match="classnames.txt: 1 class names for 2 class folders"):
        ImageFolderSet(custom)
    (custom / "classnames.txt").write_text("a\tapple\nb\tbanana\n")  # folder<TAB>name when names differ
    with pytest.raises(DataError, match="no images"):
        ImageFolderSet(custom)
    (custom / "a" / "x.png").write_bytes(b"not a png")
    broken = ImageFolderSet(custom)
    assert broken[0] == (None, 0) and broken.skipped == {"undecodable_image": 1}  # skipped and counted, not raised


def test_retrieval_set_groups_captions_and_counts_skips(captions_csv, tmp_path):
    ds = RetrievalSet(captions_csv)
    assert len(ds) == 24 and all(len(caps) == 2 for _, caps in ds.items)
    assert ds.skipped == {"missing_image": 1, "empty_caption": 1}
    # webdataset: one caption per line of txt; a sample without captions is skipped
    shard = tmp_path / "ret.tar"
    with wds.TarWriter(str(shard)) as w:
        for i, (path, caps) in enumerate(ds.items[:3]):
            w.write({"__key__": f"s{i}", "png": path.read_bytes(), "txt": "\n".join(caps)})
        w.write({"__key__": "empty", "png": path.read_bytes(), "txt": "  \n"})
        w.write({"__key__": "nocaption", "png": path.read_bytes()})
    shards = RetrievalSet(shard)
    assert [c for _, c in shards.items] == [c for _, c in ds.items[:3]]
    assert shards.skipped == {"empty_caption": 1, "missing_caption": 1}


def clip_benchmark_accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[float]:
    """CLIP_benchmark 1.6.2's ``accuracy`` with one fix: its ``float()`` of a 1-element array is a TypeError under
    numpy >= 2.4, so the sum is taken as a 0-d tensor. The ranking and hit rule are verbatim."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum(0).item()) / len(target) for k in topk]


def test_zeroshot_and_retrieval_equal_clip_benchmark(tiny, folder, captions_csv, monkeypatch):
    pytest.importorskip("sklearn")
    zc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    monkeypatch.setattr(zc, "accuracy", clip_benchmark_accuracy)
    test = ImageFolderSet(folder / "test", tiny.preprocess_val, meta_dir=folder)
    loader = DataLoader(test, batch_size=8)
    theirs = zc.evaluate(tiny.model, loader, tiny.tokenizer, test.classes, list(TEMPLATES), "cpu", amp=False)
    ours = evaluate_data(tiny, folder, ["zeroshot_classification"], QUIET)["tasks"]["zeroshot_classification"]
    for name in ("acc1", "acc5", "mean_per_class_recall"):
        assert ours[name] == pytest.approx(theirs[name], abs=1e-9), name

    loader = DataLoader(RetrievalSet(captions_csv, tiny.preprocess_val), batch_size=8, collate_fn=RetrievalSet.collate)
    theirs = zr.evaluate(tiny.model, loader, tiny.tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    ours = evaluate_data(tiny, captions_csv, None, QUIET)["tasks"]["zeroshot_retrieval"]
    assert ours["n"] == 24 and ours["n_captions"] == 48
    for name, value in theirs.items():  # CLIP_benchmark averages in float32
        assert ours[name] == pytest.approx(value, rel=1e-6), name


def test_linear_probe_on_image_folder_and_shapes(tiny, folder, tiny_shapes):
    opts = RunOptions(batch_size=32, progress=False, fewshot_ks=(-1, 2))
    res = evaluate_data(tiny, folder, ["zeroshot_classification", "linear_probe"], opts)["tasks"]
    assert set(res) == {"zeroshot_classification", "linear_probe", "linear_probe_k2"}
    assert res["linear_probe"]["n_train"] == 30 and res["linear_probe_k2"]["n_train"] == 12
    assert res["linear_probe"]["n"] == 24 and 0 <= res["linear_probe"]["lp_acc1"] <= 1
    shapes = evaluate_data(tiny, tiny_shapes, ["linear_probe"], RunOptions(batch_size=64, progress=False))
    probe = shapes["tasks"]["linear_probe"]
    assert set(shapes["tasks"]) == {"linear_probe"} and 0 < probe["n"] <= 128 and probe["n_train"] > 100
    with pytest.raises(DataError, match="does not support linear_probe"):
        evaluate_data(tiny, folder / "test", ["linear_probe"], QUIET)


def test_cli_eval_several_models_and_datasets(captions_csv, tiny_shapes, tmp_path, capsys):
    out = tmp_path / "res"
    argv = ["eval", "--model", "tiny-student", "--model", "tiny-teacher", "--batch-size", "32", "--out", str(out)]
    argv += ["--data", str(captions_csv), "--data", str(tiny_shapes)]
    assert main([*argv, "--task", "zeroshot,retrieval"]) == 0
    printed = json.loads(capsys.readouterr().out.replace("NaN", "null"))
    assert set(printed) == {"tiny-student", "tiny-teacher"}
    assert set(printed["tiny-student"]) == {"captions", tiny_shapes.name}
    assert set(printed["tiny-student"][tiny_shapes.name]) == {"zeroshot_classification", "zeroshot_retrieval"}
    doc = json.loads((out / "captions_tiny-teacher_zeroshot_retrieval.json").read_text())
    assert (doc["dataset"], doc["model"], doc["task"]) == ("captions", "tiny-teacher", "zeroshot_retrieval")
    assert doc["skipped"] == {"missing_image": 1, "empty_caption": 1} and doc["params"] > 0
    shapes_zs = json.loads((out / f"{tiny_shapes.name}_tiny-student_zeroshot_classification.json").read_text())
    assert {"acc1", "heldout_acc1", "seen_acc1"} <= set(shapes_zs["metrics"])
    assert len(list(out.glob("*.json"))) == 2 * 3
    assert main(["eval", "--model", "tiny-student", "--data", str(captions_csv), "--fewshot-k", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "linear_probe" in err and "captions.csv" in err
    assert not math.isnan(shapes_zs["metrics"]["acc1"])


# ---------------------------------------------------------------- issue 16 eval fixes


def _two_class_folder(root: Path, names: tuple[str, ...] = ("blue_square", "red_circle"), n: int = 2) -> Path:
    rng = np.random.default_rng(1)
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(n):
            cls = classnames().index(name.replace("_", " "))
            generate_sample(rng, "eval", 32, cls=cls)[0].save(root / name / f"{i}.png")
    return root


def test_classnames_are_matched_to_folders_by_name(tmp_path):
    root = _two_class_folder(tmp_path / "data")
    (root / "classnames.txt").write_text("Red Circle\nblue square\n")  # not in sorted folder order
    ds = ImageFolderSet(root)
    assert ds.folders == ["blue_square", "red_circle"] and ds.classes == ["blue square", "Red Circle"]
    assert [ds.classes[label] for _, label in ds.samples] == ["blue square"] * 2 + ["Red Circle"] * 2
    (root / "classnames.txt").write_text("red_circle\tthe red disc\nblue_square\ta blue box\n")
    assert ImageFolderSet(root).classes == ["a blue box", "the red disc"]
    (root / "classnames.txt").write_text("red circle\ngreen star\n")
    with pytest.raises(DataError, match=r"classnames\.txt: class folder 'blue_square' has no matching line"):
        ImageFolderSet(root)


def test_root_with_classification_and_retrieval_csv(tiny, tmp_path):
    root = tmp_path / "suite"
    _two_class_folder(root / "classification")
    (root / "classnames.txt").write_text("red circle\nblue square\n")
    rows = [f"classification/{p.parent.name}/{p.name},a {p.parent.name.replace('_', ' ')}"
            for p in sorted(root.glob("classification/*/*.png"))]  # fmt: skip
    (root / "retrieval.csv").write_text("filepath,caption\n" + "\n".join(rows) + "\n")
    data = open_eval_data(root)
    assert data.kind == "combined" and data.tasks == ("zeroshot_classification", "zeroshot_retrieval")
    res = evaluate_data(tiny, data, None, QUIET)["tasks"]
    assert (
        res["zeroshot_classification"]["n"] == 4
        and 0 <= res["zeroshot_classification"]["acc1"] <= 1
        and res["zeroshot_retrieval"]["n"] == 4
    )
    assert res["zeroshot_retrieval"]["n_classes"] == 2  # the captions repeat per class


def _spy_templates(monkeypatch) -> list[list[str]]:
    seen: list[list[str]] = []
    real = eval_datasets.build_classifier

    def spy(model, tokenizer, names, templates, *args, **kwargs):
        seen.append(list(templates))
        return real(model, tokenizer, names, templates, *args, **kwargs)

    monkeypatch.setattr(eval_datasets, "build_classifier", spy)
    return seen


def test_templates_file_and_templates_txt_for_image_folders(folder, tmp_path, monkeypatch, capsys):
    seen = _spy_templates(monkeypatch)
    argv = ["eval", "--model", "tiny-student", "--data", str(folder / "test"), "--batch-size", "32"]
    assert main(argv) == 0 and seen[-1] == list(DEFAULT_TEMPLATES)  # no templates.txt beside test/
    assert main(["eval", "--model", "tiny-student", "--data", str(folder), "--batch-size", "32"]) == 0
    assert seen[-1] == list(TEMPLATES)  # templates.txt beside the data
    mine = tmp_path / "mine.txt"
    mine.write_text("a rendering of a {c}\n{} in a picture\n")
    assert main([*argv, "--templates", str(mine)]) == 0
    assert seen[-1] == ["a rendering of a {c}", "{} in a picture"]
    capsys.readouterr()
    mine.write_text("a {c}\nno placeholder here\n")
    assert main([*argv, "--templates", str(mine)]) == 2
    assert "mine.txt: line 2 has no {} or {c} placeholder" in capsys.readouterr().err


def test_class_level_retrieval_recall_hand_made():
    e = torch.eye(4)
    images = F.normalize(torch.stack([e[0], e[0] + 0.1 * e[1], e[2], e[2] + 0.1 * e[3]]), dim=-1)
    # texts 0-2 equal the *other* image of their class; text 3 (class 1) points at image 0 (class 0)
    texts = F.normalize(torch.stack([images[1], images[0], images[3], e[0] - 0.3 * e[1]]), dim=-1)
    t2i, labels = torch.arange(4), torch.tensor([0, 0, 1, 1])
    instance = retrieval_metrics(images, texts, t2i, ks=(1,))
    assert instance["image_retrieval_recall@1"] == 0.0
    cls = class_retrieval_metrics(images, texts, t2i, labels)
    assert cls["image_retrieval_class_recall@1"] == 0.75  # texts 0-2 hit their class, text 3 misses
    assert cls["text_retrieval_class_recall@1"] == 1.0  # every image's top text is of its class
    assert caption_labels([["a red star"], ["A red  star."], ["a blue ring"]]).tolist() == [0, 0, 1]
    assert caption_labels([["a"], ["b"]]) is None
    with pytest.raises(ValueError, match="one entry per image"):
        class_retrieval_metrics(images, texts, t2i, labels[:3])


def test_repeated_captions_report_class_level_recall(tiny, captions_csv):
    res = evaluate_data(tiny, captions_csv, None, QUIET)["tasks"]["zeroshot_retrieval"]
    assert res["n_classes"] == 6  # 24 images, 6 distinct caption sets
    for side in ("image", "text"):
        assert res[f"{side}_retrieval_class_recall@1"] >= res[f"{side}_retrieval_recall@1"]
