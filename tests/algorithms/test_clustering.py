"""Server-side clustering of fingerprints: k-means in cosine geometry, K by silhouette, scores, pictures."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from atlas_pl.algorithms.clustering import (
    ClusterResult,
    chance_silhouette,
    cluster_clients,
    clustering_scores,
    embed_2d,
    pick_k,
)
from atlas_pl.algorithms.fingerprint import project_gradients
from atlas_pl.algorithms.plots import plot_fingerprints


def _blobs(seed: int, num_groups: int = 3, per_group: int = 4, dim: int = 64, noise: float = 0.05):
    """Unit rows around ``num_groups`` random directions, and their true group per row."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_groups, dim))
    true = np.repeat(np.arange(num_groups), per_group)
    rows = centers[true] / np.linalg.norm(centers[true], axis=1, keepdims=True)
    rows = rows + noise * rng.standard_normal(rows.shape)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True), true.tolist()


@pytest.mark.parametrize("seed", range(5))
def test_fixed_k_recovers_well_separated_blobs(seed):
    rows, true = _blobs(seed)

    result = cluster_clients(rows, num_clusters=3, seed=seed)

    assert clustering_scores(result.labels, true)["ari"] == 1.0
    assert result.silhouette is not None and result.silhouette > 0.5


@pytest.mark.parametrize("seed", range(5))
def test_auto_k_recovers_well_separated_blobs(seed):
    rows, true = _blobs(seed, num_groups=4, per_group=3)

    result = cluster_clients(rows, num_clusters="auto", seed=seed)

    assert result.num_clusters == 4
    assert clustering_scores(result.labels, true)["ari"] == 1.0
    assert set(result.silhouette_by_k) == set(range(2, 11))


@pytest.mark.parametrize("seed", range(5))
def test_auto_picks_one_cluster_for_isotropic_noise(seed):
    rows = np.random.default_rng(seed).standard_normal((20, 64))

    result = cluster_clients(rows, num_clusters="auto", seed=seed)

    assert result.num_clusters == 1 and set(result.labels) == {0}
    assert result.silhouette is None
    assert max(result.silhouette_by_k.values()) < 0.25


def test_auto_with_fewer_than_three_clients_gives_one_cluster():
    rows, _ = _blobs(0, num_groups=2, per_group=1)

    result = cluster_clients(rows, num_clusters="auto")

    assert result.num_clusters == 1 and result.labels == [0, 0] and result.silhouette_by_k == {}


def test_auto_threshold_is_an_argument():
    rows = np.random.default_rng(0).standard_normal((20, 64))

    result = cluster_clients(rows, num_clusters="auto", min_silhouette=-1.0)

    assert result.num_clusters >= 2


def test_non_finite_fingerprint_is_left_out_with_a_warning_naming_the_client():
    rows, true = _blobs(0)
    rows[2, 5] = np.nan

    with pytest.warns(UserWarning, match="client 2 "):
        result = cluster_clients(rows, num_clusters=3)

    assert result.left_out == [2] and result.labels[2] == -1
    assert clustering_scores(result.labels, true)["ari"] == 1.0


def test_zero_fingerprint_is_left_out_with_a_warning():
    rows, _ = _blobs(0)
    rows[0] = 0.0

    with pytest.warns(UserWarning, match="client 0 .*all-zero"):
        result = cluster_clients(rows, num_clusters=2)

    assert result.left_out == [0] and result.labels[0] == -1


def test_num_clusters_above_valid_clients_raises_naming_value_and_fix():
    rows, _ = _blobs(0, num_groups=2, per_group=2)
    rows[0, 0] = np.inf

    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"`num_clusters`=4 .* 3 clients .*\[1, 3\]"):
        cluster_clients(rows, num_clusters=4)


@pytest.mark.parametrize("bad", [0, -2, 2.5, "three"])
def test_invalid_num_clusters_raises(bad):
    rows, _ = _blobs(0)

    with pytest.raises(ValueError, match="`num_clusters`"):
        cluster_clients(rows, num_clusters=bad)


def test_invalid_shape_raises():
    with pytest.raises(ValueError, match="`fingerprints`"):
        cluster_clients(np.ones(5), num_clusters=1)


def test_clustering_is_deterministic_under_the_seed_and_numbers_clusters_by_first_appearance():
    rows = np.random.default_rng(1).standard_normal((15, 64))

    first, second = cluster_clients(rows, num_clusters=3, seed=7), cluster_clients(rows, num_clusters=3, seed=7)

    assert first.labels == second.labels and first.labels[0] == 0
    np.testing.assert_array_equal(first.centers, second.centers)


def test_centers_are_unit_vectors_one_per_cluster():
    rows, _ = _blobs(0)

    result = cluster_clients(torch.from_numpy(rows).float(), num_clusters=3)

    assert isinstance(result, ClusterResult) and result.centers.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(result.centers, axis=1), 1.0)


