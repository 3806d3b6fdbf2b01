"""``atlas-pl predict``: per-example predictions from a checkpoint in one JSONL file, scored exactly as ``test``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from atlas_pl.cli import main
from tests.cli.test_cli import _demo_args


@pytest.fixture
def in_repo(monkeypatch) -> None:
    monkeypatch.chdir(Path(__file__).parents[2])


def _logged(out: str, key: str) -> float:
    """A metric from the table Lightning prints after ``test``."""
    match = re.search(rf"{re.escape(key)}\s*[│|]\s*([-+0-9.eE]+)", out)
    assert match, f"{key} not in the printed test metrics:\n{out[-2000:]}"
    return float(match.group(1))


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predictions_file_reproduces_the_test_accuracy(tmp_path, in_repo, capsys) -> None:
    main(_demo_args(tmp_path, "--trainer.max_epochs", "1"))
    capsys.readouterr()
    main(["test", *_demo_args(tmp_path)[1:], "--ckpt_path", "last"])
    printed = capsys.readouterr().out
    main(["predict", *_demo_args(tmp_path)[1:], "--ckpt_path", "last"])
    path = Path(re.findall(r"written to (\S+predictions\.jsonl)", capsys.readouterr().out)[-1])
    records = _records(path)
    assert path.parent.parent == tmp_path / "logs" / "demo"  # the predict run's own logger folder

    assert {r["split"] for r in records} == {"test"} and {r["client"] for r in records} == {0, 1, 2}
    for client in range(3):  # example ids number each client's split from 0
        ids = [r["example_id"] for r in records if r["client"] == client]
        assert ids == list(range(len(ids)))
    for r in records:
        assert r["kind"] == "classification" and r["correct"] == (r["prediction"] == r["label"])
        assert sum(r["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        assert max(range(len(r["probabilities"])), key=r["probabilities"].__getitem__) == r["prediction"]
    accuracy = sum(r["prediction"] == r["label"] for r in records) / len(records)
    assert accuracy == pytest.approx(_logged(printed, "test_acc"), rel=1e-6)
    for client in range(3):
        mine = [r["prediction"] == r["label"] for r in records if r["client"] == client]
        assert sum(mine) / len(mine) == pytest.approx(_logged(printed, f"test_acc/client_{client:03d}"), rel=1e-6)


def test_predict_on_the_validation_split_to_a_given_file(tmp_path, in_repo, capsys) -> None:
    main(_demo_args(tmp_path, "--trainer.max_epochs", "1"))
    output = tmp_path / "out" / "val.jsonl"
    main(
        ["predict", *_demo_args(tmp_path)[1:], "--ckpt_path", "last", "--split", "validation", "--output", str(output)]
    )
    records = _records(output)
    assert records and {r["split"] for r in records} == {"validation"}
    assert f"written to {output}" in capsys.readouterr().out
    assert [p.name for p in output.parent.iterdir()] == ["val.jsonl"]  # atomic write: no temporary file left


def test_prediction_records_hold_label_word_probabilities_and_generated_text() -> None:
    from atlas_pl.evaluation import FederatedEvaluator, TaskInfo
    from tests.test_evaluation import EOS, X, _batch, _client, _hand_built

    split = _hand_built()  # every position predicts token X
    tasks = [
        TaskInfo("sentiment", "classification", 2, label_ids=[[5, EOS], [X, EOS]], label_names=["pos", "neg"]),
        TaskInfo("squad", "qa", 0),
    ]
    evaluator = FederatedEvaluator(
        2, tasks, max_new_tokens=1, eos_token_id=EOS, decode=lambda ids, **_: " ".join({X: "seven"}[i] for i in ids)
    )
    rows = evaluator.predict(_client(0, split), _batch(0, 0, [X, EOS], [1, 0]))
    assert [(r["prediction"], r["label"], r["correct"]) for r in rows] == [(1, 1, True), (1, 0, False)]
    assert rows[0]["prediction_name"] == "neg" and rows[1]["label_name"] == "pos"
    assert rows[0]["probabilities"][1] > 0.99 and sum(rows[0]["probabilities"]) == pytest.approx(1.0)
    rows = evaluator.predict(_client(1, split), _batch(1, 1, [X, EOS], [-1, -1], targets=["seven", "eight"]))
    assert [(r["kind"], r["prediction"], r["label"], r["score"]) for r in rows] == [
        ("qa", "seven", "seven", 1.0),
        ("qa", "seven", "eight", 0.0),
    ]
