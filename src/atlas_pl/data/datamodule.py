"""Lightning DataModule that partitions grouped synthetic tasks over federated clients."""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from atlas_pl.data.formats import collate, encode_causal_lm, encode_classification
from atlas_pl.data.sampling import ClientChunkBatchSampler, RoundBatchSampler, sample_clients
from atlas_pl.data.synthetic import GROUPS, Example, Task, make_synthetic_tasks
from atlas_pl.data.tokenizers import load_tokenizer

__all__ = ["FederatedDataModule"]


def _check(ok: bool, name: str, value: Any, fix: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid; fix: {fix}.")


def _offsets(sizes: list[int]) -> list[int]:
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += n
    return offsets


class FederatedDataModule(L.LightningDataModule):
    """Federated data: grouped synthetic tasks, one task per client, one Lightning epoch per federated round.

    Client ``i`` is assigned task ``i % num_tasks`` (``num_tasks = num_groups * tasks_per_group``, ordered
    ``sentiment_0, sentiment_1, ..., topic_0, ...``). Clients sharing a task receive disjoint shares of its
    examples. Training batches come from :class:`~atlas_pl.data.sampling.RoundBatchSampler` (each batch holds one
    client's examples; ``local_steps`` batches per sampled client per round); validation batches walk every
    client's validation examples in client order without mixing clients.

    For multi-GPU (DDP) runs, construct the Trainer with ``use_distributed_sampler=False``; sharding of the round's
    clients across ranks is done by the batch sampler itself.

    Args:
        num_clients: Number of federated clients (>= 1).
        tokenizer: Tokenizer name: ``"gpt2-offline"`` (GPT-2 BPE, no download) or a local HF tokenizer folder / hub id.
        task_format: ``"causal_lm"`` (prompt + verbalizer answer word, loss on the answer only) or
            ``"classification"`` (encoder input ids + integer label).
        num_groups: Number of task groups, in ``[1, 6]``.
        tasks_per_group: Tasks per group (>= 1); tasks in a group share the rule and label words.
        examples_per_client: Examples generated per client (train + validation, before the split).
        val_fraction: Fraction of each task's examples held out for validation, in ``(0, 1)``.
        max_length: Maximum sequence length in tokens (prompt + answer + EOS for causal LM).
        batch_size: Batch size for training and validation (>= 1).
        local_steps: Local optimisation steps (batches) per sampled client per round (>= 1).
        sample_fraction: Fraction of clients sampled per round, in ``(0, 1]``.
        prompt_template: Causal-LM prompt template containing ``{text}``.
        seed: Non-negative seed for data generation and client/batch sampling.
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
    ) -> None:
        super().__init__()
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
        clients_per_task = -(-num_clients // (num_groups * tasks_per_group))
        _check(
            examples_per_client * clients_per_task >= 10,
            "examples_per_client",
            examples_per_client,
            f"each task needs >= 10 examples; pass examples_per_client >= {-(-10 // clients_per_task)}",
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
        self._is_setup = False
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.pad_id: int = 0
        self.num_examples: list[int] = []
        self.num_val_examples: list[int] = []
        self.client_tasks: list[str] = []
        self.client_groups: list[str] = []
        self.label_words: dict[str, list[str]] = {}
        self.num_labels: int = 0
        self.train_datasets: list[list[dict[str, Any]]] = []
        self.val_datasets: list[list[dict[str, Any]]] = []

    # ------------------------------------------------------------------ setup
    def _encode(self, example: Example, task: Task, client_idx: int) -> dict[str, Any]:
        assert self.tokenizer is not None
        if self.task_format == "causal_lm":
            item: dict[str, Any] = encode_causal_lm(
                self.tokenizer, example.text, task.label_words[example.label], self.max_length, self.prompt_template
            )
            item["label"] = example.label
            item["task"] = task.name
        else:
            item = encode_classification(self.tokenizer, example.text, example.label, self.max_length)
        item["client_idx"] = client_idx
        return item

    def setup(self, stage: str | None = None) -> None:
        """Generates tasks, partitions them over clients and tokenizes everything (idempotent, no trainer needed).

        Args:
            stage: Lightning stage (ignored; all splits are built at once).

        Raises:
            ValueError: If a client ends up with no training examples.
        """
        if self._is_setup:
            return
        num_tasks = self.num_groups * self.tasks_per_group
        clients_per_task = -(-self.num_clients // num_tasks)
        tasks = make_synthetic_tasks(
            num_groups=self.num_groups,
            tasks_per_group=self.tasks_per_group,
            examples_per_task=self.examples_per_client * clients_per_task,
            val_fraction=self.val_fraction,
            seed=self.seed,
        )
        self.tokenizer = load_tokenizer(self.tokenizer_name)
        self.pad_id = int(self.tokenizer.pad_token_id)
        train_sets: list[list[dict[str, Any]]] = []
        val_sets: list[list[dict[str, Any]]] = []
        client_tasks: list[str] = []
        client_groups: list[str] = []
        for c in range(self.num_clients):
            task = tasks[c % num_tasks]
            share = c // num_tasks  # this client's share among the clients of its task
            train = task.train[share::clients_per_task]
            val = task.validation[share::clients_per_task]
            if not train:
                raise ValueError(
                    f"client {c} (task {task.name}) got 0 training examples; fix: increase examples_per_client "
                    f"(now {self.examples_per_client}) or lower val_fraction (now {self.val_fraction})."
                )
            train_sets.append([self._encode(e, task, c) for e in train])
            val_sets.append([self._encode(e, task, c) for e in val])
            client_tasks.append(task.name)
            client_groups.append(task.group)
        used = {t.name: t for t in tasks if t.name in set(client_tasks)}
        self.train_datasets, self.val_datasets = train_sets, val_sets
        self.client_tasks, self.client_groups = client_tasks, client_groups
        self.num_examples = [len(d) for d in train_sets]
        self.num_val_examples = [len(d) for d in val_sets]
        self.label_words = {name: list(t.label_words) for name, t in used.items()}
        self.num_labels = max(len(words) for words in self.label_words.values())
        self._is_setup = True

    # ------------------------------------------------------------ dataloaders
    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "_trainer", None)
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
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        dataset = [item for client in self.train_datasets for item in client]
        return DataLoader(
            dataset,  # type: ignore[arg-type]
            batch_sampler=self.train_sampler(),
            collate_fn=partial(collate, pad_id=self.pad_id),
            num_workers=0,
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        dataset = [item for client in self.val_datasets for item in client]
        sampler = ClientChunkBatchSampler(_offsets(self.num_val_examples), self.num_val_examples, self.batch_size)
        return DataLoader(
            dataset,  # type: ignore[arg-type]
            batch_sampler=sampler,
            collate_fn=partial(collate, pad_id=self.pad_id),
            num_workers=0,
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

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
        """One row per client: ``client_idx``, ``task``, ``group``, ``num_train``, ``num_val`` (for logging)."""
        self.setup()
        return [
            {"client_idx": c, "task": t, "group": g, "num_train": n, "num_val": v}
            for c, (t, g, n, v) in enumerate(
                zip(self.client_tasks, self.client_groups, self.num_examples, self.num_val_examples)
            )
        ]

    def group_counts(self) -> dict[str, int]:
        """Number of clients per group."""
        self.setup()
        return dict(Counter(self.client_groups))
