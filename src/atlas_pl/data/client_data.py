"""Each client's data for :class:`~atlas_pl.data.datamodule.FederatedDataModule`: its task, its share, its records.

Two steps, run by the DataModule's ``setup`` once the tasks are loaded:

1. :func:`client_splits` gives every client a task and its train/validation/test indices: the original synthetic
   stride layout (``legacy=True``, see :func:`stride_splits`), or the general partitioner of
   :mod:`atlas_pl.data.partition` (clients per task, ``iid``/``dirichlet`` shares, quantity skew, caps).
2. :func:`client_datasets` tokenizes each used task once and materializes every client's records, each tagged with
   ``task_id``, ``client_idx`` and ``task``, plus the client's training label histogram.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from atlas_pl.algorithms.privacy import randomized_response
from atlas_pl.data.encoding import encode_split
from atlas_pl.data.partition import ClientSplit, assign_clients, split_eval, split_task
from atlas_pl.data.tasks import Task

__all__ = ["MIN_EXAMPLES", "ClientDatasets", "client_datasets", "client_splits", "stride_splits"]

MIN_EXAMPLES = 2
"""Fewest examples a client's share may hold (one for training, one for validation)."""


def stride_splits(task: Task, num_clients: int, stride: int) -> tuple[list[ClientSplit], list[np.ndarray]]:
    """The original synthetic layout: share ``k`` of a task is every ``stride``-th example from ``k``."""
    n_train, n_val = len(task.train), len(task.validation)
    splits = [ClientSplit(np.arange(k, n_train, stride), np.arange(k, n_val, stride)) for k in range(num_clients)]
    return splits, [s.val for s in splits]


