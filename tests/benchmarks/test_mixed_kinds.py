"""benchmarks/mixed_kinds.py without a model: the per-task table against the zero-shot floor, and its Markdown."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import mixed_kinds  # noqa: E402


def test_table_gives_mean_std_and_the_gain_over_the_floor_on_the_same_seeds(monkeypatch) -> None:
    monkeypatch.setattr(mixed_kinds, "task_kinds", lambda: {"sst2": "classification", "squad": "qa"})
    floors = {0: {"test_task/sst2/acc": 0.5, "test_task/squad/f1": 0.2, "test_task/squad/em": 0.1},
              1: {"test_task/sst2/acc": 0.7, "test_task/squad/f1": 0.4, "test_task/squad/em": 0.1}}  # fmt: skip
    runs = {"atlas": {"lr": 2e-3, "by_seed": {0: {"sst2/acc": 0.8, "squad/f1": 0.5},
                                              1: {"sst2/acc": 0.9, "squad/f1": 0.7}}}}  # fmt: skip
    rows = mixed_kinds.table(floors, runs)
    by = {(r["method"], r["task"], r["metric"]): r for r in rows}
    assert by["atlas", "sst2", "acc"]["mean"] == pytest.approx(0.85)
    assert by["atlas", "sst2", "acc"]["zero_shot"] == pytest.approx(0.6)
    assert by["atlas", "sst2", "acc"]["gain"] == pytest.approx(0.25)
    assert by["atlas", "squad", "f1"]["gain"] == pytest.approx(0.3) and ("atlas", "squad", "em") not in by
    assert by["zero_shot", "squad", "em"]["mean"] == pytest.approx(0.1) and by["zero_shot", "sst2", "acc"]["seeds"] == 2
    report = {"table": rows, "settings": {"rounds": 3, "seeds": [0, 1]}, "machine": {"platform": "x", "cpus": 2},
              "clustering": [{"method": "atlas", "signal": "s", "K": 2, "ari_task": 1.0, "ari_kind": 0.5}]}  # fmt: skip
    text = mixed_kinds.markdown(report)
    assert "| atlas | 0.850 ± 0.071 | 0.600 ± 0.141 | 0.850 | 0.600 | – |" in text
    assert "| atlas | s | 1 | 2 | 1.00–1.00 | 0.50–0.50 |" in text
