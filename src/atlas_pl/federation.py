"""``Federation``: the LightningModule the CLI trains — many split clients over one frozen backbone.

One training epoch is one federated round. The round's batches (built by ``FederatedDataModule``) arrive grouped by
client: ``local_steps`` batches of each sampled client. Each batch is one split step of that client. The phase
callbacks (``TaskClustering``, ``RankAllocation``, ``ClusterAggregation``) reach the clients only through the
federation protocol (``atlas_pl.protocol``) implemented below; which adapter each client trains with is the
``ClientRoster``'s business. The module never aggregates by itself: without ``ClusterAggregation`` every client keeps
its own adapters (the local-only baseline).

Sharded over ``P`` processes (``--trainer.strategy client_parallel --trainer.devices P``),
each process hosts the clients ``c`` with ``c mod P`` equal to its rank (:func:`atlas_pl.distributed.owner_of`) over its
own copy of the frozen model, trains only those, and evaluates only those; the phase callbacks gather what they need
across processes (fingerprints, allocations, pulled LoRA factors). A client's own adapters live in its process only. An
adapter shared by clients of several processes (a cluster's server adapter under ``share: server``, both adapters
under ``share: all``) is trained as one copy per process on that process's clients and the copies are averaged at
round end, weighted by the examples of the clients that trained them (SplitFed-V1 semantics; each copy keeps its own
AdamW moments). Metrics, traffic and fault records are summed over processes; checkpoints hold every client's adapters
and optimizer state from the process that hosts it, so a run resumes on any number of processes.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Literal, cast

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from typing_extensions import override

from atlas_pl.algorithms.privacy import DPSGD
from atlas_pl.client import SplitClient
from atlas_pl.data.client_data import sample_client_batches
from atlas_pl.distributed import all_reduce_sum, gather_objects, owner_of
from atlas_pl.evaluation import EvaluationSpec, FederatedEvaluator, tasks_from_datamodule
from atlas_pl.faults import FaultSpec, check_step, describe
from atlas_pl.lora.adapters import LoraSpec
from atlas_pl.metrics import PerClientMean, synced
from atlas_pl.models import load_model
from atlas_pl.profiling import section, use_profiler
from atlas_pl.protocol import AdapterLayout, AdapterUpdate, ClientSizing, Side
from atlas_pl.rng import rng_state, set_rng_state
from atlas_pl.roster import ClientRoster, Share
from atlas_pl.split.backbone import SHAPES, SplitBackbone, SplitShape
from atlas_pl.split.bottleneck import BottleneckSpec
from atlas_pl.split.channel import ActivationNoise, ChannelStats, Compression, GradientSparsity, InProcessChannel
from atlas_pl.split.pooling import Pooling
from atlas_pl.split.signal import SignalKind, task_signal
from atlas_pl.split.step import split_group_forward_backward
from atlas_pl.strategies import ClientParallelStrategy


def is_round_end(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether ``batch_idx`` is the last training batch of the current round (epoch)."""
    return batch_idx + 1 >= trainer.num_training_batches


