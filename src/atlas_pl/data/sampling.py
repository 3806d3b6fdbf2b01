"""Client sampling and per-round batch samplers for federated training (pure; torch + numpy only).

One Lightning *epoch* is one federated *round*: :class:`RoundBatchSampler` yields, for every client sampled in the
round, ``local_steps`` batches drawn from that client only. All randomness is derived from ``(seed, round_idx)`` and
``(seed, client_idx, round_idx)``, so a resumed run reproduces every round without saving sampler state.

Under several processes (a ``Federation`` sharded with ``ClientParallelStrategy``) client ``c`` is hosted by process
``c mod P`` for the whole run (:func:`atlas_pl.distributed.owner_of`): each process yields its hosted clients' batches
and pads its round with *idle* batches (index :attr:`RoundBatchSampler.idle_index`, the one past the last example) up
to the longest process's count, because Lightning meets every process in a collective at each training step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from atlas_pl.distributed import owner_of

__all__ = ["IDLE_EXAMPLE", "ClientChunkBatchSampler", "RoundBatchSampler", "RoundExamples", "sample_clients"]

IDLE_EXAMPLE: dict = {"idle": True, "client_idx": -1}
"""What the padding index of a sharded round yields: a batch that trains nobody (``collate`` keeps it as is)."""


class RoundExamples(list):
    """All clients' examples concatenated; index ``len(self)`` is the idle padding example of a sharded round."""

    def __getitem__(self, idx):  # type: ignore[no-untyped-def, override]
        if isinstance(idx, int) and idx == len(self):
            return IDLE_EXAMPLE
        return super().__getitem__(idx)


