"""Federated data: task sources, prompt formats, client partitioning, round samplers and the DataModule."""

from atlas_pl.data.datamodule import FederatedDataModule
from atlas_pl.data.encoding import encode_split, verbalizer_ids
from atlas_pl.data.formats import (
    PROMPT_TEMPLATE,
    answer_ids,
    collate,
    encode_causal_lm,
    encode_classification,
    render_prompt,
)
from atlas_pl.data.partition import assign_clients, label_entropy, split_eval, split_task
from atlas_pl.data.sampling import ClientChunkBatchSampler, RoundBatchSampler, sample_clients
from atlas_pl.data.sources import available_tasks, load_task, load_tasks
from atlas_pl.data.synthetic import GROUPS, Example, SyntheticTask, make_synthetic_tasks
from atlas_pl.data.tasks import DEFAULT_TEMPLATES, Task, TaskInfo, TaskSpec
from atlas_pl.data.tokenizers import load_tokenizer

__all__ = [
    "ClientChunkBatchSampler",
    "DEFAULT_TEMPLATES",
    "Example",
    "FederatedDataModule",
    "GROUPS",
    "PROMPT_TEMPLATE",
    "RoundBatchSampler",
    "SyntheticTask",
    "Task",
    "TaskInfo",
    "TaskSpec",
    "answer_ids",
    "assign_clients",
    "available_tasks",
    "collate",
    "encode_causal_lm",
    "encode_classification",
    "encode_split",
    "label_entropy",
    "load_task",
    "load_tasks",
    "load_tokenizer",
    "make_synthetic_tasks",
    "render_prompt",
    "sample_clients",
    "split_eval",
    "split_task",
    "verbalizer_ids",
]
