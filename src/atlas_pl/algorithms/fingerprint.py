"""Client fingerprints: a seeded random projection of a gradient, computed on the client (pure torch).

Client ``i`` sends ``f_i = P g_i / ‖P g_i‖`` with ``P ∈ R^{dim×D}``, ``P_jk ~ N(0, 1/dim)``, shared by all clients
through ``seed``. By Johnson–Lindenstrauss, inner products (hence cosines) of the ``g_i`` are preserved up to
``O(1/√dim)``, so the server can cluster clients by task from ``dim`` floats each (64 × 4 B = 256 B).

``P`` is never materialized. Its columns come in fixed blocks of ``SEED_BLOCK`` columns; block ``b`` is drawn from a
CPU ``torch.Generator`` seeded from ``(seed, b)``. ``P`` therefore depends only on ``seed`` and ``D`` (not on
``chunk_size``, the device, or which client asks first), and memory stays ``O(dim × chunk_size)`` whatever ``D``.
The matrix is generated and applied on the CPU in float32 so clients on different devices agree exactly; the cost
is ``dim × D`` Gaussian draws (about 0.5 s per million parameters at ``dim = 64`` on one core).

Which gradient: the function is signal-agnostic; the caller chooses ``g``. With LoRA, ``B = 0`` at initialization,
so ``∇_A L = B^T (...) = 0`` and only ``∇_B`` carries signal at step 0 — pass ``lora_gradients(..., which="B")``, or
the adapter update after a few local steps (``A`` and ``B`` both then move). ``normalize="per_tensor"`` divides each
tensor by its own norm first, so a few large layers do not dominate the fingerprint.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Literal

import numpy as np
import torch

SEED_BLOCK = 4096
"""Columns of ``P`` drawn from one seeded generator; part of the definition of ``P`` (changing it changes ``P``)."""

Normalize = Literal["global", "per_tensor"]
Which = Literal["A", "B", "all"]


def project_gradients(
    grads: Iterable[torch.Tensor] | Mapping[str, torch.Tensor],
    dim: int = 64,
    seed: int = 0,
    chunk_size: int = 1 << 16,
    normalize: Normalize = "global",
) -> torch.Tensor:
    """Fingerprint ``f = P g / ‖P g‖`` of the flattened, concatenated ``grads``.

    Args:
        grads: Gradient tensors, concatenated after flattening in the given order; a name→tensor mapping is taken in
            sorted-name order so all clients agree.
        dim: Fingerprint length (rows of ``P``).
        seed: Seed shared by all clients; same seed and same ``D`` give the same ``P``.
        chunk_size: Columns of ``P`` generated per step (rounded up to a multiple of ``SEED_BLOCK``); bounds memory
            to about ``dim × chunk_size`` floats. Does not change the result beyond float rounding.
        normalize: ``"global"`` projects ``g`` as is; ``"per_tensor"`` divides each tensor by its L2 norm first
            (all-zero tensors stay zero).

    Returns:
        A float32 CPU tensor ``[dim]`` of unit norm (non-finite when a gradient is non-finite; the server leaves
        such clients out).

    Raises:
        ValueError: ``dim``, ``chunk_size``, ``seed`` or ``normalize`` is invalid, ``grads`` is empty, or the
            projection is zero (all gradients are zero).
    """
    _check_projection_args(dim, seed, chunk_size, normalize)
    tensors = _ordered(grads)
    if sum(t.numel() for t in tensors) == 0:
        raise ValueError("`grads` is empty: pass at least one gradient tensor with elements")
    if normalize == "per_tensor":
        tensors = [_unit(t) for t in tensors]
    projected = _project(tensors, dim, seed, max(1, -(-chunk_size // SEED_BLOCK)))
    norm = torch.linalg.vector_norm(projected)
    if norm == 0:
        raise ValueError(
            "the projected gradient is zero (all `grads` are zero). With LoRA, B = 0 at init makes ∇_A = 0: "
            "fingerprint ∇_B (`lora_gradients(..., which='B')`) or the adapter update after a few local steps"
        )
    return projected / norm


def block_generator(seed: int, block_idx: int) -> torch.Generator:
    """The CPU generator that draws columns ``[block_idx·SEED_BLOCK, (block_idx+1)·SEED_BLOCK)`` of ``P``."""
    state = np.random.SeedSequence([seed, block_idx]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def projection_block(seed: int, block_idx: int, dim: int, num_cols: int = SEED_BLOCK) -> torch.Tensor:
    """The first ``num_cols`` columns of block ``block_idx`` of ``P``: float32 ``[dim × num_cols]``, ``N(0, 1/dim)``."""
    gen = block_generator(seed, block_idx)
    return torch.randn(dim, SEED_BLOCK, generator=gen)[:, :num_cols].mul_(dim**-0.5)


def fingerprint_bytes(dim: int = 64, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one client sends for its fingerprint: ``dim × itemsize`` (64 float32 = 256 B).

    Raises:
        ValueError: ``dim`` is below 1.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"`dim` must be an int >= 1, got {dim!r}; 64 is the default fingerprint length")
    return dim * torch.empty((), dtype=dtype).element_size()


def lora_gradients(
    named_params: Iterable[tuple[str, torch.Tensor]],
    which: Which = "B",
) -> dict[str, torch.Tensor]:
    """Detached, flattened copies of the LoRA gradients, ``{name: grad}``, to pass to ``project_gradients``.

    Args:
        named_params: ``model.named_parameters()`` or any ``(name, parameter)`` pairs.
        which: ``"B"`` for names containing ``lora_B`` (the default: the only non-zero one at init), ``"A"`` for
            ``lora_A``, ``"all"`` for both. Parameters without a gradient are skipped.

    Raises:
        ValueError: ``which`` is invalid, or no selected parameter has a gradient.
    """
    keys = {"A": ("lora_A",), "B": ("lora_B",), "all": ("lora_A", "lora_B")}.get(which)
    if keys is None:
        raise ValueError(f"`which` must be 'A', 'B' or 'all', got {which!r}")
    matched, out = 0, {}
    for name, param in named_params:
        if any(k in name for k in keys):
            matched += 1
            if param.grad is not None:
                out[name] = param.grad.detach().reshape(-1).clone()
    if not out:
        raise ValueError(
            f"no LoRA parameter selected by `which`={which!r} has a gradient ({matched} matched by name): "
            "run a backward pass on the client's batches first, and check that adapters are trainable"
        )
    return out


def _check_projection_args(dim: int, seed: int, chunk_size: int, normalize: str) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"`dim` must be an int >= 1, got {dim!r}; 64 is the default fingerprint length")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be an int >= 0 shared by all clients, got {seed!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be an int >= 1, got {chunk_size!r}; e.g. 65536")
    if normalize not in ("global", "per_tensor"):
        raise ValueError(f"`normalize` must be 'global' or 'per_tensor', got {normalize!r}")


def _ordered(grads: Iterable[torch.Tensor] | Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(grads, Mapping):
        return [grads[name].detach().reshape(-1) for name in sorted(grads)]
    return [g.detach().reshape(-1) for g in grads]


def _unit(flat: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.vector_norm(flat.double())
    return flat / norm.to(flat.dtype) if norm > 0 else flat


def _project(flats: list[torch.Tensor], dim: int, seed: int, blocks_per_chunk: int) -> torch.Tensor:
    """``P g`` accumulated in float64 over chunks of ``blocks_per_chunk`` seeded blocks."""
    out = torch.zeros(dim, dtype=torch.float64)
    first = 0
    for values in _iter_chunks(flats, blocks_per_chunk * SEED_BLOCK):
        num_blocks = -(-values.numel() // SEED_BLOCK)
        cols = [SEED_BLOCK] * (num_blocks - 1) + [values.numel() - SEED_BLOCK * (num_blocks - 1)]
        p = torch.cat([projection_block(seed, first + b, dim, c) for b, c in enumerate(cols)], dim=1)
        out += (p @ values).double()
        first += num_blocks
    return out.float()


def _iter_chunks(flats: list[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """Consecutive float32 CPU pieces of length ``size`` (the last may be shorter) of the concatenated ``flats``."""
    pending: list[torch.Tensor] = []
    filled = 0
    for flat in flats:
        start = 0
        while start < flat.numel():
            take = min(size - filled, flat.numel() - start)
            pending.append(flat[start : start + take].to(device="cpu", dtype=torch.float32))
            filled, start = filled + take, start + take
            if filled == size:
                yield pending[0] if len(pending) == 1 else torch.cat(pending)
                pending, filled = [], 0
    if filled:
        yield pending[0] if len(pending) == 1 else torch.cat(pending)
