"""``Federation``: the LightningModule the CLI trains — many split clients over one frozen backbone.

One training epoch is one federated round. The round's batches (built by ``FederatedDataModule``) arrive grouped by
client: ``local_steps`` batches of each sampled client. Each batch is one split step of that client. At the round's
last batch the round ends: client (and per-client server) adapters are aggregated and sent back. Phase callbacks
(clustering, rank allocation, aggregation) read and write the state exposed here: ``clients``, ``cluster_ids``,
``num_examples``, ``backbone``.
"""

from __future__ import annotations

import random
import time
from typing import Any, Literal, cast

import lightning as L
import numpy as np
import torch

from atlas_pl.algorithms.aggregation import fedavg
from atlas_pl.client import SplitClient
from atlas_pl.evaluation import FederatedEvaluator, Scoring, tasks_from_datamodule
from atlas_pl.lora.adapters import LoraSpec, validate_rank
from atlas_pl.metrics import PerClientMean
from atlas_pl.models import load_model
from atlas_pl.split.backbone import SplitBackbone
from atlas_pl.split.channel import Compression, InProcessChannel
from atlas_pl.split.pooling import Pooling
from atlas_pl.split.scoring import ScoreNorm
from atlas_pl.split.step import split_forward_backward

ServerAdapters = Literal["per_client", "per_cluster"]
AGGREGATIONS = ("fedavg", "exact", "zero_pad", "dense_svd", "flora", "none", "centralized")


def _numpy_state() -> tuple:
    """NumPy's global RNG state with the key array as a tensor (checkpoints load with ``weights_only=True``)."""
    state: Any = np.random.get_state()
    kind, keys, pos, has_gauss, gauss = state
    return (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))


