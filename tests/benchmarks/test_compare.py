"""benchmarks/compare.py: what each run executes, and how the runs become the table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import compare  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def _row(method: str, seed: int, acc: list[float | None], **extra) -> dict:
    row = {"workload": "minilm", "method": method, "seed": seed, "rounds": len(acc), "final_acc": acc[-1],
           "acc_per_round": acc, "group_acc": {"topic": acc[-1]}, "measured_peak": {}, "peak_bytes_max": 2**27,
           "mean_bytes_per_round": 1e6, "wall_seconds": 10.0}  # fmt: skip
    row.update(extra)
    return row


def _callback(run: dict, name: str) -> dict:
    return next(c for c in run["overlay"]["trainer"]["callbacks"] if c["class_path"].endswith(name))


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data beside the checkout")
def test_every_method_runs_the_same_base_config_and_seed_with_its_own_settings() -> None:
    runs = {m: compare.build_run("minilm", m, 3, None, False) for m in compare.METHODS}
    for run in runs.values():
        cmd = run["cmd"]
        assert cmd[cmd.index("--config") + 1] == "configs/minilm.yaml"
        assert cmd[cmd.index("--seed_everything") + 1] == "3" and cmd[cmd.index("--data.seed") + 1] == "3"
        checkpoints = [c for c in run["overlay"]["trainer"]["callbacks"] if "Checkpoint" in c["class_path"]]
        assert checkpoints == [{"class_path": "atlas_pl.callbacks.RoundCheckpoint",
                                "init_args": {"dirpath": str(run["folder"].relative_to(ROOT) / "checkpoints")}}]
    assert _callback(runs["atlas_random"], "TaskClustering")["init_args"] == {"num_clusters": 4, "assign": "random"}
    assert _callback(runs["atlas_uniform"], "RankAllocation")["init_args"]["pattern"] == "uniform"
    assert _callback(runs["atlas"], "RankAllocation")["init_args"]["pattern"] == "importance"
    zero_pad = _callback(runs["atlas_zero_pad"], "ClusterAggregation")["init_args"]["method"]
    assert zero_pad == {"class_path": "atlas_pl.algorithms.ZeroPad"}
    assert _callback(runs["atlas"], "ClusterAggregation")["init_args"]["method"]["class_path"].endswith(".Exact")
    assert _callback(runs["centralized_task"], "TaskClustering")["init_args"] == {"assign": "true_task"}


def test_rounds_to_target_use_the_better_centralized_run_of_the_same_seed() -> None:
    rows = [
        _row("centralized", 0, [0.5, 0.6]),
        _row("centralized_task", 0, [0.7, 0.8]),  # the upper bound: 0.95 * 0.8 = 0.76
        _row("atlas", 0, [0.5, 0.77, 0.9]),
        _row("local", 0, [0.5, None, 0.75]),
        _row("atlas", 1, [0.9]),  # no centralized run for seed 1
    ]
    compare.add_rounds_to_target(rows)
    by = {(r["method"], r["seed"]): r for r in rows}
    assert by["atlas", 0]["target_acc"] == pytest.approx(0.76)
    assert by["atlas", 0]["rounds_to_95"] == 2
    assert by["local", 0]["rounds_to_95"] is None
    assert by["atlas", 1]["rounds_to_95"] is None and by["atlas", 1]["target_acc"] is None
    assert by["atlas", 0]["rounds_to_95_best"] == 3  # the best final of seed 0 is atlas's 0.9: 0.855 from round 3
    assert by["local", 0]["rounds_to_95_best"] is None


def test_table_gives_mean_and_sample_std_over_seeds_and_counts_runs_that_never_reach_the_target() -> None:
    rows = [
        _row("centralized_task", 0, [0.8]),
        _row("centralized_task", 1, [0.8]),
        _row("atlas", 0, [0.7, 0.9]),
        _row("atlas", 1, [0.5, 0.7]),
    ]
    compare.add_rounds_to_target(rows)
    table = compare.markdown_table(rows, list(compare.METHODS))
    atlas = next(line for line in table.splitlines() if line.startswith("| atlas |"))
    cells = [c.strip() for c in atlas.strip("|").split("|")]
    assert cells[1] == "0,1" and cells[3] == "0.800 ± 0.141"  # mean of 0.9 and 0.7, sample std
    assert "(1/2 never)" in atlas  # seed 1 ends at 0.7 < 0.76
    assert compare.mean_std([None, float("nan")]) is None
