"""Label columns of CSV/JSONL tasks: string names map to int ids in ``label_names`` order, bad labels are named."""

from __future__ import annotations

import csv

import datasets
import pytest

from atlas_pl.data import load_task
from atlas_pl.data.labels import check_label_column
from tests.data.helpers import write_jsonl

NAMES = ["neg", "pos"]


def _write_csv(path, rows: list[tuple[str, str]]) -> str:
    """A ``text,label`` CSV; an empty label string is an empty cell."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return str(path)


def _load(path: str, cache_dir: str, label_names: list[str] | None = NAMES):
    return load_task({"name": "t", "path": path, "label_names": label_names}, cache_dir=cache_dir)


def test_csv_with_string_names_in_a_label_column_maps_them_to_int_ids(tmp_path, cache_dir):
    path = _write_csv(tmp_path / "train.csv", [("a", "pos"), ("b", "neg"), ("c", "pos")])
    task = _load(path, cache_dir)
    assert task.train["label"][:] == [1, 0, 1]  # ids in label_names order, not alphabetical by accident
    assert task.train.features["label"].dtype == "int64"
    assert task.label_names == NAMES and task.label_words == [" neg", " pos"]


def test_csv_string_label_column_order_follows_label_names(tmp_path, cache_dir):
    path = _write_csv(tmp_path / "train.csv", [("a", "pos"), ("b", "neg")])
    assert _load(path, cache_dir, ["pos", "neg"]).train["label"][:] == [0, 1]


def test_csv_string_label_column_without_label_names_uses_the_sorted_names(tmp_path, cache_dir):
    path = _write_csv(tmp_path / "train.csv", [("a", "pos"), ("b", "neg"), ("c", "mid")])
    task = _load(path, cache_dir, None)
    assert task.label_names == ["mid", "neg", "pos"] and task.train["label"][:] == [2, 1, 0]


def test_csv_with_int_ids_in_a_label_column_loads_them_as_ints(tmp_path, cache_dir):
    path = _write_csv(tmp_path / "train.csv", [("a", "1"), ("b", "0")])
    task = _load(path, cache_dir)
    assert task.train["label"][:] == [1, 0] and task.train.features["label"].dtype == "int64"


def test_jsonl_with_string_names_in_a_label_column_maps_them_to_int_ids(tmp_path, cache_dir):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    task = _load(str(tmp_path / "train.jsonl"), cache_dir)
    assert task.train["label"][:] == [1, 0] and task.train.features["label"].dtype == "int64"


@pytest.mark.parametrize(
    ("rows", "shown", "fix"),
    [
        ([("a", "pos"), ("b", "meh"), ("c", "meh")], "2 row(s) have a label outside label_names: 'meh';", "add"),
        ([("a", "pos"), ("b", "")], "1 row(s) have a label outside label_names: <empty>;", "empty label"),
    ],
    ids=["unknown_name", "empty_cell"],
)
def test_bad_string_label_in_a_csv_names_file_column_value_names_and_fix(tmp_path, cache_dir, rows, shown, fix):
    path = _write_csv(tmp_path / "train.csv", rows)
    with pytest.raises(ValueError) as info:
        _load(path, cache_dir)
    message = str(info.value)
    assert f"task 't': file {path!r}, column 'label': {shown}" in message
    assert "allowed are the names label_names=['neg', 'pos']" in message
    assert "fix: " in message and fix in message


def test_many_bad_labels_show_only_the_first_few(tmp_path, cache_dir):
    path = _write_csv(tmp_path / "train.csv", [("a", "pos")] + [(f"t{i}", f"bad{i}") for i in range(7)])
    shown = r"7 row\(s\) .*: 'bad0', 'bad1', 'bad2', 'bad3', 'bad4' \(first 5 of 7 distinct\);"
    with pytest.raises(ValueError, match=shown):
        _load(path, cache_dir)


def test_empty_cell_is_not_taken_for_a_label_name_when_names_are_inferred(tmp_path, cache_dir):
    path = _write_csv(tmp_path / "train.csv", [("a", "pos"), ("b", "")])
    with pytest.raises(ValueError, match=r"<empty>; allowed are the names label_names=\['pos'\]"):
        _load(path, cache_dir, None)


@pytest.mark.parametrize(
    ("rows", "shown"),
    [([("a", "1"), ("b", "")], "<empty>"), ([("a", "1"), ("b", "2")], "2")],
    ids=["empty_cell", "id_out_of_range"],
)
def test_bad_int_label_in_a_csv_names_file_value_and_allowed_ids(tmp_path, cache_dir, rows, shown):
    path = _write_csv(tmp_path / "train.csv", rows)
    with pytest.raises(ValueError) as info:
        _load(path, cache_dir)
    message = str(info.value)
    assert f"file {path!r}, column 'label': 1 row(s) have a label outside label_names: {shown}" in message
    assert "allowed are the ids 0..1 (label_names=['neg', 'pos'])" in message and "fix: " in message


@pytest.mark.parametrize("value", ["meh", None], ids=["unknown_name", "null"])
def test_bad_label_in_a_jsonl_names_the_file_and_the_value(tmp_path, cache_dir, value):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": value}])
    path = str(tmp_path / "train.jsonl")
    shown = "<empty>" if value is None else repr(value)
    with pytest.raises(ValueError, match=rf"file '.*train\.jsonl', column 'label': 1 row\(s\) .*: {shown};"):
        _load(path, cache_dir)


def test_bad_label_in_the_test_file_names_that_file(tmp_path, cache_dir):
    train = _write_csv(tmp_path / "train.csv", [("a", "pos"), ("b", "neg")])
    test = _write_csv(tmp_path / "test.csv", [("c", "Pos")])
    spec = {"name": "t", "data_files": {"train": train, "test": test}, "source": "csv", "label_names": NAMES}
    with pytest.raises(ValueError, match=r"test\.csv', column 'label': 1 row\(s\) .*'Pos'"):
        load_task(spec, cache_dir=cache_dir)


def test_test_file_without_the_label_column_reports_its_labels_as_empty(tmp_path, cache_dir):
    train = _write_csv(tmp_path / "train.csv", [("a", "pos"), ("b", "neg")])
    (tmp_path / "test.csv").write_text("text\nc\n", encoding="utf-8")
    spec = {"name": "t", "source": "csv", "data_files": {"train": train, "test": str(tmp_path / "test.csv")}}
    with pytest.raises(ValueError, match=r"test\.csv', column 'label': 1 row\(s\) .*<empty>.*fix: fill in"):
        load_task(spec, cache_dir=cache_dir)


def test_split_without_the_label_column_is_named():
    ds = datasets.Dataset.from_dict({"text": ["a"]})
    with pytest.raises(ValueError, match=r"task 't': dataset 'x' split 'test' has no label column 'label'.*fix: "):
        check_label_column("t", "dataset 'x' split 'test'", "label", ds, NAMES, None)


def test_an_all_minus_one_split_counts_as_unlabelled_and_a_partly_minus_one_split_is_rejected():
    unlabelled = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [-1, -1]})
    assert check_label_column("t", "split 'test'", "label", unlabelled, NAMES, None) is False
    partly = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [-1, 0]})
    with pytest.raises(ValueError, match=r"1 row\(s\) have a label outside label_names: -1;"):
        check_label_column("t", "split 'test'", "label", partly, NAMES, None)
