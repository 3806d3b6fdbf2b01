"""Aggregation of LoRA adapters (pure torch; no Lightning).

An adapter state is ``{"<module>.lora_A": A [r×d_in], "<module>.lora_B": B [d_out×r]}`` as produced by
``AdapterBank.state``. Weights ``p_i`` come from the clients' ``num_examples``.

Exact merge (DESIGN.md, phase 4): per module ``ΔW = Σ_i p_i s_i B_i A_i = [p_1 s_1 B_1, …] · [A_1; …; A_n]``, kept
factored as ``Q_b U diag(S) Vᵀ Q_aᵀ`` (QR of both stacks, SVD of the small core), never as a ``d_out×d_in`` matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Method = Literal["exact", "fedavg", "zero_pad", "flora", "dense_svd"]
METHODS: tuple[str, ...] = ("exact", "fedavg", "zero_pad", "flora", "dense_svd")
LoraFactors = tuple[Tensor, Tensor, float]  # (A [r×d_in], B [d_out×r], scaling)
PerModule = float | Mapping[str, float]


def normalize_weights(num_examples: Sequence[float]) -> list[float]:
    """``p_i = n_i / Σ n`` with checks.

    Raises:
        ValueError: Empty input, a negative count, or all counts zero.
    """
    if len(num_examples) == 0:
        raise ValueError("cannot aggregate zero clients: `num_examples` is empty")
    if any(n < 0 for n in num_examples):
        raise ValueError(f"`num_examples` must be >= 0, got {list(num_examples)}")
    total = float(sum(num_examples))
    if total <= 0:
        raise ValueError(f"`num_examples` sum to 0 ({list(num_examples)}): no client has data to weight by")
    return [float(n) / total for n in num_examples]


def fedavg(states: Sequence[dict[str, torch.Tensor]], num_examples: Sequence[float]) -> dict[str, torch.Tensor]:
    """FedAvg of adapter tensors: every ``lora_A`` and ``lora_B`` averaged separately with weights ``p_i``.

    This is SplitLoRA's aggregation; it needs equal shapes (equal ranks). Note that ``mean(B) @ mean(A)`` is not
    ``mean(B @ A)``; exact merging of the products is ``aggregate_lora`` (phase 4).

    Raises:
        ValueError: States disagree in keys or shapes (heterogeneous ranks need exact aggregation).
    """
    weights = normalize_weights(num_examples)
    if len(states) != len(weights):
        raise ValueError(f"got {len(states)} adapter states but {len(weights)} weights")
    keys = list(states[0])
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        tensors = [s[key] for s in states]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1 or any(set(s) != set(keys) for s in states):
            raise ValueError(
                f"fedavg needs equal adapter shapes; {key} has shapes {sorted(shapes)}. Use exact "
                "aggregation for heterogeneous ranks"
            )
        acc = torch.zeros_like(tensors[0], dtype=torch.float64)
        for w, t in zip(weights, tensors):
            acc += w * t.to(torch.float64)
        out[key] = acc.to(tensors[0].dtype)
    return out


# ------------------------------------------------------------------------------------------------ exact merge
@dataclass(frozen=True, eq=False)
class FactoredUpdate:
    """A merged update ``ΔW = L diag(s) R`` with ``L = q_b @ u`` and ``R = vh @ q_aᵀ`` (orthonormal ``L``, ``R``).

    ``q_b``/``q_a`` are ``None`` where the stack was at least as wide as the dimension (identity, no QR needed), so
    the core ``u diag(s) vh`` is ``min(d_out, R) × min(d_in, R)``. Truncating costs ``O((d_in + d_out) k r)``.

    Attributes:
        q_b: ``[d_out×k_b]`` orthonormal basis of the stacked ``B`` columns, or ``None`` (identity).
        u: ``[k_b×m]`` left singular vectors of the core.
        s: ``[m]`` singular values, descending; ``‖ΔW‖_F = ‖s‖``.
        vh: ``[m×k_a]`` right singular vectors of the core (transposed).
        q_a: ``[d_in×k_a]`` orthonormal basis of the stacked ``A`` rows, or ``None`` (identity).
        dtype: dtype of the factors handed out (the clients' adapter dtype).
    """

    q_b: Tensor | None
    u: Tensor
    s: Tensor
    vh: Tensor
    q_a: Tensor | None
    dtype: torch.dtype

    @classmethod
    def from_dense(cls, delta: Tensor, dtype: torch.dtype | None = None) -> FactoredUpdate:
        """Full SVD of a dense ``ΔW`` (the FlexLoRA baseline; ``O(d³)``)."""
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return cls(None, u, s, vh, None, dtype or delta.dtype)

    @property
    def shape(self) -> tuple[int, int]:
        d_out = self.u.shape[0] if self.q_b is None else self.q_b.shape[0]
        d_in = self.vh.shape[1] if self.q_a is None else self.q_a.shape[0]
        return d_out, d_in

    @property
    def norm(self) -> float:
        """``‖ΔW‖_F``, from the singular values."""
        return float(torch.linalg.vector_norm(self.s.double()))

    @property
    def rank(self) -> int:
        """Numerical rank: singular values above ``max(d_out, d_in) · eps · s_max`` (as ``matrix_rank``)."""
        if self.s.numel() == 0 or float(self.s[0]) == 0.0:
            return 0
        tol = max(self.shape) * torch.finfo(self.s.dtype).eps * float(self.s[0])
        return int((self.s > tol).sum())

    def tail_energy(self) -> Tensor:
        """``t[k] = √(Σ_{i≥k} s_i²)`` for ``k = 0..m`` (float64), so ``t[r]/t[0]`` is the rank-``r`` error."""
        sq = self.s.double().square()
        tail = torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0])
        return torch.cat([tail, tail.new_zeros(1)]).clamp_min(0).sqrt()

    def truncation_error(self, rank: int) -> float:
        """Relative Frobenius error ``√(Σ_{k>r} s_k²)/‖s‖`` of the best rank-``rank`` approximation (0 if exact)."""
        _check_rank(rank, "rank")
        if rank >= self.rank:
            return 0.0
        tail = self.tail_energy()
        return float(tail[rank] / tail[0])

    def truncate(self, rank: int, scaling: float = 1.0) -> tuple[Tensor, Tensor, float]:
        """Factors ``(A [r×d_in], B [d_out×r], rel_error)`` with ``scaling · B @ A`` the best rank-``r`` ``ΔW``."""
        return self.truncate_many([rank], [scaling])[0]

    def truncate_many(self, ranks: Sequence[int], scalings: Sequence[float]) -> list[tuple[Tensor, Tensor, float]]:
        """:meth:`truncate` for many clients, projecting the bases once up to ``max(ranks)``.

        ``B_j = L_r S_r^{1/2} / √s_j`` and ``A_j = S_r^{1/2} R_r / √s_j`` (balanced, so ``s_j B_j A_j`` is the
        truncated ``ΔW``; dividing only ``B`` by ``√s_j`` would leave a factor ``√s_j``); ranks beyond the core are
        zero-padded.

        Raises:
            ValueError: A rank < 1, a scaling <= 0, or the two lists differ in length.
        """
        if len(ranks) != len(scalings):
            raise ValueError(f"got {len(ranks)} ranks but {len(scalings)} scalings; pass one scaling per rank")
        for r, sc in zip(ranks, scalings):
            _check_rank(r, "rank")
            _check_scaling(sc, "scaling")
        top = min(max(ranks), self.s.numel())
        root = self.s[:top].clamp_min(0).sqrt()
        left = self.u[:, :top] * root if self.q_b is None else self.q_b @ (self.u[:, :top] * root)
        right = root[:, None] * (self.vh[:top] if self.q_a is None else self.vh[:top] @ self.q_a.T)
        out = []
        for r, sc in zip(ranks, scalings):
            k = min(r, top)
            b = F.pad(left[:, :k] / sc**0.5, (0, r - k))
            a = F.pad(right[:k] / sc**0.5, (0, 0, 0, r - k))
            out.append((a.to(self.dtype), b.to(self.dtype), self.truncation_error(r)))
        return out

    def compress(self, rel_tol: float = 1e-6) -> tuple[Tensor, Tensor]:
        """Lossless frozen term: ``(A [k×d_in], B [d_out×k])`` with ``‖B @ A − ΔW‖_F ≤ rel_tol · ‖ΔW‖_F``.

        ``k`` is the smallest rank (at least 1) whose discarded energy is within ``rel_tol``; the scaling is folded
        in (use it with scaling 1). A caller freezes this term into the forward and gives the client a fresh
        trainable adapter, so nothing of the cluster's update is lost to truncation.

        Raises:
            ValueError: ``rel_tol`` outside ``[0, 1)``.
        """
        if not 0.0 <= rel_tol < 1.0:
            raise ValueError(f"`rel_tol` must be in [0, 1), got {rel_tol!r}; 1e-6 keeps the update to fp32 accuracy")
        tail = self.tail_energy()
        keep = int((tail[1:] > rel_tol * tail[0]).sum()) + 1 if tail[0] > 0 else 1
        a, b, _ = self.truncate(keep)
        return a, b

    def dense(self) -> Tensor:
        """``ΔW`` as a dense ``d_out×d_in`` matrix in the compute dtype (for tests and reference checks)."""
        left = self.u if self.q_b is None else self.q_b @ self.u
        right = self.vh if self.q_a is None else self.vh @ self.q_a.T
        return (left * self.s) @ right


def merge_lora(
    factors: Sequence[LoraFactors], num_examples: Sequence[float], *, compute_dtype: torch.dtype = torch.float32
) -> FactoredUpdate:
    """Exact merge ``ΔW = Σ_i p_i s_i B_i A_i`` of one module's heterogeneous-rank adapters, kept factored.

    Cost ``O((d_in + d_out) R² + R³)`` with ``R = Σ r_i``; no ``d_out×d_in`` matrix is formed.

    Args:
        factors: Per client ``(A [r_i×d_in], B [d_out×r_i], scaling s_i)``; ranks may differ.
        num_examples: Per client example count; weights ``p_i = n_i / Σ n``.
        compute_dtype: ``torch.float32`` or ``torch.float64``; results are handed out in ``A``'s dtype.

    Raises:
        ValueError: Lengths differ, shapes disagree, a rank < 1, a scaling <= 0, or an unsupported dtype.
    """
    b_stack, a_stack = _stacks(factors, _check_factors(factors, num_examples, compute_dtype), compute_dtype)
    q_b, r_b = _orthonormalize(b_stack)
    q_a, r_a = _orthonormalize(a_stack.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return FactoredUpdate(q_b, u, s, vh, q_a, factors[0][0].dtype)


def dense_svd_merge(
    factors: Sequence[LoraFactors], num_examples: Sequence[float], *, compute_dtype: torch.dtype = torch.float32
) -> FactoredUpdate:
    """The FlexLoRA baseline: form the dense ``ΔW = Σ_i p_i s_i B_i A_i`` and take its full SVD (``O(d³)``).

    Same arguments, checks and result as :func:`merge_lora` (up to rounding), at the cost of a ``d_out×d_in`` SVD.
    """
    b_stack, a_stack = _stacks(factors, _check_factors(factors, num_examples, compute_dtype), compute_dtype)
    return FactoredUpdate.from_dense(b_stack @ a_stack, dtype=factors[0][0].dtype)


def _stacks(factors: Sequence[LoraFactors], weights: Sequence[float], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``[p_1 s_1 B_1, …, p_n s_n B_n]`` (``d_out×R``) and ``[A_1; …; A_n]`` (``R×d_in``) in ``dtype``."""
    b_stack = torch.cat([b.to(dtype) * (p * s) for (_, b, s), p in zip(factors, weights)], dim=1)
    return b_stack, torch.cat([a.to(dtype) for a, _, _ in factors], dim=0)


def _orthonormalize(stack: Tensor) -> tuple[Tensor | None, Tensor]:
    """Reduced QR of a ``d×R`` stack; when ``R >= d`` the stack itself is the (min-sized) factor, ``Q = I``."""
    if stack.shape[1] >= stack.shape[0]:
        return None, stack
    q, r = torch.linalg.qr(stack, mode="reduced")
    return q, r


def _check_factors(factors: Sequence[LoraFactors], num_examples: Sequence[float], dtype: torch.dtype) -> list[float]:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"`compute_dtype` must be torch.float32 or torch.float64, got {dtype}")
    if len(factors) != len(num_examples):
        raise ValueError(
            f"`num_examples` has {len(num_examples)} entries but `factors` has {len(factors)} clients; "
            "pass one count per client"
        )
    weights = normalize_weights(num_examples)
    d_out, d_in = factors[0][1].shape[0], factors[0][0].shape[-1]
    for i, (a, b, s) in enumerate(factors):
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"client {i}: `lora_A` {tuple(a.shape)} and `lora_B` {tuple(b.shape)} must be [r×d_in] and "
                "[d_out×r] with the same r"
            )
        _check_rank(a.shape[0], f"rank of client {i}")
        _check_scaling(s, f"scaling of client {i}")
        if a.shape[1] != d_in or b.shape[0] != d_out:
            raise ValueError(
                f"client {i} adapts a [{b.shape[0]}×{a.shape[1]}] module (d_out×d_in) but client 0 a "
                f"[{d_out}×{d_in}] one; merge only adapters of the same module"
            )
    return weights


