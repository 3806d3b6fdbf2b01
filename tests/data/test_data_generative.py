"""Generative task folders in the shared normalized format: squad-style QA and dialogsum/aeslc-style summaries.

The folders are written here in the layout of ``../shared/data`` (``meta.json`` with ``task_type`` and ``fields``
instead of ``label_names``); the kind comes from ``task_type``, the training target from ``answer`` / ``summary`` and
every reference (for scoring) from ``answers`` / ``summaries``.
"""

from __future__ import annotations

import json

import pytest

from atlas_pl.data import FederatedDataModule
from atlas_pl.data.sources import load_task
from atlas_pl.data.tasks import TaskSpec
from tests.data.helpers import write_jsonl

QA_TEST = [
    {"context": "Denver won Super Bowl 50 in Santa Clara.", "question": "Who won Super Bowl 50?",
     "answer": "Denver", "answers": ["Denver", "Denver Broncos"]},
    {"context": "The game was played in Santa Clara, California.", "question": "Where was the game?",
     "answer": "Santa Clara", "answers": ["Santa Clara", "Santa Clara, California"]},
]  # fmt: skip


def _qa_rows(n: int, offset: int = 0) -> list[dict]:
    return [{"context": f"Item {i} is kept in box {i % 7}.", "question": f"Where is item {i}?",
             "answer": f"box {i % 7}", "answers": [f"box {i % 7}"]} for i in range(offset, offset + n)]  # fmt: skip


def _summary_rows(n: int, offset: int = 0, refs: int = 1) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        doc = f"#Person1#: Shall we meet at {i % 12} pm?\n#Person2#: Yes, at the cafe number {i}."
        summary = f"They meet at {i % 12} pm at cafe {i}."
        rows.append({"document": doc, "summary": summary,
                     "summaries": [summary] + [f"Two people agree to meet ({k})." for k in range(refs - 1)]})
    return rows


def _folder(root, name, group, task_type, fields, splits) -> None:
    for split, rows in splits.items():
        write_jsonl(root / name / f"{split}.jsonl", rows)
    meta = {"task": name, "group": group, "task_type": task_type, "fields": fields,
            "splits": {k: len(v) for k, v in splits.items()}}  # fmt: skip
    (root / name / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("generative")
    _folder(root, "squad_mini", "qa", "extractive_qa", ["context", "question", "answer", "answers"],
            {"train": _qa_rows(40), "validation": _qa_rows(6, 40), "test": QA_TEST})  # fmt: skip
    _folder(root, "dialog_mini", "summarization", "summarization", ["document", "summary", "summaries"],
            {"train": _summary_rows(40), "test": _summary_rows(4, 40, refs=3)})  # fmt: skip
    _folder(root, "odd", "x", "translation", ["document"], {"train": _summary_rows(4)})
    return root


def test_squad_folder_is_qa_with_every_gold_answer_as_references(gen_dir, cache_dir):
    task = load_task("squad_mini", data_dir=str(gen_dir), cache_dir=cache_dir)
    assert task.kind == "qa" and task.generative and task.group == "qa" and task.label_names == []
    assert task.test[0] == {"text": QA_TEST[0]["context"], "text_pair": QA_TEST[0]["question"], "target": "Denver",
                            "references": ["Denver", "Denver Broncos"]}  # fmt: skip
    assert task.train[3]["references"] == ["box 3"] and task.template.startswith("Context: {context}")


def test_summarization_folder_keeps_dialogue_lines_and_all_summaries(gen_dir, cache_dir):
    task = load_task("dialog_mini", data_dir=str(gen_dir), cache_dir=cache_dir)
    row = task.test[1]
    assert task.kind == "summarization" and "\n#Person2#:" in row["text"]
    assert row["target"] == "They meet at 5 pm at cafe 41." and len(row["references"]) == 3
    assert row["references"][0] == row["target"]


def test_explicit_kind_wins_and_unknown_task_type_names_the_fix(gen_dir, cache_dir):
    assert TaskSpec.parse("squad_mini").kind is None  # decided by meta.json when loading
    with pytest.raises(ValueError, match=r"task 'odd'.*task_type='translation'.*fix: set `kind`"):
        load_task("odd", data_dir=str(gen_dir), cache_dir=cache_dir)
    task = load_task({"name": "odd", "kind": "summarization"}, data_dir=str(gen_dir), cache_dir=cache_dir)
    assert task.kind == "summarization" and task.train[0]["references"] == [task.train[0]["target"]]


def test_references_column_can_be_named_and_a_missing_one_is_refused(tmp_path, cache_dir):
    rows = [{"doc": f"mail {i} about the budget", "subj": "Budget", "alts": ["budget", "Q3 budget"]} for i in range(4)]
    write_jsonl(tmp_path / "mail.jsonl", rows)
    spec = {"name": "mail", "kind": "summarization", "path": str(tmp_path / "mail.jsonl"), "text_column": "doc",
            "target_column": "subj", "references_column": "alts"}  # fmt: skip
    assert load_task(spec, cache_dir=cache_dir).train[0]["references"] == ["Budget", "budget", "Q3 budget"]
    with pytest.raises(ValueError, match=r"references_column='nope' is not a column"):
        load_task({**spec, "references_column": "nope"}, cache_dir=cache_dir)


def test_datamodule_batches_carry_every_reference_of_test_examples(gen_dir, cache_dir):
    dm = FederatedDataModule(
        num_clients=4, tokenizer="gpt2-offline", data_dir=str(gen_dir), tasks=["squad_mini", "dialog_mini"],
        cache_dir=cache_dir, max_examples_per_client=12, batch_size=4, max_length=96, seed=0,
    )  # fmt: skip
    dm.setup()
    assert [t.kind for t in dm.tasks] == ["qa", "summarization"]
    batches = [b for b in dm.test_dataloader() if b["task_id"] == 0]
    refs = [r for b in batches for r in b["references"]]
    assert sorted(map(tuple, refs)) == sorted(tuple(r["answers"]) for r in QA_TEST)
    for b in batches:
        assert [r[0] for r in b["references"]] == b["targets"]  # the trained answer is the first reference
    with pytest.raises(ValueError, match=r"label_dp_epsilon.*'squad_mini'.*generative"):
        FederatedDataModule(num_clients=2, tokenizer="gpt2-offline", data_dir=str(gen_dir), tasks=["squad_mini"],
                            label_dp_epsilon=1.0, cache_dir=cache_dir).setup()  # fmt: skip
