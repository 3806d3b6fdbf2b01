"""Turning examples into model inputs: causal-LM (verbalizer) and encoder classification formats, and collation.

Pure code: depends on torch and a Hugging Face tokenizer only.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

__all__ = ["IGNORE_INDEX", "PROMPT_TEMPLATE", "collate", "encode_causal_lm", "encode_classification"]

PROMPT_TEMPLATE = "{text}\nAnswer:"
"""Default prompt; the answer word (with its leading space) follows ``Answer:``."""

IGNORE_INDEX = -100
"""Label value ignored by the cross-entropy loss (Hugging Face convention)."""


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_causal_lm(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    answer_word: str,
    max_length: int,
    template: str = PROMPT_TEMPLATE,
) -> dict[str, list[int]]:
    """Encodes ``template(text) + answer_word + eos`` for causal-LM fine-tuning with a loss on the answer only.

    The answer (``answer_word`` tokens and EOS) is never truncated. When the whole sequence is longer than
    ``max_length``, the *text* is truncated from the right so the template's fixed parts (e.g. the ``Answer:`` line)
    survive; if even those do not fit, the prompt is truncated from the left.

    Args:
        tokenizer: Tokenizer with an ``eos_token_id``.
        text: Input text substituted for ``{text}`` in ``template``.
        answer_word: Verbalizer word, normally with a leading space (``" positive"``).
        max_length: Maximum total length in tokens.
        template: Prompt template containing ``{text}``.

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` of equal length; ``labels`` is ``-100`` on prompt positions and
        equals ``input_ids`` on answer and EOS positions (the model shifts labels internally).

    Raises:
        ValueError: If ``template`` lacks ``{text}``, the tokenizer has no EOS token, or the answer alone does not fit.
    """
    if "{text}" not in template:
        raise ValueError(f"template={template!r} lacks the '{{text}}' placeholder; fix: e.g. {PROMPT_TEMPLATE!r}.")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token_id; fix: use a causal-LM tokenizer that defines an EOS token.")
    answer = _ids(tokenizer, answer_word) + [int(tokenizer.eos_token_id)]
    budget = max_length - len(answer)
    if budget < 1:
        raise ValueError(
            f"max_length={max_length} cannot hold the answer {answer_word!r} ({len(answer)} tokens incl. EOS) "
            "plus a prompt; fix: increase max_length."
        )
    prompt = _ids(tokenizer, template.replace("{text}", text))
    if len(prompt) > budget:
        pre, post = template.split("{text}", 1)
        pre_ids, post_ids = (_ids(tokenizer, pre) if pre else []), (_ids(tokenizer, post) if post else [])
        room = budget - len(pre_ids) - len(post_ids)
        if room > 0:
            prompt = pre_ids + _ids(tokenizer, text)[:room] + post_ids
        else:
            prompt = prompt[-budget:]
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


def encode_classification(tokenizer: PreTrainedTokenizerBase, text: str, label: int, max_length: int) -> dict[str, Any]:
    """Encodes ``text`` for a sequence-classification (encoder) model.

    Args:
        tokenizer: Tokenizer; its own special tokens (e.g. ``[CLS]``/``[SEP]``) are added.
        text: Input text, truncated to ``max_length`` tokens.
        label: Integer class label.
        max_length: Maximum length in tokens (special tokens included).

    Returns:
        ``{"input_ids": [...], "labels": label}``.
    """
    ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": list(ids), "labels": int(label)}


def collate(batch: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pads a list of encoded examples into tensors.

    Args:
        batch: Encoded examples with ``input_ids`` (list), ``labels`` (list for causal LM, int for classification)
            and ``client_idx`` (int, identical across the batch). An optional int ``label`` (verbalizer class index
            of causal-LM examples) is stacked too; other keys (e.g. ``task``) are dropped.
        pad_id: Token id used for padding ``input_ids``.

    Returns:
        ``input_ids`` LongTensor[B, T], ``attention_mask`` LongTensor[B, T] (1 real, 0 pad), ``labels``
        (LongTensor[B, T] padded with -100, or LongTensor[B]), optionally ``label`` LongTensor[B], and ``client_idx``
        as a python int.

    Raises:
        ValueError: If the batch is empty or mixes clients.
    """
    if not batch:
        raise ValueError("collate got an empty batch; fix: check the sampler yields non-empty index lists.")
    clients = {int(item["client_idx"]) for item in batch}
    if len(clients) != 1:
        raise ValueError(f"a batch mixes clients {sorted(clients)}; fix: use a per-client batch sampler.")
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
    out["client_idx"] = clients.pop()
    return out
