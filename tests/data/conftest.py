"""Fixtures shared by the data tests."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from atlas_pl.data import FederatedDataModule, load_tokenizer
from tests.data.helpers import write_task_folder


@pytest.fixture(scope="session")
def gpt2_tokenizer() -> PreTrainedTokenizerBase:
    return load_tokenizer("gpt2-offline")


@pytest.fixture(scope="session")
def small_datamodule() -> FederatedDataModule:
    """Five clients over two tasks (2 groups x 1 task), so clients 0/2/4 and 1/3 share a task."""
    dm = FederatedDataModule(
        num_clients=5, num_groups=2, tasks_per_group=1, examples_per_client=30, batch_size=4, local_steps=3, seed=1
    )
    dm.setup()
    return dm


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Three tasks in two groups: two sentiment tasks and one sentence-pair NLI task without a test split."""
    root = tmp_path_factory.mktemp("tasks")
    write_task_folder(
        root, "senti_a", "sentiment", ["positive", "negative"], {"train": 60, "validation": 10, "test": 20}
    )
    write_task_folder(root, "senti_b", "sentiment", ["positive", "negative"], {"train": 40, "test": 12})
    write_task_folder(
        root, "nli_c", "nli", ["entailment", "contradiction", "neutral"], {"train": 45, "validation": 9}, pair=True
    )
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_cache"))
