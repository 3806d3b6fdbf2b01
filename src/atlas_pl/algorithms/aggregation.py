"""Aggregation methods: how a cluster's LoRA adapters become one update handed back at each receiver's ranks.

Each method is a small class behind one interface (as peft's ``LoraVariant``), chosen in YAML by ``class_path``::

    - class_path: atlas_pl.callbacks.ClusterAggregation
      init_args:
        method: {class_path: atlas_pl.algorithms.Exact}

:meth:`AggregationMethod.aggregate` takes the *senders* (``AdapterUpdate`` records of the clients that trained) and
the *receivers* (``{module: (rank, scaling)}`` of every member) separately: a member that did not train receives the
merge without counting in it, and a module is merged among the senders that hold it and sent to the receivers that
hold it (clients that cut at different layers hold different modules). Pure torch; no Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from atlas_pl.algorithms.merge import (
    FactoredUpdate,
    LoraFactors,
    dense_svd_merge,
    fedavg,
    merge_lora,
    normalize_weights,
    stack_factors,
)
from atlas_pl.protocol import AdapterLayout, AdapterUpdate

Pairs = list[tuple[Tensor, Tensor]]


@dataclass
class AggregationReport:
    """What one aggregation did, per module (keys: module names) and per receiver (list index = receiver).

    Attributes:
        method: The method's name.
        truncation_error: Relative Frobenius error ``‖s_j B_j A_j − ΔW‖/‖ΔW‖`` of each receiver's new update against
            the exact merge (``nan`` for a receiver without the module).
        update_norm: ``‖ΔW‖_F`` of the exact merged update, from its singular values.
        merged_rank: Numerical rank of ``ΔW``.
        bytes_up: Adapter bytes the senders sent.
        bytes_down: Bytes sent back (new adapters; for FLoRA also the stacked factors every receiver merges).
        base_updates: FLoRA only: per module the dense ``ΔW`` added to every receiver's frozen base weight.
    """

    method: str
    truncation_error: dict[str, list[float]] = field(default_factory=dict)
    update_norm: dict[str, float] = field(default_factory=dict)
    merged_rank: dict[str, int] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    base_updates: dict[str, Tensor] = field(default_factory=dict)

    @property
    def bytes_exchanged(self) -> int:
        return self.bytes_up + self.bytes_down


@dataclass
class ModuleJob:
    """One module's inputs: the senders' factors and weights, their exact merge, and the receivers' ranks/scalings."""

    factors: list[LoraFactors]
    num_examples: list[float]
    update: FactoredUpdate
    ranks: list[int]
    scalings: list[float]
    compute_dtype: torch.dtype = torch.float32
    generator: torch.Generator | None = None


@dataclass
class ModuleResult:
    """One module's outputs: ``(A, B)`` per receiver, their errors against the merge, and an optional base delta."""

    pairs: Pairs
    errors: list[float]
    base_delta: Tensor | None = None


