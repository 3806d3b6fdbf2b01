"""Pictures of the clustering (matplotlib's object API only: no pyplot state, safe under the Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

_MARKERS = "osD^v<>pP*Xh"


def plot_fingerprints(
    points: np.ndarray,
    labels: Sequence[int],
    true_labels: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
) -> Figure:
    """Scatter of 2-D fingerprint coordinates (``embed_2d``): colour = cluster, marker = true task/group.

    Args:
        points: ``[n × 2]`` coordinates; rows with NaN (left-out clients) are not drawn.
        labels: Cluster id per client (``-1`` = left out, drawn grey).
        true_labels: True group per client, one marker shape each; one shape for all when None.
        names: Text label per client (e.g. ``"client 3"``), drawn next to its point.

    Returns:
        The figure; save it with ``fig.savefig(path)``.

    Raises:
        ValueError: ``points`` is not ``[n × 2]`` or a per-client sequence has another length.
    """
    points = np.asarray(points, dtype=float)
    n = len(labels)
    if points.shape != (n, 2):
        raise ValueError(f"`points` must have shape ({n}, 2) to match `labels`, got {points.shape}; see embed_2d")
    for arg, seq in (("true_labels", true_labels), ("names", names)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"`{arg}` has {len(seq)} entries for {n} clients; pass one per client or None")
    groups = list(true_labels) if true_labels is not None else [0] * n
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    _scatter(ax, points, list(labels), groups)
    for i, name in enumerate(names or []):
        if np.all(np.isfinite(points[i])):
            ax.annotate(str(name), points[i], fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("client fingerprints (colour = cluster, marker = true group)", fontsize=9)
    return fig


def _scatter(ax: Axes, points: np.ndarray, labels: list[int], groups: list) -> None:
    """One scatter call per (cluster, group) pair, with a legend entry for each."""
    marker_of = {g: _MARKERS[j % len(_MARKERS)] for j, g in enumerate(dict.fromkeys(groups))}
    for cluster in sorted(set(labels)):
        colour = "grey" if cluster < 0 else f"C{cluster % 10}"
        for group, marker in marker_of.items():
            idx = [i for i in range(len(labels)) if labels[i] == cluster and groups[i] == group]
            if idx:
                label = f"cluster {cluster}" if cluster >= 0 else "left out"
                ax.scatter(points[idx, 0], points[idx, 1], c=colour, marker=marker, label=f"{label} / {group}")
    ax.legend(fontsize=6, loc="best")
