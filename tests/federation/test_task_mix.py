"""A federation over a mix of real-format tasks: classification scored by label words, QA by generated text."""

import json
from pathlib import Path

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


def _generative_folder(root, name: str, task_type: str, rows: list[dict]) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    _write(folder / "train.jsonl", rows[:24])
    _write(folder / "test.jsonl", rows[24:])
    (folder / "meta.json").write_text(json.dumps({"task": name, "group": name, "task_type": task_type}))


def test_generated_answers_reach_tensorboard_text_the_profile_and_the_test_results(tmp_path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from atlas_pl.callbacks import FederatedResults
    from atlas_pl.profiling import RoundProfiler

    root = tmp_path / "data"
    _generative_folder(root, "codes", "extractive_qa", [
        {"context": f"The code is {i}.", "question": "What is the code?", "answer": str(i),
         "answers": [str(i), f"code {i}"]} for i in range(30)])  # fmt: skip
    _generative_folder(root, "notes", "summarization", [
        {"document": f"#A#: see you at {i}\n#B#: fine", "summary": f"meet at {i}",
         "summaries": [f"meet at {i}", "they meet"]} for i in range(30)])  # fmt: skip
    dm = FederatedDataModule(num_clients=2, data_dir=str(root), cache_dir=str(tmp_path / "cache"), batch_size=4,
                             local_steps=1, max_length=40, tasks=["codes", "notes"])  # fmt: skip
    ev = EvaluationSpec(max_new_tokens=5, max_new_tokens_per_task={"summarization": 3}, text_examples=2)
    L.seed_everything(0, verbose=False)
    fed = Federation(**tiny_federation_kwargs(num_clients=2, evaluation=ev))
    logger = TensorBoardLogger(tmp_path / "tb", name="mix")
    profiler = RoundProfiler(dirpath=tmp_path, filename="prof")
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=False,
                        callbacks=[FederatedResults(summary=False)], profiler=profiler)  # fmt: skip
    trainer.fit(fed, datamodule=dm)

    assert [t.kind for t in dm.tasks] == ["qa", "summarization"]  # from meta.json task_type
    final = fed.history[-1]
    assert {"val_task/codes/em", "val_task/codes/f1", "val_task/notes/rougeL", "val_task/notes/rouge2"} <= set(final)
    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    assert {"examples/codes/text_summary", "examples/notes/text_summary"} <= set(events.Tags()["tensors"])
    text = events.Tensors("examples/codes/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.count("**client 0**") == 2 and "What is the code?" in text and "generated:" in text
    assert all(r["generation"] > 0 for r in profiler.rounds)  # generation is its own part of the round profile

    trainer.test(fed, datamodule=dm)
    results = json.loads((Path(logger.log_dir) / "test_results.json").read_text())
    shown = results["examples"]
    assert set(shown) == {"codes", "notes"} and len(shown["codes"]) == 2
    assert shown["codes"][0]["references"][1].startswith("code ")  # every gold answer is kept for scoring
    assert all(len(e["prediction"].split()) <= 3 for e in shown["notes"])  # the summarization limit: 3 tokens
