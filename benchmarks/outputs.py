"""What every benchmark writes: the machine, ``<stem>.json`` (the report), ``<stem>.csv`` (its table), a PNG."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
from pathlib import Path
from typing import Any

from atlas_pl.io import atomic_write_bytes


def machine_info() -> dict[str, Any]:
    """Platform, Python, torch and CPU count of this machine (no paths)."""
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count()}  # fmt: skip


def write_report(out: Path, stem: str, report: dict[str, Any], table: list[dict[str, Any]]) -> None:
    """``<out>/<stem>.json`` (``report``) and ``<out>/<stem>.csv`` (``table``, one row per dict; the columns are every
    key of any row, empty where a row lacks one), atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / f"{stem}.json", json.dumps(report, indent=1).encode())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in table for k in row)))  # rows may differ
    writer.writeheader()
    writer.writerows(table)
    atomic_write_bytes(out / f"{stem}.csv", buf.getvalue().encode())


def save_png(fig: Any, path: Path) -> None:
    """A matplotlib figure as a PNG, atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_readme_section(readme: Path, key: str, title: str, text: str) -> None:
    """Replace the text between ``<!-- key:begin -->`` and ``<!-- key:end -->`` in ``readme`` (atomically); without
    the markers, append them under a ``### title`` heading."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    doc = readme.read_text()
    if begin in doc and end in doc:
        pre, rest = doc.split(begin, 1)
        doc = pre + begin + "\n" + text + end + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip() + f"\n\n### {title}\n\n{begin}\n{text}{end}\n"
    atomic_write_bytes(readme, doc.encode())
