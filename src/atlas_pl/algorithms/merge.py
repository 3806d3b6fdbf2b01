"""The merge math of LoRA aggregation (pure torch; no Lightning): weights, FedAvg, and the exact factored merge.

An adapter state is ``{"<module>.lora_A": A [r×d_in], "<module>.lora_B": B [d_out×r]}`` as produced by
``AdapterBank.state``. Weights ``p_i`` come from the clients' ``num_examples``. The aggregation methods built on this
(exact, FedAvg, zero-pad, dense SVD, FLoRA) are classes in ``atlas_pl.algorithms.aggregation``.

Exact merge (DESIGN.md, phase 4): per module ``ΔW = Σ_i p_i s_i B_i A_i = [p_1 s_1 B_1, …] · [A_1; …; A_n]``, kept
factored as ``Q_b U diag(S) Vᵀ Q_aᵀ`` (QR of both stacks, SVD of the small core), never as a ``d_out×d_in`` matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LoraFactors = tuple[Tensor, Tensor, float]  # (A [r×d_in], B [d_out×r], scaling)


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
        check_rank(rank, "rank")
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
            check_rank(r, "rank")
            check_scaling(sc, "scaling")
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
    b_stack, a_stack = stack_factors(factors, _check_factors(factors, num_examples, compute_dtype), compute_dtype)
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
    b_stack, a_stack = stack_factors(factors, _check_factors(factors, num_examples, compute_dtype), compute_dtype)
    return FactoredUpdate.from_dense(b_stack @ a_stack, dtype=factors[0][0].dtype)


def stack_factors(
    factors: Sequence[LoraFactors], weights: Sequence[float], dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
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
        check_rank(a.shape[0], f"rank of client {i}")
        check_scaling(s, f"scaling of client {i}")
        if a.shape[1] != d_in or b.shape[0] != d_out:
            raise ValueError(
                f"client {i} adapts a [{b.shape[0]}×{a.shape[1]}] module (d_out×d_in) but client 0 a "
                f"[{d_out}×{d_in}] one; merge only adapters of the same module"
            )
    return weights


def check_rank(rank: int, name: str) -> None:
    if int(rank) != rank or rank < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {rank!r}; a LoRA adapter needs at least rank 1")


def check_scaling(scaling: float, name: str) -> None:
    if not scaling > 0 or scaling == float("inf"):
        raise ValueError(f"`{name}` must be a finite float > 0 (alpha / r), got {scaling!r}")
