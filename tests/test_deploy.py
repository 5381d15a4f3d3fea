"""ONNX bundles per precision (fp32 / fp16 / int8): parity, tokenizer + preprocess contract, accuracy and latency
report, fp16 overflow detection, ORT session options, the export graph rewrite, torch.compile. No timing asserts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import onnx
import pytest
import torch
from conftest import seeded_model

from clipslim.cli import main
from clipslim.deploy import REPORT_FILE, OrtClip, OrtConfig, deploy, deploy_summary, parity, round_ratios
from clipslim.deploy.compiled import check_compiler, compile_clip
from clipslim.deploy.export_graph import OrtBlock, onnx_ready
from clipslim.deploy.onnx import example_inputs

BUNDLE_FILES = {"image.onnx", "text.onnx", "preprocess.json", "vocab.json", "merges.txt", "tokenizer.json"}


@pytest.fixture(scope="module")
def tiny():
    return seeded_model("tiny-student")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, tiny_shapes, tiny) -> Path:
    """`clipslim deploy --precision fp32 fp16 int8 --data` of tiny-student, with the weights of the `tiny` fixture."""
    folder = tmp_path_factory.mktemp("deploy")
    weights = folder / "w.pt"
    torch.save(tiny.model.state_dict(), weights)
    out = folder / "onnx"
    argv = ["deploy", "--model", f"tiny-student:{weights}", "--out", str(out), "--precision", "fp32", "fp16", "int8"]
    assert main([*argv, "--repeats", "3", "--batch-sizes", "1", "4", "--data", str(tiny_shapes)]) == 0
    return out


def test_fp32_onnx_matches_pytorch_at_several_batch_sizes(deployed, tiny):
    onnx_model = OrtClip.from_folder(deployed / "fp32")
    for batch in (1, 5):  # exported with batch 2: the batch axis is dynamic
        images, tokens = example_inputs(tiny, batch, seed=batch)
        diffs = parity(tiny.model, onnx_model, images, tokens)
        assert diffs["image_max_abs_diff"] < 1e-5 and diffs["text_max_abs_diff"] < 1e-5, diffs
        assert onnx_model.encode_image(images).shape == (batch, 32)


def test_bundle_is_self_contained(deployed, tiny):
    """The folder alone (its tokenizer, its preprocess.json) gives eager's embeddings: no open_clip needed."""
    from transformers import CLIPTokenizer

    for precision in ("fp32", "fp16", "int8"):
        folder = deployed / precision
        assert BUNDLE_FILES <= {p.name for p in folder.iterdir()}, precision
        pre = json.loads((folder / "preprocess.json").read_text())
        assert pre["precision"] == precision and pre["image"]["shape"] == ["batch", 3, 32, 32]
        for key in ("mean", "std"):
            assert pre["image"][key] == list(tiny.preprocess_cfg[key])
        assert pre["image"]["interpolation"] == "bicubic" and pre["image"]["resize_mode"] == "shortest"
        assert pre["text"]["context_length"] == 16 and pre["outputs"]["normalized"]
        graph = onnx.load(str(folder / "image.onnx"))
        assert [i.name for i in graph.graph.input] == ["image"] and [o.name for o in graph.graph.output] == [
            "image_embeds"
        ]
        assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp16 too: casts inside
    captions = ["a red circle", "two small blue squares on the left of a big triangle and more words than fit"]
    ids = CLIPTokenizer.from_pretrained(str(deployed / "fp32"))(
        captions, padding="max_length", truncation=True, max_length=16, return_tensors="np"
    )["input_ids"]
    got = OrtClip.from_folder(deployed / "fp32").encode_text(torch.from_numpy(ids))
    with torch.no_grad():
        want = tiny.model.encode_text(torch.as_tensor(tiny.tokenizer(captions)), normalize=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_report_has_parity_accuracy_latency_and_size_per_precision(deployed):
    report = json.loads((deployed / REPORT_FILE).read_text())
    precisions = report["precisions"]
    assert set(precisions) == {"fp32", "fp16", "int8"} and precisions["fp32"]["parity_ok"]
    for name, info in precisions.items():
        assert {"image_max_abs_diff", "image_min_cosine", "text_min_cosine"} <= set(info["parity"]), name
        assert set(info["accuracy_delta_vs_eager"]) >= {"acc1", "acc5"}
    for batch in ("b1", "b4"):
        for encoder in ("image", "text"):
            speed = report["latency"][batch][encoder]
            assert set(speed) == {"eager", "fp32", "fp16", "int8"} and speed["eager"]["ratio_to_eager"] == 1.0
            for stats in speed.values():  # median of per-round ratios, quartiles as spread, one round per call here
                assert stats["ratio_p25"] <= stats["ratio_to_eager"] <= stats["ratio_p75"] and stats["rounds"] == 3
    acc = report["accuracy"]  # fp32 ONNX scores exactly what eager scores; fp16 / int8 are measured, not assumed
    assert acc["fp32"]["acc1"] == acc["eager"]["acc1"] and acc["fp32"]["n"] == acc["eager"]["n"] > 0
    assert precisions["fp32"]["accuracy_delta_vs_eager"]["acc1"] == 0.0
    size = {p: info["file_bytes"] for p, info in precisions.items()}
    assert size["fp16"]["text"] < 0.55 * size["fp32"]["text"] and size["int8"]["text"] < 0.5 * size["fp32"]["text"]
    assert report["table"].count("\n") == 1 + 4 and "Δ vs eager" in report["table"]
    assert not any(v["overflow"] for v in precisions["fp16"]["fp16_overflow"].values())


def test_int8_and_fp16_graphs_are_really_converted_and_close(deployed, tiny):
    ops = {n.op_type for n in onnx.load(str(deployed / "int8" / "image.onnx")).graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}
    fp16 = onnx.load(str(deployed / "fp16" / "text.onnx"))
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.graph.initializer) > 10
    images, tokens = example_inputs(tiny, 4)
    for precision, min_cos in (("int8", 0.97), ("fp16", 0.999)):  # int8 of random tiny weights: ~0.98
        diffs = parity(tiny.model, OrtClip.from_folder(deployed / precision), images, tokens)
        assert diffs["image_min_cosine"] > min_cos and diffs["text_min_cosine"] > min_cos, (precision, diffs)
        assert diffs["image_max_abs_diff"] > 1e-6  # really a different graph


