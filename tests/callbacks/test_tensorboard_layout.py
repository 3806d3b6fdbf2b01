"""The Custom Scalars layout: per metric one chart with a line per cluster and one with a line per task."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from atlas_pl.cli import main
from atlas_pl.tensorboard_layout import CHARTS, add_federation_layout
from tests.conftest import TINY_DEMO_MODEL

CONFIG_TAG = "custom_scalars__config__"  # where TensorBoard's custom_scalars plugin reads the layout
TINY_FIT = [
    *TINY_DEMO_MODEL,
    "--data.num_clients",
    "4",
    "--data.num_groups",
    "2",
    "--data.tasks_per_group",
    "2",
    "--data.examples_per_client",
    "16",
    "--data.local_steps",
    "1",
    "--data.batch_size",
    "8",
    "--trainer.max_epochs",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.callbacks",  # clusters = the two task groups, so K = 2 without depending on fingerprints
    '[{"class_path": "atlas_pl.callbacks.task_clustering.TaskClustering", '
    '"init_args": {"assign": "true_group", "num_clusters": 2}}]',
]


def multiline_charts(layout: layout_pb2.Layout) -> dict[tuple[str, str], list[str]]:
    """``(category, chart title) -> tag regexes`` of every multiline chart."""
    return {(c.title, chart.title): list(chart.multiline.tag) for c in layout.category for chart in c.chart}


def matching(regexes: list[str], tags: list[str]) -> set[str]:
    """The tags a chart draws: TensorBoard keeps a tag when ``re.match`` of one of the chart's regexes succeeds."""
    return {t for t in tags if any(re.match(r, t) for r in regexes)}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """Event folder of a one-round demo fit with 4 clients, 4 tasks in 2 groups, and 2 clusters."""
    tmp_path = tmp_path_factory.mktemp("tensorboard_layout")
    repo = Path(__file__).parents[2]
    args = ["fit", "--config", str(repo / "configs" / "demo.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    main([*args, "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), *TINY_FIT])
    return next((tmp_path / "logs").rglob("results.json")).parent


@pytest.fixture(scope="module")
def events(tiny_run: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(tiny_run), size_guidance={"tensors": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def read_layout(events: EventAccumulator) -> layout_pb2.Layout:
    (written,) = events.Tensors(CONFIG_TAG)  # exactly one layout per run
    return layout_pb2.Layout.FromString(written.tensor_proto.string_val[0])


def test_fit_writes_three_metrics_times_cluster_and_task_charts(events) -> None:
    charts = multiline_charts(read_layout(events))
    assert sorted(charts) == sorted(
        [(category, f"{category} per {scope}")
         for category in ("train loss", "validation loss", "validation accuracy")
         for scope in ("cluster", "task")]
        + [("privacy", "DP-SGD ε of the client adapters (largest, median client)"),  # drawn once DP-SGD logs it
           ("privacy", "bottleneck noise σ / rms(h) (mean, min, max over dimensions)")]
    )  # fmt: skip


def test_chart_regexes_match_exactly_the_logged_cluster_and_task_tags(tiny_run, events) -> None:
    clusters = sorted(set(json.loads((tiny_run / "results.json").read_text())["cluster_ids"]))
    with open(tiny_run / "partition.csv", newline="") as f:
        tasks = sorted({row["task"] for row in csv.DictReader(f)})
    assert clusters == [0, 1] and tasks == ["sentiment_0", "sentiment_1", "topic_0", "topic_1"]
    expected = {
        ("train loss", "cluster"): {f"train_loss/cluster_{k}" for k in clusters},
        ("train loss", "task"): {f"train_loss/task_{t}" for t in tasks},
        ("validation loss", "cluster"): {f"val_loss/cluster_{k}" for k in clusters},
        ("validation loss", "task"): {f"val_loss/task_{t}" for t in tasks},
        ("validation accuracy", "cluster"): {f"val_acc/cluster_{k}" for k in clusters},
        ("validation accuracy", "task"): {f"val_task/{t}/acc" for t in tasks},
    }
    scalar_tags = events.Tags()["scalars"]
    assert set().union(*expected.values()) <= set(scalar_tags), "every expected line is logged"
    charts = multiline_charts(read_layout(events))
    for (category, scope), tags in expected.items():
        assert matching(charts[category, f"{category} per {scope}"], scalar_tags) == tags, (category, scope)


def test_chart_regexes_leave_out_clients_overall_values_and_other_metrics() -> None:
    others = ["train_loss", "train_loss/round", "train_loss/client_003", "val_loss", "val_acc/client_010",
              "val_score/cluster_0", "val_task/topic_0/macro_f1", "clustering/size_cluster_0",
              "aggregation/client_bytes/cluster_1", "val_loss/cluster_1/extra", "val_task/a/b/acc"]  # fmt: skip
    regexes = [r for charts in CHARTS.values() for r in charts.values()]
    assert matching(regexes, others) == set()


def test_layout_is_written_only_for_tensorboard_loggers(tmp_path) -> None:
    logger = CSVLogger(tmp_path)
    assert not add_federation_layout(logger)
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
