"""The ``atlas-pl`` command: shipped configs parse, bad input exits non-zero with a message naming the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from atlas_pl.cli import main

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
BASELINES = sorted((Path(__file__).parents[2] / "configs" / "baselines").glob("*.yaml"))
TINY = [
    "--model.model_overrides",
    '{"n_layer": 2, "n_embd": 32, "n_head": 2}',
    "--data.num_clients",
    "3",
    "--data.num_groups",
    "1",
    "--data.tasks_per_group",
    "1",
    "--data.examples_per_client",
    "16",
    "--data.local_steps",
    "1",
    "--data.batch_size",
    "8",
    "--model.target_modules",
    "null",
]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_shipped_config_parses(config: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model"] and printed["data"]["num_clients"] >= 1
    assert config.read_text().startswith("#"), "each config opens with a header giving its command"


@pytest.mark.parametrize("baseline", BASELINES, ids=[c.name for c in BASELINES])
def test_every_baseline_config_parses_on_top_of_the_demo(baseline: Path, capsys) -> None:
    demo = Path(__file__).parents[2] / "configs" / "demo.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(demo), "--config", str(baseline), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["aggregation"] in ("exact", "fedavg", "none", "centralized")
    assert baseline.read_text().startswith("#"), "each config opens with a header giving its command"


def _demo_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        "configs/demo.yaml",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        "--trainer.enable_progress_bar",
        "false",
        *TINY,
        *extra,
    ]


@pytest.fixture
def in_repo(monkeypatch) -> None:
    monkeypatch.chdir(Path(__file__).parents[2])


def test_fit_resume_and_validate_from_the_last_checkpoint(tmp_path, in_repo, capsys) -> None:
    main(_demo_args(tmp_path, "--trainer.max_epochs", "2"))
    results = json.loads(next((tmp_path / "logs").rglob("results.json")).read_text())
    assert [h["round"] for h in results["history"]] == [0, 1]
    assert results["traffic"]["activations_up"] > 0
    assert (tmp_path / "logs" / "demo" / "checkpoints" / "last.ckpt").exists()
    main(_demo_args(tmp_path, "--trainer.max_epochs", "3", "--ckpt_path", "last"))
    resumed = sorted((tmp_path / "logs").rglob("results.json"))[-1]
    assert [h["round"] for h in json.loads(resumed.read_text())["history"]] == [0, 1, 2]
    validate = ["validate", *_demo_args(tmp_path)[1:], "--ckpt_path", "last"]
    main(validate)
    assert "val_loss" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (["--model.model", "no-such-model-anywhere"], "cannot load model 'no-such-model-anywhere'"),
        (["--model.cut_layer", "2"], "`cut_layer` must be an int in [1, 1]"),
        (["--model.lora_rank", "0"], "`lora_rank` must be an int >= 1"),
        (["--data.examples_per_client", "0"], "examples_per_client"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, in_repo, capsys, override, needle) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(_demo_args(tmp_path, *override))
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err


def test_unknown_config_key_is_rejected(tmp_path, in_repo, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(_demo_args(tmp_path, "--model.no_such_key", "1"))
    assert exit_info.value.code == 2
    assert "no_such_key" in capsys.readouterr().err


def test_unknown_architecture_is_rejected(tmp_path) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    from atlas_pl.split.backbone import SplitBackbone

    model = T5ForConditionalGeneration(T5Config(num_layers=2, d_model=16, d_ff=32, num_heads=2, vocab_size=100))
    with pytest.raises(ValueError, match="unsupported architecture 't5'"):
        SplitBackbone(model, cut_layer=1)
