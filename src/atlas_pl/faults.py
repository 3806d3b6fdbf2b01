"""Client faults: a client that raises, diverges or does not answer in time is left out of the round, not the run.

With ``model.faults: {tolerate: true}`` a ``Federation`` checks every client step before its optimizer steps: an
exception in the client's forward / cut / backward, a non-finite loss or adapter gradient, or a step slower than
``timeout_s`` marks the client *faulty for the round*. Its step is not applied, its remaining batches of the round are
skipped, it sends nothing at aggregation, it still receives its cluster's merge (so it starts the next round from a
healthy state) and it trains again next round. Each fault is logged (a warning naming the round, the client and the
reason), counted per round (``round/faults``) and kept in ``Federation.fault_log`` (checkpointed, written into
``results.json``).

``ClusterAggregation`` drops any sender whose update is not finite (any module, any process) and checks a quorum per
cluster: the round proceeds if at least ``quorum`` of the cluster's clients of the round answered, otherwise it fails
with the faults named. Steps a client made earlier in the round, before its fault, stay in adapters it shares with
others (a per-cluster server adapter); its own adapters are replaced by the merge.

Without ``tolerate`` (the default) any client error ends the run, as a plain Lightning error does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["ClientFault", "FaultSpec", "QuorumError", "check_step", "non_finite"]


@dataclass
class FaultSpec:
    """How a federation treats client faults (YAML: ``model.faults: {tolerate: true, timeout_s: 30}``).

    Args:
        tolerate: Leave a failing client out of the round (see the module docstring) instead of ending the run.
        timeout_s: With ``tolerate``: a client step (forward, both sides of the cut, backward) that takes longer is a
            fault, and its update is not applied (``None``: no limit). An in-process client cannot be interrupted,
            so the step runs to its end and is then discarded.
    """

    tolerate: bool = False
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tolerate, bool):
            raise ValueError(f"`faults.tolerate` must be true or false, got {self.tolerate!r}")
        t = self.timeout_s
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0):
            raise ValueError(f"`faults.timeout_s` must be a positive number of seconds or null, got {t!r}")


class ClientFault(RuntimeError):
    """A client step that must not be applied: non-finite loss or gradient, or over its time limit."""


class QuorumError(RuntimeError):
    """Too few clients of a cluster answered in a round for its aggregation to go on."""


def non_finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether any of ``tensors`` (``None`` skipped) holds a NaN or an infinity."""
    return any(t is not None and not bool(torch.isfinite(t).all()) for t in tensors)


def check_step(
    loss: torch.Tensor, params: Iterable[torch.nn.Parameter], started: float, timeout_s: float | None
) -> None:
    """The check a tolerant federation runs after a client's backward and before its optimizer steps.

    Raises:
        ClientFault: Non-finite loss, non-finite gradient of one of ``params``, or more than ``timeout_s`` seconds
            since ``started`` (``time.perf_counter()``).
    """
    value = float(loss.detach())
    if not math.isfinite(value):
        raise ClientFault(f"non-finite loss ({value})")
    if non_finite(p.grad for p in params):
        raise ClientFault("non-finite adapter gradient")
    elapsed = time.perf_counter() - started
    if timeout_s is not None and elapsed > timeout_s:
        raise ClientFault(f"no answer within {timeout_s:g} s (the step took {elapsed:.2f} s)")


def describe(err: BaseException) -> str:
    """One line naming a fault: the message of a :class:`ClientFault`, else the exception type and message."""
    return str(err) if isinstance(err, ClientFault) else f"{type(err).__name__}: {err}"


def quorum_message(round_idx: int, cluster: int, healthy: list[int], faults: dict[int, str], quorum: float) -> str:
    """The error of a cluster below quorum: who answered, who did not and why, and the fixes."""
    failed = "; ".join(f"client {c}: {why}" for c, why in sorted(faults.items()))
    total = len(healthy) + len(faults)
    return (
        f"round {round_idx}: only {len(healthy)} of the {total} clients of cluster {cluster} answered (quorum "
        f"{quorum:g}); {failed}. Fix the failing clients, or lower ClusterAggregation's `quorum`"
    )
