"""Lightning DataModule that spreads tasks (synthetic, local folders, files, hub datasets) over federated clients."""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from atlas_pl.data.client_data import MIN_EXAMPLES, client_datasets, client_splits
from atlas_pl.data.encoding import verbalizer_ids
from atlas_pl.data.formats import collate, collate_clients
from atlas_pl.data.sampling import ClientChunkBatchSampler, RoundBatchSampler, RoundExamples, sample_clients
from atlas_pl.data.sources import load_tasks
from atlas_pl.data.synthetic import GROUPS
from atlas_pl.data.table import save_table
from atlas_pl.data.tasks import Task, TaskInfo, TaskSpec, head_ids
from atlas_pl.data.tokenizers import load_tokenizer
from atlas_pl.distributed import owner_of

__all__ = ["FederatedDataModule"]


def _check(ok: bool, name: str, value: Any, fix: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid; fix: {fix}.")


def _label_dp_error(generative: list[str]) -> ValueError:
    return ValueError(
        f"label_dp_epsilon randomizes class labels, but {generative} are generative tasks; fix: drop "
        "label_dp_epsilon or train classification tasks only."
    )


def _offsets(sizes: list[int]) -> list[int]:
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += n
    return offsets


class FederatedDataModule(L.LightningDataModule):
    """Federated data: tasks spread over clients (one task per client), one Lightning epoch per federated round.

    ``tasks=None`` uses the grouped synthetic tasks (``num_groups * tasks_per_group`` of them, ordered
    ``sentiment_0, sentiment_1, ..., topic_0, ...``); with the default partition settings client ``i`` gets task
    ``i % num_tasks`` and the clients of a task get disjoint stride shares of its train and validation splits, exactly
    as in earlier versions. A ``tasks`` list (folder names under ``data_dir``, ``"synthetic"``, or dicts, see
    :class:`~atlas_pl.data.tasks.TaskSpec`) goes through the general partitioner
    (:mod:`atlas_pl.data.partition`): clients per task round-robin (or ``clients_per_task``), a task's train split
    divided among its clients (``iid`` or ``dirichlet`` label skew, optional quantity skew), each share split into
    train/validation by ``val_fraction``, and the task's test split (validation if none) dealt among its clients.

    Training batches come from :class:`~atlas_pl.data.sampling.RoundBatchSampler` (each batch holds one client's
    examples; ``local_steps`` batches per sampled client per round); validation and test batches walk every client's
    examples in client order without mixing clients. For multi-GPU (DDP) runs, construct the Trainer with
    ``use_distributed_sampler=False``; the batch sampler shards the round's clients across ranks itself.

    After :meth:`setup`: ``tasks`` (:class:`~atlas_pl.data.tasks.TaskInfo` per ``task_id``), ``verbalizer_ids``
    (per task, per label: the answer ids incl. EOS the causal-LM encoder appends; ``[]`` for generative tasks),
    ``client_task_ids``, ``client_tasks``, ``client_groups``, ``num_examples``, ``num_val_examples``,
    ``num_test_examples``, ``num_labels`` (max over tasks), ``label_words`` (task name -> words), ``task_heads``,
    ``tokenizer``, ``pad_id``. Each encoded example has ``input_ids``, ``labels``, ``label``, ``task_id``,
    ``client_idx``, ``task`` and, for generative tasks, ``target``.

    Args:
        num_clients: Number of federated clients (>= 1).
        tokenizer: Tokenizer name: ``"gpt2-offline"`` (GPT-2 BPE, no download) or a local HF tokenizer folder / hub id.
        task_format: ``"causal_lm"`` (prompt + answer, loss on the answer only) or ``"classification"`` (encoder
            input ids + integer label; classification tasks only).
        num_groups: Synthetic task groups, in ``[1, 6]``.
        tasks_per_group: Synthetic tasks per group (>= 1); tasks in a group share the rule and label words.
        examples_per_client: Synthetic examples generated per client (train + validation, before the split).
        val_fraction: Fraction held out for validation (of each synthetic task; of each client's share otherwise),
            in ``(0, 1)``.
        max_length: Maximum sequence length in tokens (prompt + answer + EOS for causal LM).
        batch_size: Batch size for training, validation and test (>= 1).
        local_steps: Local optimisation steps (batches) per sampled client per round (>= 1).
        sample_fraction: Fraction of clients sampled per round, in ``(0, 1]``.
        prompt_template: Prompt of single-text classification tasks without their own template; contains ``{text}``.
        seed: Non-negative seed for data generation, partitioning and client/batch sampling.
        tasks: Task specs (``None``: the synthetic tasks). A string is a folder name under ``data_dir`` or
            ``"synthetic"``; a dict has the fields of :class:`~atlas_pl.data.tasks.TaskSpec` (``name``, ``source``,
            ``path``, ``hf_config``, columns, ``label_names``, ``label_words``, ``template``, ``kind``, ``group``,
            ``max_train_examples``, ...).
        data_dir: Folder holding task folders in the normalized JSONL format.
        clients_per_task: Clients per task (an int, or one int per task); must sum to ``num_clients``. ``None``:
            client ``c`` gets task ``c % num_tasks``.
        partition: ``"iid"`` or ``"dirichlet"`` (per class, proportions ``~ Dir(dirichlet_alpha)`` over the task's
            clients).
        dirichlet_alpha: Dirichlet concentration (> 0); smaller is more label skew.
        quantity_skew: Lognormal sigma of client share sizes (0: equal shares).
        max_examples_per_client: Cap on each client's share (train + validation) after partitioning.
        max_eval_examples_per_client: Cap on each client's test examples (validation comes from the client's share,
            bounded by ``max_examples_per_client``).
        max_target_length: Maximum answer tokens (before EOS) of generative tasks.
        cache_dir: ``datasets`` cache folder for loaded files and cached tokenization (``None``: HF datasets cache).
        interleave_clients: Shuffle each round's batches across clients instead of client after client (the pooled
            order of the centralized baseline).
        schedule: Order of a round's steps: ``sequential`` (each sampled client runs its ``local_steps`` in turn) or
            ``synchronous`` (SplitFed-style: at every local step all of the round's clients step together — the
            server runs the clients sharing a server adapter as one batch, see ``model.server_batching``, and takes
            one optimizer step for them). Each client trains on the same batches either way.
        max_val_examples_per_client: Validate on each client's first ``N`` validation examples only (a fixed
            sample: the same every round), to bound evaluation time on many clients; ``None``: all. Test is never
            capped by it.
        heads: Classification heads of an encoder (``task_format: classification``): ``per_task`` (each task its
            own) or ``per_label_words`` (tasks with the same label words share one head, each word one output; the
            classes are renumbered in word order, see ``Task.sorted_by_label_word``). After :meth:`setup`,
            ``task_heads`` gives each task's head (the task id of the first task sharing it).
        label_dp_epsilon: Label differential privacy: every client trains on randomized-response labels (each kept
            with probability ``e^ε / (e^ε + K − 1)``, else a uniform other class; drawn once, seeded by ``seed``), so
            whatever leaves it (the labels of a two-part split, the gradients of a U-shaped one, the adapters) is
            ``ε``-label-DP for the whole run; validation and test labels stay true. Classification tasks only;
            ``null``: off. See :func:`atlas_pl.algorithms.randomized_response`.
    """

    def __init__(
        self,
        num_clients: int = 9,
        tokenizer: str = "gpt2-offline",
        task_format: Literal["causal_lm", "classification"] = "causal_lm",
        num_groups: int = 3,
        tasks_per_group: int = 3,
        examples_per_client: int = 160,
        val_fraction: float = 0.2,
        max_length: int = 48,
        batch_size: int = 16,
        local_steps: int = 4,
        sample_fraction: float = 1.0,
        prompt_template: str = "{text}\nAnswer:",
        seed: int = 0,
        tasks: list[str | dict[str, Any]] | None = None,
        data_dir: str | None = None,
        clients_per_task: int | list[int] | None = None,
        partition: Literal["iid", "dirichlet"] = "iid",
        dirichlet_alpha: float = 0.5,
        quantity_skew: float = 0.0,
        max_examples_per_client: int | None = None,
        max_eval_examples_per_client: int | None = None,
        max_target_length: int = 64,
        cache_dir: str | None = None,
        interleave_clients: bool = False,
        heads: Literal["per_task", "per_label_words"] = "per_task",
        label_dp_epsilon: float | None = None,
        schedule: Literal["sequential", "synchronous"] = "sequential",
        max_val_examples_per_client: int | None = None,
    ) -> None:
        super().__init__()
        _check(schedule in ("sequential", "synchronous"), "schedule", schedule, "use 'sequential' or 'synchronous'")
        _check(not (schedule == "synchronous" and interleave_clients), "interleave_clients", interleave_clients,
               "interleave_clients (pooled order) and schedule synchronous are two orders; choose one")  # fmt: skip
        _check(max_val_examples_per_client is None or max_val_examples_per_client >= 1, "max_val_examples_per_client",
               max_val_examples_per_client, "pass an int >= 1, or null for all")  # fmt: skip
        _check(num_clients >= 1, "num_clients", num_clients, "pass num_clients >= 1")
        _check(
            task_format in ("causal_lm", "classification"),
            "task_format",
            task_format,
            "use 'causal_lm' or 'classification'",
        )
        _check(1 <= num_groups <= len(GROUPS), "num_groups", num_groups, f"choose 1 <= num_groups <= {len(GROUPS)}")
        _check(tasks_per_group >= 1, "tasks_per_group", tasks_per_group, "pass tasks_per_group >= 1")
        _check(examples_per_client >= 2, "examples_per_client", examples_per_client, "pass examples_per_client >= 2")
        _check(0.0 < val_fraction < 1.0, "val_fraction", val_fraction, "pass a value in (0, 1), e.g. 0.2")
        _check(max_length >= 8, "max_length", max_length, "pass max_length >= 8 (e.g. 48)")
        _check(batch_size >= 1, "batch_size", batch_size, "pass batch_size >= 1")
        _check(local_steps >= 1, "local_steps", local_steps, "pass local_steps >= 1")
        _check(0.0 < sample_fraction <= 1.0, "sample_fraction", sample_fraction, "pass a value in (0, 1]")
        _check("{text}" in prompt_template, "prompt_template", prompt_template, "include the '{text}' placeholder")
        _check(seed >= 0, "seed", seed, "pass a non-negative seed")
        _check(partition in ("iid", "dirichlet"), "partition", partition, "use 'iid' or 'dirichlet'")
        _check(dirichlet_alpha > 0, "dirichlet_alpha", dirichlet_alpha, "pass a positive value, e.g. 0.5")
        _check(quantity_skew >= 0, "quantity_skew", quantity_skew, "pass a value >= 0 (0: equal shares)")
        for name, cap in (
            ("max_examples_per_client", max_examples_per_client),
            ("max_eval_examples_per_client", max_eval_examples_per_client),
        ):
            _check(cap is None or cap >= MIN_EXAMPLES, name, cap, f"pass null or an int >= {MIN_EXAMPLES}")
        _check(heads in ("per_task", "per_label_words"), "heads", heads, "use 'per_task' or 'per_label_words'")
        eps_ok = label_dp_epsilon is None or (not isinstance(label_dp_epsilon, bool) and label_dp_epsilon > 0)
        _check(eps_ok, "label_dp_epsilon", label_dp_epsilon, "pass null (no label privacy) or an epsilon > 0, e.g. 1.0")
        _check(max_target_length >= 1, "max_target_length", max_target_length, "pass max_target_length >= 1")
        _check(tasks is None or len(tasks) > 0, "tasks", tasks, "list at least one task, or leave tasks unset")
        specs = [TaskSpec.parse(t) for t in tasks or []]  # validates spec keys early
        if label_dp_epsilon is not None and any(sp.generative for sp in specs):
            raise _label_dp_error([sp.name for sp in specs if sp.generative])
        if task_format == "classification" and any(sp.generative for sp in specs):
            raise ValueError(
                f"task_format='classification' cannot train generative tasks "
                f"{[sp.name for sp in specs if sp.generative]}; fix: use task_format='causal_lm'."
            )
        clients_per_synthetic = -(-num_clients // (num_groups * tasks_per_group))
        _check(
            examples_per_client * clients_per_synthetic >= 10,
            "examples_per_client",
            examples_per_client,
            f"each task needs >= 10 examples; pass examples_per_client >= {-(-10 // clients_per_synthetic)}",
        )
        self.save_hyperparameters()
        self.num_clients = num_clients
        self.tokenizer_name = tokenizer
        self.task_format = task_format
        self.num_groups = num_groups
        self.tasks_per_group = tasks_per_group
        self.examples_per_client = examples_per_client
        self.val_fraction = val_fraction
        self.max_length = max_length
        self.batch_size = batch_size
        self.local_steps = local_steps
        self.sample_fraction = sample_fraction
        self.prompt_template = prompt_template
        self.seed = seed
        self.task_specs = tasks
        self.data_dir = data_dir
        self.clients_per_task = clients_per_task
        self.partition = partition
        self.dirichlet_alpha = dirichlet_alpha
        self.quantity_skew = quantity_skew
        self.max_examples_per_client = max_examples_per_client
        self.max_eval_examples_per_client = max_eval_examples_per_client
        self.max_target_length = max_target_length
        self.cache_dir = cache_dir
        self.interleave_clients = interleave_clients
        self.schedule = schedule
        self.max_val_examples_per_client = max_val_examples_per_client
        self.heads = heads
        self.label_dp_epsilon = label_dp_epsilon
        self.task_heads: list[int] = []
        self._is_setup = False
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.pad_id: int = 0
        self.tasks: list[TaskInfo] = []
        self.verbalizer_ids: list[list[list[int]]] = []
        self.client_task_ids: list[int] = []
        self.client_tasks: list[str] = []
        self.client_groups: list[str] = []
        self.num_examples: list[int] = []
        self.num_val_examples: list[int] = []
        self.num_test_examples: list[int] = []
        self.label_words: dict[str, list[str]] = {}
        self.num_labels: int = 0
        self.train_datasets: list[list[dict[str, Any]]] = []
        self.val_datasets: list[list[dict[str, Any]]] = []
        self.test_datasets: list[list[dict[str, Any]]] = []
        self._label_hists: list[list[int]] = []

    # ------------------------------------------------------------------ setup
    @property
    def _legacy_layout(self) -> bool:
        """Synthetic tasks with the default partition settings: the original stride layout."""
        return self.task_specs is None and (
            self.partition == "iid"
            and self.quantity_skew == 0
            and self.clients_per_task is None
            and self.max_examples_per_client is None
        )

    def _load(self) -> list[Task]:
        clients_per_task = -(-self.num_clients // (self.num_groups * self.tasks_per_group))
        synthetic = {
            "num_groups": self.num_groups,
            "tasks_per_group": self.tasks_per_group,
            "examples_per_task": self.examples_per_client * clients_per_task,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
        }
        specs: list[Any] = self.task_specs if self.task_specs is not None else ["synthetic"]
        tasks = load_tasks(list(specs), self.data_dir, self.cache_dir, self.seed, synthetic, self.prompt_template)
        generative = [t.name for t in tasks if t.generative]
        if generative and self.label_dp_epsilon is not None:
            raise _label_dp_error(generative)
        if generative and self.task_format == "classification":
            raise ValueError(
                f"task_format='classification' cannot train generative tasks {generative}; fix: use 'causal_lm'."
            )
        return tasks

    @override
    def setup(self, stage: str | None = None) -> None:
        """Loads the tasks, partitions them over clients and tokenizes everything (idempotent, no trainer needed).

        Args:
            stage: Lightning stage (ignored; all splits are built at once).

        Raises:
            ValueError: If a task cannot be loaded or partitioned, or a client ends up with no training examples
                (the message names the client or task and the fix).
            FileNotFoundError: If a task's folder or file is missing.
        """
        if self._is_setup:
            return
        tasks = self._load()
        if self.heads == "per_label_words":
            tasks = [task.sorted_by_label_word() for task in tasks]
        self.tokenizer = load_tokenizer(self.tokenizer_name)
        self.pad_id = int(self.tokenizer.pad_token_id)
        client_task_ids, splits, evals = client_splits(
            tasks,
            self.num_clients,
            legacy=self._legacy_layout,
            clients_per_task=self.clients_per_task,
            partition=self.partition,
            dirichlet_alpha=self.dirichlet_alpha,
            quantity_skew=self.quantity_skew,
            max_examples_per_client=self.max_examples_per_client,
            max_eval_examples_per_client=self.max_eval_examples_per_client,
            val_fraction=self.val_fraction,
            seed=self.seed,
        )
        data = client_datasets(
            tasks,
            self.tokenizer,
            client_task_ids,
            splits,
            evals,
            legacy=self._legacy_layout,
            task_format=self.task_format,
            max_length=self.max_length,
            max_target_length=self.max_target_length,
            examples_per_client=self.examples_per_client,
            val_fraction=self.val_fraction,
            label_dp=None if self.label_dp_epsilon is None else (self.label_dp_epsilon, self.seed),
        )
        self.train_datasets, self.val_datasets, self.test_datasets = data.train, data.val, data.test
        self._label_hists = data.label_hists
        self.tasks = [task.info() for task in tasks]
        self.task_heads = head_ids(self.tasks, self.heads)
        self.verbalizer_ids = [verbalizer_ids(self.tokenizer, task) for task in self.tasks]
        self.client_task_ids = client_task_ids
        self.client_tasks = [tasks[t].name for t in client_task_ids]
        self.client_groups = [tasks[t].group for t in client_task_ids]
        self.num_examples = [len(d) for d in self.train_datasets]
        self.num_val_examples = [len(d) for d in self.val_datasets]
        self.num_test_examples = [len(d) for d in self.test_datasets]
        used = sorted(set(client_task_ids))
        self.label_words = {tasks[t].name: list(tasks[t].label_words) for t in used}
        self.num_labels = max(task.num_labels for task in self.tasks)
        self._is_setup = True

    # ------------------------------------------------------------ dataloaders
    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)  # LightningDataModule.trainer: set while a Trainer runs it
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def train_sampler(self) -> RoundBatchSampler:
        """The round batch sampler over the concatenated training set (rank/world size from the trainer if any)."""
        self.setup()
        rank, world_size = self._rank_world()
        return RoundBatchSampler(
            client_offsets=_offsets(self.num_examples),
            client_sizes=self.num_examples,
            batch_size=self.batch_size,
            local_steps=self.local_steps,
            fraction=self.sample_fraction,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            interleave=self.interleave_clients,
            synchronous=self.schedule == "synchronous",
        )

    @override
    def train_dataloader(self) -> DataLoader:
        self.setup()
        dataset = RoundExamples(item for client in self.train_datasets for item in client)
        return DataLoader(
            dataset,  # type: ignore[arg-type]
            batch_sampler=self.train_sampler(),
            collate_fn=partial(collate_clients if self.schedule == "synchronous" else collate, pad_id=self.pad_id),
            num_workers=0,
        )

    def _eval_loader(self, datasets: list[list[dict[str, Any]]]) -> DataLoader:
        self.setup()
        sizes = [len(d) for d in datasets]
        rank, world_size = self._rank_world()
        hosted = [c for c in range(len(sizes)) if owner_of(c, world_size) == rank] if world_size > 1 else None
        return DataLoader(
            [item for client in datasets for item in client],  # type: ignore[arg-type]
            batch_sampler=ClientChunkBatchSampler(_offsets(sizes), sizes, self.batch_size, hosted),
            collate_fn=partial(collate, pad_id=self.pad_id),
            num_workers=0,
        )

    @override
    def val_dataloader(self) -> DataLoader:
        """Every client's validation examples (its first ``max_val_examples_per_client``), in ``batch_size`` chunks."""
        self.setup()
        cap = self.max_val_examples_per_client
        return self._eval_loader(self.val_datasets if cap is None else [d[:cap] for d in self.val_datasets])

    @override
    def test_dataloader(self) -> DataLoader:
        """Every client's test share (the task's test split, or validation if none), batched like validation.

        With ``tasks=None`` and the default partition, the test data is the validation data (no synthetic test set).
        """
        self.setup()
        return self._eval_loader(self.test_datasets)

    # ---------------------------------------------------------------- helpers
    def round_clients(self, round_idx: int) -> list[int]:
        """All clients (across ranks) sampled in ``round_idx``.

        Args:
            round_idx: Round index (Lightning epoch).

        Returns:
            Sorted client indices.
        """
        return sample_clients(self.num_clients, self.sample_fraction, self.seed, round_idx)

    def partition_table(self) -> list[dict[str, Any]]:
        """The partition: one row per client, for logging and for saving next to results.

        Returns:
            Rows with ``client_idx``, ``task``, ``task_id``, ``group``, ``kind``, ``num_train``, ``num_val``,
            ``num_test`` and ``label_hist`` (training examples per class; ``[]`` for generative tasks).
        """
        self.setup()
        return [
            {
                "client_idx": c,
                "task": self.client_tasks[c],
                "task_id": t,
                "group": self.client_groups[c],
                "kind": self.tasks[t].kind,
                "num_train": self.num_examples[c],
                "num_val": self.num_val_examples[c],
                "num_test": self.num_test_examples[c],
                "label_hist": self._label_hists[c],
            }
            for c, t in enumerate(self.client_task_ids)
        ]

    def save_partition(self, path: str) -> tuple[str, str]:
        """Writes :meth:`partition_table` to ``<path>.csv`` and ``<path>.json`` atomically.

        Args:
            path: Output path stem (a ``.csv``/``.json`` suffix is dropped).

        Returns:
            The CSV and JSON paths.
        """
        csv_path, json_path = save_table(self.partition_table(), path)
        return str(csv_path), str(json_path)

    def group_counts(self) -> dict[str, int]:
        """Number of clients per group."""
        self.setup()
        return dict(Counter(self.client_groups))
