"""Datasets: the embedded shapes generator and loaders that skip and count bad samples."""

from clipslim.data.loader import DataError, SkipStats, make_loader, num_samples, resolve_shards
from clipslim.data.shapes import classnames, generate_sample, load_info, read_lines, write_shapes

__all__ = [
    "DataError",
    "SkipStats",
    "classnames",
    "generate_sample",
    "load_info",
    "make_loader",
    "num_samples",
    "read_lines",
    "resolve_shards",
    "write_shapes",
]