def test_fp16_text_overflow_is_detected_and_reported(tmp_path):
    bundle = seeded_model("tiny-student")
    with torch.no_grad():  # residual stream ~1e5, past fp16's 65504; the image tower is untouched
        bundle.model.token_embedding.weight.mul_(1e7)
    report = deploy(bundle, tmp_path / "out", ["fp16"], repeats=1, batch_sizes=(1,))
    verdict = report["precisions"]["fp16"]["fp16_overflow"]
    assert verdict["text"]["overflow"] and verdict["text"]["torch_fp16_nonfinite_rows"] == 16
    assert verdict["text"]["peak_abs_activation"] > 65504 and not verdict["image"]["overflow"]
    assert verdict["image"]["torch_fp16_nonfinite_rows"] == 0 and verdict["image"]["fp16_headroom"] > 1
    summary = deploy_summary(report, tmp_path / "out")
    assert "fp16 text tower OVERFLOWS" in summary and "fp16 image tower: no overflow" in summary


@pytest.mark.parametrize(
    "config",
    [
        OrtConfig(io_binding=True),
        OrtConfig(parallel=True, inter_threads=2),
        OrtConfig(spinning=True, intra_threads=1),
        OrtConfig(optimization="disable"),
        OrtConfig(mem_arena=False, mem_pattern=False),
    ],
)
def test_session_options_change_speed_not_results(deployed, tiny, config):
    images, tokens = example_inputs(tiny, 3)
    reference = OrtClip.from_folder(deployed / "fp32")
    other = OrtClip.from_folder(deployed / "fp32", config)
    torch.testing.assert_close(other.encode_image(images), reference.encode_image(images), atol=1e-5, rtol=0)
    torch.testing.assert_close(other.encode_text(tokens), reference.encode_text(tokens), atol=1e-5, rtol=0)


def test_session_options_are_applied():
    opts = OrtConfig(intra_threads=3, mem_arena=False, mem_pattern=False, spinning=True).session_options()
    assert opts.intra_op_num_threads == 3 and not opts.enable_cpu_mem_arena and not opts.enable_mem_pattern
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    default = OrtConfig().session_options()  # the measured best: see benchmarks/deploy_speed.py
    assert default.enable_cpu_mem_arena and default.enable_mem_pattern
    assert default.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_gelu_exports_as_one_op(deployed, tiny):
    """Opset 20's Gelu: the Erf / Div / Mul / Add spelling of GELU is what made ORT slower than eager at batch 64."""
    blocks = {"image": tiny.model.visual.transformer.resblocks, "text": tiny.model.transformer.resblocks}
    for tower in ("image", "text"):
        ops = [n.op_type for n in onnx.load(str(deployed / "fp32" / f"{tower}.onnx")).graph.node]
        assert ops.count("Gelu") == len(blocks[tower]) and "Erf" not in ops, tower  # one per block's MLP


