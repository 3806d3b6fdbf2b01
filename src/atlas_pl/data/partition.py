"""Spreading tasks over federated clients and each task's examples over its clients (pure numpy).

Three steps, each deterministic given its seed:

1. :func:`assign_clients` gives every client one task (round-robin over tasks).
2. :func:`split_task` divides a task's training pool among its clients: ``iid`` (seeded shuffle), or ``dirichlet``
   label skew (per class, the class's examples are split by proportions drawn from ``Dir(alpha)`` over the task's
   clients), optionally with quantity skew (client weights ``~ lognormal(0, sigma)``). Shares are disjoint and cover
   the pool; an optional per-client cap then drops the surplus. Every client's share is split into train/validation.
3. :func:`split_eval` deals a task's held-out split disjointly among its clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ClientSplit", "assign_clients", "label_entropy", "split_eval", "split_task"]


@dataclass
class ClientSplit:
    """Indices (into the task's train split) of one client's training and validation examples."""

    train: np.ndarray
    val: np.ndarray


def assign_clients(num_tasks: int, num_clients: int | None, clients_per_task: int | Sequence[int] | None) -> list[int]:
    """Assigns each client one task.

    Args:
        num_tasks: Number of tasks (>= 1).
        num_clients: Total clients; with ``clients_per_task=None`` client ``c`` gets task ``c % num_tasks``.
        clients_per_task: Clients per task: an int (same for every task) or one int per task. Clients are then
            dealt round-robin over the tasks that still need clients. ``num_clients``, if given, must equal the total.

    Returns:
        The task index of each client.

    Raises:
        ValueError: If the counts are inconsistent or leave a task without clients.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks={num_tasks!r}; fix: configure at least one task.")
    if clients_per_task is None:
        if num_clients is None or num_clients < num_tasks:
            raise ValueError(
                f"num_clients={num_clients!r} is smaller than the {num_tasks} tasks, so some tasks get no client; "
                f"fix: pass num_clients >= {num_tasks} or set clients_per_task."
            )
        return [c % num_tasks for c in range(num_clients)]
    counts = [int(clients_per_task)] * num_tasks if isinstance(clients_per_task, int) else list(clients_per_task)
    if len(counts) != num_tasks or min(counts) < 1:
        raise ValueError(
            f"clients_per_task={clients_per_task!r} must be an int >= 1 or {num_tasks} ints >= 1 (one per task); "
            "fix: give every task at least one client."
        )
    if num_clients is not None and num_clients != sum(counts):
        raise ValueError(
            f"num_clients={num_clients} differs from sum(clients_per_task)={sum(counts)}; "
            f"fix: set num_clients={sum(counts)}."
        )
    left, out = list(counts), []
    while any(left):
        for t in range(num_tasks):
            if left[t]:
                out.append(t)
                left[t] -= 1
    return out


def _quantity_weights(k: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    w = rng.lognormal(0.0, sigma, size=k) if sigma > 0 else np.ones(k)
    return w / w.sum()


def _sizes(n: int, weights: np.ndarray, min_examples: int) -> np.ndarray:
    """``min_examples`` each, the rest by ``weights`` (floor, then largest remainders); sums to ``n``."""
    rest = n - min_examples * len(weights)
    raw = weights * rest
    sizes = np.floor(raw).astype(int)
    order = np.argsort(-(raw - sizes), kind="stable")
    sizes[order[: rest - sizes.sum()]] += 1
    return sizes + min_examples


def _dirichlet_shares(
    labels: np.ndarray, weights: np.ndarray, alpha: float, min_examples: int, rng: np.random.Generator, retries: int
) -> list[np.ndarray]:
    """Label-skewed shares: per class, proportions ``~ Dir(alpha)`` times the quantity weights.

    Minimum-size rule: if some client gets fewer than ``min_examples`` examples, all classes are redrawn (same
    generator, so the result stays deterministic), at most ``retries`` times. If no draw succeeds, the draw with the
    largest smallest share is kept and each short client is topped up with random examples taken from the currently
    largest share (so very small ``alpha`` still yields a valid, if slightly less skewed, partition).
    """
    k = len(weights)
    best: list[np.ndarray] = []
    for _ in range(max(retries, 1)):
        shares: list[list[np.ndarray]] = [[] for _ in range(k)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            p = rng.dirichlet(np.full(k, alpha)) * weights
            cuts = (np.cumsum(p / p.sum())[:-1] * len(idx)).round().astype(int)
            for client, part in enumerate(np.split(idx, cuts)):
                shares[client].append(part)
        out = [np.concatenate(s) for s in shares]
        if min(len(s) for s in out) >= min_examples:
            return out
        if not best or min(len(s) for s in out) > min(len(s) for s in best):
            best = out
    for client in range(k):
        while len(best[client]) < min_examples:
            donor = int(np.argmax([len(s) for s in best]))
            take = min(min_examples - len(best[client]), len(best[donor]) - min_examples)
            moved = rng.permutation(len(best[donor]))
            best[client] = np.concatenate([best[client], best[donor][moved[:take]]])
            best[donor] = best[donor][np.sort(moved[take:])]
    return best


def split_task(
    labels: np.ndarray,
    num_clients: int,
    *,
    method: str = "iid",
    alpha: float = 0.5,
    quantity_skew: float = 0.0,
    min_examples: int = 2,
    max_examples_per_client: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    retries: int = 100,
    task: str = "task",
) -> list[ClientSplit]:
    """Divides one task's training pool among its clients, then each client's share into train/validation.

    ``iid``: a seeded permutation cut into sizes ``min_examples + (rest by client weight)``. ``dirichlet``: see
    :func:`_dirichlet_shares`; the draw is repeated (same generator, so still deterministic) until every client has
    ``min_examples``, and after ``retries`` failed draws short clients are topped up from the largest share.
    Client weights are ``lognormal(0, quantity_skew)`` (equal when 0). Shares are disjoint and cover all
    ``len(labels)`` examples; ``max_examples_per_client`` then keeps the first ``max`` of each (shuffled) share.
    Each share's validation part is ``round(val_fraction * n)`` examples (at least 1 and leaving at least 1 for
    training when ``n >= 2``; none when ``n == 1``).

    Args:
        labels: Class index of every pool example (use one constant value for generative tasks).
        num_clients: Clients of this task (>= 1).
        method: ``"iid"`` or ``"dirichlet"``.
        alpha: Dirichlet concentration (> 0); smaller means more label skew.
        quantity_skew: Lognormal sigma of client sizes (>= 0).
        min_examples: Minimum examples per client share (before the cap and the validation split).
        max_examples_per_client: Optional cap on each client's share (train + validation).
        val_fraction: Fraction of each share held out for validation, in ``[0, 1)``.
        seed: Seed (e.g. ``[seed, task_id]`` mixed by the caller).
        retries: Dirichlet redraws before topping up short clients.
        task: Task name for error messages.

    Returns:
        One :class:`ClientSplit` per client, indices into ``labels``.

    Raises:
        ValueError: If an argument is out of range or the pool is too small for ``min_examples`` per client.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if method not in ("iid", "dirichlet"):
        raise ValueError(f"partition={method!r} is invalid; fix: use 'iid' or 'dirichlet'.")
    if alpha <= 0 or quantity_skew < 0 or not 0.0 <= val_fraction < 1.0 or num_clients < 1:
        raise ValueError(
            f"task {task!r}: dirichlet_alpha={alpha!r} (> 0), quantity_skew={quantity_skew!r} (>= 0), "
            f"val_fraction={val_fraction!r} ([0, 1)) or num_clients={num_clients!r} (>= 1) is out of range; fix: "
            "pass values in the ranges shown."
        )
    if n < num_clients * max(min_examples, 1):
        raise ValueError(
            f"task {task!r} has {n} training examples for {num_clients} clients x min_examples={min_examples}; fix: "
            "give the task fewer clients (clients_per_task), more data (max_train_examples), or lower min_examples."
        )
    rng = np.random.default_rng(seed)
    weights = _quantity_weights(num_clients, quantity_skew, rng)
    if method == "iid":
        perm = rng.permutation(n)
        shares = np.split(perm, np.cumsum(_sizes(n, weights, min_examples))[:-1])
    else:
        shares = _dirichlet_shares(labels, weights, alpha, min_examples, rng, retries)
    out = []
    for share in shares:
        share = rng.permutation(share)[:max_examples_per_client]
        m = len(share)
        n_val = 0 if m < 2 or val_fraction == 0 else min(max(1, round(val_fraction * m)), m - 1)
        out.append(ClientSplit(train=np.sort(share[n_val:]), val=np.sort(share[:n_val])))
    return out


def split_eval(num_examples: int, num_clients: int, cap: int | None = None, seed: int = 0) -> list[np.ndarray]:
    """Deals a held-out split disjointly among a task's clients (seeded permutation, round-robin), capped.

    Args:
        num_examples: Size of the held-out split (may be 0).
        num_clients: Clients of the task.
        cap: Maximum examples per client (``None``: no cap).
        seed: Seed.

    Returns:
        Sorted indices per client.
    """
    perm = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(perm[c::num_clients][:cap]) for c in range(num_clients)]


def label_entropy(labels: np.ndarray, num_labels: int) -> float:
    """Shannon entropy (nats) of a label histogram; a skew measure (0 = one class only)."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=num_labels).astype(float)
    if counts.sum() == 0:
        return 0.0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
