from __future__ import annotations

import csv
import json

import pytest

from atlas_pl.data import TaskSpec, available_tasks, load_task, load_tasks
from tests.data.helpers import write_jsonl, write_task_folder


def _write_csv(path, rows, fields) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def test_folder_task_reads_meta_and_splits(data_dir, cache_dir):
    task = load_task("senti_a", data_dir=str(data_dir), cache_dir=cache_dir)
    assert (task.name, task.group, task.kind) == ("senti_a", "sentiment", "classification")
    assert task.label_names == ["positive", "negative"] and task.label_words == [" positive", " negative"]
    assert (len(task.train), len(task.validation), len(task.test)) == (60, 10, 20)
    assert task.train[0] == {"text": "good item 0", "label": 0}
    assert task.template == "{text}\nAnswer:"


def test_pair_folder_task_gets_the_pair_template_and_falls_back_to_validation(data_dir, cache_dir):
    task = load_task("nli_c", data_dir=str(data_dir), cache_dir=cache_dir)
    assert task.has_pair and task.template == "{text}\n{text_pair}\nAnswer:"
    assert task.test is None and task.eval_split is task.validation


def test_unknown_task_name_lists_tasks_that_exist(data_dir):
    with pytest.raises(FileNotFoundError, match=r"'sst9'.*nli_c.*senti_a"):
        load_task("sst9", data_dir=str(data_dir))
    assert available_tasks(data_dir) == ["nli_c", "senti_a", "senti_b"]


def test_folder_name_without_data_dir_says_to_set_it():
    with pytest.raises(ValueError, match="data_dir"):
        load_task("sst2")


def test_missing_train_split_names_task_and_path(tmp_path):
    write_task_folder(tmp_path, "no_train", "sentiment", ["positive", "negative"], {"test": 4})
    with pytest.raises(FileNotFoundError, match=r"no_train.*train\.jsonl"):
        load_task("no_train", data_dir=str(tmp_path))


def test_csv_with_string_labels_maps_them_by_label_names_order(tmp_path, cache_dir):
    rows = [{"review": f"text {i}", "stars": ["low", "high"][i % 2]} for i in range(6)]
    _write_csv(tmp_path / "train.csv", rows, ["review", "stars"])
    spec = {"name": "stars", "path": str(tmp_path / "train.csv"), "text_column": "review", "label_column": "stars",
            "label_names": ["high", "low"]}  # fmt: skip
    task = load_task(spec, cache_dir=cache_dir)
    assert [r["label"] for r in task.train] == [1, 0, 1, 0, 1, 0] and task.label_words == [" high", " low"]
    default = load_task({**spec, "label_names": None}, cache_dir=cache_dir)
    assert default.label_names == ["high", "low"]  # sorted unique values


def test_jsonl_file_with_column_mapping_and_test_file(tmp_path, cache_dir):
    write_jsonl(tmp_path / "tr.jsonl", [{"q": f"t {i}", "y": i % 3} for i in range(9)])
    write_jsonl(tmp_path / "te.jsonl", [{"q": "x", "y": 2}])
    spec = {"name": "j", "source": "jsonl", "data_files": {"train": str(tmp_path / "tr.jsonl"),
            "test": str(tmp_path / "te.jsonl")}, "text_column": "q", "label_column": "y",
            "label_names": ["a_b", "c", "d"], "group": "g"}  # fmt: skip
    task = load_task(spec, cache_dir=cache_dir)
    assert len(task.train) == 9 and len(task.test) == 1 and task.label_words == [" a b", " c", " d"]
    assert task.group == "g"


def test_label_outside_label_names_is_rejected(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 5}])
    with pytest.raises(ValueError, match=r"task 'bad'.*label.*0\.\.1"):
        load_task({"name": "bad", "path": str(tmp_path / "t.jsonl"), "label_names": ["x", "y"]})


def test_unknown_string_label_is_rejected(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "zz"}])
    with pytest.raises(ValueError, match=r"task 'bad'.*label_names"):
        load_task({"name": "bad", "path": str(tmp_path / "t.jsonl"), "label_names": ["x", "y"]})


