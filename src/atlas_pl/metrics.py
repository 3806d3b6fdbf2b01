"""Evaluation metrics: per-client means with cluster roll-ups, and torchmetrics per task.

Per-client means are synchronised across processes; per-task collections hold accuracy / macro-F1, exact match / F1
and ROUGE-L.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Literal, cast

import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.functional.text import rouge_score, squad
from torchmetrics.text import ROUGEScore, SQuAD

from atlas_pl.distributed import gather_objects, is_distributed


@contextmanager
def synced(*metrics: Metric) -> Iterator[None]:
    """Inside the block, ``metrics`` hold the states of every process (summed); outside, each its own again.

    A no-op in one process. :class:`PerClientMean`'s read-outs (``per_client``, ``grouped``, ``overall``) read the
    raw states, so a sharded federation reads them inside this block. Every process must enter it.
    """
    with ExitStack() as stack:
        if is_distributed():
            for metric in metrics:
                stack.enter_context(metric.sync_context(should_sync=True))
        yield


class PerClientMean(Metric):
    """Weighted mean of a value per client; ``compute()`` returns ``[num_clients]`` (NaN where a client had no data).

    Args:
        num_clients: Number of clients (length of the state vectors).
    """

    full_state_update = False
    total: torch.Tensor
    weight: torch.Tensor

    def __init__(self, num_clients: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_clients = num_clients
        self.add_state("total", default=torch.zeros(num_clients, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.zeros(num_clients, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, client_idx: int, weight: float = 1.0) -> None:  # type: ignore[override]
        self.total[client_idx] += value.detach().to(torch.float64) * weight
        self.weight[client_idx] += weight

    def compute(self) -> torch.Tensor:
        return self.total / self.weight

    def per_client(self) -> torch.Tensor:
        """``[num_clients]`` means (NaN where no data); unlike ``compute()`` never squeezed to a scalar."""
        return self.total / self.weight

    def seen(self) -> torch.Tensor:
        """Bool mask of clients that received at least one update."""
        return self.weight > 0

    def grouped(self, groups: list[int]) -> dict[int, float]:
        """Weighted mean per group id (e.g. cluster), over the clients that had data."""
        out: dict[int, float] = {}
        ids = torch.tensor(groups, device=self.total.device)
        for g in sorted(set(groups)):
            sel = ids == g
            w = self.weight[sel].sum()
            if w > 0:
                out[g] = float(self.total[sel].sum() / w)
        return out

    def overall(self) -> float:
        w = self.weight.sum()
        return float(self.total.sum() / w) if w > 0 else float("nan")


TaskKind = Literal["classification", "qa", "summarization"]
PRIMARY = {"classification": "acc", "qa": "f1", "summarization": "rougeL"}
"""The per-example score each task kind is judged by (per client and per cluster roll-ups use it)."""


References = str | Sequence[str]
"""One reference text, or every reference of one example (scored by the best match)."""


def _refs(value: References) -> list[str]:
    out = [value] if isinstance(value, str) else [str(v) for v in value]
    if not out:
        raise ValueError("an example has no reference text; fix: give every generative example at least one")
    return out


def example_scores(kind: TaskKind, preds: list[str], references: Sequence[References]) -> list[float]:
    """Per-example primary score of generated text in ``[0, 1]``, the best over each example's references.

    ``qa``: SQuAD F1 (answers normalized: lower case, no punctuation or articles; the maximum over the gold answers,
    as the official SQuAD script). ``summarization``: ROUGE-L F-measure against the reference it matches best.
    """
    if kind == "qa":
        return [_squad_f1(p, _refs(r)) for p, r in zip(preds, references)]
    if kind == "summarization":
        return [
            float(rouge_score(p, [_refs(r)], rouge_keys="rougeL")["rougeL_fmeasure"]) for p, r in zip(preds, references)
        ]
    raise ValueError(f"`kind` must be 'qa' or 'summarization' for generated text, got {kind!r}")


def _squad_f1(pred: str, answers: list[str]) -> float:
    return float(squad([_squad_pred(pred, "0")], [_squad_target(answers, "0")])["f1"]) / 100.0


def _squad_pred(text: str, idx: str) -> dict[str, str]:
    return {"prediction_text": text, "id": idx}


def _squad_target(answers: References, idx: str) -> dict[str, Any]:
    texts = _refs(answers)
    return {"answers": {"answer_start": [0] * len(texts), "text": texts}, "id": idx}


class TaskMetrics(nn.Module):
    """torchmetrics per task: accuracy and macro-F1 (classification), exact match and F1 (QA), ROUGE-L (summaries).

    Args:
        kinds: Kind of each task (index = task id).
        num_labels: Number of labels of each task (ignored for generative tasks).
        names: Task names used as metric keys.
    """

    def __init__(self, kinds: list[TaskKind], num_labels: list[int], names: list[str]) -> None:
        super().__init__()
        if not (len(kinds) == len(num_labels) == len(names)):
            raise ValueError("`kinds`, `num_labels` and `names` must have one entry per task")
        self.kinds, self.names = list(kinds), list(names)
        self.per_task = nn.ModuleList(_collection(k, n) for k, n in zip(kinds, num_labels))

    def collection(self, task_id: int) -> MetricCollection:
        """The metric collection of task ``task_id``."""
        return cast(MetricCollection, self.per_task[task_id])

    def update_classes(self, task_id: int, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.collection(task_id).update(preds, target)

    def update_text(self, task_id: int, preds: list[str], references: Sequence[References]) -> None:
        """Score generated texts against their reference(s): the best over an example's references counts."""
        collection = self.collection(task_id)
        if self.kinds[task_id] == "qa":
            ids = [str(i) for i in range(len(preds))]
            collection.update(
                [_squad_pred(p, i) for p, i in zip(preds, ids)], [_squad_target(r, i) for r, i in zip(references, ids)]
            )
        else:
            collection.update(preds, [_refs(r) for r in references])

    def compute(self) -> dict[str, float]:
        """``{"<task>/<metric>": value}`` for every task that received data (scores in ``[0, 1]``)."""
        out: dict[str, float] = {}
        # under several processes a task counts if any process saw it (compute() is a collective for all of them)
        updated = [any(flags) for flags in zip(*gather_objects([_has_updates(self.collection(t)) for t in
                                                                range(len(self.names))]))]  # fmt: skip
        for t, (name, kind) in enumerate(zip(self.names, self.kinds)):
            collection = self.collection(t)
            if not updated[t]:
                continue
            with warnings.catch_warnings():  # a process that saw none of this task's clients joins the sum with zeros
                warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method")
                computed = collection.compute()
            for key, value in computed.items():
                if key.endswith(("_precision", "_recall")):
                    continue
                scale = 100.0 if kind == "qa" else 1.0
                out[f"{name}/{_KEY.get(key, key)}"] = float(value) / scale
        return out

    def reset(self) -> None:
        for t in range(len(self.names)):
            self.collection(t).reset()


_KEY = {"exact_match": "em", "rougeL_fmeasure": "rougeL", "rouge1_fmeasure": "rouge1", "rouge2_fmeasure": "rouge2"}


def _collection(kind: TaskKind, num_labels: int) -> MetricCollection:
    if kind == "classification":
        return MetricCollection(
            {
                "acc": MulticlassAccuracy(num_labels, average="micro"),
                "macro_f1": MulticlassF1Score(num_labels, average="macro"),
            }
        )
    if kind == "qa":
        return MetricCollection({"squad": SQuAD()}, compute_groups=False)
    if kind == "summarization":
        return MetricCollection({"rouge": ROUGEScore(rouge_keys=("rouge1", "rouge2", "rougeL"))}, compute_groups=False)
    raise ValueError(f"unknown task kind {kind!r}; use 'classification', 'qa' or 'summarization'")


def _has_updates(collection: MetricCollection) -> bool:
    return any(getattr(m, "_update_count", 0) > 0 for m in collection.values())
