"""Loading tasks from their sources into normalized ``datasets.Dataset`` splits.

Sources: a folder in the normalized JSONL format (``<data_dir>/<name>/{train,validation,test}.jsonl`` +
``meta.json``), plain CSV/JSONL files with a column mapping, any ``datasets.load_dataset`` name (``glue``/``sst2``,
``ag_news``, or a local builder such as ``json``) and the built-in synthetic generator. Files are read through
``datasets`` (Arrow cache in ``cache_dir`` or the HF datasets cache), so later steps can cache their ``map`` results.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from atlas_pl.data.labels import check_label_column, label_names
from atlas_pl.data.synthetic import make_synthetic_tasks
from atlas_pl.data.tasks import Task, TaskSpec, default_label_words, default_template, kind_of, validate_template

__all__ = ["SPLITS", "available_tasks", "load_task", "load_tasks"]

SPLITS: tuple[str, ...] = ("train", "validation", "test")

_TEXT_GUESSES: dict[str, list[tuple[str, str | None]]] = {
    "classification": [
        ("text", "text_pair"),
        ("sentence1", "sentence2"),
        ("premise", "hypothesis"),
        ("question", "sentence"),
        ("text", None),
        ("sentence", None),
    ],
    "qa": [("context", "question")],
    "summarization": [("text", None), ("document", None), ("article", None), ("dialogue", None)],
}
_TARGET_GUESSES: dict[str, list[str]] = {
    "qa": ["answer", "answers", "target"],
    "summarization": ["summary", "highlights", "target"],
}
_REFERENCE_GUESSES: dict[str, list[str]] = {"qa": ["answers"], "summarization": ["summaries", "references"]}


def available_tasks(data_dir: str | os.PathLike) -> list[str]:
    """Names of the task folders (with a ``meta.json``) under ``data_dir``, sorted."""
    root = Path(data_dir)
    return sorted(p.name for p in root.iterdir() if (p / "meta.json").is_file()) if root.is_dir() else []


def _infer_source(spec: TaskSpec) -> str:
    if spec.source is not None:
        return spec.source
    if spec.hf_config is not None or spec.data_files is not None:
        return "hf"
    if spec.path is not None:
        suffix = Path(spec.path).suffix.lower()
        if suffix in (".csv", ".tsv"):
            return "csv"
        if suffix in (".jsonl", ".json"):
            return "jsonl"
        if not Path(spec.path).exists():
            return "hf"  # a hub name such as "ag_news" or "owner/name"
    return "folder"


def _load_files(spec: TaskSpec, builder: str, files: dict[str, str], cache_dir: str | None) -> dict[str, Any]:
    for split, path in files.items():
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"task {spec.name!r}: {split} file {str(path)!r} does not exist; fix: correct `path`/`data_files` "
                "or create the file."
            )
    kwargs = {"delimiter": "\t"} if builder == "csv" and all(str(p).endswith(".tsv") for p in files.values()) else {}
    try:
        return dict(datasets.load_dataset(builder, data_files=files, cache_dir=cache_dir, **kwargs))
    except Exception as exc:  # noqa: BLE001 - empty or malformed files get the task name and a fix
        raise ValueError(
            f"task {spec.name!r}: could not read {files} ({type(exc).__name__}: {str(exc)[:200]}); fix: make sure "
            f"each file is non-empty, valid {builder.upper()} with one example per row."
        ) from exc


def _folder(
    spec: TaskSpec, data_dir: str | None, cache_dir: str | None
) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    if spec.path is None and data_dir is None:
        raise ValueError(
            f"task {spec.name!r} is a folder name but data_dir is not set; fix: pass data_dir=<folder holding "
            f"{spec.name}/meta.json>, or give a dict spec with `source` and `path`."
        )
    folder = Path(spec.path) if spec.path is not None else Path(str(data_dir)) / spec.name
    if not (folder / "meta.json").is_file():
        known = available_tasks(folder.parent)
        hint = f"tasks there include {known[:8]}" if known else "that folder holds no task folders"
        raise FileNotFoundError(
            f"task {spec.name!r}: no task folder {str(folder)!r} (needs meta.json); {hint}; fix: use one of those "
            "names, set data_dir, or give a dict spec with `source` ('csv', 'jsonl', 'hf') and `path`."
        )
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    files = {split: str(folder / f"{split}.jsonl") for split in SPLITS if (folder / f"{split}.jsonl").is_file()}
    if "train" not in files:
        raise FileNotFoundError(
            f"task {spec.name!r}: {str(folder / 'train.jsonl')!r} does not exist; fix: add the train split "
            "(one JSON object per line with text and label)."
        )
    return _load_files(spec, "json", files, cache_dir), meta, files


def _plain(spec: TaskSpec, builder: str, cache_dir: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    files = dict(spec.data_files or {})
    if spec.path is not None:
        files.setdefault("train", spec.path)
    if "train" not in files:
        raise ValueError(
            f"task {spec.name!r}: source={spec.source!r} needs a train file; fix: set `path` (the train file) or "
            "`data_files: {train: ..., test: ...}`."
        )
    return _load_files(spec, builder, files, cache_dir), files


def _hub(spec: TaskSpec, cache_dir: str | None) -> dict[str, Any]:
    path = spec.path or spec.name
    try:
        return dict(datasets.load_dataset(path, spec.hf_config, data_files=spec.data_files, cache_dir=cache_dir))
    except Exception as exc:  # noqa: BLE001 - offline / unknown names get one clear message
        raise ValueError(
            f"task {spec.name!r}: could not load {path!r} (config {spec.hf_config!r}) with datasets.load_dataset "
            f"({type(exc).__name__}: {str(exc)[:200]}); fix: check the name and internet access, or export the "
            "dataset once to a local folder in the normalized format and use data_dir (or source='jsonl'/'csv')."
        ) from exc


def _columns(spec: TaskSpec, columns: list[str]) -> tuple[str, str | None, str | None, str | None]:
    text, pair = spec.text_column, spec.text_pair_column
    if text is None:
        guesses = [g for g in _TEXT_GUESSES[str(spec.kind)] if g[0] in columns and (g[1] is None or g[1] in columns)]
        if not guesses:
            raise ValueError(
                f"task {spec.name!r}: no text column among {columns}; fix: set text_column (and text_pair_column)."
            )
        text, pair = guesses[0][0], pair or guesses[0][1]
    target = spec.target_column
    refs = spec.references_column
    if spec.kind != "classification" and target is None:
        target = next((c for c in _TARGET_GUESSES[str(spec.kind)] if c in columns), None)
    if spec.kind != "classification" and refs is None:
        refs = next((c for c in _REFERENCE_GUESSES[str(spec.kind)] if c in columns), None)
    roles = (("text_column", text), ("text_pair_column", pair), ("target_column", target), ("references_column", refs))
    for role, col in roles:
        if col is not None and col not in columns:
            raise ValueError(f"task {spec.name!r}: {role}={col!r} is not a column of {columns}; fix: set {role}.")
    if spec.kind == "classification" and spec.label_column not in columns:
        raise ValueError(f"task {spec.name!r}: label_column={spec.label_column!r} not in {columns}; fix: set it.")
    if spec.kind != "classification" and target is None:
        raise ValueError(f"task {spec.name!r}: no target column among {columns}; fix: set target_column.")
    return text, pair, target, refs


def _target_str(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("text", "")
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return str(value)


def _reference_list(value: Any, target: str) -> list[str]:
    """Every reference of one example: a list, a SQuAD-style ``{"text": [...]}`` dict or one string.

    The target comes first when it is not among them; empty strings are dropped.
    """
    if isinstance(value, dict):
        value = value.get("text", [])
    values = [str(v) for v in value] if isinstance(value, (list, tuple)) else [] if value is None else [str(value)]
    out = [v for v in values if v.strip()]
    return out if target in out else [target, *out]


def _normalize_batch(
    batch: dict[str, list],
    text: str,
    pair: str | None,
    label: str | None,
    target: str | None,
    label_map: dict[str, int] | None,
    refs: str | None = None,
) -> dict[str, list]:
    out: dict[str, list] = {"text": [str(v) for v in batch[text]]}
    if pair is not None:
        out["text_pair"] = [str(v) for v in batch[pair]]
    if target is not None:
        out["target"] = [_target_str(v) for v in batch[target]]
        given = batch[refs] if refs is not None else [None] * len(out["target"])
        out["references"] = [_reference_list(v, t) for v, t in zip(given, out["target"])]
    elif label is not None:  # checked by check_label_column before
        values = batch[label]
        out["label"] = [label_map[str(v)] if label_map is not None else int(v) for v in values]
    return out


def _features(pair: str | None, label: str | None, target: str | None) -> datasets.Features:
    """The normalized columns' types, set explicitly: an output column never inherits a removed raw column's type."""
    features = {"text": datasets.Value("string")}
    if pair is not None:
        features["text_pair"] = datasets.Value("string")
    if target is not None:
        features["target"] = datasets.Value("string")
        features["references"] = datasets.Sequence(datasets.Value("string"))
    elif label is not None:
        features["label"] = datasets.Value("int64")
    return datasets.Features(features)


def _label_names(spec: TaskSpec, raw: dict[str, Any], meta: dict[str, Any]) -> tuple[list[str], dict[str, int] | None]:
    """Label names and, for string label columns, the name -> id map."""
    feature = raw["train"].features.get(spec.label_column)
    given = spec.label_names or meta.get("label_names") or getattr(feature, "names", None)
    is_string = getattr(feature, "dtype", None) in ("string", "large_string")
    return label_names(spec.label_column, raw, given, is_string)


def _normalize(
    spec: TaskSpec, raw: dict[str, Any], meta: dict[str, Any], template: str | None, origins: dict[str, str]
) -> Task:
    renamed = {std: raw[src] for std, src in ((s, spec.split_names.get(s, s)) for s in SPLITS) if src in raw}
    if "train" not in renamed:
        raise FileNotFoundError(
            f"task {spec.name!r} has no train split (found {sorted(raw)}); fix: provide one, or map a split with "
            "split_names: {train: <name>}."
        )
    spec = dataclasses.replace(spec, kind=kind_of(spec, meta))  # type: ignore[arg-type]
    text, pair, target, refs = _columns(spec, renamed["train"].column_names)
    is_cls = spec.kind == "classification"
    names, label_map = _label_names(spec, renamed, meta) if is_cls else ([], None)
    label = spec.label_column if is_cls else None
    kwargs = {
        "text": text,
        "pair": pair,
        "label": label,
        "target": target,
        "label_map": label_map,
        "refs": refs,
    }
    features = _features(pair, label, target)
    splits: dict[str, Any] = {}
    for split, ds in renamed.items():
        where = origins.get(spec.split_names.get(split, split), f"split {split!r}")
        if is_cls and not check_label_column(spec.name, where, spec.label_column, ds, names, label_map):
            continue  # an unlabelled (all -1) hub test split
        fp = datasets.fingerprint.Hasher.hash([ds._fingerprint, kwargs, "normalize-v3"])
        splits[split] = ds.map(
            _normalize_batch,
            batched=True,
            fn_kwargs=kwargs,
            remove_columns=ds.column_names,
            features=features,
            new_fingerprint=fp,
            desc=f"normalize {spec.name}/{split}",
        )
    if len(splits["train"]) == 0:
        raise ValueError(f"task {spec.name!r} has an empty train split; fix: check the file or the column mapping.")
    words = spec.label_words or default_label_words(names)
    if len(words) != len(names):
        raise ValueError(
            f"task {spec.name!r}: {len(words)} label_words for {len(names)} labels {names}; fix: one word per label."
        )
    if spec.template is None and not (spec.kind == "classification" and pair is None and template is not None):
        template = default_template(str(spec.kind), pair is not None)
    template = spec.template or template
    assert template is not None
    validate_template(spec.name, template, pair is not None)
    return Task(
        spec.name,
        spec.group or meta.get("group") or spec.name,
        str(spec.kind),
        names,
        list(words),
        template,
        splits["train"],
        splits.get("validation"),
        splits.get("test"),
    )


def _origins(spec: TaskSpec, raw: dict[str, Any], files: dict[str, str]) -> dict[str, str]:
    """Where each raw split comes from, for messages: ``"file 'data/train.csv'"`` or ``"dataset 'glue' split 'x'"``."""
    where = f"dataset {spec.path or spec.name!r}"
    return {split: f"file {str(files[split])!r}" if split in files else f"{where} split {split!r}" for split in raw}


def _subsample(task: Task, limit: int | None, seed: int) -> Task:
    if limit is not None and len(task.train) > limit:
        keep = np.sort(np.random.default_rng([seed, 7]).choice(len(task.train), size=limit, replace=False))
        task.train = task.train.select(keep)
    return task


def load_task(
    spec: str | dict[str, Any] | TaskSpec,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
    template: str | None = None,
) -> Task:
    """Loads one (non-synthetic) task.

    Args:
        spec: Folder name under ``data_dir``, dict, or :class:`TaskSpec`.
        data_dir: Folder holding normalized task folders.
        cache_dir: ``datasets`` cache folder (``None``: the HF datasets cache).
        seed: Seed of the ``max_train_examples`` subsample.
        template: Default template of single-text classification tasks without their own (``None``: per kind).

    Returns:
        The task with normalized splits.

    Raises:
        FileNotFoundError: If a folder, file or the train split is missing.
        ValueError: If a column, label, template or hub name is wrong (the message names the task and the fix).
    """
    spec = TaskSpec.parse(spec)
    source = _infer_source(spec)
    meta: dict[str, Any] = {}
    if source == "folder":
        raw, meta, files = _folder(spec, data_dir, cache_dir)
    elif source in ("csv", "jsonl"):
        raw, files = _plain(spec, "csv" if source == "csv" else "json", cache_dir)
    elif source == "hf":
        raw, files = _hub(spec, cache_dir), dict(spec.data_files or {})
    else:
        raise ValueError(f"task {spec.name!r}: source={source!r} is loaded by load_tasks; fix: call load_tasks.")
    return _subsample(_normalize(spec, raw, meta, template, _origins(spec, raw, files)), spec.max_train_examples, seed)


def _synthetic(spec: TaskSpec, synthetic: dict[str, Any], default: str | None) -> list[Task]:
    made = make_synthetic_tasks(**synthetic)
    if spec.name != "synthetic":
        made = [t for t in made if t.name == spec.name]
        if not made:
            names = [t.name for t in make_synthetic_tasks(**synthetic)]
            raise ValueError(f"synthetic task {spec.name!r} does not exist; fix: use 'synthetic' or one of {names}.")
    out = []
    for t in made:
        names = [w.strip() for w in t.label_words]
        split = {
            s: datasets.Dataset.from_list([{"text": e.text, "label": e.label} for e in getattr(t, s)])
            for s in ("train", "validation")
        }
        template = spec.template or default or default_template("classification", False)
        validate_template(t.name, template, False)
        task = Task(
            t.name,
            spec.group or t.group,
            "classification",
            names,
            spec.label_words or list(t.label_words),
            template,
            split["train"],
            split["validation"],
            None,
        )
        out.append(_subsample(task, spec.max_train_examples, synthetic.get("seed", 0)))
    return out


def load_tasks(
    specs: list[str | dict[str, Any] | TaskSpec],
    data_dir: str | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
    synthetic: dict[str, Any] | None = None,
    template: str | None = None,
) -> list[Task]:
    """Loads every task of a config's ``tasks`` list (``"synthetic"`` expands to all synthetic tasks).

    Args:
        specs: Task specs (see :class:`TaskSpec`).
        data_dir: Folder holding normalized task folders.
        cache_dir: ``datasets`` cache folder.
        seed: Seed for subsampling.
        synthetic: Keyword arguments of :func:`make_synthetic_tasks` for synthetic specs.
        template: Default template of single-text classification tasks without their own.

    Returns:
        Tasks in spec order.

    Raises:
        ValueError: If the list is empty or names a task twice.
    """
    if not specs:
        raise ValueError("tasks=[] is empty; fix: list at least one task (e.g. ['sst2']) or leave tasks unset.")
    out: list[Task] = []
    for raw_spec in specs:
        spec = TaskSpec.parse(raw_spec)
        if spec.source == "synthetic":
            out += _synthetic(spec, synthetic or {}, template)
        else:
            out.append(load_task(spec, data_dir, cache_dir, seed, template))
    names = [t.name for t in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"tasks name {dupes} more than once; fix: give each task entry a unique `name`.")
    return out
