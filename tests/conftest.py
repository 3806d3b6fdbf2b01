"""Fixtures shared by the whole suite: tiny federations built from configs (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub (it reads these once)
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lightning as L  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_GPT2 = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}
# `atlas-pl` arguments that shrink configs/demo.yaml to a tiny model (3 blocks: the demo's candidate cuts 1 and 2 exist)
TINY_DEMO_MODEL = ["--model.model_overrides", '{"n_layer": 3, "n_embd": 32, "n_head": 2}',
                   "--model.lora.target_modules", "null"]  # fmt: skip
TINY_DEMO = [*TINY_DEMO_MODEL, "--data.num_clients", "3", "--data.num_groups", "1", "--data.tasks_per_group", "1",
             "--data.examples_per_client", "16", "--data.local_steps", "1", "--data.batch_size", "8"]  # fmt: skip


def demo_cli_args(tmp_path, *extra: str) -> list[str]:
    """``atlas-pl fit`` on the tiny demo, everything written under ``tmp_path`` (logs, checkpoints under ``logs``)."""
    demo = str(Path(__file__).parents[1] / "configs" / "demo.yaml")
    return ["fit", "--config", demo, "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--trainer.enable_progress_bar", "false",
            *TINY_DEMO, *extra]  # fmt: skip


def tiny_federation_kwargs(**overrides) -> dict:
    """Federation kwargs of a tiny GPT-2 federation; ``lora_dropout=`` sets the LoRA dropout."""
    from atlas_pl.lora.adapters import LoraSpec

    lora = LoraSpec(rank=4, alpha=8, dropout=overrides.pop("lora_dropout", 0.0))
    kwargs = dict(model="gpt2-tiny", model_overrides=dict(TINY_GPT2), num_clients=4, cut_layer=1, lora=lora,
                  learning_rate=1e-2)
    kwargs.update(overrides)
    return kwargs


def tiny_data_kwargs(**overrides) -> dict:
    kwargs = dict(num_clients=4, num_groups=2, tasks_per_group=2, examples_per_client=24, max_length=32,
                  batch_size=8, local_steps=2, seed=0)
    kwargs.update(overrides)
    return kwargs


def phase_trainer(tmp_path, callbacks, max_epochs: int = 0) -> L.Trainer:
    """A quiet CPU trainer with atomic checkpoints for phase-callback tests (``max_epochs=0``: fit start only)."""
    from atlas_pl.io import AtomicCheckpointIO

    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
                     callbacks=callbacks, default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()])


@pytest.fixture
def fast_trainer_kwargs(tmp_path) -> dict:
    return dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0, use_distributed_sampler=False, default_root_dir=tmp_path,
                enable_checkpointing=False)


@pytest.fixture
def seeded() -> None:
    L.seed_everything(0, verbose=False)
