"""Differential privacy: the Gaussian mechanism for fingerprints, DP-SGD for client adapters, ``(ε, δ)`` (pure).

A client clips its fingerprint to norm ``C`` and adds ``N(0, σ²C²)`` noise before it leaves the client
(``privatize``); ``dp_epsilon`` reports the ``ε`` the release costs at a given ``δ`` through ``dp_accounting``.

What is protected: the clipped vector is treated as one record with L2 sensitivity ``C`` (add/remove neighbouring,
as in ``dp_accounting``). That bounds what the server learns about a client's whole contribution to ``f_i``. It is
not an example-level guarantee for the client's data set: that needs per-example clipping before the gradients are
summed (DP-SGD), which this helper does not do. Post-processing (re-normalizing the noisy vector, k-means) costs
nothing more.

:class:`DPSGD` is that example-level guarantee for a client's adapter (``model.dp_sgd``): every example's gradient of
the client-half adapter is clipped to ``C``, the clipped gradients are summed, ``N(0, σ²C²)`` is added and the sum is
divided by the batch size (Abadi et al., 2016; the rule of opacus's ``DPOptimizer``). The per-example gradients come
from one backward of the client half per example (:meth:`DPSGD.backward`): below the cut examples do not interact,
so ``∂(h_i · g_i)/∂θ`` is example ``i``'s gradient exactly, and the server's returned ``g = ∂L/∂h`` is all the client
needs. ``ε`` after ``T`` steps at sampling rate ``q = batch / examples`` comes from ``dp_accounting``
(:func:`dp_epsilon`; the accounting assumes Poisson sampling, the loader draws fixed-size shuffled batches, the usual
approximation). What it protects: everything the client's adapter carries about one example (the factors uploaded
every round and all that is computed from them). What it does not: the cut activations of the example itself, which
leave the client every step (``model.activation_noise`` is their defence) and the server adapter and heads, which
the server trains on them.

:func:`randomized_response` is label differential privacy (``data.label_dp_epsilon``; Warner 1965, Ghazi et al.,
"Deep Learning with Label Differential Privacy", 2021): before training, a client replaces each training label by
itself with probability ``e^ε / (e^ε + K − 1)`` and by each other class otherwise, once. Everything computed from the
noisy labels afterwards (the returned gradients of a U-shaped split, the labels a two-part server reads, the adapters)
is post-processing, so every label is ``ε``-label-DP for the whole training, however many rounds. It is the defence of
the labels that the gradient attacks of :mod:`atlas_pl.attacks.labels` cannot undo: what they read is the noisy label.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import dp_accounting
import numpy as np
import torch

Accountant = Literal["rdp", "pld"]


def clip_to_norm(vector: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Scale ``vector`` by ``min(1, C / ‖vector‖)`` so its L2 norm is at most ``clip_norm``.

    Raises:
        ValueError: ``clip_norm`` is not positive.
    """
    if not clip_norm > 0:
        raise ValueError(f"`clip_norm` must be > 0, got {clip_norm!r}; pass the L2 bound C, e.g. 1.0")
    norm = float(torch.linalg.vector_norm(vector))
    return vector * min(1.0, clip_norm / norm) if norm > 0 else vector.clone()


