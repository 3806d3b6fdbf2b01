"""benchmarks/conflict_clustering.py without the model: pair errors by hand, and --rescore of stored fingerprints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import conflict_clustering  # noqa: E402


def test_pair_errors_count_merged_and_split_pairs_by_hand() -> None:
    # groups 0 0 1 1; clusters put clients 1 and 2 together: pairs (1,2) merged; (0,1) and (2,3) split
    assert conflict_clustering.pair_errors([0, 1, 1, 2], [0, 0, 1, 1]) == {"merged": 1, "split": 2}
    assert conflict_clustering.pair_errors([5, 5, 7, 7], [0, 0, 1, 1]) == {"merged": 0, "split": 0}


def test_rescore_reclusters_stored_fingerprints_under_every_bar(tmp_path) -> None:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((3, 64))
    groups = np.repeat(np.arange(3), 4)
    tight = centers[groups] + 0.05 * rng.standard_normal((12, 64))  # three clear groups
    noise = rng.standard_normal((12, 64))
    np.savez(tmp_path / "minilm_clustering_fingerprints.npz", grad_B_seed0=tight, contrast_seed0=noise,
             groups_seed0=groups)  # fmt: skip

    report = conflict_clustering.main(["--workload", "minilm", "--rescore", "--seeds", "0", "--out", str(tmp_path)])

    assert json.loads((tmp_path / "minilm_clustering.json").read_text())["summary"] == json.loads(
        json.dumps(report["summary"])
    )
    by = {(s["signal"], s["min_silhouette"], s["k_tolerance"]): s for s in report["summary"]}
    assert by["grad_B", "chance", 0.0]["K"] == [3] and by["grad_B", "chance", 0.0]["ari_group"] == [1.0]
    assert by["grad_B", 0.25, 0.0]["K"] == [3]
    assert by["contrast", 0.25, 0.0]["K"] == [1]  # isotropic noise: under the fixed bar
    assert by["grad_B", "chance", 0.0]["ari_group_at_true_k"] == [1.0]
    assert set(by["grad_B", 0.25, 0.0]["K_at_min_silhouette"]) == {"chance", "uniform", 0.25, 0.2, 0.15}
    assert (tmp_path / "minilm_clustering.csv").read_text().startswith("seed,signal,min_silhouette,bar,")


def test_rescore_of_the_mixed_workload_scores_task_and_kind_too(tmp_path) -> None:
    rng = np.random.default_rng(1)
    tasks = np.repeat(np.arange(5), 2)  # 5 tasks, 2 clients each
    kinds = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])  # classification x2, qa, summarization x2
    centers = rng.standard_normal((5, 64))
    by_task = centers[tasks] + 0.05 * rng.standard_normal((10, 64))
    by_kind = rng.standard_normal((3, 64))[kinds] + 0.05 * rng.standard_normal((10, 64))
    np.savez(tmp_path / "smollm2_mixed_clustering_fingerprints.npz", grad_B_seed0=by_task, contrast_seed0=by_kind,
             update_seed0=by_task, groups_seed0=tasks, task_seed0=tasks, kind_seed0=kinds)  # fmt: skip

    report = conflict_clustering.main(["--workload", "smollm2_mixed", "--rescore", "--seeds", "0", "--out",
                                       str(tmp_path)])  # fmt: skip

    by = {(s["signal"], s["min_silhouette"], s["k_tolerance"]): s for s in report["summary"]}
    assert {s for s, _, _ in by} == {"grad_B", "contrast", "update"}
    assert by["grad_B", "chance", 0.0]["ari_task"] == [1.0] and by["grad_B", "chance", 0.0]["ari_kind"][0] < 1.0
    assert by["contrast", "chance", 0.0]["ari_kind"] == [1.0] and by["contrast", "chance", 0.0]["ari_task"][0] < 1.0
    assert by["update", "chance", 0.0]["ari_task_at_true_k"] == [1.0]
