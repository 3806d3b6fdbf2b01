"""Evaluation through the split model: label-word (verbalizer) scoring and greedy generation for causal LMs.

Both run the client half and the server half of one :class:`~atlas_pl.split.backbone.SplitBackbone` with a client's
adapters, without gradients. The LM head is applied only where a score needs it: at the positions that predict a
candidate's tokens (scoring) or the next token (generation), never over the vocabulary at every position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from transformers.cache_utils import DynamicCache

from atlas_pl.split.backbone import SplitBackbone
from atlas_pl.split.registry import get_submodule

IGNORE_INDEX = -100
ScoreNorm = Literal["sum", "mean"]


def answer_starts(labels: torch.Tensor) -> torch.Tensor:
    """Index of the first answer token per row of right-aligned causal-LM ``labels`` (``-100`` on the prompt).

    Raises:
        ValueError: A row has no answer token.
    """
    has = labels != IGNORE_INDEX
    if not bool(has.any(dim=1).all()):
        rows = (~has.any(dim=1)).nonzero()[:, 0].tolist()
        raise ValueError(f"rows {rows} have no answer tokens; check the prompt template and max_length")
    return has.int().argmax(dim=1)


def _candidate_batch(
    prompts: list[list[int]], candidates: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every ``prompt + candidate`` pair, right-padded: ``input_ids``, ``attention_mask``, ``labels``."""
    seqs = [(p, list(c)) for p in prompts for c in candidates]
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        ids[row, :n] = torch.tensor(p + c)
        mask[row, :n] = 1
        labels[row, len(p) : n] = torch.tensor(c)
    return ids, mask, labels