def privatize(
    vector: torch.Tensor,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Gaussian mechanism: clip ``vector`` to norm ``C`` and add ``N(0, σ²C²)`` to every coordinate.

    Args:
        vector: The fingerprint (any shape; usually ``[dim]``).
        clip_norm: ``C``, the L2 bound (the sensitivity).
        noise_multiplier: ``σ``, noise standard deviation in units of ``C``; 0 clips without noise.
        generator: A CPU generator for reproducible noise; the global RNG when None.

    Returns:
        The noisy vector, same shape, dtype and device as ``vector``.

    Raises:
        ValueError: ``clip_norm`` is not positive or ``noise_multiplier`` is negative.
    """
    if not noise_multiplier >= 0:
        raise ValueError(f"`noise_multiplier` must be >= 0, got {noise_multiplier!r}; use 0 for clipping only")
    clipped = clip_to_norm(vector, clip_norm)
    noise = torch.randn(vector.shape, generator=generator, dtype=torch.float64)
    return clipped + (noise * noise_multiplier * clip_norm).to(dtype=vector.dtype, device=vector.device)


def dp_epsilon(
    noise_multiplier: float,
    steps: int,
    delta: float,
    sampling_rate: float = 1.0,
    accountant: Accountant = "rdp",
) -> float:
    """``ε`` of ``steps`` Gaussian releases with noise multiplier ``σ`` at the given ``δ``.

    Each release is ``GaussianDpEvent(σ)``, Poisson-subsampled with ``sampling_rate`` when it is below 1, composed
    ``steps`` times. ``"rdp"`` is fast and a slight over-estimate; ``"pld"`` is tighter and slower.

    Args:
        noise_multiplier: ``σ`` (noise std / clip norm); 0 gives ``inf``.
        steps: Number of releases (e.g. 1 fingerprint per client, or one per clustering round).
        delta: Target ``δ`` in (0, 1), conventionally below 1 / number of records.
        sampling_rate: Poisson sampling probability of a record per release, in (0, 1].
        accountant: ``"rdp"`` (Rényi DP) or ``"pld"`` (privacy loss distributions).

    Returns:
        ``ε`` (``math.inf`` without noise).

    Raises:
        ValueError: An argument is out of range.
    """
    _check_accounting_args(noise_multiplier, steps, delta, sampling_rate, accountant)
    if noise_multiplier == 0:
        return math.inf
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    acc: dp_accounting.PrivacyAccountant
    acc = dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else dp_accounting.pld.PLDAccountant()
    acc.compose(event, count=steps)
    return float(acc.get_epsilon(delta))


def _check_accounting_args(
    noise_multiplier: float, steps: int, delta: float, sampling_rate: float, accountant: str
) -> None:
    if not noise_multiplier >= 0:
        raise ValueError(f"`noise_multiplier` must be >= 0, got {noise_multiplier!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be an int >= 1 (number of releases), got {steps!r}")
    if not 0 < delta < 1:
        raise ValueError(f"`delta` must be in (0, 1), got {delta!r}; a common choice is 1e-5")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"`sampling_rate` must be in (0, 1], got {sampling_rate!r}; use 1.0 without subsampling")
    if accountant not in ("rdp", "pld"):
        raise ValueError(f"`accountant` must be 'rdp' or 'pld', got {accountant!r}")


@dataclass(frozen=True)
class DPSGD:
    """DP-SGD of a client's adapter: per-example clipping to ``clip_norm`` and Gaussian noise (``model.dp_sgd``).

    Args:
        noise_multiplier: ``σ``, the noise standard deviation in units of ``clip_norm`` (``>= 0``; 0 clips only and
            gives no guarantee).
        clip_norm: ``C``, the L2 bound of one example's gradient of the client adapter (``> 0``).
        delta: The ``δ`` at which ``ε`` is reported, in (0, 1); below 1 / (examples of a client).
    """

    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if isinstance(self.noise_multiplier, bool) or not self.noise_multiplier >= 0:
            raise ValueError(f"dp_sgd.noise_multiplier must be >= 0 (σ in units of clip_norm), got "
                             f"{self.noise_multiplier!r}")  # fmt: skip
        if isinstance(self.clip_norm, bool) or not self.clip_norm > 0:
            raise ValueError(f"dp_sgd.clip_norm must be > 0 (the L2 bound of one example's gradient, e.g. 1.0), got "
                             f"{self.clip_norm!r}")  # fmt: skip
        if not 0 < self.delta < 1:
            raise ValueError(f"dp_sgd.delta must be in (0, 1), got {self.delta!r}; use less than 1 / examples")

    def backward(
        self,
        hidden: torch.Tensor,
        grad: torch.Tensor,
        params: Sequence[torch.nn.Parameter],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Fill ``params``' ``.grad`` with the private mean gradient of the batch whose cut activations are ``hidden``.

        Example ``i``'s gradient is ``B · ∂(h_i · g_i)/∂θ`` (``g = ∂L/∂h`` of the batch-mean loss, so the batch
        gradient is the mean of these, as with opacus's ``loss_reduction="mean"``); each is clipped to ``C``, the
        clipped ones are summed, ``N(0, σ²C²)`` is added per coordinate and the sum is divided by ``B``. The result
        is added to any ``.grad`` already there. With ``σ = 0`` and ``C`` above every norm it equals the plain
        ``hidden.backward(grad)``.

        Args:
            hidden: The client half's output ``[B, ...]`` (its graph reaches ``params``).
            grad: ``∂L/∂hidden`` as returned by the server, same shape.
            params: The client adapter's trainable parameters.
            generator: Generator of the noise (the global RNG when None; on the parameters' device).

        Returns:
            The per-example gradient norms before clipping ``[B]`` (for logging the clipped share).
        """
        params = [p for p in params if p.requires_grad]
        batch = hidden.shape[0]
        sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        norms = torch.zeros(batch, dtype=torch.float64)
        for i in range(batch):
            out = torch.zeros_like(grad)
            out[i] = grad[i]
            per = torch.autograd.grad(hidden, params, out, retain_graph=i < batch - 1, allow_unused=True)
            per_f = [torch.zeros_like(s) if g is None else g.float() * batch for g, s in zip(per, sums)]
            norm = torch.sqrt(sum((g.double().pow(2).sum() for g in per_f), torch.zeros((), dtype=torch.float64)))
            norms[i] = norm.cpu()
            factor = min(1.0, self.clip_norm / max(float(norm), 1e-12))
            for s, g in zip(sums, per_f):
                s.add_(g, alpha=factor)
        std = self.noise_multiplier * self.clip_norm
        for p, s in zip(params, sums):
            if std > 0:
                s.add_(torch.randn(s.shape, generator=generator, device=s.device, dtype=s.dtype) * std)
            update = (s / batch).to(p.dtype)
            p.grad = update if p.grad is None else p.grad + update
        return norms

    def epsilon(self, steps: int, sampling_rate: float) -> float:
        """``ε`` at ``delta`` after ``steps`` steps of one client at ``sampling_rate`` (``inf`` without noise)."""
        if steps < 1:
            return 0.0
        return _cached_epsilon(self.noise_multiplier, steps, self.delta, min(1.0, sampling_rate))


@functools.lru_cache(maxsize=1024)
def _cached_epsilon(noise_multiplier: float, steps: int, delta: float, sampling_rate: float) -> float:
    """:func:`dp_epsilon` per distinct setting: a round asks it for every client, most of which share one setting."""
    return dp_epsilon(noise_multiplier, steps, delta, sampling_rate)


def keep_probability(epsilon: float, num_classes: int) -> float:
    """Probability that randomized response keeps a label: ``e^ε / (e^ε + K − 1)``."""
    return 1.0 / (1.0 + (num_classes - 1) * math.exp(-epsilon))


def randomized_response(
    labels: np.ndarray, num_classes: int, epsilon: float, seed: int | tuple[int, ...] = 0
) -> np.ndarray:
    """``ε``-label-DP labels: each kept with :func:`keep_probability`, else replaced by a uniform other class.

    Args:
        labels: Integer labels in ``[0, num_classes)``.
        num_classes: ``K`` (>= 2).
        epsilon: ``ε`` (> 0); the larger, the more labels are kept.
        seed: Seed of the draw (a client draws once and keeps the noisy labels).

    Raises:
        ValueError: ``epsilon`` not positive, fewer than 2 classes, or a label outside ``[0, num_classes)``.
    """
    if isinstance(epsilon, bool) or not epsilon > 0:
        raise ValueError(f"label_dp_epsilon must be > 0 (e.g. 1.0; larger keeps more labels), got {epsilon!r}")
    if num_classes < 2:
        raise ValueError(f"randomized response needs >= 2 classes, got {num_classes}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    rng = np.random.default_rng(seed)
    flip = rng.random(labels.shape) >= keep_probability(epsilon, num_classes)
    shift = rng.integers(1, num_classes, size=labels.shape)  # a uniform other class
    return np.where(flip, (labels + shift) % num_classes, labels)
