"""Evaluation through the split model: label-word (verbalizer) scoring and greedy generation for causal LMs.

Both run the client half and the server half of one :class:`~atlas_pl.split.backbone.SplitBackbone` with a client's
adapters, without gradients. The LM head is applied only where a score needs it: at the positions that predict a
candidate's tokens (scoring) or the next token (generation), never over the vocabulary at every position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

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


@torch.no_grad()
def greedy_generate(
    backbone: SplitBackbone,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: int | None,
    client_adapter: str | None = None,
    server_adapter: str | None = None,
) -> list[list[int]]:
    """Greedy decoding through the split model, one prompt at a time (no KV cache: simple and exact).

    Returns:
        The generated token ids per prompt, without the prompt and without the EOS token.
    """
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens!r}")
    backbone.activate(client_adapter, server_adapter)
    head = get_submodule(backbone.model, backbone.arch.head_path)
    device = next(backbone.model.parameters()).device
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        new: list[int] = []
        for _ in range(max_new_tokens):
            mask = torch.ones_like(ids)
            cut = backbone.cut_of(client_adapter)
            hidden = backbone.server_hidden(backbone.client_forward(ids, mask, cut), mask, cut)
            token = int(head(hidden[:, -1]).argmax(-1))
            if token == eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
        outputs.append(new)
    return outputs
