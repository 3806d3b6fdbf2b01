"""``TaskClustering``: phase 1 of ATLAS — client fingerprints, server-side k-means, clusters for the later phases.

At fit start each client computes a task signal on a few of its own batches (by default the change of its LoRA
adapters after a few local split steps, restored afterwards), compresses it on the client to a ``dim``-D fingerprint
with a seeded projection shared by all clients (optionally clipped and noised for differential privacy), and sends
only those ``dim`` floats. The server clusters the fingerprints with k-means and writes the assignment to the module
(``assign_clusters``): per-cluster server adapters, aggregation and per-cluster curves follow it.

The module is seen only through the federation protocol (``atlas_pl.protocol.TaskDiscovery``: ``local_clients``,
``cluster_of``, ``client_batches``, ``task_signal``, ``assign_clusters``). Under several processes (one client per
process) the fingerprints are gathered, rank 0 clusters them, and every process receives the assignment.
"""

from __future__ import annotations

import io
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from atlas_pl.algorithms.clustering import (
    ClusterResult,
    check_min_silhouette,
    cluster_clients,
    clustering_scores,
    embed_2d,
)
from atlas_pl.algorithms.fingerprint import fingerprint_bytes, project_gradients
from atlas_pl.algorithms.plots import plot_fingerprints
from atlas_pl.algorithms.privacy import dp_epsilon, privatize
from atlas_pl.distributed import broadcast_object, gather_objects
from atlas_pl.protocol import TaskDiscovery, require
from atlas_pl.split.signal import SIGNAL_KINDS

Signal = Literal["update", "grad_B", "contrast"]
QUALITY = ("ari", "nmi", "sil", "dp_")