class Federation(L.LightningModule):
    """Split federated LoRA fine-tuning of one model by many clients (one training epoch = one round).

    Args:
        model: Base model name: ``gpt2-tiny``, ``gpt2-small-shape``, ``llama-tiny``, ``bert-tiny``,
            ``smollm2-offline``, ``minilm-offline``, a local folder or a hub id (see ``atlas_pl.models``).
        model_overrides: Config fields of config-built models (``{"n_layer": 2}``) or ``from_pretrained`` kwargs
            (``num_labels`` of an encoder's base head; task heads take their sizes from the datamodule's tasks).
        task_format: ``causal_lm`` (answer tokens as targets) or ``classification`` (encoder + class head).
        num_clients: Number of clients; must equal the datamodule's.
        cut_layer: Blocks ``[0, cut_layer)`` run on the clients, the rest on the server.
        lora: LoRA rank, alpha, dropout and target module suffixes of every adapter (YAML: ``lora: {rank: 8,
            alpha: 16, target_modules: [attn.c_attn]}``; heterogeneous ranks come from ``RankAllocation``).
        learning_rate: AdamW learning rate (client and server adapters).
        weight_decay: AdamW weight decay.
        share: Which adapters a cluster's clients share (see ``atlas_pl.roster``): ``server`` (one server adapter per
            cluster, trained by its clients in turn; ATLAS and SplitLoRA), ``none`` (each client its own client and
            server adapter: local-only, or both sides aggregated by ``ClusterAggregation``), ``all`` (one client and
            one server adapter per cluster on its clients' batches in turn: pooled data, the centralized upper
            bound; one cluster = one model on all the data, true-task clusters = one model per task).
        compression: Wire format of activations/gradients across the cut (``none``, ``fp16``, ``bf16``, ``int8``).
        dtype: Dtype of the frozen backbone.
        evaluation: How clients are scored (``scoring``, ``score_norm``, ``max_new_tokens``; see ``EvaluationSpec``).
        pooling: How an encoder classifier pools the last hidden states: ``mean`` (attention-mask-weighted mean over
            tokens), ``cls`` (first token), ``pooler`` (the model's pooler), or ``auto``: a sentence-transformers
            checkpoint's own pooling (all-MiniLM-L6-v2: ``mean``; its pooler is untrained), else ``pooler`` when the
            pooler is trained (non-zero bias), else ``mean``. Ignored by causal LMs (see ``atlas_pl.split.pooling``).
        faults: What a failing client does to the run (``tolerate``, ``timeout_s``; see ``atlas_pl.faults``): by
            default any client error ends it; with ``tolerate: true`` the client is left out of the round.
        activation_noise: A privacy defence: noise every client adds to its cut activations before sending
            (``{multiplier: 1.0, kind: gaussian}``: standard deviation in units of the activations' RMS; see
            ``atlas_pl.split.channel.ActivationNoise``). Default: none.
        split_shape: ``two_part`` (the server runs the rest of the model, the head and the loss: it sees the labels)
            or ``u_shaped`` (the client keeps the head and the loss: only intermediate activations go up and their
            gradients come down, labels never leave the client; two more transfers per step, same gradients).
        gradient_sparsity: A privacy defence of the U-shaped split: the fraction of each returned gradient vector's
            entries the client sends (``{keep: 0.1}``: the 10 % largest in magnitude, the rest zero; see
            ``atlas_pl.split.channel.GradientSparsity``). Default: all (no defence).
        dp_sgd: A privacy defence of what the client adapters carry: DP-SGD on every client's client-half adapter
            (``{noise_multiplier: 1.0, clip_norm: 1.0, delta: 1e-5}``: per-example clipping and Gaussian noise, see
            ``atlas_pl.algorithms.DPSGD``); each round logs ``privacy/dp_epsilon`` (the largest client ``ε`` so far,
            from ``dp_accounting``). It does not protect the cut activations (``activation_noise`` does). Default:
            none.
        bottleneck: A privacy defence of the cut activations: a variational information bottleneck, learned noise
            per hidden dimension trained with the penalty ``weight`` · (a bound on the information ``z`` carries about
            ``h``) (``{weight: 0.1, init_scale: 0.3}``; see ``atlas_pl.split.bottleneck``); each round logs
            ``privacy/bottleneck_scale`` (mean σ / rms(h); ``_min`` / ``_max`` over dimensions). One process only;
            not with ``dp_sgd``.
            Default: none.
        server_batching: With ``data.schedule: synchronous``, run the clients of a step that share a server adapter
            (and cut layer) through the server half as one batch (default), or one at a time with their server
            gradients summed — the same result up to float rounding (dropout aside), slower. Either way the shared
            server adapter takes one optimizer step per local step (see
            ``atlas_pl.split.step.split_group_forward_backward``). No effect on the sequential schedule.
        server_batch_size: At most this many sequences per batched server pass (``None``: every client of a group
            at once); a larger group runs as several passes of clients with similar sequence lengths. Bounds the
            server's activation memory; the result is the same.
    """

    def __init__(
        self,
        model: str = "gpt2-tiny",
        model_overrides: dict[str, Any] | None = None,
        task_format: Literal["causal_lm", "classification"] = "causal_lm",
        num_clients: int = 9,
        cut_layer: int = 1,
        lora: LoraSpec | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        share: Share = "server",
        compression: Compression = "none",
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        evaluation: EvaluationSpec | None = None,
        pooling: Pooling = "auto",
        faults: FaultSpec | None = None,
        activation_noise: ActivationNoise | None = None,
        split_shape: SplitShape = "two_part",
        gradient_sparsity: GradientSparsity | None = None,
        dp_sgd: DPSGD | None = None,
        bottleneck: BottleneckSpec | None = None,
        server_batching: bool = True,
        server_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
            raise ValueError(f"`num_clients` must be an int >= 1, got {num_clients!r}")
        lora = LoraSpec(**lora) if isinstance(lora, dict) else lora or LoraSpec()
        ev = EvaluationSpec(**evaluation) if isinstance(evaluation, dict) else evaluation or EvaluationSpec()
        fault_spec = FaultSpec(**faults) if isinstance(faults, dict) else faults or FaultSpec()
        noise = ActivationNoise(**activation_noise) if isinstance(activation_noise, dict) else activation_noise
        noise = noise or ActivationNoise()
        sparse = GradientSparsity(**gradient_sparsity) if isinstance(gradient_sparsity, dict) else gradient_sparsity
        sparse = sparse or GradientSparsity()
        dp = DPSGD(**dp_sgd) if isinstance(dp_sgd, dict) else dp_sgd
        vib = BottleneckSpec(**bottleneck) if isinstance(bottleneck, dict) else bottleneck
        if vib is not None and dp is not None:
            raise ValueError(
                "`bottleneck` and `dp_sgd` cannot be combined: DP-SGD clips the client adapter's per-example gradients "
                "and the bottleneck's noise scales would escape its accounting. Fix: drop one of them."
            )
        if sparse.keep < 1 and split_shape != "u_shaped":
            raise ValueError(
                f"`gradient_sparsity` (keep {sparse.keep}) sparsifies the gradients a U-shaped client returns; with "
                f"split_shape {split_shape!r} the server computes the loss and holds the labels, so there is nothing "
                "for it to hide. Fix: set `model.split_shape: u_shaped`, or drop `model.gradient_sparsity`."
            )
        self.save_hyperparameters(ignore=["lora", "evaluation", "faults", "activation_noise", "gradient_sparsity",
                                          "dp_sgd", "bottleneck"])  # fmt: skip
        self.hparams.update(lora=asdict(lora), evaluation=asdict(ev), faults=asdict(fault_spec),
                            activation_noise=asdict(noise), gradient_sparsity=asdict(sparse),
                            dp_sgd=asdict(dp) if dp is not None else None,
                            bottleneck=asdict(vib) if vib is not None else None)  # fmt: skip
        self.dp_sgd = dp
        self.server_batching = bool(server_batching)
        if server_batch_size is not None and (isinstance(server_batch_size, bool) or server_batch_size < 1):
            raise ValueError(f"`server_batch_size` must be an int >= 1 (sequences per server pass) or null, got "
                             f"{server_batch_size!r}")  # fmt: skip
        self.server_batch_size = server_batch_size
        self.evaluation = ev
        self.faults = fault_spec
        self.fault_log: list[dict[str, Any]] = []  # every fault: round, client, cluster, reason
        self._round_faults: dict[int, str] = {}
        self.learning_rate, self.weight_decay = learning_rate, weight_decay
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold adapters, never the frozen backbone
        overrides = dict(model_overrides or {})
        base = load_model(model, task_format, int(overrides.pop("num_labels", 2)), overrides, dtype)
        base.train()  # pretrained checkpoints load in eval mode; fine-tuning runs dropout as Hugging Face does
        if split_shape not in SHAPES:
            raise ValueError(f"`split_shape` must be one of {SHAPES}, got {split_shape!r}")
        self.backbone = SplitBackbone(base, cut_layer, lora, pooling)
        self.backbone.shape = split_shape
        if vib is not None:
            self.backbone.enable_bottleneck(vib)
        self.channel = InProcessChannel(compression, noise, sparse)
        self.num_clients = num_clients
        self.roster = ClientRoster(self.backbone, num_clients, share)
        self.num_examples: list[int] = [1] * num_clients
        self.client_task_ids: list[int] = [0] * num_clients
        self.clients: list[SplitClient] = [self._make_client(i) for i in range(num_clients)]
        self.train_loss = PerClientMean(num_clients)
        self.evaluator = FederatedEvaluator(num_clients, None, ev.scoring, ev.score_norm, ev.max_new_tokens)
        self.history: list[dict[str, Any]] = []
        self._round_privacy: dict[str, float] = {}  # the last round's ``privacy/*`` metrics, kept in ``history``
        self._participants: set[int] = set()
        self._round_start_bytes = (0, 0)
        self._round_start_time = 0.0
        self._predicted: list[int] = [0] * num_clients  # examples predicted per client (``predict_step`` ids)
        self.shard_rank, self.num_shards = 0, 1  # this process's shard of the clients (see the module docstring)

    @property
    def cluster_ids(self) -> list[int]:
        """Cluster of every client (see :class:`ClientRoster`)."""
        return self.roster.cluster_ids

    def _make_client(self, idx: int) -> SplitClient:
        return SplitClient(
            self.backbone,
            client_adapter=self.roster.adapter(idx, "client"),
            server_adapter=self.roster.adapter(idx, "server"),
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            channel=self.channel,
            client_idx=idx,
            owns_backbone=False,
            dp_sgd=self.dp_sgd,
        )

    # ------------------------------------------------------------------------------ the federation protocol
    replicates_clients = True
    """Every process keeps every client's adapters and layout (it trains only its shard): phase callbacks apply every
    client's ``resize`` in every process, in client order, so a sharded run draws the same initial factors."""

    def local_clients(self) -> list[int]:
        """The clients this process hosts: all of them in one process, ``c mod P == rank`` when sharded."""
        return [c for c in range(self.num_clients) if owner_of(c, self.num_shards) == self.shard_rank]

    def cluster_of(self, client: int) -> int:
        return self.roster.cluster_ids[client]

    def participants(self) -> list[int]:
        """Clients that trained in the current round so far (a client left out for a fault is not one)."""
        return sorted(self._participants - set(self._round_faults))

    def round_faults(self) -> dict[int, str]:
        """Clients left out of the current round, with the reason (``faults: {tolerate: true}``)."""
        return dict(self._round_faults)

    def client_batches(self, client: int, num_batches: int, seed: int) -> list[dict]:
        """``num_batches`` training batches of ``client`` from the datamodule (seeded choice), on this device."""
        batches = sample_client_batches(self.trainer.datamodule, client, num_batches, seed)  # type: ignore[attr-defined]
        return [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]

    def task_signal(self, client: int, batches: list[dict], kind: SignalKind = "grad_B") -> dict[str, torch.Tensor]:
        """``client``'s gradient (``grad_B``) or one-step ``update`` signal on ``batches`` (see ``split.signal``)."""
        return task_signal(self.clients[client], batches, kind)

    def assign_clusters(self, cluster_ids: Sequence[int]) -> None:
        """Assign clients to clusters; shared adapters of a new cluster start from its first member's (no loss).

        Raises:
            ValueError: Wrong length or a negative id.
        """
        self.roster.assign(cluster_ids)
        self._sync_clients()

    def client_modules(self, client: int, cut_layer: int | None = None) -> list[str]:
        """Modules a client adapter of ``client`` covers when it cuts at ``cut_layer`` (default: its cut).

        Raises:
            ValueError: A cut outside ``[model.cut_layer, num_layers - 1]``.
        """
        if cut_layer is None:
            return self.backbone.client_module_names(self.backbone.cut_of(self.clients[client].client_adapter))
        self.backbone.validate_client_cut(cut_layer)
        return self.backbone.client_module_names(cut_layer)

    def client_sizing(self) -> ClientSizing:
        dm: Any = self.trainer.datamodule  # type: ignore[attr-defined]
        return ClientSizing(
            model_config=self.backbone.model.config,
            batch_size=int(dm.batch_size),
            seq_len=int(dm.max_length),
            target_modules=tuple(self.backbone.targets),
            cut_layer=self.backbone.cut_layer,
            dtype=str(next(self.backbone.model.parameters()).dtype).replace("torch.", ""),
            device="cuda" if self.device.type == "cuda" else "cpu",
            local_steps=int(getattr(dm, "local_steps", 1)),
        )

    def resize(self, client: int, rank_pattern: dict[str, int], cut_layer: int | None = None) -> None:
        """Re-create ``client``'s client adapter with per-module ranks and, optionally, its own cut layer.

        A client's cut must be in ``[model.cut_layer, num_layers - 1]`` (the server adapters start at
        ``model.cut_layer``). Resized adapters restart from ``B = 0`` and keep the scaling ``lora_alpha / lora_rank``.
        """
        self.roster.resize(self.clients[client].client_adapter, rank_pattern, cut_layer)

    def adapter_sides(self) -> tuple[Side, ...]:
        return self.roster.aggregated_sides()

    def adapter_layout(self, client: int, side: Side) -> AdapterLayout:
        return self.roster.layout(client, side)

    def pull(self, client: int, side: Side) -> AdapterUpdate:
        """What ``client`` sends at aggregation (counted on the channel)."""
        update = self.roster.pull(client, side, self.num_examples[client], self.client_task_ids[client])
        self.channel.send_adapters(update.nbytes, 0, client_idx=client)
        return update

    def push(self, client: int, side: Side, update: AdapterUpdate) -> None:
        """Load what ``client`` receives at aggregation (counted on the channel)."""
        self.roster.push(client, side, update)
        self.channel.send_adapters(0, self.backbone.bank.nbytes(self.roster.adapter(client, side)), client_idx=client)

    def reset_optimizer_state(self, client: int, side: Side) -> None:
        """Forget the AdamW moments of ``client``'s adapter on ``side`` (its next step starts them afresh).

        After a merge re-decomposes an adapter into new factors, moments kept from the old factors describe another
        basis; ``ClusterAggregation(reset_optimizer=True)`` calls this for every member it pushed to.
        """
        if self._trainer is None or not getattr(self, "_client_opt_index", None):
            return  # no optimizers yet: nothing to forget
        opt = cast(list, self.optimizers())[self.optimizer_index(client)[0 if side == "client" else 1]]
        inner = getattr(opt, "optimizer", opt)
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state.pop(param, None)

    def _sync_clients(self) -> None:
        for idx, client in enumerate(self.clients):
            client.client_adapter = self.roster.adapter(idx, "client")
            client.server_adapter = self.roster.adapter(idx, "server")

    @override
    def setup(self, stage: str) -> None:
        if self._trainer is not None:
            self.shard(int(self.trainer.global_rank), int(self.trainer.world_size), self.trainer.strategy)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "num_examples"):
            self.attach_data(dm)

    def shard(self, rank: int, num_shards: int, strategy: Any = None) -> None:
        """Host the clients ``c`` with ``c mod num_shards == rank`` in this process (``setup`` calls it).

        Raises:
            ValueError: Several processes under a strategy other than ``ClientParallelStrategy`` (DDP would average
                gradients of different clients and demand equal shapes), or fewer clients than processes.
        """
        if num_shards > 1 and self.backbone.bottleneck is not None:
            raise ValueError(
                "`model.bottleneck` runs in one process (its per-client noise scales are not gathered across shards); "
                "fix: drop --trainer.strategy client_parallel / --trainer.devices, or drop the bottleneck"
            )
        if num_shards > 1 and not isinstance(strategy, ClientParallelStrategy):
            raise ValueError(
                f"a Federation over {num_shards} processes needs ClientParallelStrategy (each process trains its own "
                f"shard of clients; {type(strategy).__name__} would synchronise their gradients). Fix: "
                "--trainer.strategy client_parallel"
            )
        if num_shards > self.num_clients:
            raise ValueError(
                f"{num_shards} processes for {self.num_clients} clients: every process must host one at least. "
                f"Fix: --trainer.devices <= {self.num_clients}"
            )
        self.shard_rank, self.num_shards = rank, num_shards
        if num_shards > 1:  # every logged value is summed over the processes already (``synced``): no sync_dist
            warnings.filterwarnings("ignore", message=r".*sync_dist=True.* when logging on epoch level",
                                    category=PossibleUserWarning)  # fmt: skip

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
            heads = list(getattr(dm, "task_heads", []) or []) or None  # per_label_words: tasks sharing heads
            self.backbone.configure_tasks([t.num_labels for t in tasks], heads)
        tokenizer = getattr(dm, "tokenizer", None)
        ev = self.evaluation
        self.evaluator = FederatedEvaluator(
            self.num_clients,
            tasks,
            ev.scoring,
            ev.score_norm,
            ev,
            eos_token_id=getattr(tokenizer, "eos_token_id", None),
            decode=getattr(tokenizer, "decode", None),
            pad_token_id=getattr(tokenizer, "pad_token_id", None),
        ).to(self.device)
        self.task_names = [t.name for t in tasks]

    @override
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
    @override
    def on_fit_start(self) -> None:
        use_profiler(getattr(self.trainer, "profiler", None))  # the split step reports its sections to it

    @override
    def on_fit_end(self) -> None:
        use_profiler(None)

    @override
    def on_train_epoch_start(self) -> None:
        self._participants = set()
        self._round_faults = {}
        self.roster.end_aggregation()
        self.train_loss.reset()
        self._round_start_bytes = (self.channel.stats.bytes_up, self.channel.stats.bytes_down)
        self._round_start_time = time.perf_counter()

    @override
    def training_step(self, batch: dict, batch_idx: int) -> None:
        if "clients" in batch:  # a synchronous round's step: every client of the step together
            self.group_step(batch["clients"], batch_idx)
            return
        idx = int(batch["client_idx"])
        if idx < 0 or idx in self._round_faults:  # a sharded round's idle padding step; a client left out
            return
        opts = cast(list, self.optimizers())
        ci, si = self.optimizer_index(idx)
        client = self.clients[idx]
        if not self.faults.tolerate:
            out = client.run_split_step(batch, (opts[ci], opts[si]), self.manual_backward)
        else:
            params = [*client.split.bank.parameters(client.client_adapter), *client.split.server_parameters(
                client.server_adapter)]  # fmt: skip
            started = time.perf_counter()
            try:
                out = client.run_split_step(
                    batch,
                    (opts[ci], opts[si]),
                    self.manual_backward,
                    check=lambda o: check_step(o.loss, params, started, self.faults.timeout_s),
                )
            except Exception as err:  # noqa: BLE001 - any client failure is the client's, not the run's
                self.leave_out(idx, describe(err))
                return
        self.train_loss.update(out.loss, idx, out.num_targets)
        self._participants.add(idx)
        self.log_step_loss(out.loss.detach(), batch_idx)

    def log_step_loss(self, loss: torch.Tensor, batch_idx: int) -> None:
        """Log the step's ``train_loss`` (progress bar, loggers) every ``trainer.log_every_n_steps`` steps.

        Also at a round's last step. Each ``self.log`` costs about half a millisecond; per-client losses are logged
        per round by :meth:`end_round`.
        """
        every = max(1, int(getattr(self.trainer, "log_every_n_steps", 1) or 1))
        if (batch_idx + 1) % every == 0 or is_round_end(self.trainer, batch_idx):
            self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)

    def group_step(self, batches: list[dict], batch_idx: int = 0) -> None:
        """One local step of several clients (``data.schedule: synchronous``): client halves, batched server halves.

        Every client's and every distinct server adapter's optimizer steps once, after all gradients are in.

        Raises:
            ValueError: With ``faults: {tolerate: true}`` (one failing client would spoil its group's server step).
        """
        if self.faults.tolerate:
            raise ValueError(
                "faults.tolerate leaves a failing client out of its own step; under data.schedule synchronous its "
                "group shares one server step. Fix: data.schedule sequential, or faults.tolerate false"
            )
        opts = cast(list, self.optimizers())
        idxs = [int(b["client_idx"]) for b in batches]
        used = sorted({j for i in idxs for j in self.optimizer_index(i)})
        for j in used:
            opts[j].zero_grad(set_to_none=True)
        clients = [self.clients[i] for i in idxs]
        outs = split_group_forward_backward(
            self.backbone,
            self.channel,
            batches,
            [(c.client_adapter, c.server_adapter, i) for c, i in zip(clients, idxs)],
            backward=self.manual_backward,
            client_backwards=[c._private_backward if c.dp_sgd is not None else None for c in clients],
            batched=self.server_batching,
            max_rows=self.server_batch_size,
        )
        with section("split/optimizers"):
            for j in used:
                opts[j].step()
        for i, out in zip(idxs, outs):
            self.train_loss.update(out.loss, i, out.num_targets)
            self._participants.add(i)
        self.log_step_loss(torch.stack([o.loss.detach() for o in outs]).mean(), batch_idx)

    def leave_out(self, client: int, reason: str) -> None:
        """Leave ``client`` out of the rest of this round and its aggregation; log and record why."""
        round_idx = int(self.current_epoch)
        self._round_faults[client] = reason
        self.fault_log.append({"round": round_idx, "client": client, "cluster": self.cluster_ids[client],
                               "reason": reason})  # fmt: skip
        rank_zero_warn(
            f"round {round_idx}: client {client} left out of this round ({reason}); it receives its cluster's merge "
            "and trains again next round"
        )

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """At the round's last batch (after ``ClusterAggregation``, whose hook runs first), log the round."""
        if is_round_end(self.trainer, batch_idx):
            self.end_round()

    def end_round(self) -> None:
        """Log the round: traffic (aggregation included), participants, time and train loss per client/cluster/task.

        Sharded, it first averages the copies of shared adapters (:meth:`sync_shared_adapters`) and sums traffic,
        participants and faults over the processes.
        """
        self.sync_shared_adapters()
        up0, down0 = self._round_start_bytes
        stats = self.channel.stats
        parts = gather_objects((self.participants(), len(self._round_faults), stats.bytes_up - up0,
                                stats.bytes_down - down0))  # fmt: skip
        participants = sorted(c for part in parts for c in part[0])
        self.consolidate_records()
        metrics = {
            "comm/bytes_up": float(sum(p[2] for p in parts)),
            "comm/bytes_down": float(sum(p[3] for p in parts)),
            "round/participants": float(len(participants)),
            "round/faults": float(sum(p[1] for p in parts)),
            "round/seconds": time.perf_counter() - self._round_start_time,
        }
        self._round_privacy = self.privacy_metrics()
        metrics.update(self._round_privacy)
        with synced(self.train_loss):
            losses = self.train_loss.per_client()
            for i in participants:
                metrics[f"train_loss/client_{i:03d}"] = float(losses[i])
            for k, v in self.train_loss.grouped(self.cluster_ids).items():
                metrics[f"train_loss/cluster_{k}"] = v
            for scope, v in self.per_task(self.train_loss).items():
                metrics[f"train_loss/{scope}"] = v
            metrics["train_loss/round"] = self.train_loss.overall()
        self.log_round(metrics)

    def dp_state(self) -> dict[int, tuple[int, int]]:
        """Per client with private steps: ``(steps, batch size)``, summed over the processes of a sharded run."""
        mine = {i: (self.clients[i].dp_steps, self.clients[i].dp_batch_size) for i in self.local_clients()
                if self.clients[i].dp_steps}  # fmt: skip
        merged: dict[int, tuple[int, int]] = {}
        for part in gather_objects(mine):
            for i, (steps, batch) in part.items():
                old = merged.get(i, (0, 0))
                merged[i] = (old[0] + steps, max(old[1], batch))
        return merged

    def privacy_metrics(self) -> dict[str, float]:
        """Privacy figures of the round.

        With ``dp_sgd``: the largest and the median client ``ε`` so far and the share of clipped examples; with a
        ``bottleneck``: the participants' mean noise scale ``σ / rms(h)`` and its range over dimensions.
        """
        vib = self.backbone.bottleneck
        if vib is not None:
            names = sorted({self.clients[c].client_adapter for c in self.participants()} & set(vib.log_scale))
            if not names:
                return {}
            scales = torch.stack([vib.scales(n) for n in names])
            return {"privacy/bottleneck_scale": float(scales.mean()),
                    "privacy/bottleneck_scale_min": float(scales.min()),
                    "privacy/bottleneck_scale_max": float(scales.max())}  # fmt: skip
        if self.dp_sgd is None:
            return {}
        state = self.dp_state()
        for i, (steps, batch) in state.items():  # every process holds the totals (they are checkpointed)
            if owner_of(i, self.num_shards) != self.shard_rank:
                self.clients[i].dp_steps, self.clients[i].dp_batch_size = steps, batch
        eps = sorted(self.dp_sgd.epsilon(steps, batch / max(1, self.num_examples[i]))
                     for i, (steps, batch) in state.items())  # fmt: skip
        if not eps:
            return {}
        clipped = [c.dp_clipped for i, c in enumerate(self.clients) if i in self._participants]
        return {
            "privacy/dp_epsilon": eps[-1],
            "privacy/dp_epsilon_median": eps[len(eps) // 2],
            "privacy/dp_clipped": sum(clipped) / len(clipped) if clipped else float("nan"),
        }

    # ------------------------------------------------------------------------------------------ sharding
    def adapter_users(self) -> dict[str, set[int]]:
        """Every adapter some client trains with → the processes hosting those clients."""
        users: dict[str, set[int]] = {}
        for c in range(self.num_clients):
            for side in ("client", "server"):
                users.setdefault(self.roster.adapter(c, side), set()).add(owner_of(c, self.num_shards))  # type: ignore[arg-type]
        return users

    def adapter_parameters(self, name: str) -> list[torch.nn.Parameter]:
        """The trainable tensors of adapter ``name``: its LoRA factors, and a server adapter's task heads."""
        if name in self.backbone.server_adapters:
            return self.backbone.server_parameters(name)
        return self.backbone.bank.parameters(name)

    @torch.no_grad()
    def sync_shared_adapters(self) -> None:
        """Average the per-process copies of adapters shared across processes (one all-reduce; no-op unsharded).

        Each copy counts the training examples of the hosted clients that trained it this round; a copy nobody
        trained counts zero, and an adapter nobody trained anywhere stays as it is.
        """
        if self.num_shards == 1:
            return
        shared = sorted(name for name, ranks in self.adapter_users().items() if len(ranks) > 1)
        if not shared:
            return
        trained = set(self.participants())
        params = [self.adapter_parameters(name) for name in shared]
        weights = torch.tensor(
            [sum(float(self.num_examples[c]) for c in trained if name in (self.roster.adapter(c, "client"),
             self.roster.adapter(c, "server"))) for name in shared], dtype=torch.float64, device=self.device,
        )  # fmt: skip
        flat = torch.cat([w * torch.cat([p.reshape(-1).double() for p in ps]) for w, ps in zip(weights, params)])
        all_reduce_sum(flat)
        all_reduce_sum(weights)
        offset = 0
        for w, ps in zip(weights, params):
            for p in ps:
                n = p.numel()
                if w > 0:
                    p.copy_((flat[offset : offset + n] / w).view_as(p).to(p.dtype))
                offset += n

    def consolidate_records(self) -> None:
        """Sharded: every process's fault log of this round to all, channel totals onto process 0 (others zero).

        Afterwards the fault log is the same everywhere and the channel counts summed over processes are unchanged,
        so process 0 (which writes results and checkpoints) holds the federation's totals.
        """
        if self.num_shards == 1:
            return
        round_idx = int(self.current_epoch)
        local = set(self.local_clients())
        mine = [r for r in self.fault_log if r["round"] == round_idx and r["client"] in local]
        parts = gather_objects((mine, self.channel.stats.state_dict()))
        records = sorted((r for part, _ in parts for r in part), key=lambda r: r["client"])
        self.fault_log = [r for r in self.fault_log if r["round"] != round_idx] + records
        totals = ChannelStats()
        if self.shard_rank == 0:
            for _, state in parts:
                totals = totals.merged(state)
        self.channel.stats.load_state_dict(totals.state_dict())

    def log_round(self, metrics: dict[str, float]) -> None:
        """Log per-round metrics: to callbacks (``callback_metrics``) and to the loggers with ``step = round``."""
        with section("federation/logging"):
            self.log_dict(metrics, logger=False, batch_size=1)
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.current_epoch)

    # ------------------------------------------------------------------------------------------ evaluation
    @override
    def on_validation_epoch_start(self) -> None:
        self.evaluator.reset()

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluator.update(self.clients[int(batch["client_idx"])], batch)

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    @override
    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def evaluation_metrics(self, prefix: str) -> dict[str, float]:
        """Metrics per client, cluster, task and overall (see :meth:`FederatedEvaluator.compute`), loss per task.

        Sharded, every process evaluates its hosted clients and the metrics are summed over processes here.
        """
        ev = self.evaluator
        with synced(ev.loss, ev.acc, ev.score):
            metrics = ev.compute(prefix, self.cluster_ids)
            metrics.update({f"{prefix}_loss/{scope}": v for scope, v in self.per_task(ev.loss).items()})
        return metrics

    def per_task(self, metric: PerClientMean) -> dict[str, float]:
        """Weighted mean of a per-client metric over each task's clients, keyed ``task_<name>`` (none without tasks)."""
        names = [t.name for t in self.evaluator.tasks]
        grouped = metric.grouped(self.client_task_ids) if names else {}
        return {f"task_{names[t]}": v for t, v in grouped.items() if t < len(names)}

    @override
    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        metrics = self.evaluation_metrics("val")
        if self.trainer.state.fn != "fit":  # `atlas-pl validate`: Lightning prints and returns these
            self.log_dict(metrics, batch_size=1)
            return
        self.log_round(metrics)
        self.log_text_examples()
        self.history.append(
            {
                "round": int(self.current_epoch),
                **metrics,
                **self._round_privacy,
                "bytes_up": self.channel.stats.bytes_up,
                "bytes_down": self.channel.stats.bytes_down,
            }
        )

    def generated_examples(self) -> dict[str, list[dict[str, Any]]]:
        """Task name → the first few generated answers of the last evaluation (``text_examples`` per task).

        Each is a dict of client, prompt, generated text, references and score.
        """
        tasks = self.evaluator.tasks
        return {(tasks[t].name if t < len(tasks) else str(t)): list(rows)
                for t, rows in sorted(self.evaluator.examples.items())}  # fmt: skip

    def log_text_examples(self) -> None:
        """A few generated answers per generative task (prompt end, answer, references) as TensorBoard text."""
        with section("federation/logging"):
            for task, text in self.evaluator.examples_markdown().items():
                for logger in self.loggers:
                    add_text = getattr(getattr(logger, "experiment", None), "add_text", None)
                    if callable(add_text):
                        add_text(f"examples/{task}", text, global_step=self.current_epoch)

    @override
    def on_test_epoch_end(self) -> None:
        self.log_dict(self.evaluation_metrics("test"), batch_size=1)

    @override
    def on_predict_epoch_start(self) -> None:
        self._predicted = [0] * self.num_clients

    @override
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
        return {k for k, _ in self.named_parameters()
                if "lora_" in k or k.startswith(("backbone.heads.", "backbone.bottleneck."))}  # fmt: skip

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        roster = self.roster.state_dict()
        self.gather_hosted_state(checkpoint, roster)
        checkpoint["federation"] = {
            **roster,
            "num_examples": list(self.num_examples),
            "history": self.history,
            "fault_log": self.fault_log,
            "channel": self.channel.stats.state_dict(),
            "dp_steps": {i: [c.dp_steps, c.dp_batch_size] for i, c in enumerate(self.clients) if c.dp_steps},
            "rng": rng_state(),
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("federation", {})
        self.roster.load_state_dict(state)  # clusters (and their shared adapters), ranks and cuts of phases 1-2
        self._sync_clients()
        missing = sorted(self.trainable_keys() - set(checkpoint.get("state_dict", {})))
        if missing:
            raise ValueError(
                f"checkpoint lacks {len(missing)} adapter tensors (first: {missing[0]}); it was written "
                "by a federation with other clients, ranks or cut layer: resume with the same config"
            )
        self.num_examples = list(state.get("num_examples", self.num_examples))
        self.history = list(state.get("history", []))
        self.fault_log = list(state.get("fault_log", []))
        self.channel.stats.load_state_dict(state.get("channel", {}) if self.shard_rank == 0 else {})  # totals once
        for i, (steps, batch) in state.get("dp_steps", {}).items():
            if owner_of(int(i), self.num_shards) == self.shard_rank:  # counted again by its host only
                self.clients[int(i)].dp_steps, self.clients[int(i)].dp_batch_size = int(steps), int(batch)
        if state.get("rng"):
            set_rng_state(state["rng"])

    def gather_hosted_state(self, checkpoint: dict[str, Any], roster: dict[str, Any]) -> None:
        """Sharded: every adapter's tensors, ranks, cut and optimizer state into ``checkpoint`` from its trainer.

        Each comes from the process that trains it (``roster`` gets the ranks and cuts). A no-op in one process;
        every process must call it (``on_save_checkpoint`` does).

        Adapters trained in one process only come from that process; adapters shared across processes are equal
        everywhere after :meth:`sync_shared_adapters` and keep process 0's copy and moments.
        """
        if self.num_shards == 1:
            return
        keys = {id(p): k for k, p in self.named_parameters()}
        state, opt_states = checkpoint["state_dict"], checkpoint.get("optimizer_states")
        opt_index = {**getattr(self, "_client_opt_index", {}), **getattr(self, "_server_opt_index", {})}
        mine: dict[str, Any] = {"tensors": {}, "ranks": {}, "cuts": {}, "optimizers": {}}
        for name, ranks in self.adapter_users().items():
            if ranks != {self.shard_rank} or self.shard_rank == 0:
                continue
            for p in self.adapter_parameters(name):
                if keys.get(id(p)) in state:
                    mine["tensors"][keys[id(p)]] = p.detach().cpu()
            mine["ranks"][name] = dict(self.backbone.bank.ranks[name])
            if name in self.backbone.client_cuts:
                mine["cuts"][name] = self.backbone.client_cuts[name]
            if opt_states is not None and name in opt_index:
                mine["optimizers"][opt_index[name]] = opt_states[opt_index[name]]
        for part in gather_objects(mine)[1:]:
            state.update(part["tensors"])
            roster["adapter_ranks"].update(part["ranks"])
            roster["client_cuts"].update(part["cuts"])
            for j, opt_state in part["optimizers"].items():
                if opt_states is not None:
                    opt_states[j] = opt_state
