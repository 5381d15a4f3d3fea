"""A CSV log per run: one row per logged step, columns grow as new metrics appear (rewritten, never half-written)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..io import atomic_write_text


class CsvLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if self.path.is_file():
            try:
                with open(self.path, newline="", encoding="utf-8") as f:
                    self.rows = list(csv.DictReader(f))
            except (OSError, UnicodeDecodeError, csv.Error) as err:
                raise ConfigError(f"{self.path}: unreadable log ({err}); move it away to start a new one") from err

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint so the log matches the restored state."""
        self.rows = [r for i, r in enumerate(self.rows, 2) if self._step(r, i) <= step]

    def _step(self, row: dict[str, Any], line: int) -> int:
        try:
            return int(float(row["step"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(
                f"{self.path}: line {line}: no numeric step ({row.get('step')!r}); move it away to start a new log"
            ) from err

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.flush()

    def flush(self) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())
