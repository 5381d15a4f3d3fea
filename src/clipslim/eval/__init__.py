"""Evaluation with CLIP_benchmark's metric definitions: zero-shot classification, retrieval, result files."""

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
    "mean_per_class_recall",
    "retrieval_metrics",
    "write_results",
    "zeroshot_metrics",
]