def client_splits(
    tasks: list[Task],
    num_clients: int,
    *,
    legacy: bool,
    clients_per_task: int | list[int] | None,
    partition: str,
    dirichlet_alpha: float,
    quantity_skew: float,
    max_examples_per_client: int | None,
    max_eval_examples_per_client: int | None,
    val_fraction: float,
    seed: int,
) -> tuple[list[int], list[ClientSplit], list[np.ndarray]]:
    """Client -> task ids, and per client its train/val indices and its eval (test) indices.

    Args:
        tasks: The loaded tasks, in ``task_id`` order.
        num_clients: Number of federated clients.
        legacy: Use the original stride layout (client ``c`` gets task ``c % len(tasks)``; validation doubles as the
            eval split) instead of the partitioner.
        clients_per_task: Clients per task (an int, or one int per task); ``None``: round-robin.
        partition: ``"iid"`` or ``"dirichlet"`` label skew.
        dirichlet_alpha: Dirichlet concentration of the label skew.
        quantity_skew: Lognormal sigma of client share sizes (0: equal shares).
        max_examples_per_client: Cap on each client's share (train + validation).
        max_eval_examples_per_client: Cap on each client's test examples.
        val_fraction: Fraction of each client's share held out for validation.
        seed: The DataModule's seed (task ``t`` is partitioned with ``seed * 100_003 + t``).

    Returns:
        ``(client_task_ids, splits, evals)``: the task id of each client, its :class:`ClientSplit` (indices into the
        task's train split, or train/validation splits with ``legacy``) and its indices into the task's eval split.
    """
    if legacy:
        client_task_ids = [c % len(tasks) for c in range(num_clients)]
    else:
        client_task_ids = assign_clients(len(tasks), num_clients, clients_per_task)
    splits: list[ClientSplit | None] = [None] * num_clients
    evals: list[np.ndarray | None] = [None] * num_clients
    for t, task in enumerate(tasks):
        clients = [c for c, tid in enumerate(client_task_ids) if tid == t]
        if not clients:
            continue
        if legacy:
            shares, tests = stride_splits(task, len(clients), -(-num_clients // len(tasks)))
        else:
            labels = np.asarray(task.train["label"]) if not task.generative else np.zeros(len(task.train), int)
            shares = split_task(
                labels,
                len(clients),
                method=partition,
                alpha=dirichlet_alpha,
                quantity_skew=quantity_skew,
                min_examples=MIN_EXAMPLES,
                max_examples_per_client=max_examples_per_client,
                val_fraction=val_fraction,
                seed=seed * 100_003 + t,
                task=task.name,
            )
            held_out = task.eval_split
            n_eval = 0 if held_out is None else len(held_out)
            tests = split_eval(n_eval, len(clients), max_eval_examples_per_client, seed * 100_003 + t)
        for c, share, test in zip(clients, shares, tests):
            splits[c], evals[c] = share, test
    return client_task_ids, [s for s in splits if s is not None], [e for e in evals if e is not None]


@dataclass
class ClientDatasets:
    """Every client's encoded records, in client order.

    Attributes:
        train: Per client, its training records.
        val: Per client, its validation records.
        test: Per client, its test records (``[]`` if its task has no eval split).
        label_hists: Per client, its training examples per class (``[]`` for generative tasks).
    """

    train: list[list[dict[str, Any]]]
    val: list[list[dict[str, Any]]]
    test: list[list[dict[str, Any]]]
    label_hists: list[list[int]]


def _materialize(encoded: Any, idx: np.ndarray, task_id: int, name: str, client: int) -> list[dict[str, Any]]:
    rows = encoded.select(idx).to_list() if len(idx) else []
    for row in rows:
        row.update(task_id=task_id, client_idx=client, task=name)
        if row.get("target") is None:
            row.pop("target", None)
            row.pop("references", None)
    return rows


def _relabel(_: dict[str, Any], i: int, noisy: np.ndarray) -> dict[str, int]:
    return {"label": int(noisy[i])}


def client_datasets(
    tasks: list[Task],
    tokenizer: PreTrainedTokenizerBase,
    client_task_ids: list[int],
    splits: list[ClientSplit],
    evals: list[np.ndarray],
    *,
    legacy: bool,
    task_format: str,
    max_length: int,
    max_target_length: int,
    examples_per_client: int,
    val_fraction: float,
    label_dp: tuple[float, int] | None = None,
) -> ClientDatasets:
    """Tokenizes the tasks the clients use and materializes each client's train, validation and test records.

    Args:
        tasks: The loaded tasks, in ``task_id`` order.
        tokenizer: The tokenizer to encode with.
        client_task_ids: Task id of each client (from :func:`client_splits`).
        splits: Train/validation indices of each client (from :func:`client_splits`).
        evals: Test indices of each client (from :func:`client_splits`).
        legacy: The splits are the stride layout (validation indices point into the task's validation split, which is
            also the eval split) rather than the partitioner's (validation indices point into the train split).
        task_format: ``"causal_lm"`` or ``"classification"`` (see :func:`~atlas_pl.data.encoding.encode_split`).
        max_length: Maximum sequence length in tokens.
        max_target_length: Maximum answer tokens (before EOS) of generative tasks.
        examples_per_client: The DataModule's setting, named in the error message.
        val_fraction: The DataModule's setting, named in the error message.
        label_dp: ``(ε, seed)``: the training records carry randomized-response labels
            (:func:`atlas_pl.algorithms.randomized_response`, drawn once per example); validation and test keep the
            true ones.

    Returns:
        The records of every client.

    Raises:
        ValueError: A client got no training examples (the message names the client, its task and the fix).
    """
    encode = partial(
        encode_split,
        tokenizer=tokenizer,
        task_format=task_format,
        max_length=max_length,
        max_target_length=max_target_length,
    )
    enc_train: dict[int, Any] = {}
    enc_private: dict[int, Any] = {}  # the training records: randomized labels with label_dp, else enc_train
    enc_eval: dict[int, Any] = {}
    for t in sorted(set(client_task_ids)):
        task = tasks[t]
        enc_train[t] = encode(task.train, task, task.template)
        enc_private[t] = enc_train[t]
        if label_dp is not None:
            noisy = randomized_response(np.asarray(task.train["label"]), task.num_labels, label_dp[0], (label_dp[1], t))
            private = task.train.map(partial(_relabel, noisy=noisy), with_indices=True)
            enc_private[t] = encode(private, task, task.template)
        held_out = task.validation if legacy else task.eval_split
        enc_eval[t] = None if held_out is None else encode(held_out, task, task.template)
    data = ClientDatasets(train=[], val=[], test=[], label_hists=[])
    for c, (t, share, test) in enumerate(zip(client_task_ids, splits, evals)):
        task = tasks[t]
        if len(share.train) == 0:
            raise ValueError(
                f"client {c} (task {task.name}) got 0 training examples; fix: increase examples_per_client "
                f"(now {examples_per_client}), give the task more data, or lower val_fraction "
                f"(now {val_fraction})."
            )
        data.train.append(_materialize(enc_private[t], share.train, t, task.name, c))
        val_source = enc_eval[t] if legacy else enc_train[t]
        data.val.append(_materialize(val_source, share.val, t, task.name, c))
        data.test.append(_materialize(enc_eval[t], test, t, task.name, c) if enc_eval[t] is not None else [])
        hist = np.bincount([x["label"] for x in data.train[-1] if x["label"] >= 0], minlength=task.num_labels)
        data.label_hists.append([int(v) for v in hist])
    return data


def sample_client_batches(dm: Any, idx: int, num_batches: int, seed: int) -> list[dict]:
    """``num_batches`` collated training batches of client ``idx`` of a set-up datamodule (seeded choice).

    The phases' task signals use it: the examples are a permutation of the client's training set seeded with
    ``seed + idx``, so every client draws its own, reproducibly.
    """
    from atlas_pl.data.formats import collate

    if hasattr(dm, "client_batches"):
        return list(dm.client_batches(idx, num_batches, seed))
    data = dm.train_datasets[idx]
    order = np.random.default_rng(seed + idx).permutation(len(data))
    size = int(getattr(dm, "batch_size", 16))
    make = partial(collate, pad_id=int(getattr(dm, "pad_id", 0)))
    return [
        make([data[j] for j in order[b * size : (b + 1) * size]]) for b in range(num_batches) if b * size < len(data)
    ]
