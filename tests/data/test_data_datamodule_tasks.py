from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from atlas_pl.data import FederatedDataModule
from tests.data.helpers import write_jsonl

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")


@pytest.fixture(scope="module")
def task_dm(data_dir, cache_dir):
    """Five clients over three fixture tasks in two groups (sentiment x2, nli), Dirichlet label skew."""
    dm = FederatedDataModule(
        num_clients=5, tasks=["senti_a", "senti_b", "nli_c"], data_dir=str(data_dir), cache_dir=cache_dir,
        partition="dirichlet", dirichlet_alpha=1.0, batch_size=4, local_steps=2, max_length=32, seed=2,
        max_eval_examples_per_client=8,
    )  # fmt: skip
    dm.setup()
    return dm


def test_clients_get_tasks_round_robin_with_task_infos(task_dm):
    dm = task_dm
    assert dm.client_task_ids == [0, 1, 2, 0, 1]
    assert dm.client_tasks == ["senti_a", "senti_b", "nli_c", "senti_a", "senti_b"]
    assert dm.client_groups == ["sentiment", "sentiment", "nli", "sentiment", "sentiment"]
    assert [(t.name, t.group, t.num_labels) for t in dm.tasks] == [
        ("senti_a", "sentiment", 2), ("senti_b", "sentiment", 2), ("nli_c", "nli", 3)]  # fmt: skip
    assert dm.tasks[2].label_words == [" entailment", " contradiction", " neutral"] and dm.num_labels == 3
    assert dm.pad_id == dm.tokenizer.pad_token_id


def test_each_task_pool_is_used_exactly_once(task_dm):
    dm = task_dm
    for t, size in ((0, 60), (1, 40), (2, 45)):
        clients = [c for c, tid in enumerate(dm.client_task_ids) if tid == t]
        rows = [tuple(x["input_ids"]) for c in clients for x in dm.train_datasets[c] + dm.val_datasets[c]]
        assert len(rows) == len(set(rows)) == size
        assert sum(dm.num_examples[c] + dm.num_val_examples[c] for c in clients) == size


def test_test_shares_are_disjoint_capped_and_fall_back_to_validation(task_dm):
    dm = task_dm
    assert dm.num_test_examples == [8, 6, 8, 8, 6]  # senti_a test 20 -> 10 each, capped at 8; nli_c: validation 9
    a = {tuple(x["input_ids"]) for x in dm.test_datasets[0]}
    b = {tuple(x["input_ids"]) for x in dm.test_datasets[3]}
    assert not a & b


def test_batches_carry_the_contract_keys(task_dm):
    dm = task_dm
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for b in loader:
            assert set(b) == {"input_ids", "attention_mask", "labels", "label", "client_idx", "task_id"}
            assert isinstance(b["client_idx"], int) and b["task_id"] == dm.client_task_ids[b["client_idx"]]
            assert b["labels"].shape == b["input_ids"].shape and b["label"].dtype == torch.long
            answers = [row[m != -100].tolist() for row, m in zip(b["input_ids"], b["labels"])]
            assert answers == [dm.verbalizer_ids[b["task_id"]][y] for y in b["label"].tolist()]


def test_pair_task_prompt_holds_both_texts(task_dm):
    x = task_dm.train_datasets[2][0]
    text = task_dm.tokenizer.decode(x["input_ids"])
    assert "\npair " in text and text.endswith(task_dm.tasks[2].label_words[x["label"]] + "<|endoftext|>")


def test_partition_table_is_saved_as_csv_and_json(task_dm, tmp_path):
    rows = task_dm.partition_table()
    assert rows[2]["kind"] == "classification" and sum(rows[2]["label_hist"]) == rows[2]["num_train"]
    csv_path, json_path = task_dm.save_partition(str(tmp_path / "partition.json"))
    assert json.loads(open(json_path).read()) == rows
    lines = open(csv_path).read().splitlines()
    assert lines[0].startswith("client_idx,task,task_id,group,kind,num_train") and len(lines) == 6


def test_dict_specs_and_explicit_clients_per_task(data_dir, cache_dir):
    dm = FederatedDataModule(
        num_clients=3, tasks=[{"name": "senti_a", "label_words": [" yes", " no"]}, "nli_c"], data_dir=str(data_dir),
        cache_dir=cache_dir, clients_per_task=[2, 1], quantity_skew=1.0, max_examples_per_client=20, batch_size=4,
    )  # fmt: skip
    dm.setup()
    assert sorted(dm.client_tasks) == ["nli_c", "senti_a", "senti_a"]
    assert dm.verbalizer_ids[0] == [[3763, 50256], [645, 50256]]
    assert all(n + v <= 20 for n, v in zip(dm.num_examples, dm.num_val_examples))


