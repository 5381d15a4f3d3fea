"""`clipslim bench`: FLOPs against hand counts, traffic and memory probes, result structure. No timing asserts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from clipslim.cli import main
from clipslim.eval.bench import _callers, count_cost, latency_stats, peak_memory, percentile
from clipslim.models import load_model


def test_percentile_and_latency_stats():
    values = np.random.default_rng(0).random(37).tolist()
    for q in (0, 50, 95, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    stats = latency_stats([0.5, 0.1, 0.3, 0.2, 0.4], batch=4)
    assert stats["latency_ms_p50"] == pytest.approx(300) and stats["latency_ms_p95"] == pytest.approx(480)
    assert stats["items_per_s"] == pytest.approx(4 / 0.3)


def test_count_cost_of_a_linear_layer():
    layer, x = nn.Linear(8, 3), torch.randn(5, 8)
    flops, traffic = count_cost(lambda: layer(x))
    assert flops == 2 * 5 * 8 * 3
    # addmm reads bias, input and weight (its transpose is a view: no traffic) and writes the output, all fp32
    assert traffic == 4 * (3 + 5 * 8 + 8 * 3 + 5 * 3)


def test_flops_of_tiny_student_match_hand_count():
    bundle = load_model("tiny-student")
    bundle.model.eval()
    calls = _callers(bundle, torch.device("cpu"))
    # image: 32 px, patch 16 -> 4 patches + CLS = 5 tokens, width 32, 2 layers, MLP 128, projection 32 -> 32
    patch = 2 * 4 * (3 * 16 * 16) * 32
    layer = 2 * 5 * 32 * 96 + 2 * (2 * 5 * 5 * 32) + 2 * 5 * 32 * 32 + 2 * (2 * 5 * 32 * 128)
    assert count_cost(calls["image"](1), bundle.model)[0] == patch + 2 * layer + 2 * 32 * 32
    # text: 16 tokens, width 32, 2 layers; attention is counted (CPU SDPA kernel) and the projection is 1 token
    layer = 2 * 16 * 32 * 96 + 2 * (2 * 16 * 16 * 32) + 2 * 16 * 32 * 32 + 2 * (2 * 16 * 32 * 128)
    assert count_cost(calls["text"](1), bundle.model)[0] == 2 * layer + 2 * 32 * 32
    assert not bundle.model.training  # counting in train mode (no fused MHA fast path) restores the mode


def test_peak_memory_sees_a_64mib_allocation():
    mem, method = peak_memory(lambda: torch.ones(16 * 2**20), "cpu")
    assert mem is not None, method
    assert 60 * 2**20 <= mem <= 200 * 2**20, method


def test_cli_bench_writes_json_table_and_roofline(tmp_path, capsys):
    out = tmp_path / "b" / "bench.json"
    argv = ["bench", "--model", "tiny-student", "--batch-sizes", "4", "1", "--quick", "--repeats", "2"]
    assert main([*argv, "--out", str(out), "--plot"]) == 0
    doc = json.loads(out.read_text())
    assert doc["batch_sizes"] == [1, 4] and doc["machine"]["matmul_flops_per_s"] > 0
    m = doc["models"][0]
    assert m["params"] > m["params_non_embedding"] > 0 and m["image_size"] == [32, 32]
    for enc, per_item in (("image", m["flops_per_image"]), ("text", m["flops_per_caption"])):
        assert [r["batch"] for r in m[enc]] == [1, 4]
        assert [r["flops"] for r in m[enc]] == [per_item, 4 * per_item]  # FLOPs are linear in the batch
        for r in m[enc]:
            assert r["latency_ms_p95"] >= r["latency_ms_p50"] > 0 and r["bytes_moved"] > 0
            assert r["achieved_flops_per_s"] == pytest.approx(r["flops"] * r["items_per_s"] / r["batch"])
    assert m["images_per_s"] == m["image"][-1]["items_per_s"]
    assert (tmp_path / "b" / "roofline.png").stat().st_size > 10_000
    assert "| tiny-student |" in capsys.readouterr().out
    assert main(["bench", "--model", "tiny-student", "--batch-sizes", "0"]) == 2
    assert "batch sizes >= 1" in capsys.readouterr().err


def test_peak_memory_counts_live_tensors_not_allocator_leftovers():
    def two_temporaries():
        a = torch.ones(4 * 2**20)  # 16 MiB, freed before b exists
        del a
        b = torch.ones(2 * 2**20)  # 8 MiB
        return b.sum()

    big = peak_memory(lambda: torch.ones(32 * 2**20).sum(), "cpu")[0]  # 128 MiB freed: pages the allocator may keep
    mem, _ = peak_memory(two_temporaries, "cpu")
    assert big >= 128 * 2**20
    assert 16 * 2**20 <= mem < 24 * 2**20  # the peak is one 16 MiB buffer, not the sum, and not zero after `big`
