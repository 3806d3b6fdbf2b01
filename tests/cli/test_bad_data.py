"""Bad task data given to ``atlas-pl fit`` exits with code 2 and a message naming the file, the value and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atlas_pl.cli import main
from tests.conftest import demo_cli_args

TINY = ["--data.num_clients", "2", "--data.examples_per_client", "10", "--data.batch_size", "2"]


def _fit_args(tmp_path: Path, task: dict) -> list[str]:
    cache = str(tmp_path / "cache")
    return demo_cli_args(tmp_path, *TINY, "--data.cache_dir", cache, "--data.tasks", json.dumps([task]))


def test_csv_label_outside_label_names_exits_2_naming_file_value_and_fix(tmp_path, capsys) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\ngood film,pos\nbad film,neg\nso-so film,meh\n", encoding="utf-8")
    task = {"name": "reviews", "path": str(path), "label_names": ["neg", "pos"]}
    with pytest.raises(SystemExit) as exit_info:
        main(_fit_args(tmp_path, task))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message = next(line for line in err.splitlines() if line.startswith("atlas-pl: error: "))
    assert message.startswith("atlas-pl: error: task 'reviews': file ")
    assert "reviews.csv', column 'label': 1 row(s) have a label outside label_names: 'meh';" in message
    assert "label_names=['neg', 'pos']" in message and "fix: " in message