def sequence_logprobs(
    backbone: SplitBackbone,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    cut_layer: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of ``log p(label token | prefix)`` over each row's labelled positions, and the number of such positions.

    The head runs only at the (shifted) labelled positions; the log-softmax there covers the whole vocabulary.
    """
    hidden = backbone.client_forward(input_ids, attention_mask, cut_layer)
    hidden = backbone.server_hidden(hidden, attention_mask, cut_layer)
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    head = get_submodule(backbone.model, backbone.arch.head_path)
    logp = head(hidden[:, :-1][selected]).float().log_softmax(-1)
    gold = logp.gather(1, targets[selected].unsqueeze(1)).squeeze(1)
    rows = selected.nonzero()[:, 0]
    total = torch.zeros(labels.shape[0], device=gold.device).index_add_(0, rows, gold)
    count = selected.sum(dim=1)
    return total, count


@torch.no_grad()
def score_label_words(
    backbone: SplitBackbone,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    candidates: Sequence[Sequence[int]],
    client_adapter: str | None = None,
    server_adapter: str | None = None,
    norm: ScoreNorm = "sum",
    max_sequences: int = 256,
) -> torch.Tensor:
    """Log-likelihood of every candidate answer after each example's prompt: ``scores[B, C]``.

    The prompt of row ``b`` is ``input_ids[b]`` before its first answer token (``labels != -100``); candidate ``c`` is
    a token-id list (a label word's tokens plus EOS, exactly as training encodes answers). Candidates of different
    lengths compete by their summed log-probability (``norm="sum"``) or their mean per token (``"mean"``).

    Args:
        backbone: The split model.
        input_ids: ``[B, T]`` encoded prompt + gold answer (right-padded).
        labels: ``[B, T]`` causal-LM labels, ``-100`` on prompt and padding.
        candidates: One token-id list per label (the task's verbalizer).
        client_adapter: Client adapter to evaluate with.
        server_adapter: Server adapter to evaluate with.
        norm: ``sum`` or ``mean`` of the candidate's token log-probabilities.
        max_sequences: Prompt-candidate pairs run per forward pass (bounds memory).

    Raises:
        ValueError: No candidates, an empty candidate, or a row without an answer.
    """
    if not candidates or any(len(c) == 0 for c in candidates):
        raise ValueError("`candidates` must be non-empty token-id lists (one per label); check the task's label words")
    if norm not in ("sum", "mean"):
        raise ValueError(f"`norm` must be 'sum' or 'mean', got {norm!r}")
    backbone.activate(client_adapter, server_adapter)
    starts = answer_starts(labels).tolist()
    prompts = [input_ids[b, :s].tolist() for b, s in enumerate(starts)]
    per_chunk = max(1, max_sequences // len(candidates))
    device = input_ids.device
    scores = []
    for i in range(0, len(prompts), per_chunk):
        ids, mask, lab = (t.to(device) for t in _candidate_batch(prompts[i : i + per_chunk], candidates))
        total, count = sequence_logprobs(backbone, ids, mask, lab, backbone.cut_of(client_adapter))
        score = total / count.clamp(min=1) if norm == "mean" else total
        scores.append(score.view(-1, len(candidates)))
    return torch.cat(scores)


def _token_limits(max_new_tokens: int | Sequence[int], n_prompts: int) -> list[int]:
    """``max_new_tokens`` as one limit per prompt.

    Raises:
        ValueError: A limit that is not an int >= 1, or a sequence whose length is not the number of prompts.
    """
    per_prompt = isinstance(max_new_tokens, Sequence)
    given = list(max_new_tokens) if isinstance(max_new_tokens, Sequence) else [max_new_tokens]
    bad = [m for m in given if isinstance(m, bool) or not isinstance(m, int) or m < 1]
    if bad:
        raise ValueError(f"`max_new_tokens` must be an int >= 1 (or one such int per prompt), got {bad[0]!r}")
    if per_prompt and len(given) != n_prompts:
        raise ValueError(
            f"`max_new_tokens` has {len(given)} limits for {n_prompts} prompts; give one int per prompt or a single int"
        )
    return given if per_prompt else given * n_prompts


def _left_padded(
    prompts: Sequence[list[int]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts left-padded to the longest: ``input_ids`` and ``attention_mask`` (1 on real tokens)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def _next_tokens(
    backbone: SplitBackbone,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    caches: tuple[DynamicCache, DynamicCache],
    cut: int,
) -> torch.Tensor:
    """Greedy next token of every row after ``input_ids`` (the new tokens), appending their keys/values to the caches.

    ``attention_mask`` covers the cached tokens and the new ones; ``position_ids`` are the new tokens' positions. The
    client half (embeddings + blocks ``[0, cut)``) keeps its keys/values in ``caches[0]``, the server half (blocks
    ``[cut, L)``, final norm and head, the last two at the last position only) in ``caches[1]``: only the hidden
    states of the new tokens cross the cut.
    """
    arch, model = backbone.arch, backbone.model
    blocks: Any = model.get_submodule(arch.blocks_path)
    client_cache, server_cache = caches
    hidden = arch.embed(model, input_ids, position_ids=position_ids)
    ctx = arch.context(model, hidden, attention_mask, position_ids=position_ids, cache=client_cache, first_block=0)
    for block in blocks[:cut]:
        hidden = arch.run_block(block, hidden, ctx)
    ctx = arch.context(model, hidden, attention_mask, position_ids=position_ids, cache=server_cache, first_block=cut)
    for block in blocks[cut:]:
        hidden = arch.run_block(block, hidden, ctx)
    last = hidden[:, -1]
    norm = get_submodule(model, arch.final_norm_path)
    if norm is not None:
        last = norm(last)
    head = get_submodule(model, arch.head_path)
    return head(last).argmax(-1)


def _generate_chunk(
    backbone: SplitBackbone,
    prompts: Sequence[list[int]],
    limits: Sequence[int],
    eos_token_id: int | None,
    pad_token_id: int,
    cut: int,
) -> list[list[int]]:
    """Batched greedy decoding of ``prompts`` with KV caches; see :func:`greedy_generate`."""
    device = next(backbone.model.parameters()).device
    input_ids, attention_mask = _left_padded(prompts, pad_token_id, device)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    caches = (DynamicCache(), DynamicCache())
    live = list(range(len(prompts)))  # chunk row of each row still decoding
    generated: list[list[int]] = [[] for _ in prompts]
    while True:
        tokens = _next_tokens(backbone, input_ids, attention_mask, position_ids, caches, cut)
        keep = []
        for i, (row, token) in enumerate(zip(live, tokens.tolist(), strict=True)):
            if token == eos_token_id:
                continue
            generated[row].append(token)
            if len(generated[row]) < limits[row]:
                keep.append(i)
        if not keep:
            return generated
        if len(keep) < len(live):  # drop finished rows from the batch and from the caches
            index = torch.tensor(keep, device=device)
            for cache in caches:
                cache.batch_select_indices(index)
            attention_mask, tokens = attention_mask[index], tokens[index]
            live = [live[i] for i in keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(live), 1)], dim=1)
        position_ids = attention_mask.sum(dim=1, keepdim=True) - 1
        input_ids = tokens.unsqueeze(1)


@torch.no_grad()
def greedy_generate(
    backbone: SplitBackbone,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    eos_token_id: int | None,
    client_adapter: str | None = None,
    server_adapter: str | None = None,
    *,
    batch_size: int = 16,
    pad_token_id: int | None = None,
) -> list[list[int]]:
    """Batched greedy decoding through the split model, with a KV cache on each side of the cut.

    The prompts are decoded ``batch_size`` at a time, shortest-to-longest neighbours together (sorted by length, so a
    chunk carries little padding); the results come back in input order. A chunk's prompts are left-padded with
    ``pad_token_id`` to a common length, with attention mask 0 on the padding and position ids
    ``cumsum(mask) - 1``: every row sees the positions and the keys it would see alone, so padding changes no token.
    The whole prompts run once through the client half (embeddings + blocks ``[0, cut)``, where ``cut`` is the
    client's cut, :meth:`~atlas_pl.split.backbone.SplitBackbone.cut_of`) and the server half (blocks ``[cut, L)``;
    the final norm and the LM head only at the last position); each half keeps the keys/values of its own blocks in
    a ``transformers.DynamicCache``. Every following step feeds only the previous step's tokens through both halves.
    A row stops at EOS or after its token limit, and leaves the batch (and the caches); decoding ends when no row
    is left.

    Args:
        backbone: The split model (a causal LM).
        prompts: Token ids of each prompt (at least one token each).
        max_new_tokens: Most tokens generated per prompt: one int for all, or one int per prompt.
        eos_token_id: Token that ends a row (not returned); ``None``: rows run to their limit.
        client_adapter: Client adapter to decode with (it also sets the cut).
        server_adapter: Server adapter to decode with.
        batch_size: Prompts decoded together (bounds memory: the caches hold ``batch_size`` rows).
        pad_token_id: Id written in the left padding (masked out, so any id works); default ``eos_token_id``, or 0.

    Returns:
        The generated token ids per prompt, in input order, without the prompt and without the EOS token.

    Raises:
        ValueError: An encoder (not a causal LM) backbone, a limit below 1, a ``max_new_tokens`` sequence of the wrong
            length, an empty prompt, or ``batch_size`` below 1.
    """
    if backbone.task != "causal_lm":
        raise ValueError(
            f"greedy generation needs a causal LM, but the backbone is a {backbone.arch.name!r} {backbone.task} "
            "model (an encoder does not generate); load a causal LM (GPT-2, LLaMA, Qwen2, Mistral) with "
            "task_format='causal_lm', or evaluate this task by scoring instead of generating"
        )
    limits = _token_limits(max_new_tokens, len(prompts))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}")
    rows = [list(p) for p in prompts]
    empty = [i for i, p in enumerate(rows) if not p]
    if empty:
        raise ValueError(f"prompts {empty} are empty; greedy generation needs at least one prompt token per prompt")
    pad = pad_token_id if pad_token_id is not None else eos_token_id if eos_token_id is not None else 0
    backbone.activate(client_adapter, server_adapter)
    cut = backbone.cut_of(client_adapter)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    outputs: list[list[int]] = [[] for _ in rows]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        generated = _generate_chunk(
            backbone, [rows[i] for i in chunk], [limits[i] for i in chunk], eos_token_id, pad, cut
        )
        for i, ids in zip(chunk, generated, strict=True):
            outputs[i] = ids
    return outputs
