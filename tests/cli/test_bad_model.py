"""``model_overrides`` left over from another model family exit with code 2 and a message naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from atlas_pl.cli import main

ROOT = Path(__file__).parents[2]


def test_gpt2_overrides_on_a_llama_model_exit_2_naming_the_keys_and_the_fix(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(ROOT)
    args = ["fit", "--config", "configs/demo.yaml", "--model.model", "llama-tiny"]  # demo.yaml sets n_layer, n_embd
    args += ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "`model_overrides` key(s) 'n_embd'" in err
    assert "'n_layer' (did you mean 'num_hidden_layers'?)" in err
    assert "do not fit model 'llama-tiny' (LlamaConfig" in err
    assert "--model.model_overrides null" in err
