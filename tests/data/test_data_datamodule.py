from __future__ import annotations

import inspect
import json
from collections import Counter

import pytest
import torch

from atlas_pl.data import FederatedDataModule, encode_causal_lm, make_synthetic_tasks


def test_setup_assigns_clients_round_robin_and_counts_examples(small_datamodule):
    dm = small_datamodule
    assert dm.client_tasks == ["sentiment_0", "topic_0", "sentiment_0", "topic_0", "sentiment_0"]
    assert dm.client_groups == ["sentiment", "topic", "sentiment", "topic", "sentiment"]
    assert dm.num_examples == [len(d) for d in dm.train_datasets]
    assert all(n > 0 for n in dm.num_examples)
    assert sum(dm.num_examples) == sum(row["num_train"] for row in dm.partition_table())
    assert dm.num_labels == 4 and dm.label_words["sentiment_0"] == [" positive", " negative"]
    assert dm.pad_id == 50256


def test_clients_sharing_a_task_get_disjoint_shares(small_datamodule):
    dm = small_datamodule
    task = make_synthetic_tasks(num_groups=2, tasks_per_group=1, examples_per_task=30 * 3, seed=1)[0]
    expected = Counter(
        tuple(encode_causal_lm(dm.tokenizer, e.text, task.label_words[e.label], dm.max_length)["input_ids"])
        for e in task.train
    )
    shares = [Counter(tuple(x["input_ids"]) for x in dm.train_datasets[c]) for c in (0, 2, 4)]
    # The three shares of sentiment_0 add up exactly to the task's training split: a partition, no overlap.
    assert shares[0] + shares[1] + shares[2] == expected
    assert sum(dm.num_examples[c] for c in (0, 2, 4)) == len(task.train)
    assert {x["client_idx"] for c in (0, 2, 4) for x in dm.train_datasets[c]} == {0, 2, 4}


def test_setup_is_idempotent(small_datamodule):
    before = small_datamodule.train_datasets
    small_datamodule.setup("fit")
    assert small_datamodule.train_datasets is before


def test_train_dataloader_yields_single_client_causal_batches(small_datamodule):
    dm = small_datamodule
    dl = dm.train_dataloader()
    batches = list(dl)
    assert len(batches) == len(dl) == dm.num_clients * dm.local_steps
    b = batches[0]
    assert set(b) == {"input_ids", "attention_mask", "labels", "label", "client_idx", "task_id"}
    assert b["task_id"] == dm.client_task_ids[b["client_idx"]]
    assert b["input_ids"].shape == b["attention_mask"].shape == b["labels"].shape
    assert b["input_ids"].shape[0] == dm.batch_size and b["input_ids"].shape[1] <= dm.max_length
    assert b["label"].shape == (dm.batch_size,)
    assert (b["labels"] != -100).sum(dim=1).tolist() == [2] * dm.batch_size  # answer word + eos
    assert [x["client_idx"] for x in batches] == [c for c in range(dm.num_clients) for _ in range(dm.local_steps)]


def test_val_dataloader_covers_every_client_in_order(small_datamodule):
    dm = small_datamodule
    batches = list(dm.val_dataloader())
    seen = [b["client_idx"] for b in batches]
    assert seen == sorted(seen) and set(seen) == set(range(dm.num_clients))
    assert sum(b["input_ids"].shape[0] for b in batches) == sum(len(d) for d in dm.val_datasets)
    assert len(list(dm.test_dataloader())) == len(batches)


def test_causal_items_keep_label_and_task_for_verbalizer_scoring(small_datamodule):
    item = small_datamodule.val_datasets[1][0]
    assert item["task"] == "topic_0" and 0 <= item["label"] < 4 and item["client_idx"] == 1


def test_classification_format_yields_int_labels():
    dm = FederatedDataModule(
        num_clients=2,
        task_format="classification",
        num_groups=1,
        tasks_per_group=2,
        examples_per_client=20,
        batch_size=3,
        local_steps=1,
    )
    b = next(iter(dm.train_dataloader()))
    assert b["labels"].shape == (3,) and b["labels"].dtype == torch.long


def test_sample_fraction_limits_clients_per_round():
    dm = FederatedDataModule(num_clients=6, examples_per_client=20, batch_size=2, local_steps=2, sample_fraction=0.5)
    dl = dm.train_dataloader()
    assert len(dl) == 3 * 2
    assert len({b["client_idx"] for b in dl}) == 3


def test_constructor_defaults_are_json_serializable():
    defaults = {
        k: p.default for k, p in inspect.signature(FederatedDataModule.__init__).parameters.items() if k != "self"
    }
    json.dumps(defaults)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_clients": 0}, "num_clients"),
        ({"batch_size": 0}, "batch_size"),
        ({"local_steps": 0}, "local_steps"),
        ({"num_groups": 7}, "num_groups"),
        ({"tasks_per_group": 0}, "tasks_per_group"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"sample_fraction": 0.0}, "sample_fraction"),
        ({"task_format": "seq2seq"}, "task_format"),
        ({"prompt_template": "no placeholder"}, "prompt_template"),
        ({"examples_per_client": 1}, "examples_per_client"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_datamodule_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FederatedDataModule(**kwargs)


def test_client_without_train_examples_raises_naming_the_client():
    dm = FederatedDataModule(num_clients=4, num_groups=1, tasks_per_group=1, examples_per_client=3, val_fraction=0.9)
    with pytest.raises(ValueError, match=r"client \d+"):
        dm.setup()


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`")
def test_lightning_fit_advances_the_round_each_epoch_and_follows_sampled_clients():
    import lightning as L

    dm = FederatedDataModule(
        num_clients=6,
        num_groups=2,
        tasks_per_group=1,
        examples_per_client=20,
        batch_size=2,
        local_steps=2,
        sample_fraction=0.5,
        seed=3,
    )

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: dict[int, list[int]] = {}

        def training_step(self, batch, batch_idx):
            self.seen.setdefault(self.current_epoch, []).append(batch["client_idx"])
            return (self.w * batch["input_ids"].float().mean() - 1.0).pow(2)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-6)

    probe = Probe()
    trainer = L.Trainer(
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(probe, datamodule=dm)
    assert len({tuple(dm.round_clients(r)) for r in range(3)}) > 1  # rounds really differ, so the check has teeth
    for epoch in range(3):
        expected = [c for c in dm.round_clients(epoch) for _ in range(dm.local_steps)]
        assert probe.seen[epoch] == expected