def _check_rank(rank: int, name: str) -> None:
    if int(rank) != rank or rank < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {rank!r}; a LoRA adapter needs at least rank 1")


def _check_scaling(scaling: float, name: str) -> None:
    if not scaling > 0 or scaling == float("inf"):
        raise ValueError(f"`{name}` must be a finite float > 0 (alpha / r), got {scaling!r}")


# ------------------------------------------------------------------------------------------- state-dict level
@dataclass
class AggregationReport:
    """What one aggregation did, per module (keys: module names) and per client (list index = client).

    Attributes:
        method: The method used.
        truncation_error: Relative Frobenius error ``‖s_j B_j A_j + base_j − ΔW‖/‖ΔW‖`` of each client's new update
            against the exact merge (for ``exact`` and ``dense_svd`` the SVD tail ``√(Σ_{k>r} S_k²)/‖S‖``).
        update_norm: ``‖ΔW‖_F`` of the exact merged update, from its singular values.
        merged_rank: Numerical rank of ``ΔW``.
        bytes_up: Adapter bytes the clients sent.
        bytes_down: Bytes sent back (new adapters; for ``flora`` also the stacked factors every client merges).
        base_updates: ``flora`` only: per module the dense ``ΔW`` to add to every client's frozen base weight.
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
class _Job:
    """One module's inputs for a method: factors, weights, the exact merge, and the target ranks/scalings."""

    factors: list[LoraFactors]
    num_examples: Sequence[float]
    update: FactoredUpdate
    ranks: list[int]
    scalings: list[float]
    compute_dtype: torch.dtype
    generator: torch.Generator | None


