"""Tokenizing whole task splits with ``Dataset.map`` (cached by fingerprint) and the per-task verbalizer ids.

The fingerprint of an encoded split combines the normalized split's fingerprint with everything the encoding depends
on (tokenizer identity, format, template, label words, lengths, :data:`ENCODING_VERSION`), so a second setup with the
same settings loads the Arrow cache file instead of tokenizing again. In-memory datasets (synthetic tasks) are
encoded in memory.
"""

from __future__ import annotations

from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from atlas_pl.data.formats import answer_ids, encode_causal_lm, encode_classification
from atlas_pl.data.tasks import TaskInfo

__all__ = ["ENCODING_VERSION", "encode_split", "verbalizer_ids"]

ENCODING_VERSION = "2"
"""Bump when the encoders change, to invalidate cached encodings."""


def _tokenizer_key(tokenizer: PreTrainedTokenizerBase) -> list[Any]:
    return [
        type(tokenizer).__name__,
        tokenizer.name_or_path,
        len(tokenizer),
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer("Hello world, answer:")["input_ids"],
    ]


def _encode_batch(
    batch: dict[str, list],
    tokenizer: PreTrainedTokenizerBase,
    task_format: str,
    template: str,
    label_words: list[str],
    max_length: int,
    max_target_length: int | None,
) -> dict[str, list]:
    out: dict[str, list] = {"input_ids": [], "labels": [], "label": []}
    pairs = batch.get("text_pair") or [None] * len(batch["text"])
    targets = batch.get("target")
    if targets is not None:
        out["target"] = list(targets)
        refs = batch.get("references")
        out["references"] = [list(r) for r in refs] if refs is not None else [[t] for t in targets]
    for i, (text, pair) in enumerate(zip(batch["text"], pairs)):
        label = -1 if targets is not None else int(batch["label"][i])
        if task_format == "classification":
            item = encode_classification(tokenizer, text, label, max_length, text_pair=pair)
        else:
            answer = label_words[label] if targets is None else " " + str(targets[i]).strip()
            limit = None if targets is None else max_target_length
            item = encode_causal_lm(
                tokenizer, text, answer, max_length, template, text_pair=pair, max_target_length=limit
            )
        out["input_ids"].append(item["input_ids"])
        out["labels"].append(item["labels"])
        out["label"].append(label)
    return out


def encode_split(
    ds: datasets.Dataset,
    task: TaskInfo,
    template: str,
    tokenizer: PreTrainedTokenizerBase,
    task_format: str,
    max_length: int,
    max_target_length: int | None = None,
) -> datasets.Dataset:
    """Tokenizes a normalized split (``text``, ``text_pair``?, ``label`` | ``target``) with ``Dataset.map``.

    Args:
        ds: Normalized split.
        task: The task (label words, kind, name).
        template: Prompt template (causal LM).
        tokenizer: Tokenizer.
        task_format: ``"causal_lm"`` or ``"classification"``.
        max_length: Maximum sequence length.
        max_target_length: Maximum answer tokens (before EOS) of generative targets.

    Returns:
        A dataset with ``input_ids``, ``labels`` (list for causal LM, int for classification), ``label`` (``-1`` for
        generative tasks) and, for generative tasks, ``target`` and ``references`` (every reference answer).
        File-backed inputs are cached beside their Arrow
        files (hit on the next call with the same settings).
    """
    kwargs = {
        "tokenizer": tokenizer,
        "task_format": task_format,
        "template": template,
        "label_words": list(task.label_words),
        "max_length": max_length,
        "max_target_length": max_target_length,
    }
    key = [
        ds._fingerprint,
        ENCODING_VERSION,
        _tokenizer_key(tokenizer),
        task_format,
        template,
        task.label_words,
        max_length,
        max_target_length,
    ]
    quiet = not ds.cache_files and not datasets.utils.are_progress_bars_disabled()
    if quiet:  # in-memory (synthetic) splits are small: no progress bar
        datasets.utils.disable_progress_bars()
    try:
        return ds.map(
            _encode_batch,
            batched=True,
            batch_size=256,
            fn_kwargs=kwargs,
            remove_columns=ds.column_names,
            new_fingerprint=datasets.fingerprint.Hasher.hash(key),
            desc=f"tokenize {task.name}",
        )
    finally:
        if quiet:
            datasets.utils.enable_progress_bars()


def verbalizer_ids(tokenizer: PreTrainedTokenizerBase, task: TaskInfo) -> list[list[int]]:
    """Per label, the answer token ids the causal-LM encoder appends (label word + EOS); ``[]`` if generative.

    Without an EOS token (encoder tokenizers) the ids are the label word's tokens only.
    """
    if task.generative:
        return []
    if tokenizer.eos_token_id is None:
        return [list(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in task.label_words]
    return [answer_ids(tokenizer, w) for w in task.label_words]
