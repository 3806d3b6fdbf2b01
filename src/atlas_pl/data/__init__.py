"""Federated data: offline tokenizers, grouped synthetic tasks, encoders, client/round samplers, DataModule."""

from atlas_pl.data.datamodule import FederatedDataModule
from atlas_pl.data.formats import PROMPT_TEMPLATE, collate, encode_causal_lm, encode_classification
from atlas_pl.data.sampling import ClientChunkBatchSampler, RoundBatchSampler, sample_clients
from atlas_pl.data.synthetic import GROUPS, Example, Task, make_synthetic_tasks
from atlas_pl.data.tokenizers import load_tokenizer

__all__ = [
    "GROUPS",
    "PROMPT_TEMPLATE",
    "ClientChunkBatchSampler",
    "Example",
    "FederatedDataModule",
    "RoundBatchSampler",
    "Task",
    "collate",
    "encode_causal_lm",
    "encode_classification",
    "load_tokenizer",
    "make_synthetic_tasks",
    "sample_clients",
]
