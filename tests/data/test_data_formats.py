from __future__ import annotations

import pytest
import torch

from atlas_pl.data import answer_ids, collate, encode_causal_lm, encode_classification, render_prompt
from atlas_pl.data.formats import IGNORE_INDEX


def test_encode_causal_lm_masks_prompt_and_keeps_answer_and_eos(gpt2_tokenizer):
    enc = encode_causal_lm(gpt2_tokenizer, "what a lovely day", " positive", max_length=48)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels)
    assert ids[-2:] == [3967, 50256] and labels[-2:] == [3967, 50256]
    assert all(x == IGNORE_INDEX for x in labels[:-2])
    assert gpt2_tokenizer.decode(ids) == "what a lovely day\nAnswer: positive<|endoftext|>"


def test_encode_causal_lm_never_truncates_the_answer_and_keeps_the_template_suffix(gpt2_tokenizer):
    long_text = " ".join(["word"] * 200)
    enc = encode_causal_lm(gpt2_tokenizer, long_text, " negative", max_length=16)
    assert len(enc["input_ids"]) == 16
    assert enc["input_ids"][-2:] == [4633, 50256] and enc["labels"][-2:] == [4633, 50256]
    assert gpt2_tokenizer.decode(enc["input_ids"]).endswith("\nAnswer: negative<|endoftext|>")


def test_encode_causal_lm_rejects_template_without_text_placeholder(gpt2_tokenizer):
    with pytest.raises(ValueError, match="template"):
        encode_causal_lm(gpt2_tokenizer, "x", " positive", 32, template="Answer:")


def test_encode_causal_lm_rejects_max_length_too_small_for_answer(gpt2_tokenizer):
    with pytest.raises(ValueError, match="max_length"):
        encode_causal_lm(gpt2_tokenizer, "x", " positive", 2)


def test_encode_classification_truncates_and_keeps_int_label(gpt2_tokenizer):
    enc = encode_classification(gpt2_tokenizer, " ".join(["word"] * 50), 2, max_length=8)
    assert len(enc["input_ids"]) == 8 and enc["labels"] == 2


def test_collate_right_pads_ids_masks_and_causal_labels():
    batch = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "label": 0, "task": "t", "client_idx": 4},
        {"input_ids": [5], "labels": [5], "label": 1, "task": "t", "client_idx": 4},
    ]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[1, 2, 3], [5, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 2, 3], [5, -100, -100]]
    assert out["label"].tolist() == [0, 1]
    assert out["client_idx"] == 4 and isinstance(out["client_idx"], int)
    assert "task" not in out
    assert out["input_ids"].dtype == torch.long


def test_collate_stacks_int_labels_for_classification():
    out = collate(
        [{"input_ids": [1, 2], "labels": 1, "client_idx": 0}, {"input_ids": [3], "labels": 0, "client_idx": 0}], 9
    )
    assert out["labels"].tolist() == [1, 0] and out["labels"].shape == (2,)
    assert out["input_ids"].tolist() == [[1, 2], [3, 9]]


def test_collate_rejects_batches_mixing_clients():
    with pytest.raises(ValueError, match="mixes clients"):
        collate([{"input_ids": [1], "labels": 0, "client_idx": 0}, {"input_ids": [1], "labels": 0, "client_idx": 1}], 0)


def test_render_prompt_fills_pair_fields_and_qa_aliases():
    assert render_prompt("{text}|{text_pair}", {"text": "a{b}", "text_pair": "c"}) == "a{b}|c"
    assert render_prompt("C: {context} Q: {question}", {"text": "x", "text_pair": "y"}) == "C: x Q: y"


def test_pair_prompt_truncates_the_longest_field_first_and_keeps_the_answer(gpt2_tokenizer):
    enc = encode_causal_lm(
        gpt2_tokenizer, " ".join(["word"] * 100), " yes", 20, "{text}\n{text_pair}\nAnswer:", text_pair="short pair"
    )
    text = gpt2_tokenizer.decode(enc["input_ids"])
    assert len(enc["input_ids"]) == 20 and "\nshort pair\nAnswer: yes<|endoftext|>" in text


def test_generative_target_is_cut_to_max_target_length_plus_eos(gpt2_tokenizer):
    enc = encode_causal_lm(
        gpt2_tokenizer, "doc", " one two three four five", 64, "{text}\nSummary:", max_target_length=3
    )
    assert enc["labels"][-4:] == answer_ids(gpt2_tokenizer, " one two three four five", 3)
    assert sum(x != IGNORE_INDEX for x in enc["labels"]) == 4


def test_encode_classification_encodes_text_pairs_like_the_tokenizer(gpt2_tokenizer):
    enc = encode_classification(gpt2_tokenizer, "first", 1, 32, text_pair="second")
    assert enc["input_ids"] == gpt2_tokenizer("first", "second")["input_ids"] and enc["labels"] == 1


def test_collate_returns_task_id_and_targets_for_generative_batches():
    batch = [
        {"input_ids": [1], "labels": [1], "label": -1, "task_id": 2, "client_idx": 0, "target": "a"},
        {"input_ids": [2, 3], "labels": [-100, 3], "label": -1, "task_id": 2, "client_idx": 0, "target": "b"},
    ]
    out = collate(batch, 0)
    assert out["task_id"] == 2 and isinstance(out["task_id"], int) and out["targets"] == ["a", "b"]
    assert out["label"].tolist() == [-1, -1]


def test_collate_rejects_batches_mixing_tasks():
    with pytest.raises(ValueError, match="task_id"):
        collate(
            [{"input_ids": [1], "labels": 0, "client_idx": 0, "task_id": 0},
             {"input_ids": [1], "labels": 0, "client_idx": 0, "task_id": 1}],
            0,
        )  # fmt: skip