class AggregationMethod:
    """Merge the senders' adapters of a cluster and hand every receiver an adapter of its own ranks.

    Subclasses implement :meth:`redecompose` (one module); :meth:`merge` (the exact ``ΔW``, also reported for
    methods that do not use it) may be overridden.

    Args:
        compute_dtype: ``torch.float32`` or ``torch.float64`` for the merge; outputs keep the adapters' dtype.
    """

    name: ClassVar[str] = "method"

    def __init__(self, compute_dtype: str = "float32") -> None:
        if compute_dtype not in ("float32", "float64"):
            raise ValueError(f"`compute_dtype` must be 'float32' or 'float64', got {compute_dtype!r}")
        self.compute_dtype = getattr(torch, compute_dtype)
        self.generator: torch.Generator | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def check_clusters(self, num_clusters: int) -> None:
        """Refuse a federation this method cannot serve (FLoRA: one cluster)."""

    def merge(self, factors: list[LoraFactors], num_examples: list[float]) -> FactoredUpdate:
        """The exact ``ΔW = Σ p_i s_i B_i A_i`` of one module, factored."""
        return merge_lora(factors, num_examples, compute_dtype=self.compute_dtype)

    def redecompose(self, job: ModuleJob) -> ModuleResult:
        """``(A, B)`` of every receiver for one module."""
        raise NotImplementedError

    def aggregate(
        self, senders: Sequence[AdapterUpdate], receivers: Sequence[AdapterLayout]
    ) -> tuple[list[AdapterUpdate], AggregationReport]:
        """One cluster's aggregation: a new update per receiver (same order) and a report.

        Raises:
            ValueError: No senders, or inputs the method cannot merge (e.g. unequal ranks for :class:`FedAvg`).
        """
        if not senders:
            raise ValueError("cannot aggregate zero clients: `senders` is empty")
        report = AggregationReport(self.name, bytes_up=sum(u.nbytes for u in senders))
        out = [AdapterUpdate({}, {}) for _ in receivers]
        modules = sorted({m for layout in receivers for m in layout})
        for m in modules:
            held = [u for u in senders if m in u.factors]
            targets = [j for j, layout in enumerate(receivers) if m in layout]
            if not held:  # no sender holds it this round: the receivers keep theirs
                continue
            factors = [(u.factors[m][0], u.factors[m][1], float(u.scalings[m])) for u in held]
            weights = [float(u.num_examples) for u in held]
            update = self.merge(factors, weights)
            ranks = [int(receivers[j][m][0]) for j in targets]
            scalings = [float(receivers[j][m][1]) for j in targets]
            job = ModuleJob(factors, weights, update, ranks, scalings, self.compute_dtype, self.generator)
            result = self.redecompose(job)
            errors = [float("nan")] * len(receivers)
            for j, (a, b), scaling, error in zip(targets, result.pairs, scalings, result.errors):
                out[j].factors[m], out[j].scalings[m], errors[j] = (a, b), scaling, error
                if result.base_delta is not None:
                    out[j].base_deltas[m] = result.base_delta
            report.truncation_error[m], report.update_norm[m], report.merged_rank[m] = errors, update.norm, update.rank
            if result.base_delta is not None:
                report.base_updates[m] = result.base_delta
                report.bytes_down += len(targets) * sum(_nbytes(a, b) for a, b, _ in factors)
        for key in sorted({k for u in senders for k in u.extras}):
            held = [u for u in senders if key in u.extras]
            merged = fedavg([{key: u.extras[key]} for u in held], [u.num_examples for u in held])[key]
            for target in out:
                target.extras[key] = merged
        report.bytes_down += sum(u.nbytes for u in out)
        return out, report


class Exact(AggregationMethod):
    """ATLAS: lossless merge from stacked factors, then the best rank-``r_j`` approximation for each receiver."""

    name = "exact"

    def redecompose(self, job: ModuleJob) -> ModuleResult:
        done = job.update.truncate_many(job.ranks, job.scalings)
        return ModuleResult([(a, b) for a, b, _ in done], [e for _, _, e in done])


class DenseSVD(Exact):
    """FlexLoRA: form the dense ``ΔW`` and take its full SVD (same result as :class:`Exact` at ``O(d³)``)."""

    name = "dense_svd"

    def merge(self, factors: list[LoraFactors], num_examples: list[float]) -> FactoredUpdate:
        return dense_svd_merge(factors, num_examples, compute_dtype=self.compute_dtype)


class FedAvg(AggregationMethod):
    """SplitLoRA: average ``A`` and ``B`` separately (scalings ignored, as the method does); equal ranks only."""

    name = "fedavg"

    def redecompose(self, job: ModuleJob) -> ModuleResult:
        if len({a.shape[0] for a, _, _ in job.factors} | set(job.ranks)) != 1:
            raise ValueError(
                f"FedAvg needs one rank for all clients and targets, got ranks "
                f"{[a.shape[0] for a, _, _ in job.factors]} and target ranks {job.ranks}; use Exact"
            )
        avg = fedavg([{"A": a, "B": b} for a, b, _ in job.factors], job.num_examples)
        pairs = [(avg["A"].clone(), avg["B"].clone()) for _ in job.ranks]
        return ModuleResult(pairs, errors_against(job, pairs))


class ZeroPad(AggregationMethod):
    """HetLoRA-style: zero-pad every adapter to the largest rank, average ``A`` and ``B``, slice to each rank."""

    name = "zero_pad"

    def redecompose(self, job: ModuleJob) -> ModuleResult:
        top = max(a.shape[0] for a, _, _ in job.factors)
        padded = [{"A": F.pad(a, (0, 0, 0, top - a.shape[0])), "B": F.pad(b, (0, top - b.shape[1]))}
                  for a, b, _ in job.factors]  # fmt: skip
        avg = fedavg(padded, job.num_examples)
        pairs = [
            (F.pad(avg["A"][:r], (0, 0, 0, max(0, r - top))), F.pad(avg["B"][:, :r], (0, max(0, r - top))))
            for r in job.ranks
        ]
        return ModuleResult(pairs, errors_against(job, pairs))


