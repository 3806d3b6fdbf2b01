"""benchmarks/round_profile.py end to end on the tiny demo model: three cells, the batching table, its outputs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import round_profile  # noqa: E402
from atlas_pl.profiling import PARTS  # noqa: E402


def test_round_profile_splits_each_cell_and_compares_batched_with_one_at_a_time(tmp_path) -> None:
    args = ["--models", "demo", "--clients", "4", "--batching-clients", "4", "--config-clients", "0", "--lean-clients",
            "--rounds", "2",
            "--out", str(tmp_path)]  # fmt: skip
    report = round_profile.main(args)
    rows = {r["schedule"]: r for r in report["rows"]}
    assert set(rows) == {"sequential", "synchronous", "synchronous_unbatched"}
    for r in rows.values():
        assert r["clients"] == 4 and r["rounds_measured"] == 1 and r["s_round"] > 0
        assert math.isclose(r["s_round"], sum(r[f"s_{p}"] for p in PARTS))
        assert r["s_client"] > 0 and r["s_server"] > 0 and r["s_evaluation"] > 0 and r["s_checkpoint"] > 0
        assert math.isclose(r["steps_share"] + r["overhead_share"], 1.0)
    (batching,) = report["batching"]
    assert batching["round_ratio"] == batching["round_s_batched"] / batching["round_s_unbatched"]
    assert all(math.isfinite(r["val_loss"]) for r in rows.values())  # (the demo has dropout: batched draws differ)
    text = (tmp_path / "round_profile.json").read_text()
    assert str(tmp_path) not in text and str(ROOT) not in text
    assert json.loads(text)["rows"] == report["rows"]
    assert (tmp_path / "round_profile.csv").exists() and (tmp_path / "round_profile.png").exists()
    again = round_profile.main(args)  # every cell cached: nothing runs again
    assert [r["s_round"] for r in again["rows"]] == [r["s_round"] for r in report["rows"]]