def test_fingerprints_of_task_gradients_cluster_by_task():
    gen = torch.Generator().manual_seed(0)
    tasks = torch.randn(3, 8_000, generator=gen)
    true = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    grads = [tasks[t] + 0.5 * torch.randn(8_000, generator=gen) for t in true]

    fingerprints = torch.stack([project_gradients([g], dim=64, seed=0) for g in grads])
    result = cluster_clients(fingerprints, num_clusters="auto")

    assert clustering_scores(result.labels, true) == {"ari": 1.0, "nmi": pytest.approx(1.0)}


def test_cluster_result_round_trips_through_plain_json():
    rows, _ = _blobs(0)
    rows[3] = np.nan
    with pytest.warns(UserWarning):
        result = cluster_clients(rows, num_clusters="auto")

    restored = ClusterResult.from_dict(json.loads(json.dumps(result.to_dict())))

    assert restored.labels == result.labels and restored.silhouette_by_k == result.silhouette_by_k
    assert restored.left_out == [3] and restored.silhouette == result.silhouette
    assert restored.min_silhouette == result.min_silhouette == 0.25
    np.testing.assert_array_equal(restored.centers, result.centers)


# --- the chance bar -----------------------------------------------------------------------------------------------


def _noisy_groups(num_groups: int, per_group: int, noise: float, seed: int = 1) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_groups, 64))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    rows = np.repeat(centers, per_group, axis=0) + noise * rng.standard_normal((num_groups * per_group, 64))
    return rows, [g for g in range(num_groups) for _ in range(per_group)]


def _one_task_noise(seed: int, num_clients: int = 12) -> np.ndarray:
    """One task's fingerprints: a common direction plus noise concentrated in 3 of 64 directions."""
    scales = np.r_[np.full(3, 1.0), np.full(61, 0.1)]
    return 2 * np.eye(64)[0] + np.random.default_rng(seed).standard_normal((num_clients, 64)) * scales


def test_chance_bar_keeps_one_cluster_for_anisotropic_noise_that_clears_the_fixed_bar():
    """Noise in few directions scores silhouettes above 0.25; the Gaussian null shaped like the data does too."""
    fixed = [cluster_clients(_one_task_noise(100 + s), "auto").num_clusters for s in range(10)]
    chance = [
        cluster_clients(_one_task_noise(100 + s), "auto", min_silhouette="chance").num_clusters for s in range(10)
    ]

    assert all(k > 1 for k in fixed)  # 0.25 splits one task's noise every time
    assert sum(k > 1 for k in chance) <= 2  # the 95th percentile of the null: about 1 in 20 by design


def test_chance_bar_finds_groups_of_many_clients_below_the_fixed_bar():
    """36 clients of 6 groups whose best silhouette is under 0.25 but far above one Gaussian's."""
    rows, true = _noisy_groups(num_groups=6, per_group=6, noise=0.19)

    fixed = cluster_clients(rows, "auto", min_silhouette=0.25)
    chance = cluster_clients(rows, "auto", min_silhouette="chance")

    assert chance.min_silhouette < max(chance.silhouette_by_k.values()) < 0.25
    assert fixed.num_clusters == 1
    assert chance.num_clusters == 6 and clustering_scores(chance.labels, true)["ari"] > 0.9
    assert chance.min_silhouette == pytest.approx(chance_silhouette(rows))


def test_chance_bar_has_little_power_with_two_clients_per_group():
    """The documented limit: 12 clients in 6 pairs look like one Gaussian's draws unless the pairs are tight."""
    tight, _ = _noisy_groups(num_groups=6, per_group=2, noise=0.1)
    loose, _ = _noisy_groups(num_groups=6, per_group=2, noise=0.15)

    assert cluster_clients(tight, "auto", min_silhouette="chance").num_clusters == 6
    loose_result = cluster_clients(loose, "auto", min_silhouette="chance")
    assert loose_result.num_clusters == 1 and max(loose_result.silhouette_by_k.values()) > 0.25


def test_chance_silhouette_with_fewer_than_three_clients_is_infinite():
    assert chance_silhouette(np.eye(64)[:2]) == float("inf")


@pytest.mark.parametrize("bad", [1.5, -2, "auto", None, True])
def test_invalid_min_silhouette_raises_naming_the_choices(bad):
    with pytest.raises(ValueError, match="`min_silhouette` must be a number in \\[-1, 1\\] or 'chance'"):
        cluster_clients(np.eye(4), "auto", min_silhouette=bad)


# --- scores -------------------------------------------------------------------------------------------------------


def test_clustering_scores_are_one_for_a_relabelled_partition():
    scores = clustering_scores([1, 1, 0, 0, 2], [0, 0, 1, 1, 2])

    assert scores == {"ari": 1.0, "nmi": pytest.approx(1.0)}


