"""Tiny task-folder writers for the data tests (tests write their own fixture files)."""

from __future__ import annotations

import json

WORDS = {
    "sentiment": (["good", "great", "lovely"], ["bad", "awful", "poor"]),
    "nli": (["yes", "same", "agree"], ["no", "other", "differ"], ["maybe", "perhaps", "unsure"]),
}


def write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_rows(group: str, n: int, pair: bool = False, offset: int = 0) -> list[dict]:
    """``n`` labelled rows, labels cycling over the group's classes; texts are short and unique."""
    classes = WORDS[group]
    rows = []
    for i in range(offset, offset + n):
        label = i % len(classes)
        row = {"text": f"{classes[label][i % 3]} item {i}", "label": label}
        if pair:
            row["text_pair"] = f"pair {i}"
        rows.append(row)
    return rows


def write_task_folder(root, name, group, label_names, sizes, pair=False) -> None:
    """A task folder in the normalized format: ``{split}.jsonl`` for each split in ``sizes`` plus ``meta.json``."""
    folder = root / name
    offset = 0
    for split, n in sizes.items():
        write_jsonl(folder / f"{split}.jsonl", make_rows(group, n, pair, offset))
        offset += n
    meta = {"task": name, "group": group, "label_names": label_names, "pair": pair, "splits": sizes}
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
