from __future__ import annotations

import os

from atlas_pl.data import encode_split, load_task, verbalizer_ids
from tests.data.helpers import write_jsonl


def _files(root) -> set[str]:
    return {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if not f.endswith(".lock")}


def test_second_encoding_hits_the_datasets_cache(tmp_path, gpt2_tokenizer):
    write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}", "label": i % 2} for i in range(12)])
    cache = str(tmp_path / "cache")
    spec = {"name": "cached", "path": str(tmp_path / "t.jsonl"), "label_names": ["no", "yes"]}
    task = load_task(spec, cache_dir=cache)
    first = encode_split(task.train, task, task.template, gpt2_tokenizer, "causal_lm", 32)
    before = _files(cache)
    again = load_task(spec, cache_dir=cache)
    second = encode_split(again.train, again, again.template, gpt2_tokenizer, "causal_lm", 32)
    assert first.cache_files and second.cache_files == first.cache_files
    assert second._fingerprint == first._fingerprint and _files(cache) == before  # nothing re-tokenized
    other = encode_split(again.train, again, again.template, gpt2_tokenizer, "causal_lm", 24)
    assert other.cache_files != first.cache_files  # settings are part of the fingerprint


def test_encoded_answer_equals_the_verbalizer_ids(tmp_path, gpt2_tokenizer):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "a b", "text_pair": "c", "label": i % 3} for i in range(6)])
    spec = {"name": "v", "path": str(tmp_path / "t.jsonl"), "label_names": ["not_sure", "yes", "no"]}
    task = load_task(spec, cache_dir=str(tmp_path / "c"))
    enc = encode_split(task.train, task, task.template, gpt2_tokenizer, "causal_lm", 32)
    verbal = verbalizer_ids(gpt2_tokenizer, task)
    assert verbal[0] == gpt2_tokenizer(" not sure")["input_ids"] + [gpt2_tokenizer.eos_token_id]
    for row in enc:
        answer = [t for t, y in zip(row["input_ids"], row["labels"]) if y != -100]
        assert answer == verbal[row["label"]]


def test_generative_split_keeps_target_and_label_minus_one(tmp_path, gpt2_tokenizer):
    write_jsonl(tmp_path / "s.jsonl", [{"document": "long text here", "summary": "short"}] * 2)
    task = load_task({"name": "sum", "kind": "summarization", "path": str(tmp_path / "s.jsonl")})
    enc = encode_split(task.train, task, task.template, gpt2_tokenizer, "causal_lm", 32, max_target_length=8)
    row = enc[0]
    assert row["label"] == -1 and row["target"] == "short" and verbalizer_ids(gpt2_tokenizer, task) == []
    assert gpt2_tokenizer.decode(row["input_ids"]) == "long text here\nSummary: short<|endoftext|>"


def test_classification_format_keeps_int_labels(tmp_path, gpt2_tokenizer):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "text_pair": "b", "label": 1}])
    task = load_task({"name": "p", "path": str(tmp_path / "t.jsonl"), "label_names": ["x", "y"]})
    row = encode_split(task.train, task, task.template, gpt2_tokenizer, "classification", 16)[0]
    assert row["labels"] == 1 and row["label"] == 1 and row["input_ids"] == gpt2_tokenizer("a", "b")["input_ids"]
