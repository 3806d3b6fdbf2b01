"""Turning examples into model inputs: causal-LM (verbalizer) and encoder classification formats, and collation.

Pure code: depends on torch and a Hugging Face tokenizer only.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_TEMPLATE",
    "answer_ids",
    "collate",
    "encode_causal_lm",
    "encode_classification",
    "render_prompt",
]

PROMPT_TEMPLATE = "{text}\nAnswer:"
"""Default prompt; the answer word (with its leading space) follows ``Answer:``."""

IGNORE_INDEX = -100
"""Label value ignored by the cross-entropy loss (Hugging Face convention)."""


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ALIASES = {"context": "text", "question": "text_pair"}


def render_prompt(template: str, fields: dict[str, str]) -> str:
    """Substitutes ``{text}``, ``{text_pair}`` (and the aliases ``{context}``, ``{question}``) into ``template``.

    Args:
        template: Prompt template.
        fields: Normalized field values (``text``, ``text_pair``).

    Returns:
        The rendered prompt; values are inserted verbatim (braces inside them are not interpreted).

    Raises:
        ValueError: If the template names a field missing from ``fields``.
    """
    return "".join(_segment_text(seg, fields) for seg in _segments(template))


def _segments(template: str) -> list[tuple[str, bool]]:
    """Splits a template into ``(literal, False)`` and ``(field_name, True)`` pieces (aliases resolved)."""
    out: list[tuple[str, bool]] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(template):
        if m.start() > pos:
            out.append((template[pos : m.start()], False))
        out.append((_ALIASES.get(m.group(1), m.group(1)), True))
        pos = m.end()
    if pos < len(template):
        out.append((template[pos:], False))
    return out


def _segment_text(seg: tuple[str, bool], fields: dict[str, str]) -> str:
    value, is_field = seg
    if not is_field:
        return value
    if fields.get(value) is None:
        raise ValueError(
            f"template field {{{value}}} has no value; fix: provide {value!r} or drop it from the template."
        )
    return str(fields[value])


def answer_ids(tokenizer: PreTrainedTokenizerBase, answer: str, max_target_length: int | None = None) -> list[int]:
    """The answer tokens a causal-LM example ends with: ``answer`` (optionally truncated) followed by EOS.

    Args:
        tokenizer: Tokenizer with an ``eos_token_id``.
        answer: Verbalizer word or reference text, normally with a leading space (``" positive"``).
        max_target_length: Keep at most this many answer tokens before EOS (``None``: all).

    Returns:
        Token ids, EOS last; this is exactly what :func:`encode_causal_lm` appends.

    Raises:
        ValueError: If the tokenizer has no EOS token.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token_id; fix: use a causal-LM tokenizer that defines an EOS token.")
    ids = _ids(tokenizer, answer)
    if max_target_length is not None:
        ids = ids[:max_target_length]
    return ids + [int(tokenizer.eos_token_id)]


def _fit_prompt(tokenizer: PreTrainedTokenizerBase, template: str, fields: dict[str, str], budget: int) -> list[int]:
    """Tokenizes the prompt; when it exceeds ``budget``, truncates the longest field(s) from the right."""
    prompt = _ids(tokenizer, render_prompt(template, fields))
    if len(prompt) <= budget:
        return prompt
    pieces = [(_ids(tokenizer, _segment_text(seg, fields)), seg[1]) for seg in _segments(template)]
    fixed = sum(len(ids) for ids, is_field in pieces if not is_field)
    lengths = [len(ids) if is_field else 0 for ids, is_field in pieces]
    room = budget - fixed
    if room <= 0:
        return prompt[-budget:]
    lo, hi = 0, max(lengths)  # longest-first: the largest per-field cap whose total fits in `room`
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(min(n, mid) for n in lengths) <= room else (lo, mid - 1)
    lengths = [min(n, lo) for n in lengths]
    out: list[int] = []
    for (ids, is_field), n in zip(pieces, lengths):
        out += ids[:n] if is_field else ids
    return out


def encode_causal_lm(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    answer_word: str,
    max_length: int,
    template: str = PROMPT_TEMPLATE,
    *,
    text_pair: str | None = None,
    max_target_length: int | None = None,
) -> dict[str, list[int]]:
    """Encodes ``template(text, text_pair) + answer + eos`` for causal-LM fine-tuning with a loss on the answer only.

    The answer (:func:`answer_ids`: the ``answer_word`` tokens, cut to ``max_target_length`` if given, and EOS) is
    never truncated further. When the whole sequence is longer than ``max_length``, the *input fields* are truncated
    from the right (longest field first) so the template's fixed parts (e.g. the ``Answer:`` line) survive; if even
    those do not fit, the prompt is truncated from the left.

    Args:
        tokenizer: Tokenizer with an ``eos_token_id``.
        text: Input text substituted for ``{text}`` (alias ``{context}``) in ``template``.
        answer_word: Verbalizer word or reference answer, normally with a leading space (``" positive"``).
        max_length: Maximum total length in tokens.
        template: Prompt template containing ``{text}``.
        text_pair: Second input substituted for ``{text_pair}`` (alias ``{question}``).
        max_target_length: Maximum answer tokens before EOS (generative targets); ``None`` keeps the whole answer.

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` of equal length; ``labels`` is ``-100`` on prompt positions and
        equals ``input_ids`` on answer and EOS positions (the model shifts labels internally).

    Raises:
        ValueError: If ``template`` lacks ``{text}``, the tokenizer has no EOS token, or the answer alone does not fit.
    """
    if "{text}" not in template and "{context}" not in template:
        raise ValueError(f"template={template!r} lacks the '{{text}}' placeholder; fix: e.g. {PROMPT_TEMPLATE!r}.")
    answer = answer_ids(tokenizer, answer_word, max_target_length)
    budget = max_length - len(answer)
    if budget < 1:
        raise ValueError(
            f"max_length={max_length} cannot hold the answer {answer_word[:40]!r} ({len(answer)} tokens incl. EOS) "
            "plus a prompt; fix: increase max_length (or lower max_target_length)."
        )
    fields = {"text": text} if text_pair is None else {"text": text, "text_pair": text_pair}
    prompt = _fit_prompt(tokenizer, template, fields, budget)
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