def test_clustering_scores_match_hand_computed_values():
    # Every cell of the 2×2 contingency table holds 1: index 0, expected (2·2)/C(4,2) = 2/3, max 2 → ARI = -1/2.
    scores = clustering_scores([0, 0, 1, 1], [0, 1, 0, 1])

    assert scores["ari"] == pytest.approx(-0.5)
    assert scores["nmi"] == pytest.approx(0.0)


def test_clustering_scores_ignore_left_out_clients():
    assert clustering_scores([0, 0, 1, -1], [0, 0, 1, 0])["ari"] == 1.0


def test_clustering_scores_with_different_lengths_raise():
    with pytest.raises(ValueError, match="`true_labels`"):
        clustering_scores([0, 1], [0, 1, 1])


# --- pictures -----------------------------------------------------------------------------------------------------


def test_embed_2d_gives_two_coordinates_per_client():
    rows, _ = _blobs(0)

    assert embed_2d(rows).shape == (12, 2)


@pytest.mark.parametrize(("num_rows", "expected"), [(1, [[0.0, 0.0]]), (2, None)])
def test_embed_2d_handles_fewer_than_three_clients(num_rows, expected):
    rows, _ = _blobs(0, num_groups=num_rows, per_group=1)

    points = embed_2d(rows)

    assert points.shape == (num_rows, 2) and np.all(np.isfinite(points))
    if expected is not None:
        np.testing.assert_array_equal(points, expected)


def test_embed_2d_gives_nan_coordinates_to_a_non_finite_row():
    rows, _ = _blobs(0)
    rows[4, 0] = np.nan

    points = embed_2d(rows)

    assert np.all(np.isnan(points[4])) and np.all(np.isfinite(np.delete(points, 4, axis=0)))


def test_plot_fingerprints_returns_a_figure_that_saves():
    rows, true = _blobs(0)
    rows[1, 0] = np.nan
    with pytest.warns(UserWarning):
        labels = cluster_clients(rows, num_clusters=3).labels

    fig = plot_fingerprints(embed_2d(rows), labels, true_labels=true, names=[f"client {i}" for i in range(12)])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")

    assert isinstance(fig, Figure) and buffer.tell() > 0


def test_plot_fingerprints_with_mismatched_points_raises():
    with pytest.raises(ValueError, match="`points`"):
        plot_fingerprints(np.zeros((3, 2)), [0, 1])


def _nested_groups(offset: float = 0.5, seed: int = 1) -> tuple[np.ndarray, list[int]]:
    """Four groups of 3 in two opposite pairs (``±e0``, each pair split along its own axis): one split dominates."""
    rng, e = np.random.default_rng(seed), np.eye(16)
    centers = [e[0] + offset * e[1], e[0] - offset * e[1], -e[0] + offset * e[2], -e[0] - offset * e[2]]
    points = np.concatenate([c + 0.1 * rng.standard_normal((3, 16)) for c in centers])
    return points, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_k_tolerance_splits_a_dominant_pair_into_its_groups_where_the_best_silhouette_merges_them() -> None:
    x, truth = _nested_groups()
    best = cluster_clients(x, "auto", seed=0)
    assert best.num_clusters == 2 and clustering_scores(best.labels, truth)["ari"] < 0.5
    tolerant = cluster_clients(x, "auto", seed=0, k_tolerance=0.1)
    assert tolerant.num_clusters == 4 and clustering_scores(tolerant.labels, truth)["ari"] == 1.0
    scores = tolerant.silhouette_by_k  # the rule: the largest K within 10 % of the best silhouette
    assert tolerant.num_clusters == max(k for k, v in scores.items() if v >= 0.9 * max(scores.values()))
    assert scores[tolerant.num_clusters] < scores[2]


def test_k_tolerance_never_goes_below_min_silhouette_nor_invents_structure() -> None:
    noise = np.random.default_rng(0).standard_normal((12, 64))
    assert cluster_clients(noise, "auto", seed=0, k_tolerance=0.5).num_clusters == 1
    x, _ = _nested_groups()
    loose = cluster_clients(x, "auto", seed=0, k_tolerance=0.9, min_silhouette=0.6)
    assert loose.silhouette_by_k[loose.num_clusters] >= 0.6
    with pytest.raises(ValueError, match="`k_tolerance` must be in"):
        cluster_clients(x, "auto", k_tolerance=1.0)


def test_pick_k_rereads_the_choice_from_the_silhouettes_of_a_result() -> None:
    x, _ = _nested_groups()
    for tolerance in (0.0, 0.1):
        result = cluster_clients(x, "auto", seed=0, k_tolerance=tolerance)
        assert pick_k(result.silhouette_by_k, 0.25, tolerance) == result.num_clusters
    assert pick_k({2: 0.20, 5: 0.22}, min_silhouette=0.25) == 1  # below the bar: one cluster
    assert pick_k({2: 0.20, 5: 0.22}, min_silhouette=0.15) == 5
    assert pick_k({}, 0.0) == 1
