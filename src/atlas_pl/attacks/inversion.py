"""White-box inversion of smashed activations: what a split server can read back from the cut activations ``h``.

The server knows the frozen pretrained client layers (and, at round end, the client adapters), so it can search for
the input whose client-side forward reproduces an observed ``h``: optimize a dummy embedding sequence (``embedding``
mode) or a softmax-relaxed distribution over the vocabulary (``relaxed`` mode, whose embeddings are convex
combinations of real token embeddings) to minimise ``Σ_t ‖f(x)_t − h_t‖² / ‖h_t‖²`` (each position relative to its
own norm: pretrained models put outsized activations on a few positions), then read tokens out — the nearest token
embedding per position, or the distribution's argmax. The attack runs any client half: a forward hook replaces the
output of the model's input-embedding layer with the dummy embeddings, and the rest of the client forward (position
embeddings, masks, blocks ``[0, cut)``) is the model's own. Where the embedding block normalizes the sum of token and
position embeddings (BERT's LayerNorm), many free embeddings give the same ``h`` and the nearest token is not the
input's: use the ``relaxed`` mode there (``tests/attacks/test_inversion.py`` shows both).

The **learned inverter** (:class:`LearnedInverter`) needs no optimisation per observation: the server feeds public
auxiliary text (a few hundred sentences of another task) through the client half it knows and fits a ridge
regression from each position's activation to that position's input token embedding; an observed ``h`` is read by the
nearest token embedding of the regression's output. Its tokens can then seed the white-box attack (``init_tokens``),
which refines them by activation matching (:func:`learned_inversion`).

Scores (:func:`token_scores`): token recall (the attack's success, AP: the share of the true sequence's distinct
tokens that the attack recovered), token precision, exact position accuracy and ROUGE-L F1 over token ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Mode = Literal["embedding", "relaxed"]
ClientForward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, attention_mask) -> h


@dataclass
class InversionResult:
    """Recovered token ids ``[B, T]`` and the final relative error: root mean of ``‖f(x̂)_t − h_t‖² / ‖h_t‖²``."""

    tokens: torch.Tensor
    relative_error: float
    steps: int


def invert_activations(
    client_forward: ClientForward,
    embedding: nn.Embedding,
    observed: torch.Tensor,
    attention_mask: torch.Tensor,
    mode: Mode = "embedding",
    steps: int = 300,
    lr: float = 0.1,
    temperature: float = 1.0,
    seed: int = 0,
    init_tokens: torch.Tensor | None = None,
) -> InversionResult:
    """Recover the tokens behind observed cut activations by matching the client forward (white-box).

    Args:
        client_forward: ``(input_ids, attention_mask) -> h``: the client half the server believes the client runs
            (``SplitBackbone.client_forward`` with the client's adapter active).
        embedding: The model's input token embedding (``model.get_input_embeddings()``): its output is replaced by
            the dummy embeddings inside the attack, and its weight is the dictionary tokens are read from.
        observed: The activations ``h`` ``[B, T, d]`` the server received.
        attention_mask: ``[B, T]`` (the server receives it with ``h``).
        mode: ``embedding`` (free dummy embeddings, nearest token) or ``relaxed`` (softmax over the vocabulary).
        steps: Adam steps.
        lr: Adam learning rate.
        temperature: Softmax temperature of the relaxed mode.
        seed: Seed of the dummy's initialisation.
        init_tokens: ``[B, T]`` token ids to start from instead of noise (e.g. a :class:`LearnedInverter`'s reading):
            their embeddings (``embedding`` mode) or logits peaked on them (``relaxed`` mode).

    Raises:
        ValueError: ``mode`` unknown, or ``observed`` and ``attention_mask`` of different batch or length.
    """
    if mode not in ("embedding", "relaxed"):
        raise ValueError(f"`mode` must be 'embedding' or 'relaxed', got {mode!r}")
    if observed.shape[:2] != attention_mask.shape:
        raise ValueError(f"`observed` {tuple(observed.shape)} and `attention_mask` {tuple(attention_mask.shape)} "
                         "must share batch and length")  # fmt: skip
    weight = embedding.weight.detach()
    batch, length = attention_mask.shape
    gen = torch.Generator().manual_seed(seed)
    if mode == "embedding":
        init = torch.randn(batch, length, weight.shape[1], generator=gen) * weight.std()
    else:
        init = torch.randn(batch, length, weight.shape[0], generator=gen) * 0.01
    init = init.to(device=weight.device, dtype=weight.dtype)
    if init_tokens is not None:
        if init_tokens.shape != attention_mask.shape:
            raise ValueError(f"`init_tokens` {tuple(init_tokens.shape)} must have the shape of `attention_mask` "
                             f"{tuple(attention_mask.shape)}")  # fmt: skip
        start = init_tokens.to(weight.device)
        if mode == "embedding":
            init = weight[start].clone()
        else:
            init = init + 5.0 * torch.nn.functional.one_hot(start, weight.shape[0]).to(init.dtype)
    dummy = init.requires_grad_(True)
    target = observed.detach().to(weight.dtype)
    keep = attention_mask.unsqueeze(-1).to(target.dtype)

    def embeds() -> torch.Tensor:
        if mode == "embedding":
            return dummy
        return torch.softmax(dummy / temperature, dim=-1) @ weight

    handle = embedding.register_forward_hook(lambda module, args, output: embeds())
    placeholder = torch.zeros(batch, length, dtype=torch.long, device=weight.device)
    opt = torch.optim.Adam([dummy], lr=lr)
    # every position counts alike: pretrained LMs put outsized activations on a few positions (attention sinks)
    weight_t = keep / target.pow(2).sum(dim=-1, keepdim=True).clamp_min(1e-12)
    real = float(keep.sum()) or 1.0
    error = float("nan")
    try:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            diff = client_forward(placeholder, attention_mask) - target
            loss = (diff.pow(2) * weight_t).sum() / real
            loss.backward()
            opt.step()
            error = float(loss.detach()) ** 0.5
    finally:
        handle.remove()
    with torch.no_grad():
        if mode == "embedding":
            tokens = torch.cdist(dummy.detach().reshape(-1, weight.shape[1]), weight).argmin(dim=1).view(batch, length)
        else:
            tokens = dummy.detach().argmax(dim=-1)
    return InversionResult(tokens.cpu(), error, steps)


@dataclass
class LearnedInverter:
    """A ridge regression from cut activations to input token embeddings, fit on public auxiliary text.

    Attributes:
        weight: ``[d_h + 1, d_e]`` (the last row is the bias).
    """

    weight: torch.Tensor

    @classmethod
    def fit(
        cls,
        client_forward: ClientForward,
        embedding: nn.Embedding,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        ridge: float = 1e-2,
        batch_size: int = 32,
    ) -> LearnedInverter:
        """Fit on auxiliary sequences ``input_ids`` ``[N, T]`` run through the known client half (real tokens only).

        Args:
            client_forward: The client half the server believes the client runs.
            embedding: The model's input token embedding (the regression's target and read-out dictionary).
            input_ids: Auxiliary token ids (public text of another task).
            attention_mask: Their mask.
            ridge: L2 penalty, relative to the mean squared activation.
            batch_size: Sequences per forward.
        """
        xs, ys = [], []
        with torch.no_grad():
            for i in range(0, input_ids.shape[0], batch_size):
                ids, mask = input_ids[i : i + batch_size], attention_mask[i : i + batch_size]
                hidden = client_forward(ids, mask)
                keep = mask.bool()
                xs.append(hidden[keep].double())
                ys.append(embedding.weight[ids[keep]].double())
        x, y = torch.cat(xs), torch.cat(ys)
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
        penalty = ridge * float(x.pow(2).mean()) * x.shape[0] * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        weight = torch.linalg.solve(x.T @ x + penalty, x.T @ y)
        return cls(weight.to(embedding.weight.dtype))

    def predict(self, observed: torch.Tensor, embedding: nn.Embedding) -> torch.Tensor:
        """Token ids ``[B, T]``: the nearest token embedding to each position's regressed embedding."""
        with torch.no_grad():
            flat = observed.reshape(-1, observed.shape[-1]).to(self.weight.dtype)
            flat = torch.cat([flat, torch.ones(flat.shape[0], 1, dtype=flat.dtype, device=flat.device)], dim=1)
            guess = flat @ self.weight.to(flat.device)
            tokens = torch.cdist(guess, embedding.weight.detach().to(guess.dtype)).argmin(dim=1)
        return tokens.view(observed.shape[:-1]).cpu()


def learned_inversion(
    inverter: LearnedInverter,
    client_forward: ClientForward,
    embedding: nn.Embedding,
    observed: torch.Tensor,
    attention_mask: torch.Tensor,
    refine_steps: int = 0,
    mode: Mode = "embedding",
    lr: float = 0.05,
    seed: int = 0,
) -> InversionResult:
    """The learned inverter's reading of ``observed``, refined by ``refine_steps`` of activation matching.

    With ``refine_steps = 0`` no optimisation runs (``relative_error`` is that of the read tokens' activations).
    """
    tokens = inverter.predict(observed, embedding)
    if refine_steps > 0:
        return invert_activations(client_forward, embedding, observed, attention_mask, mode=mode, steps=refine_steps,
                                  lr=lr, seed=seed, init_tokens=tokens)  # fmt: skip
    with torch.no_grad():
        keep = attention_mask.unsqueeze(-1).to(observed.dtype)
        diff = (client_forward(tokens.to(attention_mask.device), attention_mask) - observed).pow(2)
        weight_t = keep / observed.pow(2).sum(dim=-1, keepdim=True).clamp_min(1e-12)
        error = float((diff * weight_t).sum() / (float(keep.sum()) or 1.0)) ** 0.5
    return InversionResult(tokens, error, 0)


def _lcs(a: list[int], b: list[int]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def token_scores(predicted: torch.Tensor, truth: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, float]:
    """Attack success, averaged over sequences (real tokens only).

    Returns:
        ``recall`` (share of the true distinct tokens recovered: AP), ``precision`` (share of the recovered distinct
        tokens that occur in the truth), ``position_accuracy`` and ``rouge_l`` (LCS-based F1 over token ids).
    """
    rows: dict[str, list[float]] = {"recall": [], "precision": [], "position_accuracy": [], "rouge_l": []}
    for p, t, m in zip(predicted.tolist(), truth.tolist(), attention_mask.bool().tolist()):
        p = [x for x, keep in zip(p, m) if keep]
        t = [x for x, keep in zip(t, m) if keep]
        if not t:
            continue
        hit = set(p) & set(t)
        rows["recall"].append(len(hit) / len(set(t)))
        rows["precision"].append(len(hit) / max(1, len(set(p))))
        rows["position_accuracy"].append(sum(x == y for x, y in zip(p, t)) / len(t))
        lcs = _lcs(p, t)
        r, q = lcs / len(t), lcs / max(1, len(p))
        rows["rouge_l"].append(0.0 if lcs == 0 else 2 * r * q / (r + q))
    return {k: sum(v) / len(v) if v else float("nan") for k, v in rows.items()}
