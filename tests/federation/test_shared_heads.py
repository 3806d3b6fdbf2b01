"""``heads: per_label_words``: classification tasks with the same label words share one head, one output per word.

A task whose label words are swapped (the same texts, the opposite word) then targets the *other* output of the
shared head for the same text — the conflict a single shared model cannot fit, which per-task heads would hide.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from atlas_pl.callbacks import ClusterAggregation
from atlas_pl.data import FederatedDataModule
from atlas_pl.data.tasks import TaskInfo, head_ids
from atlas_pl.federation import Federation
from tests.conftest import tiny_federation_kwargs
from tests.data.helpers import write_task_folder


@pytest.fixture
def task_dir(tmp_path):
    write_task_folder(tmp_path, "senti", "sentiment", ["negative", "positive"], {"train": 48, "test": 16})
    write_task_folder(tmp_path, "nli", "nli", ["entailment", "contradiction", "neutral"], {"train": 48, "test": 16})
    return tmp_path


def _tasks(task_dir) -> list:
    flipped = {"name": "senti_flipped", "path": str(task_dir / "senti"), "label_words": [" positive", " negative"]}
    return ["senti", flipped, "nli"]


def _data(task_dir, heads: str, **kw) -> FederatedDataModule:
    kwargs = dict(num_clients=3, task_format="classification", tasks=_tasks(task_dir), data_dir=str(task_dir),
                  heads=heads, batch_size=8, local_steps=2, max_length=32, seed=0)  # fmt: skip
    kwargs.update(kw)
    return FederatedDataModule(**kwargs)


def _federation(num_clients: int) -> Federation:
    tiny_bert = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_labels": 2}
    return Federation(**tiny_federation_kwargs(model="bert-tiny", task_format="classification", share="none",
                                               num_clients=num_clients, model_overrides=tiny_bert))  # fmt: skip


def _by_text(dataset: list[dict], tokenizer) -> dict[str, int]:
    return {tokenizer.decode(r["input_ids"], skip_special_tokens=True): int(r["label"]) for r in dataset}


def test_swapped_label_words_share_the_head_and_target_the_other_output_for_the_same_text(task_dir) -> None:
    dm = _data(task_dir, "per_label_words", clients_per_task=1, partition="iid")
    dm.setup()
    assert dm.task_heads == [0, 0, 2]
    plain, flipped = dm.tasks[0], dm.tasks[1]
    assert plain.label_words == flipped.label_words == [" negative", " positive"]  # classes in word order
    assert plain.label_names == ["negative", "positive"] and flipped.label_names == ["positive", "negative"]
    a, b = _by_text(dm.test_datasets[0], dm.tokenizer), _by_text(dm.test_datasets[1], dm.tokenizer)
    common = set(a) & set(b)
    assert common and all(a[t] == 1 - b[t] for t in common)  # the same text, the other output
    per_task = _data(task_dir, "per_task", clients_per_task=1, partition="iid")
    per_task.setup()
    assert per_task.task_heads == [0, 1, 2]
    assert per_task.tasks[1].label_words == [" positive", " negative"]  # untouched without sharing
    c, d = _by_text(per_task.test_datasets[0], dm.tokenizer), _by_text(per_task.test_datasets[1], dm.tokenizer)
    assert all(c[t] == d[t] for t in set(c) & set(d))  # per-task heads: the label ids are the same


def test_head_ids_group_tasks_by_their_label_words_in_order() -> None:
    def info(name: str, words: list[str]) -> TaskInfo:
        return TaskInfo(name, "g", "classification", [w.strip() for w in words], words)

    tasks = [info("a", [" no", " yes"]), info("b", [" x", " y", " z"]), info("c", [" no", " yes"]),
             TaskInfo("qa", "g", "qa", [], []), info("d", [" yes", " no"])]  # fmt: skip
    assert head_ids(tasks, "per_label_words") == [0, 1, 0, 3, 4]  # "d" unsorted: its own (the datamodule sorts)
    assert head_ids(tasks) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="per_label_words"):
        head_ids(tasks, "shared")
    with pytest.raises(ValueError, match="heads"):
        FederatedDataModule(heads="one")


def test_a_federation_trains_one_head_per_label_space_and_averages_it_across_the_tasks_that_share_it(
    task_dir, fast_trainer_kwargs, seeded
) -> None:
    fed = _federation(3)
    dm = _data(task_dir, "per_label_words", clients_per_task=1, partition="iid")
    L.Trainer(max_epochs=1, callbacks=[ClusterAggregation("fedavg")], **fast_trainer_kwargs).fit(fed, datamodule=dm)
    backbone = fed.backbone
    for i in range(3):
        assert sorted(backbone.heads_of(f"server_{i}")) == [0, 2]  # senti and senti_flipped: one head
    assert backbone.head_of(1) == 0 and backbone.head_state("server_0", 1).keys() == {"weight", "bias"}
    # the flipped task's client reads head 0: the same logits as the plain task for the same input
    batch = next(iter(dm.test_dataloader()))
    ids, mask = batch["input_ids"][:2], batch["attention_mask"][:2]
    fed.eval()  # no dropout
    outs = [backbone(ids, mask, torch.zeros(2, dtype=torch.long), "client_0", "server_0", task_id=t) for t in (0, 1)]
    torch.testing.assert_close(outs[0].loss, outs[1].loss)
    # aggregation averaged head 0 over the senti and senti_flipped clients: every server adapter holds the same head
    heads = [backbone.head_state(f"server_{i}", 0) for i in range(3)]
    for h in heads[1:]:
        torch.testing.assert_close(h["weight"], heads[0]["weight"])


def test_heads_that_do_not_point_at_an_earlier_task_of_the_same_size_are_refused(fast_trainer_kwargs) -> None:
    fed = _federation(2)
    with pytest.raises(ValueError, match="earlier"):
        fed.backbone.configure_tasks([2, 3], heads=[0, 0])
    with pytest.raises(ValueError, match="earlier"):
        fed.backbone.configure_tasks([2, 2], heads=[1, 1])
    fed.backbone.configure_tasks([2, 2], heads=[0, 0])
    assert fed.backbone.head_of(1) == 0
