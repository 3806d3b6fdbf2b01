"""A federation over a mix of real-format tasks: classification scored by label words, QA by generated text."""

import json

import lightning as L

from atlas_pl.data import FederatedDataModule
from atlas_pl.evaluation import EvaluationSpec
from atlas_pl.federation import Federation
from tests.conftest import tiny_federation_kwargs


def _write(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _task_folder(root, name: str, labels: list[str], group: str) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    rows = [{"text": f"{labels[i % len(labels)]} example number {i}", "label": i % len(labels)} for i in range(40)]
    _write(folder / "train.jsonl", rows[:32])
    _write(folder / "test.jsonl", rows[32:])
    (folder / "meta.json").write_text(json.dumps({"name": name, "group": group, "label_names": labels}))


def test_classification_and_qa_clients_train_and_report_per_task_metrics(tmp_path, fast_trainer_kwargs) -> None:
    _task_folder(tmp_path / "data", "mood", ["sad", "happy"], "sentiment")
    _task_folder(tmp_path / "data", "news", ["sports", "science", "politics"], "topic")
    qa = [{"context": f"The code is {i}.", "question": "What is the code?", "answer": str(i)} for i in range(30)]
    _write(tmp_path / "qa.jsonl", qa)
    dm = FederatedDataModule(
        num_clients=3, data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), batch_size=4,
        local_steps=2, max_length=40, tasks=["mood", "news", {"name": "codes", "kind": "qa",
                                                              "path": str(tmp_path / "qa.jsonl")}],
    )  # fmt: skip
    L.seed_everything(0, verbose=False)
    fed = Federation(**tiny_federation_kwargs(num_clients=3, evaluation=EvaluationSpec(max_new_tokens=4)))
    trainer = L.Trainer(max_epochs=1, **fast_trainer_kwargs)
    trainer.fit(fed, datamodule=dm)

    final = fed.history[-1]
    assert {"val_task/mood/acc", "val_task/mood/macro_f1", "val_task/news/acc"} <= set(final)
    assert {"val_task/codes/em", "val_task/codes/f1"} <= set(final)
    assert 0.0 <= final["val_task/news/acc"] <= 1.0
    assert "val_acc/client_002" not in final and "val_score/client_002" in final  # QA client: score, no accuracy
    trainer.test(fed, datamodule=dm)
    assert "test_task/mood/acc" in trainer.callback_metrics