def encode_classification(
    tokenizer: PreTrainedTokenizerBase, text: str, label: int, max_length: int, text_pair: str | None = None
) -> dict[str, Any]:
    """Encodes ``text`` (and optionally ``text_pair``) for a sequence-classification (encoder) model.

    Args:
        tokenizer: Tokenizer; its own special tokens (e.g. ``[CLS]``/``[SEP]``) are added.
        text: Input text.
        label: Integer class label.
        max_length: Maximum length in tokens (special tokens included); longest input truncated first.
        text_pair: Optional second text, encoded as ``tokenizer(text, text_pair)``.

    Returns:
        ``{"input_ids": [...], "labels": label}``.
    """
    ids = tokenizer(text, text_pair, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": list(ids), "labels": int(label)}


def _same(batch: list[dict[str, Any]], key: str) -> int | None:
    values = {int(item[key]) for item in batch if key in item}
    if len(values) > 1:
        raise ValueError(
            f"a batch mixes {key} values {sorted(values)} (mixes clients); fix: use a per-client batch sampler "
            "(a client holds exactly one task)."
        )
    return values.pop() if values else None


def collate(batch: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pads a list of encoded examples into tensors.

    Args:
        batch: Encoded examples with ``input_ids`` (list), ``labels`` (list for causal LM, int for classification)
            and ``client_idx`` (int, identical across the batch). Optional: an int ``label`` (class index, ``-1`` for
            generative tasks), an int ``task_id`` (identical across the batch) and a str ``target`` (reference answer
            of generative tasks) with, optionally, its list ``references`` (every reference, for scoring). Other
            keys (e.g. ``task``) are dropped.
        pad_id: Token id used for padding ``input_ids``.

    Returns:
        ``input_ids`` LongTensor[B, T], ``attention_mask`` LongTensor[B, T] (1 real, 0 pad), ``labels``
        (LongTensor[B, T] padded with -100, or LongTensor[B]), ``label`` LongTensor[B] (when items carry it),
        ``client_idx`` and ``task_id`` as python ints, and ``targets`` (list of str) and ``references`` (list of
        lists of str; ``[target]`` where an item has none) when items carry ``target``.
        An idle padding item (``{"idle": True, "client_idx": -1}``) comes back as it is.

    Raises:
        ValueError: If the batch is empty or mixes clients or tasks.
    """
    if not batch:
        raise ValueError("collate got an empty batch; fix: check the sampler yields non-empty index lists.")
    if batch[0].get("idle"):  # the padding step of a sharded round (``RoundBatchSampler.idle_index``)
        return dict(batch[0])
    client_idx = _same(batch, "client_idx")
    task_id = _same(batch, "task_id")
    width = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.as_tensor(item["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
    out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if isinstance(batch[0]["labels"], (list, tuple)):
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for row, item in enumerate(batch):
            labels[row, : len(item["labels"])] = torch.as_tensor(item["labels"], dtype=torch.long)
        out["labels"] = labels
    else:
        out["labels"] = torch.tensor([int(item["labels"]) for item in batch], dtype=torch.long)
    if all(isinstance(item.get("label"), int) for item in batch):
        out["label"] = torch.tensor([item["label"] for item in batch], dtype=torch.long)
    if client_idx is None:
        raise ValueError("collate: items lack 'client_idx'; fix: encode examples with their client index.")
    out["client_idx"] = client_idx
    if task_id is not None:
        out["task_id"] = task_id
    if any(item.get("target") is not None for item in batch):
        out["targets"] = [str(item.get("target") or "") for item in batch]
        out["references"] = [
            [str(r) for r in item.get("references") or [item.get("target") or ""]] for item in batch
        ]
    return out


def collate_clients(batch: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Collates the examples of several clients (a synchronous round's step) into one batch per client.

    Consecutive items with the same ``client_idx`` form one client's batch (:func:`collate`). One client gives its
    plain batch; several give ``{"clients": [batch, ...], "client_idx": <the first client>}``, which
    ``Federation.training_step`` runs as one step of every client (the server batching the clients that share a
    server adapter). An idle padding item comes back as it is.
    """
    if not batch:
        raise ValueError("collate got an empty batch; fix: check the sampler yields non-empty index lists.")
    if batch[0].get("idle"):
        return dict(batch[0])
    groups: list[list[dict[str, Any]]] = []
    for item in batch:
        if not groups or groups[-1][0].get("client_idx") != item.get("client_idx"):
            groups.append([])
        groups[-1].append(item)
    if len(groups) == 1:
        return collate(groups[0], pad_id)
    batches = [collate(g, pad_id) for g in groups]
    return {"clients": batches, "client_idx": batches[0]["client_idx"]}
