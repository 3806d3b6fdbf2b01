"""Task-aware evaluation of split clients: label-word scoring, generation, per-client/task/cluster metrics.

``FederatedEvaluator`` is what ``Federation`` runs in validation and test: for each batch (one client, one task) it
computes the teacher-forced loss, then the task's score — classification by the log-likelihood of each label word
(causal LMs, so label spaces of different tasks coexist in one model) or the task head's argmax (encoders), and
generated text scored by SQuAD F1 / ROUGE-L for QA / summarization — and rolls the results up per client, per task,
per cluster and overall.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from atlas_pl.client import SplitClient
from atlas_pl.metrics import PRIMARY, PerClientMean, TaskKind, TaskMetrics, example_scores
from atlas_pl.profiling import section
from atlas_pl.split.backbone import ServerOutput
from atlas_pl.split.registry import get_submodule
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
    label_names: list[str] = field(default_factory=list)  # class names in id order (predictions files)


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
                label_names=[str(n) for n in getattr(task, "label_names", []) or []],
            )
        )
    return out


@dataclass
class BatchResult:
    """What evaluating one batch of one client gives (see :meth:`FederatedEvaluator.evaluate`).

    Attributes:
        loss: Teacher-forced mean loss.
        num_targets: Tokens/examples the loss averages over.
        task_id: Task of the batch.
        task: Its description, ``None`` without task information.
        correct: Per-example correctness (classification).
        pred: Predicted class per example (``None`` for first-token scoring and generative tasks).
        probs: ``[B, C]`` class probabilities: softmax over the label words' scores or the head's logits.
        target: Gold class per example.
        tokens: First-token scoring: the argmax token at the first answer position.
        texts: Generated text (QA / summarization).
        targets: Reference text trained on (QA / summarization).
        references: Every reference of each example (the best match scores).
        scores: Per-example SQuAD F1 / ROUGE-L of the generated text.
    """

    loss: torch.Tensor
    num_targets: int
    task_id: int = 0
    task: TaskInfo | None = None
    correct: torch.Tensor | None = None
    pred: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    target: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    texts: list[str] | None = None
    targets: list[str] | None = None
    references: list[list[str]] | None = None
    scores: list[float] | None = None


@contextmanager
def capture_head_logits(client: SplitClient, task_id: int) -> Iterator[list[torch.Tensor]]:
    """Collect the classification logits an encoder's task head computes inside the block (empty for causal LMs)."""
    captured: list[torch.Tensor] = []
    backbone = client.split
    if backbone.task != "classification":
        yield captured
        return
    heads = backbone.heads_of(client.server_adapter)
    key = backbone.head_of(task_id)
    head = heads[key] if key in heads else get_submodule(backbone.model, backbone.arch.head_path)
    handle = head.register_forward_hook(lambda _m, _i, output: captured.append(output.detach()))
    try:
        yield captured
    finally:
        handle.remove()


