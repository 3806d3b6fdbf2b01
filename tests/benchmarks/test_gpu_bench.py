"""benchmarks/gpu.py end to end: ``--tiny`` on the CPU (CI), the full run on a CUDA device (``-m gpu``)."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu  # noqa: E402

DTYPES = ("float32", "bfloat16")


def check_outputs(out: Path, report: dict) -> None:
    """gpu.{json,csv,png} written, the JSON is the report, and nothing written names a path of this machine."""
    text = (out / "gpu.json").read_text()
    assert json.loads(text)["step"] == json.loads(json.dumps(report["step"]))
    for path in (str(out), str(ROOT), str(Path.home())):
        assert path not in text
    rows = list(csv.DictReader((out / "gpu.csv").open()))
    assert [r["section"] for r in rows] == ["step"] * 4 + ["round"] + ["merge"] * 4
    assert (out / "gpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_run_on_cpu_measures_steps_a_round_and_merges(tmp_path: Path) -> None:
    report = gpu.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)])
    assert report["errors"] == {} and report["device"]["device"] == "cpu"

    steps = {(r["dtype"], r["variant"]): r for r in report["step"]}
    assert set(steps) == {(dt, v) for dt in DTYPES for v in gpu.VARIANTS}
    for r in steps.values():
        assert r["median_s"] > 0 and r["peak_bytes"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq_len"] / r["median_s"])
        assert r["trainable_bytes"] == steps[(r["dtype"], "mono_answer")]["trainable_bytes"]  # the same LoRA modules
    for dt, tol in zip(DTYPES, (1e-4, 2e-2)):
        split, mono = steps[(dt, "split")], steps[(dt, "mono_answer")]
        assert split["time_ratio_split_over_mono"] == pytest.approx(split["median_s"] / mono["median_s"])
        # same seeded weights, same batch, B = 0: the split step computes the monolith's answer-only loss
        assert split["first_loss"] == pytest.approx(mono["first_loss"], abs=tol)
    assert steps[("bfloat16", "split")]["weight_bytes"] * 2 == pytest.approx(
        steps[("float32", "split")]["weight_bytes"], rel=0.01
    )

    rd = report["round"]
    assert rd["n_clients"] == 4 and len(rd["rounds"]) == 1 + 2  # warm-up + 2 timed rounds
    assert rd["median_s"] >= rd["median_steps_s"] > 0 and rd["median_aggregate_s"] > 0 and rd["tokens_per_s"] > 0
    assert rd["bytes_up_per_round"] > 0 and rd["bytes_down_per_round"] > 0
    losses = [r["mean_loss"] for r in rd["rounds"]]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]  # the clients train on their batch
    sync = rd["server_batching"]  # synchronous rounds: 2 clients per server batch, batched vs one at a time
    assert sync["clients_per_server_batch"] == 2 and sync["steps_ratio"] > 0
    assert len(sync["batched_rounds"]) == len(sync["unbatched_rounds"]) == 1 + 2
    assert all(math.isfinite(r["mean_loss"]) for r in sync["batched_rounds"] + sync["unbatched_rounds"])

    merges = {(r["d"], r["variant"]): r for r in report["merge"]}
    assert set(merges) == {(d, m) for d in (64, 128) for m in gpu.MERGE_METHODS}
    for r in merges.values():
        assert r["median_s"] > 0 and r["peak_bytes"] > 0 and "skipped" not in r
        assert r["merged_update_rel_error"] < 1e-4  # exact: float32 rounding against the float64 sum
    assert merges[(128, "factored")]["speedup_dense_over_factored"] > 0
    check_outputs(tmp_path, report)


def test_cuda_asked_for_without_cuda_exits_with_a_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        gpu.main(["--device", "cuda", "--tiny", "--out", str(tmp_path)])
    assert exc.value.code != 0 and "CUDA is not available" in str(exc.value.code)
    assert not list(tmp_path.iterdir())


def test_a_dense_budget_of_zero_skips_the_dense_svd_and_says_why(tmp_path: Path) -> None:
    s = gpu.make_settings(gpu.parse_args(["--tiny", "--dense-budget", "0", "--repeats", "1"]), "cpu")
    rows = gpu.measure_merge(s)
    assert [r["variant"] for r in rows] == ["factored", "dense_svd"] * 2
    for r in rows:
        assert ("skipped" in r) == (r["variant"] == "dense_svd")
    assert "exceeds the dense budget" in rows[1]["skipped"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_full_run_on_one_cuda_device_fits_in_five_minutes(tmp_path: Path) -> None:
    report = gpu.main(["--device", "cuda", "--out", str(tmp_path)])
    assert report["errors"] == {} and report["device"]["gpu"]
    assert {(r["dtype"], r["variant"]) for r in report["step"]} == {(dt, v) for dt in DTYPES for v in gpu.VARIANTS}
    assert all(r["model"] == "qwen2-0.5b-shape" and r["tokens_per_s"] > 0 for r in report["step"])
    assert report["round"]["n_clients"] == 64
    factored = {r["d"]: r for r in report["merge"] if r["variant"] == "factored"}
    assert set(factored) == {4096, 8192} and all(r["merged_update_rel_error"] < 1e-4 for r in factored.values())
    assert report["wall_s"] < 300
    check_outputs(tmp_path, report)