def is_round_end(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether ``batch_idx`` is the last training batch of the current round (epoch)."""
    return batch_idx + 1 >= trainer.num_training_batches


class Federation(L.LightningModule):
    """Split federated LoRA fine-tuning of one model by many clients (one training epoch = one round).

    Args:
        model: Base model name: ``gpt2-tiny``, ``gpt2-small-shape``, ``llama-tiny``, ``bert-tiny``,
            ``smollm2-offline``, ``minilm-offline``, a local folder or a hub id (see ``atlas_pl.models``).
        model_overrides: Config fields of config-built models (``{"n_layer": 2}``) or ``from_pretrained`` kwargs.
        task_format: ``causal_lm`` (answer tokens as targets) or ``classification`` (encoder + class head).
        num_labels: Classes of the classification head (``classification`` only).
        num_clients: Number of clients; must equal the datamodule's.
        cut_layer: Blocks ``[0, cut_layer)`` run on the clients, the rest on the server.
        lora_rank: LoRA rank of every adapter (heterogeneous ranks come from ``RankAllocation``).
        lora_alpha: LoRA alpha (update scaled by ``alpha / rank``).
        lora_dropout: Dropout on the LoRA input.
        target_modules: Module suffixes inside a block to adapt; ``None`` = the architecture's default.
        learning_rate: AdamW learning rate (client and server adapters).
        weight_decay: AdamW weight decay.
        aggregation: How each cluster's adapters are merged at round end: ``fedavg`` averages ``A`` and ``B``
            separately (SplitLoRA; equal ranks), ``exact`` merges heterogeneous ranks losslessly and re-decomposes
            to each client's ranks (ATLAS), ``zero_pad`` / ``dense_svd`` / ``flora`` are baselines, ``none`` keeps
            every client's adapter local (the local-only lower bound), ``centralized`` trains one client adapter and
            one server adapter per cluster on its clients' batches in turn (pooled data: the upper bound; nothing
            to merge; one cluster = one model on all the data, true-task clusters = one model per task).
            A ``ClusterAggregation`` callback overrides it.
        server_adapters: ``per_cluster``: clients of a cluster train one shared server adapter in turn;
            ``per_client``: each client has its own server adapter, aggregated like the client adapters.
        compression: Wire format of activations/gradients across the cut (``none``, ``fp16``, ``bf16``, ``int8``).
        dtype: Dtype of the frozen backbone.
        scoring: How causal LMs are scored on classification tasks: ``label_words`` (log-likelihood of each label's
            answer tokens; the label spaces of different tasks coexist) or ``first_token`` (argmax over the vocabulary).
        score_norm: ``sum`` or ``mean`` of a label word's token log-probabilities.
        max_new_tokens: Tokens generated for QA / summarization tasks in evaluation.
        pooling: How an encoder classifier pools the last hidden states: ``mean`` (attention-mask-weighted mean over
            tokens), ``cls`` (first token), ``pooler`` (the model's pooler), or ``auto``: a sentence-transformers
            checkpoint's own pooling (all-MiniLM-L6-v2: ``mean``; its pooler is untrained), else ``pooler`` when the
            pooler is trained (non-zero bias), else ``mean``. Ignored by causal LMs (see ``atlas_pl.split.pooling``).
    """

    def __init__(
        self,
        model: str = "gpt2-tiny",
        model_overrides: dict[str, Any] | None = None,
        task_format: Literal["causal_lm", "classification"] = "causal_lm",
        num_labels: int = 2,
        num_clients: int = 9,
        cut_layer: int = 1,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        target_modules: list[str] | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        aggregation: Literal["fedavg", "exact", "zero_pad", "dense_svd", "flora", "none", "centralized"] = "fedavg",
        server_adapters: ServerAdapters = "per_cluster",
        compression: Compression = "none",
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        scoring: Scoring = "label_words",
        score_norm: ScoreNorm = "sum",
        max_new_tokens: int = 32,
        pooling: Pooling = "auto",
    ) -> None:
        super().__init__()
        if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
            raise ValueError(f"`num_clients` must be an int >= 1, got {num_clients!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"`aggregation` must be one of {AGGREGATIONS}, got {aggregation!r}")
        if server_adapters not in ("per_client", "per_cluster"):
            raise ValueError(f"`server_adapters` must be 'per_client' or 'per_cluster', got {server_adapters!r}")
        validate_rank(lora_rank, "lora_rank")
        self.save_hyperparameters()
        self.aggregation = aggregation
        self.server_adapters = server_adapters
        self.learning_rate, self.weight_decay = learning_rate, weight_decay
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold adapters, never the frozen backbone
        lora = LoraSpec(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, target_modules=target_modules)
        base = load_model(model, task_format, num_labels, model_overrides, dtype)
        base.train()  # pretrained checkpoints load in eval mode; fine-tuning runs dropout as Hugging Face does
        self.backbone = SplitBackbone(base, cut_layer, lora, pooling)
        self.channel = InProcessChannel(compression)
        self.num_clients = num_clients
        self.cluster_ids: list[int] = [0] * num_clients
        self.num_examples: list[int] = [1] * num_clients
        self.client_task_ids: list[int] = [0] * num_clients
        self.clients: list[SplitClient] = [self._make_client(i) for i in range(num_clients)]
        self.train_loss = PerClientMean(num_clients)
        self.evaluator = FederatedEvaluator(num_clients, None, scoring, score_norm, max_new_tokens)
        self.history: list[dict[str, Any]] = []
        self.external_aggregation = False  # set by a ClusterAggregation callback that takes aggregation over
        self._participants: set[int] = set()
        self._round_start_bytes = (0, 0)
        self._round_start_time = 0.0
        self._predicted: list[int] = [0] * num_clients  # examples predicted per client (``predict_step`` ids)

    # ------------------------------------------------------------------------------------------ clients
    def client_adapter_name(self, client_idx: int) -> str:
        """Client adapter of ``client_idx``: its own, or its cluster's pooled one (``centralized``)."""
        if self.aggregation == "centralized":
            return f"client_c{self.cluster_ids[client_idx]}"
        return f"client_{client_idx}"

    def server_adapter_name(self, client_idx: int) -> str:
        if self.server_adapters == "per_client" and self.aggregation != "centralized":
            return f"server_{client_idx}"
        return f"server_c{self.cluster_ids[client_idx]}"

    def _make_client(self, idx: int) -> SplitClient:
        return SplitClient(
            self.backbone,
            client_adapter=self.client_adapter_name(idx),
            server_adapter=self.server_adapter_name(idx),
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            channel=self.channel,
            client_idx=idx,
            owns_backbone=False,
        )

    # ------------------------------------------------------------------------------------------ phase hooks
    def set_clusters(self, cluster_ids: list[int]) -> None:
        """Assign clients to clusters; with per-cluster server adapters, each cluster gets its own.

        A new cluster's server adapter starts as a copy of the server adapter its first member used so far, so no
        training is lost. Call :meth:`rebuild_optimizers` afterwards when a Trainer is running.

        Raises:
            ValueError: Wrong length or a negative id.
        """
        ids = [int(c) for c in cluster_ids]
        if len(ids) != self.num_clients or min(ids) < 0:
            raise ValueError(
                f"`cluster_ids` needs {self.num_clients} ids >= 0 (one per client), got {cluster_ids!r}; "
                "clients left out of clustering must still be assigned a cluster"
            )
        previous = [c.server_adapter for c in self.clients]
        previous_client = [c.client_adapter for c in self.clients]
        self.cluster_ids = ids
        backbone = self.backbone
        for idx, client in enumerate(self.clients):
            name = self.server_adapter_name(idx)
            if name not in backbone.server_adapters:
                backbone.add_server_adapter(name)
                backbone.load_adapter_state(name, backbone.adapter_state(previous[idx]))
            client.server_adapter = name
            name = self.client_adapter_name(idx)  # changes only when centralized: one pooled adapter per cluster
            if name not in backbone.client_adapters:
                old = previous_client[idx]
                pattern, cut = dict(backbone.bank.ranks[old]), backbone.cut_of(old)
                backbone.add_client_adapter(name, rank_pattern=pattern, cut_layer=cut)
                backbone.load_adapter_state(name, backbone.adapter_state(old))
            client.client_adapter = name

    def set_client_ranks(self, rank_patterns: list[dict[str, int]], cut_layers: list[int] | None = None) -> None:
        """Give each client adapter its own per-module ranks (phase 2) and, optionally, its own cut layer.

        A client's cut must be in ``[model.cut_layer, num_layers - 1]`` (the server adapters start at
        ``model.cut_layer``). Resized adapters restart from ``B = 0`` and keep the update scaling
        ``lora_alpha / lora_rank``. Call :meth:`rebuild_optimizers` afterwards when a Trainer is running.

        Raises:
            ValueError: Not one pattern (and cut) per client, or a cut outside the allowed range.
        """
        cuts = cut_layers if cut_layers is not None else [self.backbone.cut_of(c.client_adapter) for c in self.clients]
        if len(rank_patterns) != self.num_clients or len(cuts) != self.num_clients:
            raise ValueError(
                f"`rank_patterns` and `cut_layers` need one entry per client ({self.num_clients}), got "
                f"{len(rank_patterns)} and {len(cuts)}"
            )
        for client, pattern, cut in zip(self.clients, rank_patterns, cuts):
            self.resize_adapter(client.client_adapter, pattern, cut)

    def resize_adapter(self, name: str, rank_pattern: dict[str, int], cut_layer: int | None = None) -> None:
        """Re-create adapter ``name`` with ``rank_pattern`` (and a client's ``cut_layer``) unless already so."""
        bank, backbone = self.backbone.bank, self.backbone
        if cut_layer is not None and cut_layer != backbone.cut_of(name):
            backbone.validate_client_cut(cut_layer)
            bank.delete(name)
            backbone.add_client_adapter(name, rank_pattern=dict(rank_pattern), cut_layer=cut_layer)
            return
        if {m: bank.ranks[name].get(m) for m in rank_pattern} == dict(rank_pattern):
            return
        lora = self.backbone.lora
        bank.resize(name, dict(rank_pattern), lora.alpha / lora.rank, lora.dropout)

    def rebuild_optimizers(self) -> None:
        """Recreate the optimizers after phase callbacks changed adapters or clusters (fresh optimizer state)."""
        if self._trainer is not None:
            self.trainer.strategy.setup_optimizers(self.trainer)

    def client_signal(
        self, client_idx: int, batches: list[dict], kind: Literal["grad_B", "update"] = "update"
    ) -> dict[str, torch.Tensor]:
        """A task signal of one client, computed without changing its adapters (phase 1).

        ``grad_B``: the gradient of the client and server LoRA ``B`` factors summed over ``batches`` (``∇_A`` is zero
        while ``B = 0``). ``update``: the change of every LoRA factor after one split step per batch with a fresh
        AdamW (the adapters are restored afterwards). Every step crosses the cut and is counted by the channel.

        Returns:
            ``{"client.<module>.lora_B": tensor, "server.<module>.lora_B": ...}`` (flattened).
        """
        client = self.clients[client_idx]
        sides = {"client": client.client_adapter, "server": client.server_adapter}
        saved = {n: self.backbone.adapter_state(n) for n in sides.values()}
        opts = (client.client_optimizer(), client.server_optimizer())
        with torch.enable_grad():
            for batch in batches:
                if kind == "update":
                    client.run_split_step(batch, opts)
                else:
                    split_forward_backward(
                        self.backbone, self.channel, batch, sides["client"], sides["server"], client_idx=client_idx
                    )
        signal: dict[str, torch.Tensor] = {}
        for side, name in sides.items():
            for module, (a, b, _) in self.backbone.bank.factors(name).items():
                if kind == "update":
                    signal[f"{side}.{module}.lora_A"] = (a.detach() - saved[name][f"{module}.lora_A"]).flatten()
                    signal[f"{side}.{module}.lora_B"] = (b.detach() - saved[name][f"{module}.lora_B"]).flatten()
                elif b.grad is not None:
                    signal[f"{side}.{module}.lora_B"] = b.grad.detach().flatten().clone()
            for param in self.backbone.server_parameters(name):  # its LoRA factors (and task heads)
                param.grad = None
            self.backbone.load_adapter_state(name, saved[name])
        return signal

    def setup(self, stage: str) -> None:
        if self._trainer is not None and self.trainer.world_size > 1:
            raise ValueError(
                f"Federation simulates all clients in one process; it cannot shard them over "
                f"{self.trainer.world_size} processes yet (adapters would diverge between processes). Run with "
                "one device, or use ClusterAggregation with ClientParallelStrategy where each process is one client"
            )
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "num_examples"):
            self.attach_data(dm)

    def attach_data(self, dm: Any) -> None:
        """Take client sizes, client tasks and the task list (heads, evaluation) from a set-up datamodule.

        ``setup`` calls it with the Trainer's datamodule; call it directly when the model runs on dataloaders without
        a datamodule (``atlas-pl predict``, export).

        Raises:
            ValueError: The datamodule has another number of clients, or a client has no training examples.
        """
        if getattr(dm, "num_clients", self.num_clients) != self.num_clients:
            raise ValueError(
                f"`model.num_clients` ({self.num_clients}) differs from `data.num_clients` "
                f"({dm.num_clients}); set both to the same value"
            )
        counts = list(dm.num_examples)
        empty = [i for i, n in enumerate(counts) if n < 1]
        if empty:
            raise ValueError(
                f"client(s) {empty} have no training examples; give every client data "
                "(more examples per task, or fewer clients)"
            )
        self.num_examples = counts
        self.client_task_ids = [int(t) for t in getattr(dm, "client_task_ids", self.client_task_ids)]
        self._configure_tasks(dm)

    def _configure_tasks(self, dm: Any) -> None:
        """Task heads (encoders) and task-aware evaluation from the datamodule's task list."""
        tasks = tasks_from_datamodule(dm)
        if not tasks:
            return
        if self.backbone.task == "classification":
            generative = [t.name for t in tasks if t.kind != "classification"]
            if generative:
                raise ValueError(
                    f"tasks {generative} are generative but model {self.hparams['model']!r} is an encoder; "
                    "use a causal LM (task_format: causal_lm) or drop those tasks"
                )
            self.backbone.configure_tasks([t.num_labels for t in tasks])
        tokenizer = getattr(dm, "tokenizer", None)
        hp = self.hparams
        self.evaluator = FederatedEvaluator(
            self.num_clients,
            tasks,
            hp["scoring"],
            hp["score_norm"],
            hp["max_new_tokens"],
            eos_token_id=getattr(tokenizer, "eos_token_id", None),
            decode=getattr(tokenizer, "decode", None),
        ).to(self.device)
        self.task_names = [t.name for t in tasks]

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """One optimizer per distinct client adapter, then one per server adapter (see :meth:`optimizer_index`)."""
        clients: dict[str, SplitClient] = {}
        servers: dict[str, SplitClient] = {}
        for c in self.clients:
            clients.setdefault(c.client_adapter, c)
            servers.setdefault(c.server_adapter, c)
        self._client_opt_index = {name: j for j, name in enumerate(clients)}
        self._server_opt_index = {name: len(clients) + j for j, name in enumerate(servers)}
        return [c.client_optimizer() for c in clients.values()] + [c.server_optimizer() for c in servers.values()]

    def optimizer_index(self, client_idx: int) -> tuple[int, int]:
        """Positions of the client's and its server adapter's optimizers in ``self.optimizers()``."""
        client = self.clients[client_idx]
        return self._client_opt_index[client.client_adapter], self._server_opt_index[client.server_adapter]

    # ------------------------------------------------------------------------------------------ training
    def on_train_epoch_start(self) -> None:
        self._participants = set()
        self.train_loss.reset()
        self._round_start_bytes = (self.channel.stats.bytes_up, self.channel.stats.bytes_down)
        self._round_start_time = time.perf_counter()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        idx = int(batch["client_idx"])
        opts = cast(list, self.optimizers())
        ci, si = self.optimizer_index(idx)
        out = self.clients[idx].run_split_step(batch, (opts[ci], opts[si]), self.manual_backward)
        self.train_loss.update(out.loss, idx, out.num_targets)
        self._participants.add(idx)
        self.log("train_loss", out.loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=1)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if is_round_end(self.trainer, batch_idx):
            self.end_round()

    @property
    def participants(self) -> list[int]:
        """Clients that trained in the current round so far."""
        return sorted(self._participants)

    def end_round(self) -> None:
        """Aggregate the round's adapters (unless a phase callback owns aggregation) and log the round."""
        participants = sorted(self._participants)
        if self.aggregation not in ("none", "centralized") and participants and not self.external_aggregation:
            self.aggregate(participants)
        up0, down0 = self._round_start_bytes
        stats = self.channel.stats
        metrics = {
            "comm/bytes_up": float(stats.bytes_up - up0),
            "comm/bytes_down": float(stats.bytes_down - down0),
            "round/participants": float(len(participants)),
            "round/seconds": time.perf_counter() - self._round_start_time,
        }
        losses = self.train_loss.per_client()
        for i in participants:
            metrics[f"train_loss/client_{i:03d}"] = float(losses[i])
        for k, v in self.train_loss.grouped(self.cluster_ids).items():
            metrics[f"train_loss/cluster_{k}"] = v
        for scope, v in self.per_task(self.train_loss).items():
            metrics[f"train_loss/{scope}"] = v
        metrics["train_loss/round"] = self.train_loss.overall()
        self.log_round(metrics)

    @torch.no_grad()
    def aggregate(self, participants: list[int]) -> None:
        """Aggregate the round's adapters within each cluster with ``self.aggregation`` and send them to all members.

        The same code path as the ``ClusterAggregation`` callback (which takes over when it is attached).
        """
        from atlas_pl.callbacks.cluster_aggregation import ClusterAggregation

        ClusterAggregation(cast(Any, self.aggregation)).aggregate_federation(self)

    def aggregate_heads(self, active: list[int], members: list[int]) -> None:
        """Per task: average the task head over the active clients holding that task; send it to the members."""
        for task in sorted({self.client_task_ids[i] for i in active}):
            holders = [i for i in active if self.client_task_ids[i] == task]
            states = [self.backbone.head_state(self.clients[i].server_adapter, task) for i in holders]
            if not states[0]:
                return  # causal LM: no heads
            merged = fedavg(states, [self.num_examples[i] for i in holders])
            for i in members:
                self.backbone.load_adapter_state(
                    self.clients[i].server_adapter, {f"head.task{task}.{k}": v for k, v in merged.items()}
                )

    def log_round(self, metrics: dict[str, float]) -> None:
        """Log per-round metrics: to callbacks (``callback_metrics``) and to the loggers with ``step = round``."""
        self.log_dict(metrics, logger=False, batch_size=1)
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.current_epoch)

    # ------------------------------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self) -> None:
        self.evaluator.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluator.update(self.clients[int(batch["client_idx"])], batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def evaluation_metrics(self, prefix: str) -> dict[str, float]:
        """Metrics per client, cluster, task and overall (see :meth:`FederatedEvaluator.compute`), loss per task."""
        metrics = self.evaluator.compute(prefix, self.cluster_ids)
        metrics.update({f"{prefix}_loss/{scope}": v for scope, v in self.per_task(self.evaluator.loss).items()})
        return metrics

    def per_task(self, metric: PerClientMean) -> dict[str, float]:
        """Weighted mean of a per-client metric over each task's clients, keyed ``task_<name>`` (none without tasks)."""
        names = [t.name for t in self.evaluator.tasks]
        grouped = metric.grouped(self.client_task_ids) if names else {}
        return {f"task_{names[t]}": v for t, v in grouped.items() if t < len(names)}

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        metrics = self.evaluation_metrics("val")
        if self.trainer.state.fn != "fit":  # `atlas-pl validate`: Lightning prints and returns these
            self.log_dict(metrics, batch_size=1)
            return
        self.log_round(metrics)
        self.history.append(
            {
                "round": int(self.current_epoch),
                **metrics,
                "bytes_up": self.channel.stats.bytes_up,
                "bytes_down": self.channel.stats.bytes_down,
            }
        )

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.evaluation_metrics("test"), batch_size=1)

    def on_predict_epoch_start(self) -> None:
        self._predicted = [0] * self.num_clients

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict[str, Any]]:
        """Per-example records of one client's batch, scored as in test (:meth:`FederatedEvaluator.predict`).

        ``example_id`` is the example's position in its client's split (batches come client by client, in order).
        """
        idx = int(batch["client_idx"])
        rows = self.evaluator.predict(self.clients[idx], batch)
        start = self._predicted[idx]
        self._predicted[idx] += len(rows)
        return [
            {"client": idx, "cluster": self.cluster_ids[idx], "example_id": start + k, **r} for k, r in enumerate(rows)
        ]

    # ------------------------------------------------------------------------------------------ checkpointing
    def trainable_keys(self) -> set[str]:
        return {k for k, _ in self.named_parameters() if "lora_" in k or k.startswith("backbone.heads.")}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["federation"] = {
            "cluster_ids": list(self.cluster_ids),
            "num_examples": list(self.num_examples),
            "history": self.history,
            "channel": self.channel.stats.state_dict(),
            "adapter_ranks": {n: dict(r) for n, r in self.backbone.bank.ranks.items()},
            "client_cuts": dict(self.backbone.client_cuts),
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": _numpy_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("federation", {})
        self.set_clusters(list(state.get("cluster_ids", self.cluster_ids)))  # creates per-cluster server adapters
        cuts = {str(k): int(v) for k, v in state.get("client_cuts", {}).items()}
        for name, ranks in state.get("adapter_ranks", {}).items():  # ranks and cuts chosen by phase 2
            if name in self.backbone.bank.ranks:
                self.resize_adapter(name, {m: int(r) for m, r in ranks.items()}, cuts.get(name))
        missing = sorted(self.trainable_keys() - set(checkpoint.get("state_dict", {})))
        if missing:
            raise ValueError(
                f"checkpoint lacks {len(missing)} adapter tensors (first: {missing[0]}); it was written "
                "by a federation with other clients, ranks or cut layer: resume with the same config"
            )
        self.num_examples = list(state.get("num_examples", self.num_examples))
        self.history = list(state.get("history", []))
        self.channel.stats.load_state_dict(state.get("channel", {}))
        rng = state.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            kind, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(rng["python"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
