"""Mean mining metrics (extra positives per query, recall / precision per stage) of each run, from its metrics.csv.

Usage: python benchmarks/multipos/mining_recall.py runs/issue21   (any folder holding run dirs, e.g. a compare's)
One batch is a noisy estimate, so the logged rows of a run are averaged; blank cells (a stage that found no
labelled pair that step) are left out of the precision means.
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path


def mining_means(metrics_csv: Path) -> dict[str, float]:
    with open(metrics_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    keys = [k for k in (rows[0] if rows else {}) if "_mine_" in k or k.endswith("_positives")]
    return {k: statistics.mean(float(r[k]) for r in rows if r.get(k)) for k in keys if any(r.get(k) for r in rows)}


def main(root: str) -> None:
    for path in sorted(Path(root).rglob("metrics.csv")):
        means = mining_means(path)
        if means:
            print(path.parent, {k: round(v, 3) for k, v in means.items()})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/issue21")
