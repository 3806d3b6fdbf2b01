"""Fixtures shared by the data tests."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from atlas_pl.data import FederatedDataModule, load_tokenizer


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
