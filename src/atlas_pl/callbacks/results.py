"""Results of a federated fit: the partition at start; JSON (final, history, traffic) and a per-round CSV at the end."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from rich.console import Console
from rich.table import Table
from typing_extensions import override

from atlas_pl.io import atomic_write_json, atomic_write_text
from atlas_pl.tensorboard_layout import add_federation_layout


def write_history_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """Per-round metrics in long format (``round,metric,value``), written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["round", "metric", "value"])
    for row in history:
        for key, value in row.items():
            if key != "round" and isinstance(value, (int, float)):
                writer.writerow([row.get("round"), key, value])
    atomic_write_text(path, buffer.getvalue())


def summary_table(history: list[dict[str, Any]]) -> Table:
    """A rich table with one row per round: validation loss/accuracy per cluster, cumulative traffic, DP ε if any."""
    clusters = sorted({k.split("/", 1)[1] for row in history for k in row if k.startswith("val_loss/cluster_")})
    table = Table(title="federated rounds", title_justify="left")
    table.add_column("round", justify="right")
    for c in clusters:
        table.add_column(f"val loss {c}", justify="right")
        table.add_column(f"val acc {c}", justify="right")
    table.add_column("total MB up", justify="right")
    table.add_column("total MB down", justify="right")
    private = any("privacy/dp_epsilon" in row for row in history)
    if private:
        table.add_column("DP ε (max client)", justify="right")

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for row in history:
        cells = [str(row.get("round", "?"))]
        for c in clusters:
            cells += [fmt(row.get(f"val_loss/{c}"), ".3f"), fmt(row.get(f"val_acc/{c}"), ".3f")]
        up, down = row.get("bytes_up"), row.get("bytes_down")
        cells += [fmt(None if up is None else up / 1e6, ".1f"), fmt(None if down is None else down / 1e6, ".1f")]
        if private:
            cells.append(fmt(row.get("privacy/dp_epsilon"), ".2f"))
        table.add_row(*cells)
    return table


class FederatedResults(Callback):
    """Save ``results.json`` (atomically) in the logger's folder when fit ends.

    At fit start it also saves the client partition and gives TensorBoard a Custom Scalars layout (one chart per
    metric with a line per cluster, one with a line per task; see :mod:`atlas_pl.tensorboard_layout`).

    Hooks: ``on_fit_start`` — the datamodule is set up and the loggers exist, so the partition and layout can be
    written before the first round; ``on_fit_end`` (rank 0) — the module's history holds every round by then;
    ``on_test_end`` (rank 0) — the test metrics are final: they go to ``test_<filename>`` (e.g. ``test_results.json``)
    beside the fit's results, with the checkpoint they were computed from, and (when the module has
    ``generated_examples()``, as ``Federation`` does) a few generated answers per QA / summarization task.

    Args:
        filename: File name inside ``trainer.log_dir`` (or ``default_root_dir`` without a logger).
        summary: Also print a per-round table (validation loss/accuracy per cluster, traffic) at the end of fit.
    """

    def __init__(self, filename: str = "results.json", summary: bool = True) -> None:
        if not filename.endswith(".json"):
            raise ValueError(f"`filename` must end with .json, got {filename!r}")
        self.filename = filename
        self.summary = summary
        self._start = 0.0
        self.path: Path | None = None
        self._layout_written: set[str] = set()  # event folders that have the layout

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self.save_partition(trainer)
        self.save_tensorboard_layout(trainer)

    @rank_zero_only
    def save_tensorboard_layout(self, trainer: L.Trainer) -> None:
        """Write the Custom Scalars layout once into each TensorBoard logger's event folder (other loggers: nothing)."""
        for logger in trainer.loggers:
            folder = str(getattr(logger, "log_dir", None))
            if folder not in self._layout_written and add_federation_layout(logger):
                self._layout_written.add(folder)

    def save_partition(self, trainer: L.Trainer) -> None:
        """Save the datamodule's client partition (``partition.csv/json``) and show it in TensorBoard as text."""
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "partition_table"):
            return
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every process asks
        if not trainer.is_global_zero:
            return
        folder.mkdir(parents=True, exist_ok=True)
        if hasattr(dm, "save_partition"):
            dm.save_partition(str(folder / "partition"))
        rows = dm.partition_table()
        if not rows:
            return
        header = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
        text = header + "\n".join("| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows)
        for logger in trainer.loggers:
            add_text = getattr(getattr(logger, "experiment", None), "add_text", None)
            if callable(add_text):
                add_text("partition", text, 0)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every process asks
        if not trainer.is_global_zero:
            return
        self.path = folder / self.filename
        results = self.collect(trainer, pl_module)
        atomic_write_json(self.path, results)
        write_history_csv(self.path.with_suffix(".csv"), results["history"])
        if self.summary and results["history"]:
            Console(stderr=True).print(summary_table(results["history"]))
        rank_zero_info(f"results written to {self.path}")

    @override
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every process asks
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test")}
        path = folder / f"test_{self.filename}"
        results = {
            "ckpt_path": None if trainer.ckpt_path is None else Path(trainer.ckpt_path).name,
            "rounds": len(getattr(pl_module, "history", [])),  # rounds trained into the checkpoint
            "metrics": dict(sorted(metrics.items())),
            "cluster_ids": list(getattr(pl_module, "cluster_ids", [])),
        }
        examples = getattr(pl_module, "generated_examples", None)
        if callable(examples) and examples():  # a few generated answers per generative task, to read
            results["examples"] = examples()
        atomic_write_json(path, results)
        rank_zero_info(f"test results written to {path}")

    def collect(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        history = list(getattr(pl_module, "history", []))
        channel = getattr(pl_module, "channel", None)
        final = history[-1] if history else {}
        return {
            "rounds": int(trainer.current_epoch),
            "wall_seconds": time.perf_counter() - self._start,
            "hparams": dict(pl_module.hparams),
            "final": final,
            "history": history,
            "cluster_ids": list(getattr(pl_module, "cluster_ids", [])),
            "num_examples": list(getattr(pl_module, "num_examples", [])),
            "traffic": channel.stats.as_dict() if channel is not None else {},
            "faults": list(getattr(pl_module, "fault_log", [])),  # clients left out of a round, and why
        }
