"""``RankAllocation``: phase 2 of ATLAS — budget-fitted, importance-shaped LoRA ranks per client.

At fit start (after ``TaskClustering``, which must come first in the callback list) every client measures the
gradient of its client-side LoRA ``B`` factors on a few of its batches; the server averages the normalized module
importances per cluster into a rank pattern ``π_c(m)``; each client gets ``r(m) = clip(round(λ π_c(m)), r_min,
r_max)`` with the largest ``λ`` whose estimated peak memory (``atlas_pl.memory``) fits its budget. The adapters are
re-created at those ranks and the optimizers rebuilt; the ranks are checkpointed with the federation, so a resume
restores them. ``pattern: uniform`` gives every module the same rank (HSplitLoRA: budget-fitted, not task-shaped).
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Literal

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from atlas_pl.algorithms.importance import cluster_importance, module_importance
from atlas_pl.algorithms.rank_allocation import Allocation, RankAllocator, client_memory_fn
from atlas_pl.callbacks.task_clustering import client_batches
from atlas_pl.io import atomic_write_json
from atlas_pl.memory import DEVICE_PROFILES, ModelShape, format_size, parse_size


class RankAllocation(Callback):
    """Give each client the largest LoRA ranks its memory budget allows, shaped by its cluster's module importance.

    Args:
        budgets: Memory budget per client (``"1GB"``, ``"512MiB"``, bytes); a shorter list is repeated over the clients.
        profiles: Named device profiles per client instead of ``budgets`` (see ``atlas_pl.memory.DEVICE_PROFILES``).
        r_min: Smallest rank of a module.
        r_max: Largest rank of a module.
        pattern: ``importance`` (ATLAS: per-cluster importance shapes the ranks) or ``uniform`` (HSplitLoRA).
        num_batches: Batches per client for the importance gradients.
        seed: Seed of the batch choice.
        share: ``none`` (each client its own fit), ``weakest`` (every client gets the weakest client's ranks: one
            rank for all that everyone can run — SplitLoRA), ``strongest`` (every client gets the strongest client's
            ranks, budgets ignored: what one-size-fits-all costs; clients over budget are reported).
    """

    def __init__(
        self,
        budgets: list[str | int] | None = None,
        profiles: list[str] | None = None,
        r_min: int = 1,
        r_max: int = 32,
        pattern: Literal["importance", "uniform"] = "importance",
        num_batches: int = 2,
        seed: int = 0,
        share: Literal["none", "weakest", "strongest"] = "none",
    ) -> None:
        if (budgets is None) == (profiles is None):
            raise ValueError("give exactly one of `budgets` (e.g. ['1GB', '8GB']) or `profiles` (e.g. ['phone-1gb'])")
        unknown = [p for p in profiles or [] if p not in DEVICE_PROFILES]
        if unknown:
            raise ValueError(f"unknown device profile(s) {unknown}; choose among {sorted(DEVICE_PROFILES)}")
        if share not in ("none", "weakest", "strongest"):
            raise ValueError(f"`share` must be 'none', 'weakest' or 'strongest', got {share!r}")
        if pattern not in ("importance", "uniform"):
            raise ValueError(f"`pattern` must be 'importance' or 'uniform', got {pattern!r}")
        if budgets is not None:
            if not budgets:
                raise ValueError("`budgets` is empty; give at least one budget such as '8GB'")
            for b in budgets:
                parse_size(b)  # fail at construction on an unparseable size
        RankAllocator(lambda cut, ranks: 0, r_min, r_max)  # validates r_min / r_max
        self.budgets, self.profiles = budgets, profiles
        self.r_min, self.r_max, self.pattern, self.num_batches, self.seed = r_min, r_max, pattern, num_batches, seed
        self.share = share
        self.allocations: list[dict[str, Any]] = []

    def client_budgets(self, num_clients: int) -> list[int]:
        """Budget in bytes of each client (lists shorter than ``num_clients`` are repeated)."""
        if self.profiles is not None:
            values: list[Any] = [DEVICE_PROFILES[p].memory for p in self.profiles]
        else:
            values = list(self.budgets or [])
        return [parse_size(values[i % len(values)]) for i in range(num_clients)]

    # ------------------------------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.allocations:  # restored from a checkpoint: the federation restored the ranks already
            return
        self.run(trainer, pl_module)

    def run(self, trainer: L.Trainer, fed: Any) -> list[Allocation]:
        """Importance → per-cluster patterns → budget-fitted ranks → resized adapters; returns the allocations."""
        dm = trainer.datamodule  # type: ignore[attr-defined]
        patterns = self.cluster_patterns(fed, dm)
        allocator = RankAllocator(self.estimate_fn(fed, dm), self.r_min, self.r_max)
        budgets = self.client_budgets(fed.num_clients)
        allocations = allocator.allocate_all(patterns, budgets, fed.cluster_ids, list(range(fed.num_clients)))
        if self.share != "none":
            allocations = share_allocation(allocations, self.share)
        fed.set_client_ranks([a.rank_pattern for a in allocations])
        fed.rebuild_optimizers()
        self.allocations = [a.as_dict() for a in allocations]
        self.log_allocations(trainer, fed, allocations)
        return allocations

    def cluster_patterns(self, fed: Any, dm: Any) -> dict[int, dict[str, float]]:
        """Module importance of the client-side modules, averaged per cluster (or uniform)."""
        modules = list(fed.backbone.bank.ranks[fed.clients[0].client_adapter])
        if self.pattern == "uniform":
            return {c: dict.fromkeys(modules, 1.0) for c in set(fed.cluster_ids)}
        per_client = []
        for idx in range(fed.num_clients):
            batches = client_batches(dm, idx, self.num_batches, self.seed, fed.device)
            signal = fed.client_signal(idx, batches, "grad_B")
            grads = {k[len("client.") :]: v for k, v in signal.items() if k.startswith("client.")}
            per_client.append(module_importance(grads))
        return cluster_importance(per_client, fed.cluster_ids)

    @staticmethod
    def estimate_fn(fed: Any, dm: Any) -> Any:
        """Peak-memory estimate of a client of ``fed`` for a rank pattern, at the datamodule's batch and length."""
        shape = ModelShape.from_config(fed.backbone.model.config)
        dtype = str(next(fed.backbone.model.parameters()).dtype).replace("torch.", "")
        device = "cuda" if fed.device.type == "cuda" else "cpu"
        return client_memory_fn(
            shape, int(dm.batch_size), int(dm.max_length), fed.backbone.cut_layer,
            target_modules=list(fed.backbone.targets), dtype=dtype, device=device,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------ logging
    def log_allocations(self, trainer: L.Trainer, fed: Any, allocations: list[Allocation]) -> None:
        metrics: dict[str, float] = {}
        for a in allocations:
            metrics[f"memory/estimated_peak_mb/client_{a.client:03d}"] = a.peak_bytes / 2**20
            metrics[f"memory/budget_mb/client_{a.client:03d}"] = a.budget_bytes / 2**20
            metrics[f"ranks/total/client_{a.client:03d}"] = float(sum(a.rank_pattern.values()))
            metrics[f"memory/over_budget/client_{a.client:03d}"] = float(a.peak_bytes > a.budget_bytes)
        metrics["memory/estimated_peak_mb/total"] = sum(a.peak_bytes for a in allocations) / 2**20
        rows = [
            f"client {a.client}: budget {format_size(a.budget_bytes)}, estimated peak {format_size(a.peak_bytes)}"
            f", ranks {sorted(set(a.rank_pattern.values()))}"
            for a in allocations
        ]
        rank_zero_info("rank allocation:\n  " + "\n  ".join(rows))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.current_epoch)
            add_image = getattr(getattr(logger, "experiment", None), "add_image", None)
            if callable(add_image):
                add_image("ranks/heatmap", heatmap(allocations), trainer.current_epoch, dataformats="HWC")
        if trainer.log_dir and trainer.is_global_zero:
            atomic_write_json(f"{trainer.log_dir}/allocation.json", self.allocations)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"allocations": self.allocations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.allocations = list(state_dict.get("allocations", []))