class FLoRA(AggregationMethod):
    """FLoRA stacking: the dense merged ``ΔW`` goes into every receiver's frozen base weight; adapters restart.

    Each receiver gets a fresh adapter (``A`` Kaiming-uniform, ``B = 0``). The frozen base is shared by all clusters of
    one backbone, so the method serves one cluster only.
    """

    name = "flora"

    def check_clusters(self, num_clusters: int) -> None:
        if num_clusters > 1:
            raise ValueError(
                "FLoRA merges into the frozen base weights, which all clusters share; use it with one cluster, "
                "or choose Exact"
            )

    def redecompose(self, job: ModuleJob) -> ModuleResult:
        a0, b0, _ = job.factors[0]
        pairs = []
        for r in job.ranks:
            a = torch.empty(r, a0.shape[1], dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(a, a=5**0.5, generator=job.generator)
            pairs.append((a.to(a0.dtype), b0.new_zeros(b0.shape[0], r)))
        b_stack, a_stack = stack_factors(job.factors, normalize_weights(job.num_examples), job.compute_dtype)
        return ModuleResult(pairs, [0.0] * len(job.ranks), (b_stack @ a_stack).to(a0.dtype))


METHODS: dict[str, type[AggregationMethod]] = {cls.name: cls for cls in (Exact, FedAvg, ZeroPad, FLoRA, DenseSVD)}


def aggregation_method(method: str | AggregationMethod) -> AggregationMethod:
    """An :class:`AggregationMethod` from itself or its name (``exact``, ``fedavg``, ``zero_pad``, ...).

    Raises:
        ValueError: An unknown name.
    """
    if isinstance(method, AggregationMethod):
        return method
    if method not in METHODS:
        raise ValueError(
            f"`method` must be an AggregationMethod or one of {sorted(METHODS)}, got {method!r}; in YAML give "
            "`method: {class_path: atlas_pl.algorithms.Exact}`"
        )
    return METHODS[method]()


def errors_against(job: ModuleJob, pairs: Pairs) -> list[float]:
    """``‖s_j B_j A_j − ΔW‖_F / ‖ΔW‖_F`` per receiver via ``r×m`` traces (float64), never forming ``d_out×d_in``."""
    upd = job.update
    left = (upd.u if upd.q_b is None else upd.q_b @ upd.u).double()
    right = (upd.vh if upd.q_a is None else upd.vh @ upd.q_a.T).double()
    s, ref = upd.s.double(), upd.norm
    errors = []
    for (a, b), sc in zip(pairs, job.scalings):
        a64, b64 = a.double(), b.double()
        own = sc**2 * float(((b64.T @ b64) * (a64 @ a64.T)).sum())
        cross = sc * float(((b64.T @ left) * s * (right @ a64.T).T).sum())
        sq = max(own - 2 * cross + ref**2, 0.0) ** 0.5
        errors.append(sq / ref if ref > 0 else (0.0 if own == 0 else float("inf")))
    return errors


# ------------------------------------------------------------------------------------------- state-dict level
PerModule = float | Mapping[str, float]


def aggregate_lora(
    states: Sequence[Mapping[str, Tensor]],
    num_examples: Sequence[float],
    scalings: Sequence[PerModule],
    target_ranks: Sequence[int | Mapping[str, int]] | None = None,
    method: str | AggregationMethod = "exact",
    *,
    target_scalings: Sequence[PerModule] | None = None,
    compute_dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> tuple[list[dict[str, Tensor]], AggregationReport]:
    """Aggregate adapter states of clients that all sent and all receive (state-dict form of ``method.aggregate``).

    Args:
        states: Per client ``{"<module>.lora_A": A, "<module>.lora_B": B}``; same modules for every client.
        num_examples: Per client example count (aggregation weight).
        scalings: Per client ``alpha / r``: a float, or per module ``{module: scaling}``.
        target_ranks: Per client rank (int or ``{module: rank}``); ``None`` keeps each client's ranks.
        method: An :class:`AggregationMethod` or its name (``exact``, ``fedavg``, ``zero_pad``, ``flora``,
            ``dense_svd``).
        target_scalings: Scalings clients use with their new ranks; ``None`` means ``scalings``.
        compute_dtype: ``torch.float32`` or ``torch.float64``; outputs keep the input dtype.
        generator: Random source for FLoRA's fresh adapters.

    Returns:
        The new states (one per client, same keys) and an :class:`AggregationReport`.

    Raises:
        ValueError: Unknown method, mismatched keys or lengths, bad ranks/scalings, or unequal ranks for ``fedavg``.
    """
    chosen = aggregation_method(method)
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"`compute_dtype` must be torch.float32 or torch.float64, got {compute_dtype}")
    chosen.compute_dtype, chosen.generator = compute_dtype, generator
    modules = _module_names(states, num_examples, scalings)
    ranks = target_ranks if target_ranks is not None else [_own_ranks(s, modules) for s in states]
    outs = target_scalings if target_scalings is not None else scalings
    _check_length(ranks, len(states), "target_ranks")
    _check_length(outs, len(states), "target_scalings")
    senders = [
        AdapterUpdate(
            {m: (s[f"{m}.lora_A"], s[f"{m}.lora_B"]) for m in modules},
            {m: _pick(sc, m, "scalings") for m in modules},
            n,
        )
        for s, sc, n in zip(states, scalings, num_examples)
    ]
    receivers = [{m: (int(_pick(r, m, "target_ranks")), _pick(sc, m, "target_scalings")) for m in modules}
                 for r, sc in zip(ranks, outs)]  # fmt: skip
    normalize_weights(num_examples)  # clear errors for empty, negative or all-zero weights
    updates, report = chosen.aggregate(senders, receivers)
    new_states = [
        {f"{m}.lora_{k}": t for m, (a, b) in u.factors.items() for k, t in (("A", a), ("B", b))} for u in updates
    ]
    return new_states, report


def merge_lora_states(
    states: Sequence[Mapping[str, Tensor]],
    num_examples: Sequence[float],
    scalings: Sequence[PerModule],
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> dict[str, FactoredUpdate]:
    """Per module the exact :class:`FactoredUpdate` (e.g. to :meth:`~FactoredUpdate.compress` into a frozen term).

    Raises:
        ValueError: As :func:`aggregate_lora`.
    """
    modules = _module_names(states, num_examples, scalings)
    return {
        m: merge_lora(
            [(s[f"{m}.lora_A"], s[f"{m}.lora_B"], _pick(sc, m, "scalings")) for s, sc in zip(states, scalings)],
            num_examples,
            compute_dtype=compute_dtype,
        )
        for m in modules
    }


def _own_ranks(state: Mapping[str, Tensor], modules: Sequence[str]) -> dict[str, int]:
    return {m: int(state[f"{m}.lora_A"].shape[0]) for m in modules}


def _module_names(
    states: Sequence[Mapping[str, Tensor]], num_examples: Sequence[float], scalings: Sequence
) -> list[str]:
    """Module names of the states, checked to be the same ``lora_A``/``lora_B`` pairs for every client."""
    if len(states) == 0:
        raise ValueError("cannot aggregate zero clients: `states` is empty")
    _check_length(num_examples, len(states), "num_examples")
    _check_length(scalings, len(states), "scalings")
    keys = set(states[0])
    for i, s in enumerate(states):
        if set(s) != keys:
            raise ValueError(
                f"client {i}'s state has keys {sorted(set(s) ^ keys)} that client 0's lacks or vice versa; "
                "every client must send the same modules"
            )
    modules = sorted({k.rsplit(".", 1)[0] for k in keys})
    for m in modules:
        if f"{m}.lora_A" not in keys or f"{m}.lora_B" not in keys:
            raise ValueError(f"module {m!r} needs both '{m}.lora_A' and '{m}.lora_B' in `states`, got {sorted(keys)}")
    return modules


def _check_length(values: Sequence, n: int, name: str) -> None:
    if len(values) != n:
        raise ValueError(f"`{name}` has {len(values)} entries but `states` has {n} clients; pass one per client")


def _pick(value: float | int | Mapping, module: str, name: str) -> float:
    """A per-client value that is either one number or ``{module: number}``."""
    if isinstance(value, Mapping):
        if module not in value:
            raise ValueError(f"`{name}` lacks module {module!r} (has {sorted(value)}); give a value for every module")
        return value[module]
    return value


def _nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