def aggregate_lora(
    states: Sequence[Mapping[str, Tensor]],
    num_examples: Sequence[float],
    scalings: Sequence[PerModule],
    target_ranks: Sequence[int | Mapping[str, int]] | None = None,
    method: Method = "exact",
    *,
    target_scalings: Sequence[PerModule] | None = None,
    compute_dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> tuple[list[dict[str, Tensor]], AggregationReport]:
    """Aggregate one cluster's adapter states and hand every client an adapter of its target rank.

    Methods: ``exact`` (factored merge, best rank-``r_j`` approximation per client); ``dense_svd`` (FlexLoRA: form
    ``ΔW``, full SVD, same result at ``O(d³)``); ``fedavg`` (SplitLoRA: average ``A`` and ``B`` separately; equal
    ranks); ``zero_pad`` (HetLoRA-style: zero-pad to the largest rank, average, slice to each rank); ``flora``
    (FLoRA: the dense ``ΔW`` goes into ``report.base_updates`` for the caller to add to the base weights, and every
    client gets a fresh adapter, ``A`` Kaiming-uniform and ``B = 0``). ``fedavg`` and ``zero_pad`` average the raw
    factors, ignoring scalings, as the methods do.

    Args:
        states: Per client ``{"<module>.lora_A": A, "<module>.lora_B": B}``; same modules for every client.
        num_examples: Per client example count (aggregation weight).
        scalings: Per client ``alpha / r``: a float, or per module ``{module: scaling}``.
        target_ranks: Per client rank (int or ``{module: rank}``); ``None`` keeps each client's ranks.
        method: One of ``exact``, ``fedavg``, ``zero_pad``, ``flora``, ``dense_svd``.
        target_scalings: Scalings clients use with their new ranks; ``None`` means ``scalings``.
        compute_dtype: ``torch.float32`` or ``torch.float64``; outputs keep the input dtype.
        generator: Random source for ``flora``'s fresh adapters.

    Returns:
        The new states (one per client, same keys) and an :class:`AggregationReport`.

    Raises:
        ValueError: Unknown method, mismatched keys or lengths, bad ranks/scalings, or unequal ranks for ``fedavg``.
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
    modules = _module_names(states, num_examples, scalings)
    ranks = target_ranks if target_ranks is not None else [_own_ranks(s, modules) for s in states]
    outs = target_scalings if target_scalings is not None else scalings
    _check_length(ranks, len(states), "target_ranks")
    _check_length(outs, len(states), "target_scalings")
    report = AggregationReport(method, bytes_up=sum(_nbytes(s) for s in states))
    new_states: list[dict[str, Tensor]] = [{} for _ in states]
    merge = dense_svd_merge if method == "dense_svd" else merge_lora
    for m in modules:
        factors = _module_factors(states, scalings, m)
        update = merge(factors, num_examples, compute_dtype=compute_dtype)
        targets = [int(_pick(r, m, "target_ranks")) for r in ranks], [_pick(sc, m, "target_scalings") for sc in outs]
        pairs, errors, base = _METHOD_FNS[method](
            _Job(factors, num_examples, update, *targets, compute_dtype, generator)
        )
        for new, (a, b) in zip(new_states, pairs):
            new[f"{m}.lora_A"], new[f"{m}.lora_B"] = a, b
        report.truncation_error[m], report.update_norm[m], report.merged_rank[m] = errors, update.norm, update.rank
        if base is not None:
            report.base_updates[m] = base
            report.bytes_down += len(states) * sum(_nbytes({"a": a, "b": b}) for a, b, _ in factors)
    report.bytes_down += sum(_nbytes(s) for s in new_states)
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
        m: merge_lora(_module_factors(states, scalings, m), num_examples, compute_dtype=compute_dtype) for m in modules
    }


def _module_factors(
    states: Sequence[Mapping[str, Tensor]], scalings: Sequence[PerModule], module: str
) -> list[LoraFactors]:
    """Per client ``(A, B, scaling)`` of ``module``."""
    return [
        (s[f"{module}.lora_A"], s[f"{module}.lora_B"], _pick(sc, module, "scalings")) for s, sc in zip(states, scalings)
    ]


def _own_ranks(state: Mapping[str, Tensor], modules: Sequence[str]) -> dict[str, int]:
    return {m: int(state[f"{m}.lora_A"].shape[0]) for m in modules}


Pairs = list[tuple[Tensor, Tensor]]
MethodResult = tuple[Pairs, list[float], Tensor | None]


def _exact(job: _Job) -> MethodResult:
    done = job.update.truncate_many(job.ranks, job.scalings)
    return [(a, b) for a, b, _ in done], [e for _, _, e in done], None


def _fedavg(job: _Job) -> MethodResult:
    if len({a.shape[0] for a, _, _ in job.factors} | set(job.ranks)) != 1:
        raise ValueError(
            f"method 'fedavg' needs one rank for all clients and targets, got ranks "
            f"{[a.shape[0] for a, _, _ in job.factors]} and target ranks {job.ranks}; use method='exact'"
        )
    avg = fedavg([{"A": a, "B": b} for a, b, _ in job.factors], job.num_examples)
    pairs = [(avg["A"].clone(), avg["B"].clone()) for _ in job.ranks]
    return pairs, _errors_against(job, pairs), None


def _zero_pad(job: _Job) -> MethodResult:
    top = max(a.shape[0] for a, _, _ in job.factors)
    padded = [{"A": F.pad(a, (0, 0, 0, top - a.shape[0])), "B": F.pad(b, (0, top - b.shape[1]))}
              for a, b, _ in job.factors]  # fmt: skip
    avg = fedavg(padded, job.num_examples)
    pairs = [
        (F.pad(avg["A"][:r], (0, 0, 0, max(0, r - top))), F.pad(avg["B"][:, :r], (0, max(0, r - top))))
        for r in job.ranks
    ]
    return pairs, _errors_against(job, pairs), None


def _flora(job: _Job) -> MethodResult:
    a0, b0, _ = job.factors[0]
    pairs = []
    for r in job.ranks:
        a = torch.empty(r, a0.shape[1], dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(a, a=5**0.5, generator=job.generator)
        pairs.append((a.to(a0.dtype), b0.new_zeros(b0.shape[0], r)))
    b_stack, a_stack = _stacks(job.factors, normalize_weights(job.num_examples), job.compute_dtype)
    return pairs, [0.0] * len(job.ranks), (b_stack @ a_stack).to(a0.dtype)


_METHOD_FNS: dict[str, Callable[[_Job], MethodResult]] = {
    "exact": _exact,
    "dense_svd": _exact,  # the update was merged by ``dense_svd_merge``
    "fedavg": _fedavg,
    "zero_pad": _zero_pad,
    "flora": _flora,
}


def _errors_against(job: _Job, pairs: Pairs) -> list[float]:
    """``‖s_j B_j A_j − ΔW‖_F / ‖ΔW‖_F`` per client via ``r×m`` traces (float64), never forming ``d_out×d_in``."""
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


def _nbytes(state: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())