def test_empty_task_is_rejected(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'empty'"):
        load_task({"name": "empty", "path": str(tmp_path / "t.csv"), "label_names": ["x"]})


def test_missing_file_names_task_and_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'gone'.*nope\.csv"):
        load_task({"name": "gone", "path": str(tmp_path / "nope.csv")})


@pytest.mark.parametrize(
    ("template", "match"), [("Answer:", r"\{text\}"), ("{text}\nAnswer:", r"\{text_pair\}"), ("{txt}", "unknown")]
)
def test_template_must_read_the_input_fields(data_dir, template, match):
    with pytest.raises(ValueError, match=match):
        load_task({"name": "nli_c", "template": template}, data_dir=str(data_dir))


def test_hf_source_loads_through_datasets_load_dataset(tmp_path, cache_dir):
    write_jsonl(tmp_path / "train.jsonl", [{"sentence": f"s {i}", "label": i % 2} for i in range(4)])
    write_jsonl(tmp_path / "test.jsonl", [{"sentence": "u", "label": -1}])  # unlabelled hub test split: dropped
    spec = {"name": "local_hf", "source": "hf", "path": "json", "label_names": ["n", "p"],
            "data_files": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}}  # fmt: skip
    task = load_task(spec, cache_dir=cache_dir)
    assert task.train[1] == {"text": "s 1", "label": 1} and task.test is None


def test_hub_name_offline_raises_naming_the_task_and_a_local_folder(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"task 'sst2_hub'.*glue.*local folder"):
        load_task({"name": "sst2_hub", "path": "glue", "hf_config": "sst2"}, cache_dir=str(tmp_path))


def test_qa_task_reads_context_question_and_answer_text(tmp_path, cache_dir):
    rows = [{"context": "Paris is in France.", "question": "Where is Paris?", "answers": {"text": ["France"]}}] * 3
    write_jsonl(tmp_path / "qa.jsonl", rows)
    task = load_task({"name": "qa", "kind": "qa", "path": str(tmp_path / "qa.jsonl")}, cache_dir=cache_dir)
    assert task.train[0] == {"text": "Paris is in France.", "text_pair": "Where is Paris?", "target": "France",
                             "references": ["France"]}  # fmt: skip
    assert task.label_names == [] and task.template.startswith("Context: {context}")


def test_max_train_examples_subsamples_deterministically(data_dir, cache_dir):
    a = load_task({"name": "senti_a", "max_train_examples": 7}, data_dir=str(data_dir), cache_dir=cache_dir)
    b = load_task({"name": "senti_a", "max_train_examples": 7}, data_dir=str(data_dir), cache_dir=cache_dir)
    assert len(a.train) == 7 and a.train.to_list() == b.train.to_list()


def test_synthetic_spec_expands_and_a_named_synthetic_task_is_selected():
    kwargs = {"num_groups": 2, "tasks_per_group": 2, "examples_per_task": 20}
    assert [t.name for t in load_tasks(["synthetic"], synthetic=kwargs)] == [
        "sentiment_0", "sentiment_1", "topic_0", "topic_1"]  # fmt: skip
    one = load_tasks([{"name": "topic_1", "source": "synthetic"}], synthetic=kwargs)
    assert [t.name for t in one] == ["topic_1"] and one[0].label_words[0] == " sports"


@pytest.mark.parametrize(
    ("spec", "match"),
    [({"name": "x", "colour": 1}, "colour"), ({"name": "x", "kind": "chat"}, "kind"), ([], "tasks")],
)
def test_bad_specs_raise_naming_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        load_tasks(spec if isinstance(spec, list) else [spec])


def test_duplicate_task_names_are_rejected(data_dir):
    with pytest.raises(ValueError, match="senti_a"):
        load_tasks(["senti_a", "senti_a"], data_dir=str(data_dir))


def test_task_spec_parses_strings_and_dicts():
    assert TaskSpec.parse("sst2") == TaskSpec(name="sst2")
    assert TaskSpec.parse("synthetic").source == "synthetic"
    assert TaskSpec.parse({"name": "a", "kind": "qa"}).kind == "qa"
    json.dumps(TaskSpec.parse("x").__dict__)
