"""Task descriptions: the config-side :class:`TaskSpec`, the loaded :class:`Task` and its public :class:`TaskInfo`.

A task is one dataset with one prompt template and (for classification) one verbalizer. Examples are dicts with the
normalized fields ``text``, optional ``text_pair``, and ``label`` (int, classification) or ``target`` (str, qa and
summarization). Question answering maps ``context`` to ``text`` and ``question`` to ``text_pair``; its template may
use either name (``{context}`` / ``{question}``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "DEFAULT_TEMPLATES",
    "FIELD_ALIASES",
    "Task",
    "TaskInfo",
    "TaskKind",
    "TaskSpec",
    "default_label_words",
    "default_template",
    "head_ids",
    "kind_of",
    "template_fields",
    "validate_template",
]

TaskKind = Literal["classification", "qa", "summarization"]
KINDS: tuple[str, ...] = ("classification", "qa", "summarization")
SOURCES: tuple[str, ...] = ("folder", "csv", "jsonl", "hf", "synthetic")

DEFAULT_TEMPLATES: dict[str, str] = {
    "classification": "{text}\nAnswer:",
    "pair": "{text}\n{text_pair}\nAnswer:",
    "qa": "Context: {context}\nQuestion: {question}\nAnswer:",
    "summarization": "{text}\nSummary:",
}
"""Default prompt per kind (``pair`` = classification with a ``text_pair`` field); the answer follows the prompt."""

FIELD_ALIASES: dict[str, str] = {"context": "text", "question": "text_pair"}
"""Template placeholders that read another normalized field."""

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def default_template(kind: str, has_pair: bool) -> str:
    """The default prompt template for a task kind.

    Args:
        kind: ``"classification"``, ``"qa"`` or ``"summarization"``.
        has_pair: Whether examples carry a ``text_pair`` field (sentence-pair classification).

    Returns:
        A template from :data:`DEFAULT_TEMPLATES`.
    """
    if kind == "classification" and has_pair:
        return DEFAULT_TEMPLATES["pair"]
    return DEFAULT_TEMPLATES[kind]


def default_label_words(label_names: list[str]) -> list[str]:
    """Verbalizer words from label names: ``"not_entailment"`` becomes ``" not entailment"`` (leading space)."""
    return [" " + str(name).replace("_", " ").strip() for name in label_names]


def template_fields(template: str) -> list[str]:
    """Normalized fields a template reads, in order of appearance (aliases resolved, duplicates dropped)."""
    out: list[str] = []
    for name in _PLACEHOLDER.findall(template):
        name = FIELD_ALIASES.get(name, name)
        if name not in out:
            out.append(name)
    return out


def validate_template(task: str, template: str, has_pair: bool) -> None:
    """Checks that ``template`` reads the input field(s) and nothing unknown.

    Args:
        task: Task name (for the message).
        template: Prompt template.
        has_pair: Whether the task has a ``text_pair`` field, which the template must then use too.

    Raises:
        ValueError: If ``{text}`` (or ``{context}``) is missing, ``{text_pair}`` (or ``{question}``) is missing for a
            pair task, or the template uses an unknown placeholder.
    """
    fields = template_fields(template)
    unknown = [f for f in fields if f not in ("text", "text_pair")]
    if unknown:
        raise ValueError(
            f"task {task!r}: template={template!r} uses unknown placeholder(s) {unknown}; fix: use only {{text}} and "
            "{text_pair} (or {context} and {question})."
        )
    if "text" not in fields:
        raise ValueError(
            f"task {task!r}: template={template!r} lacks the input field '{{text}}'; fix: e.g. "
            f"{DEFAULT_TEMPLATES['classification']!r}."
        )
    if has_pair and "text_pair" not in fields:
        raise ValueError(
            f"task {task!r} has a text_pair field but template={template!r} lacks '{{text_pair}}'; fix: e.g. "
            f"{DEFAULT_TEMPLATES['pair']!r}."
        )


@dataclass
class TaskSpec:
    """How to load one task (the config schema: one entry of ``data.tasks``).

    Attributes:
        name: Task name; for ``source="folder"`` also the folder under ``data_dir`` (unless ``path`` is given).
        source: ``"folder"`` (normalized JSONL folder with ``meta.json``), ``"csv"`` / ``"jsonl"`` (plain files),
            ``"hf"`` (``datasets.load_dataset(path, hf_config)``) or ``"synthetic"``. ``None`` infers it: ``"hf"``
            when ``hf_config`` or ``data_files`` is set or ``path`` looks like ``owner/name`` that is not a local
            path, ``"csv"``/``"jsonl"`` from a file suffix, else ``"folder"``.
        path: Folder, file (the train split), or hub dataset name (``"glue"``, ``"ag_news"``).
        hf_config: Hub configuration name (``"sst2"`` for ``glue``).
        data_files: Split name to file(s), for csv/jsonl/hf sources (``{"train": "a.csv", "test": "b.csv"}``).
        kind: ``"classification"``, ``"qa"`` or ``"summarization"``; ``None`` (the default) reads a folder's
            ``meta.json`` ``task_type`` (``extractive_qa`` → ``qa``, ``summarization``), else ``"classification"``.
        group: Task group (for logging and clustering evaluation); defaults to ``meta.json`` group or ``name``.
        text_column: Column holding the input text (``"context"`` for qa by default).
        text_pair_column: Column holding the second text (``"question"`` for qa by default), if any.
        label_column: Column holding the class (int id or string name), classification only.
        target_column: Column holding the reference answer trained on (``"answer"``/``"summary"`` by default),
            generative only.
        references_column: Column holding every reference of an example (a list of strings, scored by the best
            match: SQuAD EM/F1 take the maximum over answers, ROUGE-L the best reference); default ``"answers"`` (qa) /
            ``"summaries"`` (summarization) when present, else the target alone.
        label_names: Class names in id order; string labels map to ids by this order (default: sorted unique values).
        label_words: Verbalizer words, with the leading space; default from ``label_names``.
        template: Prompt template; default per kind (:data:`DEFAULT_TEMPLATES`).
        max_train_examples: Seeded subsample of the train split before partitioning (``None`` keeps all).
        split_names: Source split name to use for each of ``train``/``validation``/``test`` (e.g.
            ``{"validation": "dev"}``).
    """

    name: str
    source: Literal["folder", "csv", "jsonl", "hf", "synthetic"] | None = None
    path: str | None = None
    hf_config: str | None = None
    data_files: dict[str, str] | None = None
    kind: TaskKind | None = None
    group: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str = "label"
    target_column: str | None = None
    references_column: str | None = None
    label_names: list[str] | None = None
    label_words: list[str] | None = None
    template: str | None = None
    max_train_examples: int | None = None
    split_names: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str | dict[str, Any] | TaskSpec) -> TaskSpec:
        """Builds a spec from a config entry: a folder name / ``"synthetic"``, a dict, or a spec.

        Raises:
            ValueError: If a dict has unknown keys, no ``name``, or an invalid ``kind``/``source``.
        """
        if isinstance(spec, TaskSpec):
            out = spec
        elif isinstance(spec, str):
            out = cls(name=spec, source="synthetic" if spec == "synthetic" else None)
        elif isinstance(spec, dict):
            known = set(cls.__dataclass_fields__)
            unknown = sorted(set(spec) - known)
            if unknown or "name" not in spec:
                raise ValueError(
                    f"task spec {spec!r}: unknown key(s) {unknown} or missing 'name'; "
                    f"fix: use keys from {sorted(known)}."
                )
            out = cls(**spec)
        else:
            raise ValueError(f"task spec {spec!r} must be a str or dict; fix: e.g. 'sst2' or {{'name': 'sst2'}}.")
        if out.kind is not None and out.kind not in KINDS:
            raise ValueError(f"task {out.name!r}: kind={out.kind!r} is invalid; fix: use one of {list(KINDS)}.")
        if out.source is not None and out.source not in SOURCES:
            raise ValueError(f"task {out.name!r}: source={out.source!r} is invalid; fix: use one of {list(SOURCES)}.")
        if out.max_train_examples is not None and out.max_train_examples < 1:
            raise ValueError(
                f"task {out.name!r}: max_train_examples={out.max_train_examples!r}; fix: pass an int >= 1 or null."
            )
        return out

    @property
    def generative(self) -> bool:
        """Whether the spec says the task is qa or summarization (``kind=None`` is decided when loading)."""
        return self.kind not in (None, "classification")


TASK_TYPES: dict[str, str] = {"classification": "classification", "text_classification": "classification",
                              "extractive_qa": "qa", "qa": "qa", "summarization": "summarization"}  # fmt: skip
"""``meta.json`` ``task_type`` → task kind."""


def kind_of(spec: TaskSpec, meta: dict[str, Any]) -> str:
    """The task's kind: the spec's, else its ``meta.json`` ``task_type``, else ``"classification"``.

    Raises:
        ValueError: ``meta.json`` names a task type this package does not know.
    """
    if spec.kind is not None:
        return spec.kind
    task_type = meta.get("task_type")
    if task_type is None:
        return "classification"
    if task_type not in TASK_TYPES:
        raise ValueError(
            f"task {spec.name!r}: meta.json task_type={task_type!r} is not supported; fix: set `kind` to one of "
            f"{list(KINDS)} in the task spec, or use one of {sorted(TASK_TYPES)}."
        )
    return TASK_TYPES[task_type]


@dataclass
class TaskInfo:
    """What the model side needs to know about a task (``FederatedDataModule.tasks[task_id]``).

    Attributes:
        name: Task name.
        group: Task group.
        kind: ``"classification"``, ``"qa"`` or ``"summarization"``.
        label_names: Class names in id order (``[]`` for generative tasks).
        label_words: Verbalizer words in id order, with the leading space (``[]`` for generative tasks).
    """

    name: str
    group: str
    kind: str
    label_names: list[str]
    label_words: list[str]

    @property
    def num_labels(self) -> int:
        """Number of classes (0 for generative tasks)."""
        return len(self.label_names)

    @property
    def generative(self) -> bool:
        """Whether the answer is free text (qa, summarization) rather than a label word."""
        return self.kind != "classification"


@dataclass
class Task(TaskInfo):
    """A loaded task: :class:`TaskInfo` plus its template and splits.

    Splits are ``datasets.Dataset`` objects (sequences of example dicts with ``text``, optional ``text_pair``, and
    ``label`` or ``target``); ``validation`` and ``test`` may be ``None``.

    Attributes:
        template: Prompt template.
        train: Training split.
        validation: Validation split or ``None``.
        test: Test split or ``None``.
    """

    template: str = DEFAULT_TEMPLATES["classification"]
    train: Any = None
    validation: Any = None
    test: Any = None

    @property
    def has_pair(self) -> bool:
        """Whether examples carry a ``text_pair`` field."""
        return self.train is not None and "text_pair" in self.train.column_names

    @property
    def eval_split(self) -> Any:
        """The held-out split clients are tested on: ``test``, or ``validation`` when there is no test split."""
        return self.test if self.test is not None else self.validation

    def info(self) -> TaskInfo:
        """The public, data-free description."""
        return TaskInfo(self.name, self.group, self.kind, list(self.label_names), list(self.label_words))

    def sorted_by_label_word(self) -> Task:
        """The same task with its classes renumbered in the order of their label words.

        A classification head shared by tasks with the same words then gives each word one output; generative tasks
        are returned as is.

        Class ``i`` keeps its name *and* word together: a task whose words are swapped (``" positive"`` for label
        ``negative``) keeps that pairing, and its examples now target the other output than the unswapped task's.
        """
        if self.generative:
            return self
        order = sorted(range(len(self.label_words)), key=lambda i: (self.label_words[i], i))
        if order == list(range(len(order))):
            return self
        new_of = {old: new for new, old in enumerate(order)}

        def relabel(split: Any) -> Any:
            if split is None:
                return None
            return split.map(
                lambda batch: {"label": [new_of[int(x)] for x in batch["label"]]},
                batched=True,
                desc=f"relabel {self.name}",
            )

        return dataclasses.replace(
            self,
            label_names=[self.label_names[i] for i in order],
            label_words=[self.label_words[i] for i in order],
            train=relabel(self.train),
            validation=relabel(self.validation),
            test=relabel(self.test),
        )


def head_ids(tasks: list[TaskInfo], heads: str = "per_task") -> list[int]:
    """The classification head of each task.

    ``per_task``: its own (``[0, 1, 2, ...]``); ``per_label_words``: tasks with the same label words, in the same
    order, share the head of the first of them.

    Raises:
        ValueError: An unknown ``heads`` value.
    """
    if heads == "per_task":
        return list(range(len(tasks)))
    if heads != "per_label_words":
        raise ValueError(f"`heads` must be 'per_task' or 'per_label_words', got {heads!r}")
    first: dict[tuple[str, ...], int] = {}
    out = []
    for t, task in enumerate(tasks):
        key = tuple(task.label_words) if not task.generative else (f"<generative {t}>",)
        out.append(first.setdefault(key, t))
    return out