class TaskClustering(Callback):
    """Cluster clients by task from 64-D gradient fingerprints (phase 1).

    Hooks: ``setup`` checks the protocol; ``on_fit_start`` clusters before the first step (after the optimizers
    exist, which it rebuilds, and before ``RankAllocation``, which must come later in the callback list and reads the
    clusters); ``on_train_epoch_start`` re-clusters every ``recluster_every`` rounds.

    Args:
        num_clusters: ``K``, or ``"auto"`` (silhouette over ``k_range``; one cluster when nothing separates).
        signal: ``grad_B`` (default): the gradient of the LoRA ``B`` factors summed over ``num_batches`` batches
            (``∇_A = 0`` while ``B = 0`` at init, so ``A`` carries no signal yet); ``update``: the adapters' change
            after ``num_batches`` local steps (restored afterwards). On the synthetic demo tasks the server-side
            ``grad_B`` recovered the task groups exactly for 5 of 5 seeds (K = 3), ``update`` did not; on real tasks
            (MiniLM, ``benchmarks/clustering.py``) server-side ``grad_B`` over 8 batches matched task identity best.
            ``contrast``: ``grad_B`` of the class-balanced contrast loss instead of cross-entropy
            (:func:`~atlas_pl.split.backbone.contrast_loss`): blind to the client's label frequencies and to the
            model's current predictions, so tasks with the same texts and opposite answers get opposite
            fingerprints (the module's ``task_signal`` must know the kind; ``Federation`` does).
        num_batches: Batches per client for the signal.
        sides: Which adapters' signal to fingerprint: ``both``, ``client`` (only what the client holds) or
            ``server`` (the server computes it during the client's split steps; nearest to the loss).
        dim: Fingerprint length.
        normalize: ``global`` or ``per_tensor`` normalization before projection (see ``project_gradients``).
        seed: Seed of the shared projection, of the batch choice and of k-means.
        k_range: ``(k_min, k_max)`` tried by ``"auto"``.
        min_silhouette: ``"auto"`` keeps one cluster when the best silhouette is below this; ``"chance"``: below
            what one Gaussian with the fingerprints' own mean and covariance reaches (``chance_silhouette``).
        k_tolerance: ``"auto"`` takes the largest ``K`` whose silhouette is within this fraction of the best
            (0 = the best; see ``cluster_clients``): when unsure, split rather than merge.
        recluster_every: Re-cluster every N rounds (0 = only at fit start).
        dp_noise_multiplier: ``σ`` of the Gaussian mechanism on the fingerprint (0 = no noise).
        dp_clip: Clip norm ``C`` before noise.
        dp_delta: ``δ`` for the reported ``ε``.
        assign: ``fingerprints`` (ATLAS). Ablations: ``true_task`` / ``true_group`` (oracle clusters from the
            datamodule's ``client_tasks`` / ``client_groups``), ``random`` (``num_clusters`` random clusters, seeded),
            ``one`` (a single cluster). Oracles send no fingerprints.
    """

    def __init__(
        self,
        num_clusters: int | Literal["auto"] = "auto",
        signal: Signal = "grad_B",
        num_batches: int = 8,
        sides: Literal["both", "client", "server"] = "server",
        dim: int = 64,
        normalize: Literal["global", "per_tensor"] = "global",
        seed: int = 0,
        k_range: tuple[int, int] = (2, 10),
        min_silhouette: float | Literal["chance"] = 0.25,
        k_tolerance: float = 0.0,
        recluster_every: int = 0,
        dp_noise_multiplier: float = 0.0,
        dp_clip: float = 1.0,
        dp_delta: float = 1e-5,
        assign: Literal["fingerprints", "true_task", "true_group", "random", "one"] = "fingerprints",
    ) -> None:
        if num_clusters != "auto" and (
            isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1
        ):
            raise ValueError(f"`num_clusters` must be 'auto' or an int >= 1, got {num_clusters!r}")
        if assign not in ("fingerprints", "true_task", "true_group", "random", "one"):
            raise ValueError(
                f"`assign` must be 'fingerprints', 'true_task', 'true_group', 'random' or 'one', got {assign!r}"
            )
        if assign == "random" and num_clusters == "auto":
            raise ValueError("`assign='random'` needs an int `num_clusters`")
        self.assign = assign
        if signal not in SIGNAL_KINDS:
            raise ValueError(f"`signal` must be one of {SIGNAL_KINDS}, got {signal!r}")
        for name, value in (("num_batches", num_batches), ("dim", dim)):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value!r}")
        if recluster_every < 0 or dp_noise_multiplier < 0:
            raise ValueError("`recluster_every` and `dp_noise_multiplier` must be >= 0")
        if sides not in ("both", "client", "server"):
            raise ValueError(f"`sides` must be 'both', 'client' or 'server', got {sides!r}")
        self.num_clusters, self.signal, self.num_batches, self.dim = num_clusters, signal, num_batches, dim
        self.sides = sides
        if not 0.0 <= k_tolerance < 1.0:
            raise ValueError(f"`k_tolerance` must be in [0, 1), got {k_tolerance!r}; 0 takes the best-silhouette K")
        check_min_silhouette(min_silhouette)
        self.normalize, self.seed, self.min_silhouette, self.k_tolerance = normalize, seed, min_silhouette, k_tolerance
        self.k_range = (int(k_range[0]), int(k_range[1]))
        self.recluster_every = recluster_every
        self.dp_noise_multiplier, self.dp_clip, self.dp_delta = dp_noise_multiplier, dp_clip, dp_delta
        self.result: ClusterResult | None = None
        self.fingerprints: np.ndarray | None = None
        self.last_round = -1
        self.releases = 0

    # ------------------------------------------------------------------------------------------ policy
    def should_cluster(self, round_idx: int) -> bool:
        """Whether to (re-)cluster before ``round_idx``: at the start, then every ``recluster_every`` rounds."""
        if self.result is None:
            return True
        return self.recluster_every > 0 and round_idx - self.last_round >= self.recluster_every

    # ------------------------------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            require(pl_module, TaskDiscovery, "TaskClustering")

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.result is not None:  # restored from a checkpoint: the module already holds the assignment
            return
        self.run(trainer, pl_module, round_idx=trainer.current_epoch)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > self.last_round and self.should_cluster(trainer.current_epoch):
            self.run(trainer, pl_module, round_idx=trainer.current_epoch)

    def run(self, trainer: L.Trainer, pl_module: Any, round_idx: int) -> ClusterResult:
        """Fingerprint every client, cluster, write the assignment to the module, log, and return the result."""
        dm = getattr(trainer, "datamodule", None)
        local = list(pl_module.local_clients())
        if self.assign != "fingerprints":
            rows = {c: torch.zeros(0) for c in local}
        else:
            rows = {c: self.client_fingerprint(pl_module, c, round_idx) for c in local}
        everyone = {c: row for part in gather_objects(rows) for c, row in part.items()}
        ids = sorted(everyone)
        if ids != list(range(len(ids))):
            raise ValueError(f"client ids must be 0..N-1 across processes, got {ids}; fix `local_clients()`")
        result: ClusterResult | None = None
        if trainer.is_global_zero:
            if self.assign != "fingerprints":
                result = self.assigned(dm, len(ids))
            else:
                self.fingerprints = torch.stack([everyone[c] for c in ids]).numpy()
                result = cluster_clients(
                    self.fingerprints,
                    self.num_clusters,
                    self.seed,
                    self.k_range,
                    self.min_silhouette,
                    k_tolerance=self.k_tolerance,
                )
        result = broadcast_object(result)
        assert result is not None
        if self.assign == "fingerprints" and self.fingerprints is None:
            self.fingerprints = torch.stack([everyone[c] for c in ids]).numpy()
        pl_module.assign_clusters([0 if c < 0 else c for c in result.labels])  # left-out clients join cluster 0
        trainer.strategy.setup_optimizers(trainer)  # shared adapters may be new
        self.result, self.last_round = result, round_idx
        self.log_result(trainer, result, dm, round_idx)
        return result

    def assigned(self, dm: Any, num_clients: int) -> ClusterResult:
        """Ablation clusters that do not come from fingerprints (oracle, random or one)."""
        if self.assign == "one":
            labels = [0] * num_clients
        elif self.assign == "random":
            k = min(int(self.num_clusters), num_clients)
            labels = _codes([str(c) for c in np.random.default_rng(self.seed).integers(0, k, num_clients)])
        else:
            attribute = "client_tasks" if self.assign == "true_task" else "client_groups"
            if getattr(dm, attribute, None) is None:
                raise ValueError(
                    f"`assign={self.assign!r}` reads the true clusters from the datamodule's `{attribute}`, which "
                    f"{type(dm).__name__} lacks; use assign='fingerprints' or a FederatedDataModule"
                )
            labels = _codes(list(getattr(dm, attribute)))
        return ClusterResult(labels=labels, num_clusters=len(set(labels)), silhouette=None)

    def client_fingerprint(self, pl_module: Any, idx: int, round_idx: int) -> torch.Tensor:
        """What client ``idx`` computes and sends: its projected, normalized (optionally noised) signal."""
        batches = pl_module.client_batches(idx, self.num_batches, self.seed + round_idx)
        signal = pl_module.task_signal(idx, batches, self.signal)
        if self.sides != "both":
            kept = {k: v for k, v in signal.items() if k.startswith(f"{self.sides}.")}
            if signal and not kept:
                raise ValueError(
                    f"TaskClustering(sides={self.sides!r}) fingerprints the {self.sides!r} part of the task signal, "
                    f"but {type(pl_module).__name__} sends only {sorted({k.split('.')[0] for k in signal})}; set "
                    "`sides` to 'both' or to one of those"
                )
            signal = kept
        try:
            vector = project_gradients(signal, self.dim, self.seed, normalize=self.normalize)
        except ValueError as err:
            rank_zero_warn(f"client {idx}: no usable fingerprint ({err}); it will be left out of clustering")
            vector = torch.full((self.dim,), float("nan"))
        if self.dp_noise_multiplier > 0:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + idx + 7919 * round_idx)
            vector = privatize(vector, self.dp_clip, self.dp_noise_multiplier, generator)
            self.releases += 1 if idx == 0 else 0
        channel = getattr(pl_module, "channel", None)
        if channel is not None:
            channel.send_fingerprint(fingerprint_bytes(self.dim), client_idx=idx)
        return vector.detach().cpu()

    # ------------------------------------------------------------------------------------------ logging
    def metrics(self, result: ClusterResult, dm: Any) -> dict[str, float]:
        """Scalars: K, silhouette, cluster sizes, ε, and ARI/NMI against the true tasks and groups when known."""
        out: dict[str, float] = {"clustering/num_clusters": float(result.num_clusters)}
        if result.silhouette is not None:
            out["clustering/silhouette"] = float(result.silhouette)
        if result.min_silhouette is not None and np.isfinite(result.min_silhouette):
            out["clustering/min_silhouette"] = float(result.min_silhouette)
        for k in range(result.num_clusters):
            out[f"clustering/size_cluster_{k}"] = float(sum(1 for c in result.labels if c == k))
        out["clustering/left_out"] = float(len(result.left_out))
        for truth in ("client_tasks", "client_groups"):
            names = getattr(dm, truth, None)
            if names:
                ids = _codes(list(names))
                for key, value in clustering_scores(result.labels, ids).items():
                    out[f"clustering/{key}_vs_{truth.split('_')[1].rstrip('s')}"] = value
        if self.dp_noise_multiplier > 0:
            out["clustering/dp_epsilon"] = dp_epsilon(self.dp_noise_multiplier, max(1, self.releases), self.dp_delta)
        return out

    def log_result(self, trainer: L.Trainer, result: ClusterResult, dm: Any, round_idx: int) -> None:
        metrics = self.metrics(result, dm)
        quality = ", ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in metrics.items() if k.split("/")[1][:3] in QUALITY)
        rank_zero_info(f"clustering: K={result.num_clusters}, clusters {result.labels}; {quality}")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=round_idx)
            add_image = getattr(getattr(logger, "experiment", None), "add_image", None)
            if callable(add_image) and self.fingerprints is not None:
                add_image("clustering/fingerprints", self.picture(result, dm), round_idx, dataformats="HWC")

    def picture(self, result: ClusterResult, dm: Any) -> np.ndarray:
        """The fingerprints in 2-D (PCA): colour = cluster, marker = true group; an RGB array for TensorBoard."""
        import matplotlib.image as mpimg

        assert self.fingerprints is not None
        groups = getattr(dm, "client_groups", None)
        names = [f"c{i}" for i in range(len(result.labels))]
        figure = plot_fingerprints(embed_2d(self.fingerprints), result.labels, groups, names)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=80)
        buffer.seek(0)
        return (mpimg.imread(buffer, format="png")[..., :3] * 255).astype(np.uint8)

    # ------------------------------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "result": None if self.result is None else self.result.to_dict(),
            "fingerprints": None if self.fingerprints is None else self.fingerprints.tolist(),
            "last_round": self.last_round,
            "releases": self.releases,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        result = state_dict.get("result")
        self.result = None if result is None else ClusterResult.from_dict(result)
        prints = state_dict.get("fingerprints")
        self.fingerprints = None if prints is None else np.asarray(prints, dtype=np.float32)
        self.last_round = int(state_dict.get("last_round", -1))
        self.releases = int(state_dict.get("releases", 0))


def _codes(names: list[str]) -> list[int]:
    order = {n: i for i, n in enumerate(dict.fromkeys(names))}
    return [order[n] for n in names]
