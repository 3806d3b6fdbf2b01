"""``load_model`` names the ``model_overrides`` keys a model does not take, what it takes, and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from atlas_pl.models import accepted_config_keys, load_model

SMALL_LLAMA = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1}


def test_gpt2_keys_on_llama_are_refused_with_the_llama_names() -> None:
    with pytest.raises(ValueError) as info:
        load_model("llama-tiny", overrides={"n_layer": 2, "n_embd": 32, "n_head": 2})
    message = str(info.value)
    assert "'n_embd' (did you mean 'hidden_size'?)" in message
    assert "'n_head' (did you mean 'num_attention_heads'?)" in message
    assert "'n_layer' (did you mean 'num_hidden_layers'?)" in message
    assert "do not fit model 'llama-tiny' (LlamaConfig" in message
    assert "It accepts: " in message and "num_key_value_heads" in message


def test_a_typo_gets_the_close_matches() -> None:
    with pytest.raises(ValueError, match=r"'n_layr' \(did you mean 'n_layer'\?\)"):
        load_model("gpt2-tiny", overrides={"n_layr": 2, "n_embd": 32, "n_head": 2})


def test_a_key_without_any_close_match_is_still_named() -> None:
    with pytest.raises(ValueError, match=r"key\(s\) 'zzz' do not fit model 'bert-tiny'"):
        load_model("bert-tiny", "classification", overrides={"zzz": 1})


def test_fitting_overrides_and_standard_aliases_still_apply() -> None:
    llama = load_model("llama-tiny", overrides=SMALL_LLAMA)
    assert llama.config.num_hidden_layers == 2 and llama.config.hidden_size == 32
    gpt2 = load_model("gpt2-tiny", overrides={"num_hidden_layers": 2, "n_embd": 32, "n_head": 2})  # alias of n_layer
    assert gpt2.config.n_layer == 2


def test_accepted_keys_hold_the_config_fields_and_not_the_bookkeeping() -> None:
    from transformers import GPT2Config

    keys = accepted_config_keys(GPT2Config)
    assert {"n_layer", "num_hidden_layers", "vocab_size", "num_labels"} <= set(keys)
    assert "model_type" not in keys and "transformers_version" not in keys


def test_a_pretrained_folder_refuses_a_key_its_model_does_not_take(tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    load_model("bert-tiny", "classification", overrides={"num_hidden_layers": 2, "hidden_size": 32}).save_pretrained(
        folder
    )
    with pytest.raises(ValueError) as info:
        load_model(str(folder), "classification", overrides={"n_layer": 1})
    assert "'n_layer' (did you mean 'num_hidden_layers'?)" in str(info.value)
    assert "BertConfig" in str(info.value)
    loaded = load_model(str(folder), "classification", overrides={"hidden_dropout_prob": 0.0})  # a config field
    assert loaded.config.hidden_dropout_prob == 0.0
