"""TensorBoard Custom Scalars layout: per metric, one chart with a line per cluster and one with a line per task.

The Scalars tab draws ``val_acc/cluster_0``, ``val_acc/cluster_1``, ... as separate single-line charts. The layout
written here makes the Custom Scalars tab overlay them: each chart is a regular expression over the tags that
``Federation`` logs (TensorBoard anchors it at the start of the tag; the ``$`` anchors the end), so the number of
clusters and tasks need not be known when the layout is written.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger

CLUSTER = r"cluster_\d+"
"""Scope of a cluster in a tag (``val_acc/cluster_0``): the cluster id."""

TASK = r"task_[^/]+"
"""Scope of a task in a tag (``val_loss/task_sentiment_0``): the task name."""

CHARTS: dict[str, dict[str, str]] = {
    "train loss": {
        "train loss per cluster": rf"^train_loss/{CLUSTER}$",
        "train loss per task": rf"^train_loss/{TASK}$",
    },
    "validation loss": {
        "validation loss per cluster": rf"^val_loss/{CLUSTER}$",
        "validation loss per task": rf"^val_loss/{TASK}$",
    },
    "validation accuracy": {
        "validation accuracy per cluster": rf"^val_acc/{CLUSTER}$",
        "validation accuracy per task": r"^val_task/[^/]+/acc$",
    },
    "privacy": {
        "DP-SGD ε of the client adapters (largest, median client)": r"^privacy/dp_epsilon(_median)?$",
        "bottleneck noise σ / rms(h) (mean, min, max over dimensions)": r"^privacy/bottleneck_scale(_min|_max)?$",
    },
}
"""Category -> chart title -> regular expression of the tags drawn as the chart's lines."""


def federation_layout() -> dict[str, dict[str, list[Any]]]:
    """The layout in ``SummaryWriter.add_custom_scalars`` form: ``{category: {title: ["Multiline", [regex]]}}``."""
    return {
        category: {title: ["Multiline", [regex]] for title, regex in charts.items()}
        for category, charts in CHARTS.items()
    }


def add_federation_layout(logger: Logger) -> bool:
    """Write the layout into the event folder of a Lightning ``TensorBoardLogger``.

    Args:
        logger: Any Lightning logger; only a ``TensorBoardLogger`` (its ``experiment`` is a ``SummaryWriter``) gets
            the layout.

    Returns:
        Whether the layout was written.
    """
    if not isinstance(logger, TensorBoardLogger):
        return False
    logger.experiment.add_custom_scalars(federation_layout())
    return True
