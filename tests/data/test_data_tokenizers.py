from __future__ import annotations

import pytest

from atlas_pl.data import load_tokenizer


def test_offline_gpt2_tokenizer_matches_real_gpt2_ids(gpt2_tokenizer):
    assert gpt2_tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert gpt2_tokenizer(" positive")["input_ids"] == [3967]
    assert len(gpt2_tokenizer) == 50257


def test_offline_gpt2_tokenizer_pads_right_with_eos(gpt2_tokenizer):
    assert gpt2_tokenizer.eos_token == "<|endoftext|>"
    assert gpt2_tokenizer.pad_token_id == gpt2_tokenizer.eos_token_id == 50256
    assert gpt2_tokenizer.padding_side == "right"


def test_load_tokenizer_is_cached():
    assert load_tokenizer("gpt2-offline") is load_tokenizer("gpt2-offline")


def test_unknown_local_tokenizer_raises_value_error_naming_it(tmp_path):
    missing = str(tmp_path / "no_such_tokenizer")
    with pytest.raises(ValueError, match="no_such_tokenizer"):
        load_tokenizer(missing)
