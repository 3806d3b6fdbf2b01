"""Per-client LoRA ranks (and cut layer) that fit each client's memory budget (phase 2).

A cluster's module importance ``I_c(m)`` gives its rank *pattern* ``π_c(m) = I_c(m) / max_m' I_c(m')``. Client ``j`` of
the cluster gets ``r_j(m) = clip(round(λ_j π_c(m)), r_min, r_max)`` with the largest scale ``λ_j`` whose estimated peak
memory fits its budget: same pattern within a cluster, different absolute ranks. Ranks only change where
``λ π(m)`` crosses a half-integer, so the search runs over those breakpoints (binary search: the peak grows with every
rank, hence with ``λ``) and is exact. With several candidate cut layers the allocator keeps those whose smallest
configuration fits and picks the one with the smallest estimated round latency.

Framework-free (the shape of peft's ``RankAllocator``, not its code); the ``RankAllocation`` callback calls it.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from atlas_pl.memory import MemoryEstimate, ModelShape, estimate_client_memory, format_size, parse_size

EstimateFn = Callable[[int | None, dict[str, int]], "int | MemoryEstimate"]
"""``(cut_layer, client rank_pattern) -> peak bytes`` (or a :class:`MemoryEstimate`)."""
LatencyFn = Callable[[int | None, dict[str, int]], float]
"""``(cut_layer, client rank_pattern) -> seconds per round``."""
_BLOCK = re.compile(r"\.(\d+)\.")


def validate_rank_bounds(r_min: int, r_max: int) -> None:
    """Raise a clear error unless ``1 <= r_min <= r_max`` are ints."""
    for name, value in (("r_min", r_min), ("r_max", r_max)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
    if r_min > r_max:
        raise ValueError(f"`r_min` ({r_min}) must be <= `r_max` ({r_max}); swap them or lower `r_min`")


def normalize_pattern(importance: Mapping[str, float]) -> dict[str, float]:
    """``π(m) = I(m) / max I`` in ``[0, 1]`` (all-zero importance: a flat pattern of ones).

    Raises:
        ValueError: Empty, negative or non-finite importance.
    """
    if not importance:
        raise ValueError("`importance` is empty: pass at least one module's importance")
    bad = [(m, v) for m, v in importance.items() if not (0 <= v < math.inf)]
    if bad:
        raise ValueError(f"importance must be finite and >= 0, got {bad[0][1]!r} for module {bad[0][0]!r}")
    top = max(importance.values())
    return {m: (v / top if top > 0 else 1.0) for m, v in importance.items()}


def scale_ranks(pattern: Mapping[str, float], scale: float, r_min: int, r_max: int) -> dict[str, int]:
    """``r(m) = clip(round(scale · π(m)), r_min, r_max)`` (halves round up)."""
    return {m: min(r_max, max(r_min, math.floor(scale * p + 0.5))) for m, p in pattern.items()}


def rank_pattern(importance: Mapping[str, float], r_min: int, r_max: int, scale: float | None = None) -> dict[str, int]:
    """A cluster's integer rank pattern: ranks ∝ importance, the most important module at ``scale`` (default ``r_max``).

    Raises:
        ValueError: Bad rank bounds or importance.
    """
    validate_rank_bounds(r_min, r_max)
    return scale_ranks(normalize_pattern(importance), float(r_max if scale is None else scale), r_min, r_max)


def block_index(module: str) -> int:
    """Block index of a module name (``transformer.h.3.attn.c_attn`` → 3).

    Raises:
        ValueError: The name has no block index.
    """
    match = _BLOCK.search(f".{module}.")
    if match is None:
        raise ValueError(f"module {module!r} has no block index; expected a name like 'transformer.h.3.attn.c_attn'")
    return int(match.group(1))


@dataclass
class Allocation:
    """What one client trains: its cut layer, peft-style ranks, and the estimate that justified them.

    Attributes:
        client: Client name or index.
        budget_bytes: The client's memory budget.
        cut_layer: Chosen cut layer (``None`` when the estimate function fixes it).
        scale: The ``λ`` of ``r(m) = clip(round(λ π(m)), r_min, r_max)``.
        rank_pattern: Client-half module → rank.
        server_rank_pattern: Server-half module → rank at the same ``λ`` (for the client's server adapter).
        peak_bytes: Estimated peak memory (``<= budget_bytes``).
        estimate: The full estimate when the estimate function returns one.
        latency_s: Estimated round latency when a latency function is given.
    """

    client: Any
    budget_bytes: int
    cut_layer: int | None
    scale: float
    rank_pattern: dict[str, int]
    server_rank_pattern: dict[str, int] = field(default_factory=dict)
    peak_bytes: int = 0
    estimate: MemoryEstimate | None = None
    latency_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain, JSON-serializable values (for logs and checkpoints)."""
        out = {k: v for k, v in self.__dict__.items() if k != "estimate"}
        out["estimate"] = None if self.estimate is None else self.estimate.as_dict()
        return out


class RankAllocator:
    """Budget-fitted ranks (and cut layer) for clients that share a cluster's rank pattern.

    Args:
        estimate_fn: ``(cut_layer, rank_pattern) -> peak bytes`` of a client; must grow with every rank
            (:func:`client_memory_fn` wraps :func:`atlas_pl.memory.estimate_client_memory`).
        r_min: Smallest rank a module may get (>= 1).
        r_max: Largest rank a module may get.
        cut_layers: Candidate cut layers; ``None`` when ``estimate_fn`` fixes the cut (every module of the pattern is
            then on the client).
        latency_fn: ``(cut_layer, rank_pattern) -> seconds``; picks among several fitting cut layers (without it the
            cut with the most total rank wins, ties to the smaller cut).

    Raises:
        ValueError: ``r_min > r_max``, a rank bound < 1, or an empty ``cut_layers``.
    """

    def __init__(
        self,
        estimate_fn: EstimateFn,
        r_min: int = 1,
        r_max: int = 64,
        cut_layers: Sequence[int] | None = None,
        latency_fn: LatencyFn | None = None,
    ) -> None:
        validate_rank_bounds(r_min, r_max)
        if cut_layers is not None and len(cut_layers) == 0:
            raise ValueError("`cut_layers` must be None or a non-empty list of cut layers, got []")
        self.estimate_fn = estimate_fn
        self.r_min, self.r_max = r_min, r_max
        self.cut_layers: list[int | None] = list(cut_layers) if cut_layers is not None else [None]
        self.latency_fn = latency_fn

    # ------------------------------------------------------------------------------------------------- one client
    def allocate(self, pattern: Mapping[str, float], budget: int | str, client: Any = 0) -> Allocation:
        """The allocation of one client of the cluster whose importance (or pattern) is ``pattern``.

        Raises:
            ValueError: Unparseable budget, or a budget below what the cheapest cut layer needs at ``r_min``.
        """
        budget_bytes = parse_size(budget)
        pi = normalize_pattern(pattern)
        fitting = [a for a in (self._fit_cut(pi, cut, budget_bytes, client) for cut in self.cut_layers) if a]
        if not fitting:
            need, cut = min((self._peak(cut, self._client_ranks(pi, cut, 0.0)), cut) for cut in self.cut_layers)
            where = "" if cut is None else f" (cut layer {cut})"
            raise ValueError(
                f"client {client!r}: memory budget {format_size(budget_bytes)} ({budget_bytes} bytes) is below the "
                f"{format_size(need)} ({need} bytes) its cheapest configuration{where} needs at r_min={self.r_min}; "
                "give it at least that budget, or lower batch_size, seq_len or the cut layer"
            )
        return min(fitting, key=self._preference)

    def _preference(self, a: Allocation) -> tuple[float, int, int]:
        latency = a.latency_s if a.latency_s is not None else 0.0
        return (latency, -sum(a.rank_pattern.values()), a.cut_layer or 0)

    def _client_ranks(self, pi: Mapping[str, float], cut: int | None, scale: float) -> dict[str, int]:
        mods = {m: p for m, p in pi.items() if cut is None or block_index(m) < cut}
        return scale_ranks(mods, scale, self.r_min, self.r_max)

    def _peak(self, cut: int | None, ranks: dict[str, int]) -> int:
        out = self.estimate_fn(cut, ranks)
        return out.total if isinstance(out, MemoryEstimate) else int(out)

    def _fit_cut(self, pi: Mapping[str, float], cut: int | None, budget: int, client: Any) -> Allocation | None:
        """Largest ``λ`` that fits at this cut (binary search over the breakpoints where a rank changes)."""
        scales = breakpoints(pi if cut is None else {m: p for m, p in pi.items() if block_index(m) < cut}, self)
        fits = [self._peak(cut, self._client_ranks(pi, cut, s)) <= budget for s in scales[:1]]
        if not fits[0]:
            return None
        lo, hi = 0, len(scales) - 1  # scales[lo] fits; find the last fitting index
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._peak(cut, self._client_ranks(pi, cut, scales[mid])) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return self._allocation(pi, cut, scales[lo], budget, client)

    def _allocation(
        self, pi: Mapping[str, float], cut: int | None, scale: float, budget: int, client: Any
    ) -> Allocation:
        ranks = self._client_ranks(pi, cut, scale)
        server = {} if cut is None else scale_ranks({m: p for m, p in pi.items() if m not in ranks}, scale,
                                                    self.r_min, self.r_max)  # fmt: skip
        out = self.estimate_fn(cut, ranks)
        return Allocation(
            client=client, budget_bytes=budget, cut_layer=cut, scale=scale, rank_pattern=ranks,
            server_rank_pattern=server, peak_bytes=out.total if isinstance(out, MemoryEstimate) else int(out),
            estimate=out if isinstance(out, MemoryEstimate) else None,
            latency_s=None if self.latency_fn is None else float(self.latency_fn(cut, ranks)),
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------------- many clients
    def allocate_all(
        self,
        cluster_patterns: Mapping[int, Mapping[str, float]],
        budgets: Sequence[int | str],
        cluster_ids: Sequence[int],
        clients: Sequence[Any] | None = None,
    ) -> list[Allocation]:
        """One allocation per client: client ``i`` uses its cluster's pattern and ``budgets[i]``.

        Raises:
            ValueError: Lengths differ, a cluster without a pattern, or a budget that cannot fit (see :meth:`allocate`).
        """
        names = list(range(len(budgets))) if clients is None else list(clients)
        if not len(budgets) == len(cluster_ids) == len(names):
            raise ValueError(
                f"`budgets` ({len(budgets)}), `cluster_ids` ({len(cluster_ids)}) and `clients` ({len(names)}) "
                "must have one entry per client"
            )
        missing = sorted({int(c) for c in cluster_ids} - {int(c) for c in cluster_patterns})
        if missing:
            raise ValueError(f"no rank pattern for cluster(s) {missing}; pass one per cluster in `cluster_patterns`")
        return [self.allocate(cluster_patterns[int(c)], b, n) for b, c, n in zip(budgets, cluster_ids, names)]


def breakpoints(pi: Mapping[str, float], allocator: RankAllocator) -> list[float]:
    """Sorted scales at which some rank changes (plus 0): ``(k + 1/2) / π(m)`` for ``k`` in ``[r_min, r_max)``."""
    points = {0.0}
    for p in pi.values():
        if p > 0:
            points.update((k + 0.5) / p * (1 + 1e-12) for k in range(allocator.r_min, allocator.r_max))
    ordered = sorted(points)
    return ordered[: bisect_right(ordered, (allocator.r_max + 0.5) / min([p for p in pi.values() if p > 0] or [1]))]


def client_memory_fn(
    shape: ModelShape, batch_size: int, seq_len: int, cut_layer: int | None = None, **kwargs: Any
) -> EstimateFn:
    """An ``estimate_fn`` for :class:`RankAllocator` from :func:`atlas_pl.memory.estimate_client_memory`.

    ``cut_layer`` is the fixed cut used when the allocator passes ``None``; ``kwargs`` go to the estimate (dtype,
    device, target_modules, ...). The default ``rank`` of modules missing from the pattern is ``kwargs['rank']`` or 1.
    """

    def estimate(cut: int | None, ranks: dict[str, int]) -> MemoryEstimate:
        layer = cut if cut is not None else cut_layer
        if layer is None:
            raise ValueError("`cut_layer` is needed: pass it to client_memory_fn or give the allocator `cut_layers`")
        return estimate_client_memory(shape, layer, batch_size, seq_len, rank_pattern=ranks, **{"rank": 1, **kwargs})

    return estimate