def test_round_ratios_cancel_load_changes_between_rounds():
    # round 2 ran under load for the variant only; pooled medians would say 50x, rounds say 0.5x
    eager, variant = [1.0, 1.0, 100.0, 1.0], [0.5, 50.0, 50.0, 0.5]
    r = round_ratios(variant, eager, block=1)
    assert r["ratio_to_eager"] == 0.5 and r["rounds"] == 4 and r["ratio_p75"] > 1
    assert round_ratios([2.0, 4.0, 5.0, 7.0], [1.0, 1.0, 2.0, 2.0], block=2)["ratio_to_eager"] == 3.0


def test_speed_benchmark_summary_flags_a_missed_target():
    spec = importlib.util.spec_from_file_location(
        "deploy_speed", Path(__file__).parents[1] / "benchmarks/deploy_speed.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    stats = {"latency_ms_p50": 2.0, "ratio_to_eager": 1.0, "ratio_p25": 1.0, "ratio_p75": 1.0}
    fast, slow = {**stats, "ratio_to_eager": 0.4}, {**stats, "ratio_to_eager": 1.2, "ratio_p75": 1.3}
    levers = {"t1": {"b1": {"image": {"eager": stats, "ort": fast}}, "b64": {"image": {"eager": stats, "ort": slow}}}}
    assert bench.target(levers)["t1"] == {"ort_worst_ratio": 1.2, "max": 1.0, "met": False}
    assert bench.ratios(levers)["ort_t1_b64_image"] == [1.2, 1.0, 1.3]
    assert "| ort | 0.40 (1.00-1.00) | 1.20 (1.00-1.30) |" in bench.table(levers)


def test_export_graph_rewrite_is_exact_and_leaves_hooked_blocks_alone():
    from clipslim.tokens.prune import PruneConfig, apply_token_pruning

    bundle = seeded_model("tiny-teacher")
    for name, p in bundle.model.named_parameters():
        if name.endswith("in_proj_bias"):
            p.data.normal_(0, 0.1)  # open_clip initialises them to zero: make q/k/v splitting matter
    rewritten = onnx_ready(bundle.model)
    assert all(isinstance(b, OrtBlock) for b in rewritten.visual.transformer.resblocks)
    images, tokens = example_inputs(bundle, 3)
    with torch.no_grad():
        torch.testing.assert_close(rewritten.encode_image(images), bundle.model.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(rewritten.encode_text(tokens), bundle.model.encode_text(tokens), atol=1e-5, rtol=0)
    apply_token_pruning(bundle.model, PruneConfig(keep_ratio=0.5, after_block=0))
    pruned = onnx_ready(bundle.model)
    assert not isinstance(pruned.visual.transformer.resblocks[0], OrtBlock)  # its hook prunes tokens
    with torch.no_grad():
        torch.testing.assert_close(pruned.encode_image(images), bundle.model.encode_image(images), atol=1e-5, rtol=0)


def test_missing_bundle_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image\.onnx .*clipslim deploy"):
        OrtClip.from_folder(tmp_path)


def test_compiled_wrapper_matches_eager(tiny):
    compiled = compile_clip(tiny.model, backend="aot_eager")  # inductor's C++ build is for the benchmark
    images, tokens = example_inputs(tiny, 2)
    with torch.no_grad():
        torch.testing.assert_close(compiled.encode_image(images), tiny.model.encode_image(images))
        torch.testing.assert_close(compiled.encode_text(tokens), tiny.model.encode_text(tokens))


def test_compile_without_a_compiler_fails_early(monkeypatch):
    monkeypatch.setattr("clipslim.deploy.compiled.shutil.which", lambda name: None)
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):
        check_compiler("inductor", "cpu")
    check_compiler("aot_eager", "cpu")  # other backends build nothing


def test_cli_deploy_bad_data_is_one_line(tmp_path, capsys):
    assert main(["deploy", "--model", "tiny-student", "--out", str(tmp_path / "o"), "--data", "/no/such"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "/no/such" in err and not (tmp_path / "o").exists()


def test_cli_deploy_threads_set_torch_and_so_the_sessions(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_deploy(bundle, out_dir, precisions, **kwargs):
        seen["threads"] = torch.get_num_threads()
        return {"table": "| t |", "threads": seen["threads"], "precisions": {}}

    monkeypatch.setattr("clipslim.deploy.deploy", fake_deploy)
    before = torch.get_num_threads()
    try:
        assert main(["deploy", "--model", "tiny-student", "--out", str(tmp_path), "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen["threads"] == 1 and "1 thread(s) for torch and ONNX Runtime alike" in capsys.readouterr().out
