"""Evaluation with CLIP_benchmark's metric definitions: zero-shot classification, retrieval, linear probe, results.

Heavier pieces import on their own: ``eval.datasets`` (ImageFolder / CSV / shards, the task runner),
``eval.bench`` (speed, FLOPs, memory, roofline) and ``eval.report`` (accuracy x speed x size, Pareto plots).
"""

from clipslim.eval.linear_probe import fewshot_indices, linear_probe, lp_metrics
from clipslim.eval.retrieval import retrieval_metrics
from clipslim.eval.run import (
    Features,
    encode_batches,
    evaluate_features,
    evaluate_shapes,
    write_results,
)
from clipslim.eval.zeroshot import build_classifier, mean_per_class_recall, zeroshot_metrics

__all__ = [
    "Features",
    "build_classifier",
    "encode_batches",
    "evaluate_features",
    "evaluate_shapes",
    "fewshot_indices",
    "linear_probe",
    "lp_metrics",
    "mean_per_class_recall",
    "retrieval_metrics",
    "write_results",
    "zeroshot_metrics",
]
