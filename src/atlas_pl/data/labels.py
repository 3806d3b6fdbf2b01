"""Class labels of a classification task: its label names, and the check of a raw label column against them.

A label column holds either class names (strings, mapped to ids in ``label_names`` order) or integer ids. Every value
is checked before the column is converted, so a bad value (a name not in ``label_names``, an id out of range, an empty
cell) is reported with the file, the column, the first few offending values and the fix instead of failing later.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

__all__ = ["check_label_column", "label_names"]

_SHOWN = 5
"""How many distinct bad values a message lists."""


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value)


def _is_id(value: Any, num_labels: int) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or _is_empty(value):
        return False
    return float(value).is_integer() and 0 <= value < num_labels


def _show(value: Any) -> str:
    return "<empty>" if _is_empty(value) else repr(value)


def label_names(
    label_column: str, splits: dict[str, Any], given: list[str] | None, is_string: bool
) -> tuple[list[str], dict[str, int] | None]:
    """The task's label names and, for a string label column, the name -> id map.

    Args:
        label_column: Name of the label column.
        splits: Split name -> ``datasets.Dataset`` (raw columns).
        given: Names from the spec, ``meta.json`` or a ``ClassLabel`` feature (``None``: infer them).
        is_string: Whether the column holds class names rather than ids.

    Returns:
        ``(names, name_to_id)``; names default to the sorted distinct non-empty values of a string column, or to
        ``"0".."max id"`` for an int column; ``name_to_id`` is ``None`` for an int column.
    """
    present = [ds for ds in splits.values() if len(ds) and label_column in ds.column_names]
    values = [v for ds in present for v in ds.unique(label_column) if not _is_empty(v)]
    if is_string:
        names = [str(n) for n in given] if given is not None else sorted({str(v) for v in values})
        return names, {n: i for i, n in enumerate(names)}
    if given is not None:
        return [str(n) for n in given], None
    ids = [int(v) for v in values if isinstance(v, (int, float)) and float(v).is_integer()]
    return [str(i) for i in range(max(ids, default=-1) + 1)], None


def check_label_column(
    task: str, where: str, column: str, ds: Any, names: list[str], name_to_id: dict[str, int] | None
) -> bool:
    """Checks every value of a split's label column against the task's label names.

    Args:
        task: Task name (for the message).
        where: The split's origin for the message (``"file 'data/train.csv'"``).
        column: Name of the label column.
        ds: The split, a ``datasets.Dataset`` with ``column``.
        names: Label names in id order.
        name_to_id: Name -> id for a string column, ``None`` for an int column.

    Returns:
        True if the split is labelled; False if every label is -1 (an unlabelled hub test split, to be dropped).

    Raises:
        ValueError: If the split lacks the column, or some value is not a name in ``names`` (string column), not
            an id in ``0..len(names)-1`` (int column), or empty; the message names the file, the column, the first
            few bad values and the fix.
    """
    if column not in ds.column_names:
        raise ValueError(
            f"task {task!r}: {where} has no label column {column!r} (columns: {ds.column_names}); fix: add the "
            "column to every split, or set label_column."
        )
    distinct = ds.unique(column) if len(ds) else []
    if name_to_id is None and distinct == [-1]:
        return False
    if name_to_id is not None:
        bad = [v for v in distinct if _is_empty(v) or str(v) not in name_to_id]
    else:
        bad = [v for v in distinct if not _is_id(v, len(names))]
    if not bad:
        return True
    counts = Counter(_show(v) for v in ds[column])
    rows = sum(counts[s] for s in {_show(v) for v in bad})
    more = f" (first {_SHOWN} of {len(bad)} distinct)" if len(bad) > _SHOWN else ""
    fixes = ["fill in or drop the rows with an empty label"] if any(_is_empty(v) for v in bad) else []
    if name_to_id is not None:
        allowed = f"allowed are the names label_names={names} (ids follow that order)"
        if not all(_is_empty(v) for v in bad):
            fixes.append("correct or drop the rows with an unknown name, or add the name to label_names")
    else:
        allowed = f"allowed are the ids 0..{len(names) - 1} (label_names={names})"
        if not all(_is_empty(v) for v in bad):
            fixes.append("correct or drop the rows with an invalid id, or set label_names to cover every id")
    raise ValueError(
        f"task {task!r}: {where}, column {column!r}: {rows} row(s) have a label outside label_names: "
        f"{', '.join(_show(v) for v in bad[:_SHOWN])}{more}; {allowed}; fix: {'; '.join(fixes)}."
    )
