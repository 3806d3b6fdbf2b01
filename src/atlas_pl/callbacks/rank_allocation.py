"""``RankAllocation``: phase 2 of ATLAS — budget-fitted, importance-shaped LoRA ranks per client.

At fit start (after ``TaskClustering``, which must come first in the callback list) every client measures the
gradient of its client-side LoRA ``B`` factors on a few of its batches; the server averages the normalized module
importances per cluster into a rank pattern ``π_c(m)``; each client gets ``r(m) = clip(round(λ π_c(m)), r_min,
r_max)`` with the largest ``λ`` whose estimated peak memory (``atlas_pl.memory``) fits its budget. The adapters are
re-created at those ranks and the optimizers rebuilt; the ranks are checkpointed with the federation, so a resume
restores them. ``pattern: uniform`` gives every module the same rank (HSplitLoRA: budget-fitted, not task-shaped).

The module is seen only through the federation protocol (``atlas_pl.protocol.RankConfiguration``: ``local_clients``,
``cluster_of``, ``client_batches``, ``task_signal``, ``client_modules``, ``client_sizing``, ``resize``). Under several
processes the importances (and, for ``share``, the allocations) are gathered so every cluster pools all its clients.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Literal

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from atlas_pl.algorithms.importance import cluster_importance, module_importance
from atlas_pl.algorithms.rank_allocation import Allocation, RankAllocator, client_memory_fn
from atlas_pl.distributed import gather_objects
from atlas_pl.io import atomic_write_json
from atlas_pl.memory import DEVICE_PROFILES, ModelShape, estimate_latency, format_size, parse_size
from atlas_pl.protocol import ClientSizing, RankConfiguration, require


class RankAllocation(Callback):
    """Give each client the largest LoRA ranks its memory budget allows, shaped by its cluster's module importance.

    Hooks: ``setup`` checks the protocol; ``on_fit_start`` allocates once, before the first step and after
    ``TaskClustering`` (earlier in the callback list), then rebuilds the optimizers for the resized adapters.

    Args:
        budgets: Memory budget per client (``"1GB"``, ``"512MiB"``, bytes); a shorter list is repeated over the clients.
        profiles: Named device profiles per client instead of ``budgets`` (see ``atlas_pl.memory.DEVICE_PROFILES``).
        r_min: Smallest rank of a module.
        r_max: Largest rank of a module.
        pattern: ``importance`` (ATLAS: per-cluster importance shapes the ranks) or ``uniform`` (HSplitLoRA).
        num_batches: Batches per client for the importance gradients.
        seed: Seed of the batch choice.
        cut_layers: Candidate cut layers per client (each in ``[model.cut_layer, num_layers - 1]``); ``None`` keeps
            the federation's cut. With ``profiles`` the cut with the smallest estimated round latency among those
            that fit is chosen, otherwise the fitting cut with the most total LoRA rank (ties: the smaller cut).
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
        cut_layers: list[int] | None = None,
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
        if cut_layers is not None and not cut_layers:
            raise ValueError("`cut_layers` must be None or a non-empty list such as [1, 2, 3]")
        self.cut_layers = None if cut_layers is None else sorted(int(c) for c in cut_layers)
        self.allocations: list[dict[str, Any]] = []

    def client_budgets(self, num_clients: int) -> list[int]:
        """Budget in bytes of each client (lists shorter than ``num_clients`` are repeated)."""
        if self.profiles is not None:
            values: list[Any] = [DEVICE_PROFILES[p].memory for p in self.profiles]
        else:
            values = list(self.budgets or [])
        return [parse_size(values[i % len(values)]) for i in range(num_clients)]

    # ------------------------------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            require(pl_module, RankConfiguration, "RankAllocation")

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.allocations:  # restored from a checkpoint: the module restored the ranks already
            return
        self.run(trainer, pl_module)

    def run(self, trainer: L.Trainer, module: Any) -> list[Allocation]:
        """Importance → per-cluster patterns → budget-fitted ranks → resized adapters; returns every allocation."""
        local = list(module.local_clients())
        for cut in self.cut_layers or []:  # every candidate cut must exist, whichever one a client gets
            module.client_modules(local[0], cut)
        sizing: ClientSizing = module.client_sizing()
        patterns, num_clients = self.cluster_patterns(module, local)
        estimate = self.estimate_fn(sizing, fixed_cut=self.cut_layers is None)
        budgets = self.client_budgets(num_clients)
        mine = []
        for idx in local:
            latency = self.latency_fn(sizing, idx) if self.cut_layers and self.profiles else None
            allocator = RankAllocator(estimate, self.r_min, self.r_max, self.cut_layers, latency)
            mine.append(allocator.allocate(patterns[module.cluster_of(idx)], budgets[idx], idx))
        allocations = sorted((a for part in gather_objects(mine) for a in part), key=lambda a: a.client)
        if self.share != "none":
            allocations = share_allocation(allocations, self.share)
        mirrored = bool(getattr(module, "replicates_clients", False))  # a sharded Federation: every client, same order
        for a in allocations:
            if mirrored or a.client in local:
                module.resize(a.client, dict(a.rank_pattern), a.cut_layer)
        trainer.strategy.setup_optimizers(trainer)  # the resized adapters are new parameters
        self.allocations = [a.as_dict() for a in allocations]
        self.log_allocations(trainer, allocations)
        return allocations

    def cluster_patterns(self, module: Any, local: list[int]) -> tuple[dict[int, dict[str, float]], int]:
        """Module importance of the client-side modules averaged per cluster (or uniform), and the client count."""
        deepest = max(self.cut_layers) if self.cut_layers else None
        mine = {}
        for idx in local:
            modules = module.client_modules(idx, deepest)
            if self.pattern == "uniform":
                mine[idx] = (module.cluster_of(idx), dict.fromkeys(modules, 1.0))
                continue
            batches = module.client_batches(idx, self.num_batches, self.seed)
            signal = module.task_signal(idx, batches, "grad_B")  # client and server sides: every candidate module
            grads = {k.split(".", 1)[1]: v for k, v in signal.items()}
            mine[idx] = (module.cluster_of(idx), {m: v for m, v in module_importance(grads).items() if m in modules})
        everyone = {c: row for part in gather_objects(mine) for c, row in part.items()}
        ids = sorted(everyone)
        if self.pattern == "uniform":
            return {cluster: pattern for cluster, pattern in everyone.values()}, len(ids)
        return cluster_importance([everyone[c][1] for c in ids], [everyone[c][0] for c in ids]), len(ids)

    @staticmethod
    def estimate_fn(sizing: ClientSizing, fixed_cut: bool = True) -> Any:
        """Peak-memory estimate of a client for a rank pattern, at the sizing's batch and sequence length."""
        return client_memory_fn(
            ModelShape.from_config(sizing.model_config), sizing.batch_size, sizing.seq_len,
            sizing.cut_layer if fixed_cut else None, target_modules=list(sizing.target_modules), dtype=sizing.dtype,
            device=sizing.device,
        )  # fmt: skip

    def latency_fn(self, sizing: ClientSizing, client_idx: int) -> Any:
        """Estimated round latency of client ``client_idx`` per cut layer on its device profile."""
        shape = ModelShape.from_config(sizing.model_config)
        profile = DEVICE_PROFILES[(self.profiles or [])[client_idx % len(self.profiles or [1])]]

        def latency(cut: int | None, ranks: dict[str, int]) -> float:
            steps, batch, length = sizing.local_steps, sizing.batch_size, sizing.seq_len
            return estimate_latency(shape, cut or sizing.cut_layer, profile, batch, length, steps).total_s

        return latency

    # ------------------------------------------------------------------------------------------ logging
    def log_allocations(self, trainer: L.Trainer, allocations: list[Allocation]) -> None:
        metrics: dict[str, float] = {}
        for a in allocations:
            metrics[f"memory/estimated_peak_mb/client_{a.client:03d}"] = a.peak_bytes / 2**20
            metrics[f"memory/budget_mb/client_{a.client:03d}"] = a.budget_bytes / 2**20
            metrics[f"ranks/total/client_{a.client:03d}"] = float(sum(a.rank_pattern.values()))
            metrics[f"memory/over_budget/client_{a.client:03d}"] = float(a.peak_bytes > a.budget_bytes)
            if a.cut_layer is not None:
                metrics[f"cut_layer/client_{a.client:03d}"] = float(a.cut_layer)
        metrics["memory/estimated_peak_mb/total"] = sum(a.peak_bytes for a in allocations) / 2**20
        rows = [
            f"client {a.client}: budget {format_size(a.budget_bytes)}, estimated peak {format_size(a.peak_bytes)}"
            f", ranks {sorted(set(a.rank_pattern.values()))}"
            + ("" if a.cut_layer is None else f", cut layer {a.cut_layer}")
            for a in allocations
        ]
        rank_zero_info("rank allocation:\n  " + "\n  ".join(rows))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.current_epoch)
            add_image = getattr(getattr(logger, "experiment", None), "add_image", None)
            if callable(add_image):
                add_image("ranks/heatmap", heatmap(allocations), trainer.current_epoch, dataformats="HWC")
        folder = trainer.log_dir  # a collective under DDP: every process asks, once
        if folder and trainer.is_global_zero:
            atomic_write_json(f"{folder}/allocation.json", self.allocations)

    # ------------------------------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"allocations": self.allocations}

    @override
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

    modules = list(dict.fromkeys(m for a in allocations for m in a.rank_pattern))
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
