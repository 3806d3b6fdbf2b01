"""Server-side clustering of client fingerprints (pure numpy / scikit-learn).

Fingerprints are unit vectors, so k-means in Euclidean space is k-means in cosine geometry
(``‖x − y‖² = 2 − 2 cos(x, y)``); rows are L2-normalized again here, defensively, and centers are returned on the
sphere. ``K`` is given, or chosen by the cosine silhouette over ``k_range``.

Rule for "no structure" (``num_clusters="auto"``): silhouette cannot score ``K = 1`` itself, so the best silhouette
over ``k_range`` is tested against ``min_silhouette``; below it, or with fewer than 3 valid clients, the answer is one
cluster. The bar is a number (0.25: Kaufman & Rousseeuw's bound for "no substantial structure"), or ``"chance"``: the
95th percentile of the best silhouette that the same procedure reaches on draws from *one* Gaussian with the
fingerprints' own mean and covariance (``chance_silhouette``; the null of SigClust, Liu et al. 2008, with the
silhouette as the statistic): what one task's noise alone, shaped like these fingerprints, would score.

Measured (``benchmarks/conflict_clustering.py --workload minilm_one_task``: 12 all-MiniLM clients, all on sst2,
seeds 0-4): cross-entropy (``grad_B``) fingerprints of one task reach a best silhouette of 0.27-0.56 and the 0.25 bar
splits the task in 5 of 5 seeds; contrast fingerprints reach 0.16-0.25 (0.249 in one seed); the Gaussian null's bar
is 0.41-0.62 there and keeps one cluster in 10 of 10. A null of directions uniform on the sphere (0.146 for 12
clients at ``d = 64``) would split one task in every seed: fingerprint noise is far from isotropic. The price of
``"chance"`` is power: with 2 clients per task (the 12-client ``minilm`` and ``minilm_conflict`` workloads) its bar
(0.42-0.54) is above every best silhouette of the real 6-task fingerprints (0.23-0.46), so it answers one cluster in
20 of 20 seeds × signals, where 0.25 finds the groups. Use it with several clients per task; ATLAS's config keeps
0.25 with the contrast signal.

Clients whose fingerprint is non-finite or zero are reported by a warning, left out (label ``-1``) and listed in
``ClusterResult.left_out``; they are never silently clustered.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from threadpoolctl import threadpool_limits

LEFT_OUT = -1
"""Label of a client that was not clustered (non-finite or zero fingerprint)."""


@dataclass
class ClusterResult:
    """Outcome of ``cluster_clients``.

    Attributes:
        labels: Cluster id per client (``0..num_clusters-1``, numbered by first appearance), ``-1`` if left out.
        num_clusters: ``K`` used.
        silhouette: Cosine silhouette of the result; None when ``K = 1`` or ``K`` equals the number of clients.
        silhouette_by_k: Silhouette of each ``k`` tried by ``"auto"`` (empty for a fixed ``K``).
        left_out: Indices of clients with non-finite or zero fingerprints.
        centers: ``[num_clusters × d]`` unit-norm cluster centers.
        min_silhouette: The bar ``"auto"`` tested the best silhouette against (the number ``"chance"`` resolved
            to); None for a fixed ``K``.
    """

    labels: list[int]
    num_clusters: int
    silhouette: float | None
    silhouette_by_k: dict[int, float] = field(default_factory=dict)
    left_out: list[int] = field(default_factory=list)
    centers: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    min_silhouette: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serializable values (for ``state_dict`` and logs); ``from_dict`` inverts it."""
        return {
            "labels": list(self.labels),
            "num_clusters": self.num_clusters,
            "silhouette": self.silhouette,
            "silhouette_by_k": {str(k): v for k, v in self.silhouette_by_k.items()},
            "left_out": list(self.left_out),
            "centers": self.centers.tolist(),
            "min_silhouette": self.min_silhouette,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> ClusterResult:
        """Rebuild from ``to_dict`` output; keys missing from older states take their defaults."""
        return cls(
            labels=[int(v) for v in state["labels"]],
            num_clusters=int(state["num_clusters"]),
            silhouette=state.get("silhouette"),
            silhouette_by_k={int(k): float(v) for k, v in state.get("silhouette_by_k", {}).items()},
            left_out=[int(v) for v in state.get("left_out", [])],
            centers=np.asarray(state.get("centers", np.zeros((0, 0))), dtype=np.float64),
            min_silhouette=state.get("min_silhouette"),
        )


def cluster_clients(
    fingerprints: np.ndarray | torch.Tensor,
    num_clusters: int | Literal["auto"] = "auto",
    seed: int = 0,
    k_range: tuple[int, int] = (2, 10),
    min_silhouette: float | Literal["chance"] = 0.25,
    n_init: int = 10,
    k_tolerance: float = 0.0,
) -> ClusterResult:
    """K-means (cosine geometry) of the clients' fingerprints, ``K`` given or chosen by silhouette.

    Args:
        fingerprints: ``[num_clients × d]``, one row per client.
        num_clusters: ``K`` in ``[1, number of valid clients]``, or ``"auto"``.
        seed: ``random_state`` of k-means; the result is deterministic given the seed.
        k_range: Inclusive ``(k_min, k_max)`` tried by ``"auto"``, capped at ``valid clients − 1``; ``k_min >= 2``.
        min_silhouette: ``"auto"`` returns ``K = 1`` when the best silhouette is below this; ``"chance"``: below
            what one Gaussian with the fingerprints' mean and covariance reaches (``chance_silhouette``).
        n_init: k-means restarts (at least 10 recommended).
        k_tolerance: ``"auto"`` takes the largest ``K`` whose silhouette is within this fraction of the best one
            (and at least ``min_silhouette``); 0 takes the best. Splitting a task costs some sharing, merging two
            tasks that disagree costs far more, and when one split dominates (a task and its label-swapped copy
            have opposite fingerprints) the silhouette of the coarse ``K`` and of the true one are close.

    Returns:
        A ``ClusterResult``.

    Raises:
        ValueError: Bad shape, no valid client, ``num_clusters`` out of range, or an invalid ``k_range``/``n_init``/
            ``min_silhouette``.
    """
    x = _as_matrix(fingerprints)
    valid, left_out = _valid_rows(x)
    _check_cluster_args(num_clusters, len(valid), k_range, n_init)
    if not 0.0 <= k_tolerance < 1.0:
        raise ValueError(f"`k_tolerance` must be in [0, 1), got {k_tolerance}; 0 takes the best-silhouette K")
    check_min_silhouette(min_silhouette)
    points = x[valid] / np.linalg.norm(x[valid], axis=1, keepdims=True)
    scores: dict[int, float] = {}
    bar: float | None = None
    # A few hundred points: one OpenMP thread is fastest, and does not fight torch's thread pool for the cores.
    with threadpool_limits(limits=1, user_api="openmp"):
        if num_clusters == "auto":
            bar = (
                chance_silhouette(points, (int(k_range[0]), int(k_range[1])), n_init=n_init, seed=seed)
                if min_silhouette == "chance"
                else float(min_silhouette)
            )
            k = _choose_k(points, seed, k_range, bar, n_init, scores, k_tolerance)
        else:
            k = int(num_clusters)
        sub_labels, centers = _kmeans(points, k, seed, n_init)
    labels = np.full(len(x), LEFT_OUT, dtype=int)
    labels[valid] = sub_labels
    silhouette = scores.get(k, _silhouette(points, sub_labels))
    return ClusterResult([int(v) for v in labels], len(centers), silhouette, scores, left_out, centers, bar)


def check_min_silhouette(min_silhouette: Any) -> None:
    """Raise ``ValueError`` unless ``min_silhouette`` is a number in ``[-1, 1]`` or ``"chance"``."""
    if min_silhouette == "chance":
        return
    if (
        isinstance(min_silhouette, bool)
        or not isinstance(min_silhouette, (int, float))
        or not -1 <= min_silhouette <= 1
    ):
        raise ValueError(
            f"`min_silhouette` must be a number in [-1, 1] or 'chance', got {min_silhouette!r}; 'chance' tests the "
            "best silhouette against what one Gaussian shaped like the fingerprints reaches (see chance_silhouette)"
        )


def chance_silhouette(
    points: np.ndarray,
    k_range: tuple[int, int] = (2, 10),
    quantile: float = 0.95,
    draws: int = 40,
    n_init: int = 10,
    seed: int = 0,
) -> float:
    """The best silhouette over ``k_range`` reached by chance on structureless data shaped like ``points``.

    ``draws`` samples of ``len(points)`` rows from one Gaussian with the mean and covariance of the unit-normalized
    ``points`` (rank ``n − 1``: the sample's own principal axes and spreads), normalized to the sphere again and
    clustered as ``cluster_clients`` clusters (``k_range`` capped at ``n − 1``, cosine silhouette); returns the
    ``quantile`` of the per-draw best. Below 3 rows nothing can be scored and the bar is ``inf`` (one cluster).
    Deterministic given ``seed``; about 3 s for 12 clients, 4 s for 36 (``d = 64``).
    """
    x = _as_matrix(points)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    if n < 3:
        return float("inf")
    mean = x.mean(axis=0)
    _, spread, axes = np.linalg.svd(x - mean, full_matrices=False)
    rng = np.random.default_rng(seed)
    best = []
    with threadpool_limits(limits=1, user_api="openmp"):
        for _ in range(draws):
            sample = mean + (rng.standard_normal((n, len(spread))) * (spread / np.sqrt(n - 1))) @ axes
            sample /= np.maximum(np.linalg.norm(sample, axis=1, keepdims=True), 1e-12)
            scores: dict[int, float] = {}
            _choose_k(sample, seed, (int(k_range[0]), int(k_range[1])), -1.0, n_init, scores)
            if scores:
                best.append(max(scores.values()))
    return float(np.quantile(best, quantile)) if best else float("inf")


def clustering_scores(labels: Sequence[int], true_labels: Sequence[int]) -> dict[str, float]:
    """Adjusted Rand index and normalized mutual information against the true groups, left-out (-1) clients ignored.

    Raises:
        ValueError: Lengths differ, or every client is left out.
    """
    if len(labels) != len(true_labels):
        raise ValueError(f"`labels` has {len(labels)} entries but `true_labels` has {len(true_labels)}; pass one each")
    kept = [i for i, v in enumerate(labels) if v != LEFT_OUT]
    if not kept:
        raise ValueError("every client in `labels` is left out (-1): nothing to score")
    pred, true = [labels[i] for i in kept], [true_labels[i] for i in kept]
    return {"ari": float(adjusted_rand_score(true, pred)), "nmi": float(normalized_mutual_info_score(true, pred))}


def embed_2d(fingerprints: np.ndarray | torch.Tensor) -> np.ndarray:
    """2-D PCA coordinates ``[n × 2]`` of the unit-normalized fingerprints, for a picture.

    Non-finite or zero rows get NaN coordinates; fewer than two valid rows (or one feature) give zero coordinates
    where PCA has no direction.
    """
    x = _as_matrix(fingerprints)
    out = np.full((len(x), 2), np.nan)
    valid = [i for i in range(len(x)) if np.all(np.isfinite(x[i])) and np.linalg.norm(x[i]) > 0]
    if not valid:
        return out
    points = x[valid] / np.linalg.norm(x[valid], axis=1, keepdims=True)
    out[valid] = 0.0
    n_comp = min(2, len(valid) - 1, x.shape[1])
    if n_comp >= 1:
        out[np.ix_(valid, range(n_comp))] = PCA(n_components=n_comp).fit_transform(points)
    return out


def _as_matrix(fingerprints: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(fingerprints, torch.Tensor):
        fingerprints = fingerprints.detach().cpu().double().numpy()
    x = np.asarray(fingerprints, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"`fingerprints` must be [num_clients × dim] with both >= 1, got shape {x.shape}")
    return x


def _valid_rows(x: np.ndarray) -> tuple[list[int], list[int]]:
    valid, left_out = [], []
    for i, row in enumerate(x):
        if not np.all(np.isfinite(row)):
            warnings.warn(f"client {i} has a non-finite fingerprint; left out of clustering (label -1)", stacklevel=3)
            left_out.append(i)
        elif np.linalg.norm(row) == 0:
            warnings.warn(f"client {i} has an all-zero fingerprint; left out of clustering (label -1)", stacklevel=3)
            left_out.append(i)
        else:
            valid.append(i)
    if not valid:
        raise ValueError(f"no client has a finite, non-zero fingerprint (all {len(x)} left out); check the gradients")
    return valid, left_out


def _check_cluster_args(num_clusters: int | str, num_valid: int, k_range: tuple[int, int], n_init: int) -> None:
    if num_clusters != "auto":
        if isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)) or num_clusters < 1:
            raise ValueError(f"`num_clusters` must be 'auto' or an int >= 1, got {num_clusters!r}")
        if num_clusters > num_valid:
            raise ValueError(
                f"`num_clusters`={num_clusters} exceeds the {num_valid} clients with valid fingerprints; "
                f"pass an int in [1, {num_valid}] or 'auto'"
            )
    lo, hi = k_range
    if lo < 2 or hi < lo:
        raise ValueError(f"`k_range` must be (k_min, k_max) with 2 <= k_min <= k_max, got {k_range!r}")
    if n_init < 1:
        raise ValueError(f"`n_init` must be >= 1, got {n_init!r}; 10 is a sound default")


