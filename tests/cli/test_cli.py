"""The ``atlas-pl`` command: shipped configs parse, bad input exits non-zero with a message naming the fix."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from atlas_pl.cli import main
from tests.conftest import TINY_DEMO, demo_cli_args

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
BASELINES = sorted((Path(__file__).parents[2] / "configs" / "baselines").glob("*.yaml"))
TINY = TINY_DEMO


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
    assert printed["model"]["share"] in ("none", "server", "all")
    names = [c["class_path"].rsplit(".", 1)[-1] for c in printed["trainer"]["callbacks"]]
    aggregates = "ClusterAggregation" in names or "GraphAggregation" in names
    assert aggregates == (printed["model"]["share"] != "all" and baseline.stem != "local")
    assert baseline.read_text().startswith("#"), "each config opens with a header giving its command"


def _demo_args(tmp_path: Path, *extra: str) -> list[str]:
    return demo_cli_args(tmp_path, *extra)


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
    main(["test", *_demo_args(tmp_path)[1:], "--ckpt_path", "last"])
    tested = json.loads(sorted((tmp_path / "logs").rglob("test_results.json"))[-1].read_text())
    assert tested["ckpt_path"] == "last.ckpt" and tested["rounds"] == 3
    assert 0.0 <= tested["metrics"]["test_acc"] <= 1.0 and tested["metrics"]["test_loss"] > 0


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (["--model.model", "no-such-model-anywhere"], "cannot load model 'no-such-model-anywhere'"),
        (["--model.cut_layer", "3"], "`cut_layer` must be an int in [1, 2]"),
        (["--model.lora.rank", "0"], "`rank` must be an int >= 1"),
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


def _truncated_checkpoint(path: Path) -> Path:
    buffer = io.BytesIO()
    torch.save({"state_dict": {"backbone.w": torch.zeros(4096)}, "epoch": 1}, buffer)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def _random_checkpoint(path: Path) -> Path:
    path.write_bytes(random.Random(0).randbytes(4096))
    return path


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("make", [_truncated_checkpoint, _random_checkpoint], ids=["truncated", "random_bytes"])
@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict", "export"])
def test_unreadable_checkpoint_exits_2_naming_the_file(tmp_path, in_repo, capsys, subcommand, make) -> None:
    bad = make(tmp_path / "bad.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, *_demo_args(tmp_path)[1:], "--ckpt_path", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"checkpoint {str(bad)!r} cannot be read" in err and "pass another --ckpt_path or delete it" in err
    assert _files(tmp_path) == [bad], "nothing may be written before the checkpoint is read"


def test_unreadable_last_checkpoint_exits_2_before_writing(tmp_path, in_repo, capsys) -> None:
    bad = _random_checkpoint(_mkdir(tmp_path / "logs" / "demo" / "checkpoints") / "last.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(_demo_args(tmp_path, "--ckpt_path", "last"))
    assert exit_info.value.code == 2
    assert f"checkpoint {str(bad)!r} cannot be read" in capsys.readouterr().err
    assert _files(tmp_path) == [bad]


def test_export_without_a_checkpoint_exits_2(tmp_path, in_repo, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *_demo_args(tmp_path)[1:], "--ckpt_path", "last"])
    assert exit_info.value.code == 2
    assert "no checkpoint found for --ckpt_path 'last'" in capsys.readouterr().err


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_export_writes_a_peft_folder_per_cluster_and_client(tmp_path, in_repo, capsys) -> None:
    from peft import PeftModel

    from atlas_pl.models import load_model

    main(_demo_args(tmp_path, "--trainer.max_epochs", "1"))
    out = tmp_path / "adapters"
    main(["export", *_demo_args(tmp_path)[1:], "--ckpt_path", "last", "--output_dir", str(out), "--per_client", "true"])
    assert str(out / "client_002") in capsys.readouterr().out
    folders = sorted(p.name for p in out.iterdir())
    assert folders[:3] == ["client_000", "client_001", "client_002"] and folders[3].startswith("cluster_")
    for folder in folders:
        assert {p.name for p in (out / folder).iterdir()} == {
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
        }
    base = load_model("gpt2-tiny", overrides=json.loads(TINY[1]))
    model = PeftModel.from_pretrained(base, str(out / folders[3]))  # loads into a model of the same architecture
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_a_u_shaped_split_runs_every_atlas_phase_from_yaml_with_the_head_on_the_clients(tmp_path, in_repo) -> None:
    main(_demo_args(tmp_path, "--trainer.max_epochs", "2", "--model.split_shape", "u_shaped"))
    results = json.loads(next((tmp_path / "logs").rglob("results.json")).read_text())
    traffic = results["traffic"]
    assert results["hparams"]["split_shape"] == "u_shaped" and len(results["history"]) == 2
    assert traffic["head_activations_down"] == traffic["head_gradients_up"] > 0  # the head ran on the clients
    assert (tmp_path / "logs" / "demo" / "checkpoints" / "last.ckpt").exists()


def test_a_configured_asynchronous_round_checkpoint_writes_where_last_resumes_from(tmp_path, in_repo) -> None:
    overlay = tmp_path / "async.yaml"
    overlay.write_text("trainer:\n  callbacks:\n    - class_path: atlas_pl.callbacks.RoundCheckpoint\n"
                       "      init_args: {asynchronous: true}\n")  # fmt: skip
    main([*_demo_args(tmp_path, "--trainer.max_epochs", "1"), "--config", str(overlay)])
    assert (tmp_path / "logs" / "demo" / "checkpoints" / "last.ckpt").exists()
    main([*_demo_args(tmp_path, "--trainer.max_epochs", "2", "--ckpt_path", "last"), "--config", str(overlay)])
    resumed = sorted((tmp_path / "logs").rglob("results.json"))[-1]
    assert [h["round"] for h in json.loads(resumed.read_text())["history"]] == [0, 1]