@dataclass
class EvaluationSpec:
    """How a federation scores its clients (YAML: ``model.evaluation: {scoring: label_first_token}``).

    Args:
        scoring: How causal LMs are scored on classification tasks: ``label_words`` (log-likelihood of each label's
            answer tokens; the label spaces of different tasks coexist), ``label_first_token`` (the label words' first
            tokens at the answer position, free with the loss pass) or ``first_token`` (argmax over the vocabulary).
        score_norm: ``sum`` or ``mean`` of a label word's token log-probabilities.
        max_new_tokens: Tokens generated for QA / summarization tasks (greedy, stopped at EOS).
        max_new_tokens_per_task: Per task name or kind (``qa``, ``summarization``), a limit other than
            ``max_new_tokens`` (a task name wins over its kind), e.g. ``{qa: 16, dialogsum: 48}``.
        generation_batch_size: Prompts generated together (one KV cache per batch; bounds memory).
        text_examples: Generated answers per generative task shown as TensorBoard text each round (0: none).
    """

    scoring: Scoring = "label_words"
    score_norm: ScoreNorm = "sum"
    max_new_tokens: int = 32
    max_new_tokens_per_task: dict[str, int] = field(default_factory=dict)
    generation_batch_size: int = 16
    text_examples: int = 3

    def __post_init__(self) -> None:
        limits = {"max_new_tokens": self.max_new_tokens, **{f"max_new_tokens_per_task[{k!r}]": v
                                                            for k, v in self.max_new_tokens_per_task.items()}}
        for name, value in (*limits.items(), ("generation_batch_size", self.generation_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"evaluation.{name}={value!r}; fix: pass an int >= 1.")
        if isinstance(self.text_examples, bool) or not isinstance(self.text_examples, int) or self.text_examples < 0:
            raise ValueError(f"evaluation.text_examples={self.text_examples!r}; fix: pass an int >= 0 (0: none).")

    def new_tokens(self, task: TaskInfo) -> int:
        """The generation limit of ``task``: its name's entry, else its kind's, else ``max_new_tokens``."""
        per = self.max_new_tokens_per_task
        return int(per.get(task.name, per.get(task.kind, self.max_new_tokens)))


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
        max_new_tokens: Generation length for QA and summarization tasks, or an :class:`EvaluationSpec` whose
            per-task limits, generation batch size and number of text examples are used (``scoring`` and
            ``score_norm`` still come from the arguments).
        eos_token_id: EOS token that stops generation.
        decode: Turns generated token ids into text (the tokenizer's ``decode``).
        pad_token_id: Left-padding id of batched generation (default: EOS).
    """

    def __init__(
        self,
        num_clients: int,
        tasks: list[TaskInfo] | None = None,
        scoring: Scoring = "label_words",
        score_norm: ScoreNorm = "sum",
        max_new_tokens: int | EvaluationSpec = 32,
        eos_token_id: int | None = None,
        decode: Any = None,
        pad_token_id: int | None = None,
    ) -> None:
        super().__init__()
        if scoring not in ("label_words", "label_first_token", "first_token"):
            raise ValueError(f"`scoring` must be 'label_words', 'label_first_token' or 'first_token', got {scoring!r}")
        self.tasks = list(tasks or [])
        spec = max_new_tokens if isinstance(max_new_tokens, EvaluationSpec) else EvaluationSpec(
            max_new_tokens=max_new_tokens)  # fmt: skip
        self.scoring, self.score_norm, self.spec = scoring, score_norm, spec
        self.max_new_tokens = spec.max_new_tokens
        self.eos_token_id, self.decode, self.pad_token_id = eos_token_id, decode, pad_token_id
        self.examples: dict[int, list[dict[str, Any]]] = {}  # task id -> a few generated answers of this epoch
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
        self.examples = {}

    # ------------------------------------------------------------------------------------------ one batch
    @torch.no_grad()
    def evaluate(self, client: SplitClient, batch: dict) -> BatchResult:
        """Loss and per-example predictions of one batch of one client (what :meth:`update` and :meth:`predict` use)."""
        task_id = int(batch.get("task_id", 0))
        task = self.tasks[task_id] if task_id < len(self.tasks) else None
        with capture_head_logits(client, task_id) as captured:
            out = client.evaluate(batch)
        result = BatchResult(out.loss, out.num_targets, task_id, task)
        if task is not None and task.kind != "classification":
            result.texts, result.targets = self._generate(client, batch, task), list(batch["targets"])
            result.references = [list(r) for r in batch.get("references") or [[t] for t in result.targets]]
            result.scores = example_scores(task.kind, result.texts, result.references)
            return result
        result.correct = out.correct
        if task is None:  # no task information: the model's own prediction (encoders), correctness
            result.pred = out.pred
            result.probs = captured[0].float().softmax(dim=-1) if captured else None
            return result
        result.target = batch["label"] if "label" in batch else batch["labels"]
        result.pred, result.probs = self._predict_class(client, batch, task, out, captured)
        if result.pred is None:  # first-token scoring: the argmax token over the vocabulary, correctness only
            assert out.first_logits is not None
            result.tokens = out.first_logits.argmax(dim=1)
        else:
            result.correct = result.pred == result.target
        return result

    def update(self, client: SplitClient, batch: dict) -> None:
        """Evaluate one batch of one client and accumulate its metrics."""
        idx = int(batch["client_idx"])
        result = self.evaluate(client, batch)
        self.loss.update(result.loss, idx, result.num_targets)
        if result.scores is not None:
            self.score.update(torch.tensor(result.scores).mean(), idx, len(result.scores))
            assert self.task_metrics is not None and result.texts is not None and result.references is not None
            self.task_metrics.update_text(result.task_id, result.texts, result.references)
            self._keep_examples(idx, batch, result)
            return
        assert result.correct is not None
        self._update_correct(idx, result.correct)
        if result.pred is not None and result.task is not None:
            assert self.task_metrics is not None and result.target is not None
            self.task_metrics.update_classes(result.task_id, result.pred, result.target)

    def predict(self, client: SplitClient, batch: dict) -> list[dict[str, Any]]:
        """One record per example: task, prediction, label where known, class probabilities or generated text."""
        result = self.evaluate(client, batch)
        task = result.task
        n = len(result.texts) if result.texts is not None else int(batch["input_ids"].shape[0])
        rows: list[dict[str, Any]] = [
            {"task": task.name if task else None, "task_id": result.task_id, "kind": task.kind if task else None}
            for _ in range(n)
        ]
        for b, row in enumerate(rows):
            if result.texts is not None:
                assert result.targets is not None and result.scores is not None and result.references is not None
                row.update(prediction=result.texts[b], label=result.targets[b], references=result.references[b],
                           score=result.scores[b])  # fmt: skip
                continue
            if result.pred is not None:
                row["prediction"] = int(result.pred[b])
            elif result.tokens is not None:
                token = int(result.tokens[b])
                row["prediction"] = str(self.decode([token])) if self.decode is not None else token
            if result.target is not None:
                row["label"] = int(result.target[b])
            names = task.label_names if task else []
            if names and result.pred is not None:
                row["prediction_name"] = names[int(result.pred[b])]
            if names and result.target is not None and 0 <= int(result.target[b]) < len(names):
                row["label_name"] = names[int(result.target[b])]
            if result.probs is not None:
                row["probabilities"] = [float(p) for p in result.probs[b]]
            assert result.correct is not None
            row["correct"] = bool(result.correct[b])
        return rows

    def _update_correct(self, idx: int, correct: torch.Tensor) -> None:
        value = correct.float().mean()
        self.acc.update(value, idx, correct.numel())
        self.score.update(value, idx, correct.numel())

    def _predict_class(
        self, client: SplitClient, batch: dict, task: TaskInfo, out: ServerOutput, head_logits: list[torch.Tensor]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Predicted class and class probabilities (``None`` for first-token scoring)."""
        if out.pred is not None:  # encoder: the task head's argmax
            probs = head_logits[0].float().softmax(dim=-1) if head_logits else None
            return out.pred, probs
        if self.scoring == "first_token" or not task.label_ids:
            return None, None
        firsts = [ids[0] for ids in task.label_ids]
        if self.scoring == "label_first_token" and out.first_logits is not None and len(set(firsts)) == len(firsts):
            scores = out.first_logits[:, firsts]
        else:
            scores = score_label_words(
                client.split,
                batch["input_ids"],
                batch["labels"],
                task.label_ids,
                client.client_adapter,
                client.server_adapter,
                norm=self.score_norm,
            )
        return scores.argmax(dim=1), scores.float().softmax(dim=1)

    def _generate(self, client: SplitClient, batch: dict, task: TaskInfo) -> list[str]:
        if self.decode is None:
            raise ValueError("generative tasks need a tokenizer to decode; pass `decode` to FederatedEvaluator")
        starts = answer_starts(batch["labels"]).tolist()
        prompts = [batch["input_ids"][b, :s].tolist() for b, s in enumerate(starts)]
        with section("evaluation/generate"):
            generated = greedy_generate(
                client.split,
                prompts,
                self.spec.new_tokens(task),
                self.eos_token_id,
                client.client_adapter,
                client.server_adapter,
                batch_size=self.spec.generation_batch_size,
                pad_token_id=self.pad_token_id,
            )
        return [str(self.decode(ids, skip_special_tokens=True)).strip() for ids in generated]

    def _keep_examples(self, idx: int, batch: dict, result: BatchResult) -> None:
        """Keep the first ``text_examples`` generated answers of each task (prompt end, answer, references, score)."""
        kept = self.examples.setdefault(result.task_id, [])
        room = self.spec.text_examples - len(kept)
        if room <= 0 or self.decode is None:
            return
        assert result.texts is not None and result.references is not None and result.scores is not None
        starts = answer_starts(batch["labels"]).tolist()
        for b in range(min(room, len(result.texts))):
            prompt = str(self.decode(batch["input_ids"][b, : starts[b]].tolist(), skip_special_tokens=True))
            kept.append({"client": idx, "prompt": prompt, "prediction": result.texts[b],
                         "references": result.references[b], "score": result.scores[b]})  # fmt: skip

    def examples_markdown(self, max_prompt_chars: int = 600) -> dict[str, str]:
        """Task name → a Markdown block of the kept examples (for TensorBoard's text tab)."""
        out: dict[str, str] = {}
        for task_id, rows in sorted(self.examples.items()):
            task = self.tasks[task_id] if task_id < len(self.tasks) else None
            blocks = []
            for r in rows:
                prompt = r["prompt"] if len(r["prompt"]) <= max_prompt_chars else "…" + r["prompt"][-max_prompt_chars:]
                refs = "<br>".join(f"`{_md(x)}`" for x in r["references"])
                blocks.append(
                    f"**client {r['client']}** — score {r['score']:.3f}\n\n"
                    f"prompt:\n\n    {_md(prompt).replace(chr(10), chr(10) + '    ')}\n\n"
                    f"generated: `{_md(r['prediction'])}`\n\nreferences: {refs}"
                )
            out[task.name if task else str(task_id)] = "\n\n---\n\n".join(blocks)
        return out

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


def _md(text: str) -> str:
    """``text`` safe inside Markdown inline code (backticks replaced)."""
    return str(text).replace("`", "'")