def _choose_k(
    points: np.ndarray,
    seed: int,
    k_range: tuple[int, int],
    min_silhouette: float,
    n_init: int,
    scores: dict,
    tolerance: float = 0.0,
) -> int:
    """Best-silhouette ``k`` in ``k_range`` (filling ``scores``), or 1 when no ``k`` reaches ``min_silhouette``.

    With ``tolerance``, the largest ``k`` whose silhouette is within that fraction of the best.
    """
    hi = min(k_range[1], len(points) - 1)
    for k in range(k_range[0], hi + 1):
        score = _silhouette(points, _kmeans(points, k, seed, n_init)[0])
        if score is not None:
            scores[k] = score
    return pick_k(scores, min_silhouette, tolerance)


def pick_k(scores: dict[int, float], min_silhouette: float = 0.25, k_tolerance: float = 0.0) -> int:
    """``K`` from the silhouette of each ``k`` tried (``ClusterResult.silhouette_by_k``).

    The best (ties: the smaller ``k``), or with ``k_tolerance`` the largest ``k`` within that fraction of the best;
    1 when none reaches ``min_silhouette`` (or nothing was scored).
    """
    if not scores:
        return 1
    best = max(scores, key=lambda k: (scores[k], -k))
    if scores[best] < min_silhouette:
        return 1
    floor = max(min_silhouette, (1.0 - k_tolerance) * scores[best])
    return max(k for k, score in scores.items() if score >= floor)


def _kmeans(points: np.ndarray, k: int, seed: int, n_init: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels renumbered by first appearance, and unit-norm centers in that order."""
    if k == 1:
        labels = np.zeros(len(points), dtype=int)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Number of distinct clusters")
            labels = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(points)
    order = list(dict.fromkeys(int(v) for v in labels))
    labels = np.array([order.index(int(v)) for v in labels], dtype=int)
    centers = np.stack([points[labels == c].mean(axis=0) for c in range(len(order))])
    norms = np.linalg.norm(centers, axis=1, keepdims=True)
    return labels, centers / np.where(norms > 0, norms, 1.0)


def _silhouette(points: np.ndarray, labels: np.ndarray) -> float | None:
    """Cosine silhouette, or None when it is undefined (fewer than 2 or as many clusters as points)."""
    distinct = len(set(labels.tolist()))
    if not 2 <= distinct <= len(points) - 1:
        return None
    return float(silhouette_score(points, labels, metric="cosine"))
