"""Task-aware evaluation of split clients: label-word scoring, generation, per-client/task/cluster metrics.

``FederatedEvaluator`` is what ``Federation`` runs in validation and test: for each batch (one client, one task) it
computes the teacher-forced loss, then the task's score — classification by the log-likelihood of each label word
(causal LMs, so label spaces of different tasks coexist in one model) or the task head's argmax (encoders), and
generated text scored by SQuAD F1 / ROUGE-L for QA / summarization — and rolls the results up per client, per task,
per cluster and overall.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from atlas_pl.client import SplitClient
from atlas_pl.metrics import PRIMARY, PerClientMean, TaskKind, TaskMetrics, example_scores
from atlas_pl.split.scoring import ScoreNorm, answer_starts, greedy_generate, score_label_words

Scoring = Literal["label_words", "label_first_token", "first_token"]


@dataclass
class TaskInfo:
    """What evaluation needs to know about a task (the datamodule provides one per task id)."""

    name: str
    kind: TaskKind = "classification"
    num_labels: int = 2
    group: str = ""
    label_ids: list[list[int]] = field(default_factory=list)  # causal LM: answer token ids per label (incl. EOS)


def tasks_from_datamodule(dm: Any) -> list[TaskInfo]:
    """``TaskInfo`` per task id from a datamodule exposing ``tasks`` (and ``verbalizer_ids`` for causal LMs)."""
    verbalizers = list(getattr(dm, "verbalizer_ids", []) or [])
    out = []
    for t, task in enumerate(getattr(dm, "tasks", []) or []):
        out.append(
            TaskInfo(
                name=str(task.name),
                kind=getattr(task, "kind", "classification"),
                num_labels=int(getattr(task, "num_labels", 0) or 0),
                group=str(getattr(task, "group", "")),
                label_ids=[list(ids) for ids in verbalizers[t]] if t < len(verbalizers) else [],
            )
        )
    return out


class FederatedEvaluator(nn.Module):
    """Evaluation state of a federation: loss, accuracy and primary score per client, torchmetrics per task.

    Args:
        num_clients: Number of clients.
        tasks: Task descriptions (index = ``task_id`` of the batches); ``None`` = one anonymous classification task
            scored by ``ServerOutput.correct``.
        scoring: Causal-LM classification: ``label_words`` compares the log-likelihood of each label's answer tokens
            (one extra forward pass per label); ``label_first_token`` compares the label words' first tokens at the
            first answer position (free: the loss pass computes those logits; falls back to ``label_words`` when two
            labels share a first token); ``first_token`` takes the argmax over the whole vocabulary (strictest).
        score_norm: ``sum`` or ``mean`` of a label word's token log-probabilities.
        max_new_tokens: Generation length for QA and summarization tasks.
        eos_token_id: EOS token that stops generation.
        decode: Turns generated token ids into text (the tokenizer's ``decode``).
    """

    def __init__(
        self,
        num_clients: int,
        tasks: list[TaskInfo] | None = None,
        scoring: Scoring = "label_words",
        score_norm: ScoreNorm = "sum",
        max_new_tokens: int = 32,
        eos_token_id: int | None = None,
        decode: Any = None,
    ) -> None:
        super().__init__()
        if scoring not in ("label_words", "label_first_token", "first_token"):
            raise ValueError(f"`scoring` must be 'label_words', 'label_first_token' or 'first_token', got {scoring!r}")
        self.tasks = list(tasks or [])
        self.scoring, self.score_norm, self.max_new_tokens = scoring, score_norm, max_new_tokens
        self.eos_token_id, self.decode = eos_token_id, decode
        self.loss = PerClientMean(num_clients)
        self.acc = PerClientMean(num_clients)
        self.score = PerClientMean(num_clients)
        self.task_metrics: TaskMetrics | None = None
        if self.tasks:
            self.task_metrics = TaskMetrics(
                [t.kind for t in self.tasks], [max(t.num_labels, 2) for t in self.tasks], [t.name for t in self.tasks]
            )

    def reset(self) -> None:
        for metric in (self.loss, self.acc, self.score):
            metric.reset()
        if self.task_metrics is not None:
            self.task_metrics.reset()

    # ------------------------------------------------------------------------------------------ one batch
    @torch.no_grad()
    def update(self, client: SplitClient, batch: dict) -> None:
        """Evaluate one batch of one client and accumulate its metrics."""
        idx = int(batch["client_idx"])
        out = client.evaluate(batch)
        self.loss.update(out.loss, idx, out.num_targets)
        task_id = int(batch.get("task_id", 0))
        task = self.tasks[task_id] if task_id < len(self.tasks) else None
        if task is None:
            self._update_correct(idx, out.correct)
            return
        if task.kind != "classification":
            self._update_generated(client, batch, idx, task_id, task)
            return
        pred = self._predict_class(client, batch, task, out.pred, out.first_logits)
        target = batch["label"] if "label" in batch else batch["labels"]
        if pred is None:  # first-token scoring: correctness only
            self._update_correct(idx, out.correct)
            return
        self._update_correct(idx, pred == target)
        assert self.task_metrics is not None
        self.task_metrics.update_classes(task_id, pred, target)

    def _update_correct(self, idx: int, correct: torch.Tensor) -> None:
        value = correct.float().mean()
        self.acc.update(value, idx, correct.numel())
        self.score.update(value, idx, correct.numel())

    def _predict_class(
        self,
        client: SplitClient,
        batch: dict,
        task: TaskInfo,
        head_pred: torch.Tensor | None,
        first_logits: torch.Tensor | None,
    ) -> torch.Tensor | None:
        if head_pred is not None:  # encoder: the task head's argmax
            return head_pred
        if self.scoring == "first_token" or not task.label_ids:
            return None
        firsts = [ids[0] for ids in task.label_ids]
        if self.scoring == "label_first_token" and first_logits is not None and len(set(firsts)) == len(firsts):
            return first_logits[:, firsts].argmax(dim=1)
        scores = score_label_words(
            client.split,
            batch["input_ids"],
            batch["labels"],
            task.label_ids,
            client.client_adapter,
            client.server_adapter,
            norm=self.score_norm,
        )
        return scores.argmax(dim=1)

    def _update_generated(self, client: SplitClient, batch: dict, idx: int, task_id: int, task: TaskInfo) -> None:
        if self.decode is None:
            raise ValueError("generative tasks need a tokenizer to decode; pass `decode` to FederatedEvaluator")
        starts = answer_starts(batch["labels"]).tolist()
        prompts = [batch["input_ids"][b, :s].tolist() for b, s in enumerate(starts)]
        generated = greedy_generate(
            client.split,
            prompts,
            self.max_new_tokens,
            self.eos_token_id,
            client.client_adapter,
            client.server_adapter,
        )
        preds = [str(self.decode(ids, skip_special_tokens=True)).strip() for ids in generated]
        targets = list(batch["targets"])
        scores = torch.tensor(example_scores(task.kind, preds, targets))
        self.score.update(scores.mean(), idx, len(preds))
        assert self.task_metrics is not None
        self.task_metrics.update_text(task_id, preds, targets)

    # ------------------------------------------------------------------------------------------ roll-up
    def compute(self, prefix: str, cluster_ids: list[int]) -> dict[str, float]:
        """Metrics per client, per cluster, per task and overall, keyed ``<prefix>_<metric>/<scope>``."""
        metrics: dict[str, float] = {}
        for name, metric in (("loss", self.loss), ("acc", self.acc), ("score", self.score)):
            seen = metric.seen()
            if not bool(seen.any()):
                continue
            values = metric.per_client()
            for i in range(len(cluster_ids)):
                if seen[i]:
                    metrics[f"{prefix}_{name}/client_{i:03d}"] = float(values[i])
            for k, v in metric.grouped(cluster_ids).items():
                metrics[f"{prefix}_{name}/cluster_{k}"] = v
            metrics[f"{prefix}_{name}"] = metric.overall()
        if self.task_metrics is not None:
            per_task = self.task_metrics.compute()
            metrics.update({f"{prefix}_task/{k}": v for k, v in per_task.items()})
            keys = [f"{t.name}/{PRIMARY[t.kind]}" for t in self.tasks]
            primary = [per_task[k] for k in keys if k in per_task]
            if primary:
                metrics[f"{prefix}_score_task_mean"] = sum(primary) / len(primary)
        return metrics
