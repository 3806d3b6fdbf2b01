"""benchmarks/privacy_utility.py: the DCS score, the run overlays, and a report from finished runs and cached cells."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import privacy_utility as pu  # noqa: E402


def test_dcs_is_the_method_descriptions_formula() -> None:
    assert pu.dcs(0.0, 0.80, 0.80) == 1.0
    assert pu.dcs(1.0, 0.80, 0.80) == pytest.approx(1 / (1 + 0.5**0.5))  # every token read, no accuracy lost
    assert pu.dcs(0.5, 0.78, 0.80) == pytest.approx(1 / (1 + (0.5 * 0.25 + 0.5 * 0.0004) ** 0.5))
    assert pu.dcs(0.5, 0.85, 0.80) == pu.dcs(0.5, 0.80, 0.80)  # an accuracy gain earns nothing


def test_each_defence_becomes_yaml_options_of_the_run(tmp_path) -> None:
    args = argparse.Namespace(out=tmp_path, tasks=["sst2", "ag_news"], rounds=2, model="minilm")
    clip = {1: 2.5e-5}
    dp = pu.build_run("dp_1", 0, args, clip)
    assert dp["overlay"]["model"]["dp_sgd"] == {"noise_multiplier": 1.0, "clip_norm": 2.5e-5}
    label = pu.build_run("label_dp_1", 1, args, clip)["overlay"]
    assert label["data"]["label_dp_epsilon"] == 1.0 and "label_dp_epsilon" not in label["model"]
    assert label["data"]["num_clients"] == 4 and label["trainer"]["max_epochs"] == 2
    sparse = pu.build_run("u_shaped_sparse_0.01", 0, args, clip)["overlay"]["model"]
    assert sparse == {"cut_layer": 1, "split_shape": "u_shaped", "gradient_sparsity": {"keep": 0.01}}
    assert pu.build_run("cut3_noise_3", 0, args, clip)["overlay"]["model"] == {
        "cut_layer": 3, "activation_noise": {"multiplier": 3.0}}  # fmt: skip
    assert "--seed_everything" in dp["cmd"] and dp["test_cmd"][-1].endswith("checkpoints/last.ckpt")


def _finished_run(out: Path, name: str, seed: int, acc: dict[str, float], epsilon: float | None = None) -> None:
    folder = out / "privacy_runs" / name / f"seed{seed}"
    folder.mkdir(parents=True)
    history = [{"round": 0, **({"privacy/dp_epsilon": epsilon, "privacy/dp_clipped": 0.5} if epsilon else {})}]
    (folder / "results.json").write_text(json.dumps({"history": history}))
    metrics = {f"test_task/{t}/acc": a for t, a in acc.items()}
    (folder / "test_results.json").write_text(json.dumps({"metrics": metrics}))


def test_the_report_scores_finished_runs_with_cached_attack_cells(tmp_path) -> None:
    for seed, shift in ((0, 0.0), (1, 0.02)):
        _finished_run(tmp_path, "none", seed, {"sst2": 0.80 + shift, "ag_news": 0.85 + shift})
        _finished_run(tmp_path, "noise_3", seed, {"sst2": 0.70 + shift, "ag_news": 0.80 + shift})
        _finished_run(tmp_path, "dp_1", seed, {"sst2": 0.79, "ag_news": 0.84}, epsilon=3.0 + seed)
        _finished_run(tmp_path, "label_dp_1", seed, {"sst2": 0.78, "ag_news": 0.80})
    text = [{"model": pu.MODEL, "task": t, "cut": 1, "noise": n, "recall": r, "attack": "relaxed"}
            for t in ("sst2", "ag_news") for n, r in ((0.0, 0.95), (3.0, 0.1))]  # fmt: skip
    text += [{"model": pu.MODEL, "task": t, "cut": 1, "noise": n, "recall": r, "attack": "learned"}
             for t in ("sst2", "ag_news") for n, r in ((0.0, 0.9), (3.0, 0.3))]  # fmt: skip
    labels = [{"model": pu.MODEL, "task": "sst2", "cut": 1, "keep": 1.0, "label_dp_epsilon": 1.0, "norm_auc": 0.6,
               "direction_auc": 0.7, "sent_label_auc": 0.75}]  # fmt: skip
    settings = {"examples": 4, "proxy": "mr", "calibration_steps": 8, "clip": {"1": 1e-5}}
    (tmp_path / "privacy_utility.json").write_text(json.dumps({"settings": settings, "text_attacks": text,
                                                                "label_attacks": labels}))  # fmt: skip
    report = pu.main(["--report-only", "--defences", "none", "noise_3", "dp_1", "label_dp_1", "--seeds", "0", "1",
                      "--out", str(tmp_path)])  # fmt: skip
    rows = {r["defence"]: r for r in report["rows"]}
    assert rows["none"]["mp_sst2"] == pytest.approx(0.81) and rows["none"]["mp_drop_sst2"] == pytest.approx(0.0)
    assert rows["noise_3"]["mp_drop_ag_news"] == pytest.approx(0.05)
    assert rows["noise_3"]["ap_text_sst2"] == 0.3  # the learned inverter is the stronger attack there
    assert rows["noise_3"]["dcs_text_sst2"] == pytest.approx(pu.dcs(0.3, 0.71, 0.81))
    assert rows["dp_1"]["ap_text_sst2"] == 0.95 and rows["dp_1"]["dp_epsilon"] == 4.0  # the worst seed's ε
    assert rows["none"]["ap_label"] == 1.0  # the two-part server receives the labels
    assert rows["label_dp_1"]["ap_label"] == pytest.approx(0.5)  # 2 · 0.75 − 1: the noisy labels it receives
    table = (tmp_path / "privacy_utility.csv").read_text()
    assert table.count("\n") == 5 and (tmp_path / "privacy_utility.png").exists()
    again = json.loads((tmp_path / "privacy_utility.json").read_text())
    assert again["text_attacks"] == text and again["settings"]["clip"] == {"1": 1e-5}