def share_allocation(allocations: list[Allocation], share: str) -> list[Allocation]:
    """Every client gets the weakest (or strongest) client's ranks; its own budget and estimate are kept."""
    pick = min if share == "weakest" else max
    source = pick(allocations, key=lambda a: (a.budget_bytes, sum(a.rank_pattern.values())))
    out = []
    for a in allocations:
        shared = dataclasses.replace(
            a,
            rank_pattern=dict(source.rank_pattern),
            scale=source.scale,
            peak_bytes=source.peak_bytes,
            estimate=source.estimate,
        )
        if shared.peak_bytes > shared.budget_bytes:
            rank_zero_warn(
                f"client {a.client}: the shared ranks need {format_size(shared.peak_bytes)}, over its "
                f"budget of {format_size(shared.budget_bytes)}"
            )
        out.append(shared)
    return out


def heatmap(allocations: list[Allocation]) -> np.ndarray:
    """Clients × modules, colour = rank: an RGB array for TensorBoard."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    modules = list(allocations[0].rank_pattern)
    grid = np.array([[a.rank_pattern.get(m, 0) for m in modules] for a in allocations])
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(modules) + 2), max(3, 0.3 * len(allocations) + 1)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(modules)), [m.split(".", 2)[-1] for m in modules], rotation=90, fontsize=6)
    ax.set_yticks(range(len(allocations)), [f"client {a.client}" for a in allocations], fontsize=6)
    fig.colorbar(image, ax=ax, label="LoRA rank")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    buffer.seek(0)
    return (mpimg.imread(buffer, format="png")[..., :3] * 255).astype(np.uint8)
