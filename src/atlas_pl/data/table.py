"""Writing a partition table (one row per client) as CSV and JSON, atomically."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from atlas_pl.io import atomic_write_bytes, atomic_write_json

__all__ = ["save_table"]


def save_table(rows: list[dict[str, Any]], path: str | os.PathLike) -> tuple[Path, Path]:
    """Writes ``rows`` to ``<path>.csv`` and ``<path>.json`` (a ``.csv``/``.json`` suffix on ``path`` is dropped).

    List values (e.g. label histograms) are written as JSON strings in the CSV. Each file is written to a temporary
    file and renamed into place, so readers never see a partial table.

    Args:
        rows: Table rows with identical keys.
        path: Output path stem.

    Returns:
        The CSV and JSON paths.
    """
    stem = Path(path)
    if stem.suffix in (".csv", ".json"):
        stem = stem.with_suffix("")
    csv_path, json_path = stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".json")
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    atomic_write_bytes(csv_path, buffer.getvalue().encode())
    atomic_write_json(json_path, rows)
    return csv_path, json_path