def test_generative_task_batches_carry_targets(tmp_path, cache_dir):
    rows = [{"context": f"c {i}", "question": f"q {i}", "answer": f"a {i}"} for i in range(8)]
    write_jsonl(tmp_path / "qa.jsonl", rows)
    dm = FederatedDataModule(
        num_clients=2, tasks=[{"name": "qa", "kind": "qa", "path": str(tmp_path / "qa.jsonl")}], cache_dir=cache_dir,
        batch_size=2, local_steps=1,
    )  # fmt: skip
    b = next(iter(dm.train_dataloader()))
    assert b["label"].tolist() == [-1, -1] and len(b["targets"]) == 2 and b["targets"][0].startswith("a ")
    assert dm.verbalizer_ids == [[]] and dm.tasks[0].num_labels == 0 and dm.num_test_examples == [0, 0]


def test_generative_tasks_need_causal_lm():
    with pytest.raises(ValueError, match="causal_lm"):
        FederatedDataModule(task_format="classification", tasks=[{"name": "qa", "kind": "qa", "path": "x.jsonl"}])


def test_synthetic_tasks_expose_tasks_and_verbalizer_ids(small_datamodule):
    dm = small_datamodule
    assert [t.name for t in dm.tasks] == ["sentiment_0", "topic_0"] and dm.client_task_ids == [0, 1, 0, 1, 0]
    assert dm.verbalizer_ids[0] == [[3967, 50256], [4633, 50256]]
    assert dm.train_datasets[1][0]["task_id"] == 1
    assert len(list(dm.test_dataloader())) == len(list(dm.val_dataloader()))


def test_synthetic_entry_goes_through_the_partitioner():
    dm = FederatedDataModule(num_clients=4, num_groups=1, tasks_per_group=2, tasks=["synthetic"], partition="dirichlet",
                             examples_per_client=20, batch_size=4)  # fmt: skip
    dm.setup()
    assert dm.client_tasks == ["sentiment_0", "sentiment_1", "sentiment_0", "sentiment_1"]
    assert dm.num_test_examples == [4, 4, 4, 4]  # synthetic validation split dealt among the task's 2 clients


def test_jsonargparse_builds_the_datamodule_from_yaml_dict_specs(data_dir, cache_dir):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(FederatedDataModule, "data")
    cfg = parser.parse_string(
        f"data:\n  num_clients: 3\n  data_dir: {data_dir}\n  cache_dir: {cache_dir}\n  partition: dirichlet\n"
        '  tasks:\n  - senti_b\n  - name: nli_c\n    template: "P: {text} H: {text_pair}\\nAnswer:"\n'
    )
    dm = parser.instantiate_classes(cfg).data
    dm.setup()
    assert dm.client_tasks == ["senti_b", "nli_c", "senti_b"]
    assert dm.tokenizer.decode(dm.train_datasets[1][0]["input_ids"]).startswith("P: ")


def test_unknown_task_name_in_data_dir_is_a_clear_error(data_dir):
    dm = FederatedDataModule(num_clients=2, tasks=["senti_a", "sst9"], data_dir=str(data_dir))
    with pytest.raises(FileNotFoundError, match="sst9"):
        dm.setup()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(SHARED), reason="shared data folder not present")
def test_real_tasks_from_the_shared_data_folder(tmp_path):
    dm = FederatedDataModule(
        num_clients=6, tasks=["sst2", "rte", {"name": "ag_news", "max_train_examples": 400}], data_dir=SHARED,
        partition="dirichlet", dirichlet_alpha=0.5, max_examples_per_client=100, max_eval_examples_per_client=20,
        cache_dir=str(tmp_path), max_length=64,
    )  # fmt: skip
    dm.setup()
    assert dm.client_groups == ["sentiment", "nli", "topic"] * 2 and dm.tasks[2].num_labels == 4
    assert all(0 < n <= 100 for n in dm.num_examples) and dm.num_test_examples == [20] * 6
    b = next(iter(dm.test_dataloader()))
    assert b["input_ids"].shape[1] <= 64 and np.all(b["label"].numpy() >= 0)