def sample_clients(num_clients: int, fraction: float, seed: int, round_idx: int) -> list[int]:
    """Samples the clients that participate in a round.

    Args:
        num_clients: Total number of clients (>= 1).
        fraction: Fraction of clients to sample, in ``(0, 1]``.
        seed: Non-negative experiment seed.
        round_idx: Non-negative round index.

    Returns:
        Sorted list of ``max(1, round(fraction * num_clients))`` distinct client indices; deterministic per
        ``(seed, round_idx)`` (``numpy.random.default_rng([seed, round_idx])``).

    Raises:
        ValueError: If an argument is out of range.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients!r} must be >= 1; fix: pass num_clients >= 1.")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} must be in (0, 1]; fix: pass e.g. fraction=1.0 (all clients).")
    if seed < 0 or round_idx < 0:
        raise ValueError(f"seed={seed!r} and round_idx={round_idx!r} must be >= 0; fix: use non-negative values.")
    k = min(num_clients, max(1, round(fraction * num_clients)))
    if k == num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round_idx])
    return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))


class RoundBatchSampler(Sampler[list[int]]):
    """Yields ``local_steps`` single-client batches for each client sampled in the current round.

    Indices refer to a dataset that concatenates all clients' examples (client ``c`` occupies
    ``[client_offsets[c], client_offsets[c] + client_sizes[c])``). Call :meth:`set_epoch` with the round index
    (Lightning does this every epoch through the ``sampler`` attribute, which points to this object).

    Args:
        client_offsets: Start index of each client's examples in the concatenated dataset.
        client_sizes: Number of examples of each client (each >= 1).
        batch_size: Batch size; a client with fewer examples yields batches of ``client_size``.
        local_steps: Batches (local optimisation steps) per sampled client per round.
        fraction: Fraction of clients sampled per round, in ``(0, 1]``.
        seed: Non-negative seed.
        rank: This process's rank; it yields the batches of the sampled clients it hosts (``c mod world_size``).
        world_size: Number of processes; with more than one, every process's round is padded with idle batches to
            the same length.
        interleave: Shuffle the round's batches across clients (seeded) instead of client after client — the
            pooled-data order of the centralized baseline.
        synchronous: Step by step instead of client after client: the round's ``s``-th yield holds the ``s``-th
            batch of every hosted sampled client, concatenated in client order (``collate_clients`` splits it back
            into one batch per client). The batches themselves are the same as in the sequential order.
    """

    def __init__(
        self,
        client_offsets: Sequence[int],
        client_sizes: Sequence[int],
        batch_size: int,
        local_steps: int,
        fraction: float = 1.0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        interleave: bool = False,
        synchronous: bool = False,
    ) -> None:
        if interleave and synchronous:
            raise ValueError(
                "interleave (one shuffled stream of single-client batches) and synchronous (every client's s-th batch "
                "together) are two different round orders; fix: choose one"
            )
        if len(client_offsets) != len(client_sizes) or not client_sizes:
            raise ValueError(
                f"client_offsets (len {len(client_offsets)}) and client_sizes (len {len(client_sizes)}) must be "
                "non-empty and of equal length; fix: pass one offset and one size per client."
            )
        empty = [i for i, n in enumerate(client_sizes) if n < 1]
        if empty:
            raise ValueError(f"client_sizes has clients {empty} with no examples; fix: give every client >= 1.")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be >= 1; fix: pass batch_size >= 1.")
        if local_steps < 1:
            raise ValueError(f"local_steps={local_steps!r} must be >= 1; fix: pass local_steps >= 1.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r}, world_size={world_size!r} invalid; fix: need 0 <= rank < world_size.")
        sample_clients(len(client_sizes), fraction, seed, 0)  # validates fraction and seed
        self.client_offsets = [int(o) for o in client_offsets]
        self.client_sizes = [int(n) for n in client_sizes]
        self.batch_size = batch_size
        self.local_steps = local_steps
        self.fraction = fraction
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.interleave = interleave
        self.synchronous = synchronous
        self.epoch = 0

    @property
    def sampler(self) -> RoundBatchSampler:
        """Self, so that Lightning's ``batch_sampler.sampler.set_epoch(epoch)`` reaches :meth:`set_epoch`."""
        return self

    @property
    def num_clients(self) -> int:
        return len(self.client_sizes)

    def set_epoch(self, epoch: int) -> None:
        """Sets the round index used by the next ``__iter__``.

        Args:
            epoch: Round index (Lightning's epoch).
        """
        self.epoch = int(epoch)

    def round_clients(self, round_idx: int | None = None) -> list[int]:
        """Clients this rank trains in a round.

        Args:
            round_idx: Round index; defaults to the current epoch.

        Returns:
            The sampled clients (sorted) this rank hosts (all of them in one process).
        """
        return self.hosted(self.rank, self.epoch if round_idx is None else round_idx)

    def hosted(self, rank: int, round_idx: int) -> list[int]:
        """The clients sampled in ``round_idx`` that process ``rank`` hosts."""
        sampled = sample_clients(self.num_clients, self.fraction, self.seed, round_idx)
        return [c for c in sampled if owner_of(c, self.world_size) == rank]

    @property
    def idle_index(self) -> int:
        """Index of the idle padding example: one past the last client's examples (see :class:`RoundExamples`)."""
        return self.client_offsets[-1] + self.client_sizes[-1]

    def round_length(self, round_idx: int) -> int:
        """Batches every process yields in ``round_idx``: the longest process's count of real batches."""
        if self.synchronous:
            return self.local_steps
        return max(len(self.hosted(r, round_idx)) for r in range(self.world_size)) * self.local_steps

    def client_batches(self, client_idx: int, round_idx: int) -> list[list[int]]:
        """The ``local_steps`` batches (global indices) of one client in one round.

        Args:
            client_idx: Client index.
            round_idx: Round index.

        Returns:
            ``local_steps`` lists of ``min(batch_size, client_size)`` indices, walking seeded permutations of the
            client's examples (a fresh permutation each time the client's data is exhausted).
        """
        size = self.client_sizes[client_idx]
        bs = min(self.batch_size, size)
        need = bs * self.local_steps
        rng = np.random.default_rng([self.seed, client_idx, round_idx])
        order = np.concatenate([rng.permutation(size) for _ in range(-(-need // size))])[:need]
        order = order + self.client_offsets[client_idx]
        return [[int(i) for i in order[s * bs : (s + 1) * bs]] for s in range(self.local_steps)]

    def __iter__(self) -> Iterator[list[int]]:
        round_idx = self.epoch
        if self.synchronous:  # step s: every hosted client's s-th batch; idle when this process hosts nobody
            per_client = [self.client_batches(c, round_idx) for c in self.round_clients(round_idx)]
            for s in range(self.local_steps):
                yield [i for batches in per_client for i in batches[s]] if per_client else [self.idle_index]
            return
        batches = [b for c in self.round_clients(round_idx) for b in self.client_batches(c, round_idx)]
        if self.interleave:  # one shuffled stream over all clients' batches (pooled data)
            order = np.random.default_rng([self.seed, round_idx, 7]).permutation(len(batches))
            batches = [batches[i] for i in order]
        yield from batches
        for _ in range(self.round_length(round_idx) - len(batches)):  # sharded: as many steps as the other processes
            yield [self.idle_index]

    def __len__(self) -> int:
        return self.round_length(self.epoch)


class ClientChunkBatchSampler(Sampler[list[int]]):
    """Deterministic evaluation batches: each client's indices in order, chunked, never mixing clients.

    Args:
        client_offsets: Start index of each client's examples in the concatenated dataset.
        client_sizes: Number of examples of each client (clients with 0 examples are skipped).
        batch_size: Maximum batch size (>= 1).
        clients: Only these clients' chunks (the clients this process hosts); ``None`` = every client.
    """

    def __init__(
        self,
        client_offsets: Sequence[int],
        client_sizes: Sequence[int],
        batch_size: int,
        clients: Sequence[int] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be >= 1; fix: pass batch_size >= 1.")
        if len(client_offsets) != len(client_sizes):
            raise ValueError("client_offsets and client_sizes must have equal length; fix: one entry per client.")
        self.client_offsets = [int(o) for o in client_offsets]
        self.client_sizes = [int(n) for n in client_sizes]
        if clients is not None:
            keep = {int(c) for c in clients}
            self.client_sizes = [n if c in keep else 0 for c, n in enumerate(self.client_sizes)]
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for start, size in zip(self.client_offsets, self.client_sizes):
            for s in range(0, size, self.batch_size):
                yield list(range(start + s, start + min(s + self.batch_size, size)))

    def __len__(self) -> int:
        return sum(-(-n // self.batch_size) for n in self.client_sizes)
