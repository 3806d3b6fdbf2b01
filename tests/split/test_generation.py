"""Batched, KV-cached greedy generation through the split model equals the unsplit model's own greedy decoding."""

import pytest
import torch

from atlas_pl.lora.adapters import LoraSpec
from atlas_pl.models import load_model
from atlas_pl.split.backbone import SplitBackbone
from atlas_pl.split.scoring import greedy_generate

# 4 blocks each; float64 below keeps argmax ties out of the comparisons
OVERRIDES = {
    "gpt2-tiny": {"vocab_size": 1000, "n_embd": 32, "n_head": 2, "bos_token_id": 0, "eos_token_id": 0},
    "llama-tiny": {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "bos_token_id": 0, "eos_token_id": 0},
}  # fmt: skip
MODELS = sorted(OVERRIDES)
LENGTHS = (3, 11, 6, 8, 4)  # unsorted on purpose: the output must come back in input order
N = 6
PAD = 1


def _backbone(name: str, client_cut: int | None = None) -> SplitBackbone:
    """A float64 tiny model cut after block 1, with a client adapter ``c`` and a server adapter ``s`` whose LoRA
    factors are random (so both adapters change what the model computes)."""
    torch.manual_seed(0)
    model = load_model(name, overrides=dict(OVERRIDES[name])).to(torch.float64)
    split = SplitBackbone(model, cut_layer=1, lora=LoraSpec(rank=4, alpha=8)).eval()
    split.add_client_adapter("c", cut_layer=client_cut)
    split.add_server_adapter("s")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in ("c", "s"):
            for a, b, _ in split.bank.factors(adapter).values():
                a.copy_(torch.randn(a.shape, generator=g, dtype=a.dtype) * 0.3)
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.3)
    return split


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(2, 1000, (n,), generator=g).tolist() for n in LENGTHS]


def _hf_greedy(split: SplitBackbone, prompts: list[list[int]], n: int, eos: int | None) -> list[list[int]]:
    """The unsplit model's own ``generate`` (with the adapters active now), one prompt at a time, EOS stripped."""
    out = []
    for prompt in prompts:
        ids = split.model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=PAD
        )[0, len(prompt) :].tolist()
        out.append(ids[: ids.index(eos)] if eos in ids else ids)
    return out


def _no_cache_greedy(
    split: SplitBackbone, prompts: list[list[int]], n: int, eos: int | None, client: str, server: str
) -> list[list[int]]:
    """The previous implementation: one prompt at a time, the whole sequence re-run through both halves per token."""
    split.activate(client, server)
    cut = split.cut_of(client)
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            new: list[int] = []
            for _ in range(n):
                mask = torch.ones_like(ids)
                hidden = split.server_hidden(split.client_forward(ids, mask, cut), mask, cut)
                token = int(split.model.lm_head(hidden[:, -1]).argmax(-1))
                if token == eos:
                    break
                new.append(token)
                ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
            out.append(new)
    return out


def _eos_that_stops_some_rows(runs: list[list[int]]) -> int:
    """A token generated (not first) in some rows' runs but absent from others': as EOS it stops only those rows."""
    for run in runs:
        for token in run[1:]:
            if any(token not in other for other in runs):
                return token
    raise AssertionError(f"no token stops some rows but not others in {runs}")


def _check_against_hf(split: SplitBackbone, **kwargs) -> None:
    prompts = _prompts()
    free = greedy_generate(split, prompts, N, None, "c", "s", **kwargs)
    split.activate("c", "s")
    assert free == _hf_greedy(split, prompts, N, None)
    assert all(len(run) == N for run in free)

    eos = _eos_that_stops_some_rows(free)
    stopped = greedy_generate(split, prompts, N, eos, "c", "s", pad_token_id=PAD, **kwargs)
    split.activate("c", "s")
    assert stopped == _hf_greedy(split, prompts, N, eos)
    assert any(len(run) < N for run in stopped), "no row stopped at EOS"
    assert any(len(run) == N for run in stopped), "every row stopped at EOS"
    assert all(eos not in run for run in stopped)

    split.activate(None, None)
    assert _hf_greedy(split, prompts, N, None) != free, "the adapters should change the generated tokens"


@pytest.mark.parametrize("name", MODELS)
def test_batched_cached_generation_equals_the_unsplit_models_greedy_decoding(name: str) -> None:
    _check_against_hf(_backbone(name))


@pytest.mark.parametrize("name", MODELS)
def test_a_later_client_cut_and_chunks_smaller_than_the_prompts(name: str) -> None:
    split = _backbone(name, client_cut=3)
    assert split.cut_of("c") == 3
    _check_against_hf(split, batch_size=2)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_generation_equals_the_one_prompt_at_a_time_uncached_loop(name: str, batch_size: int) -> None:
    split = _backbone(name, client_cut=2)
    prompts = _prompts()
    free = greedy_generate(split, prompts, N, None, "c", "s")
    eos = _eos_that_stops_some_rows(free)

    for eos_id in (None, eos):
        expected = _no_cache_greedy(split, prompts, N, eos_id, "c", "s")
        assert greedy_generate(split, prompts, N, eos_id, "c", "s", batch_size=batch_size) == expected


@pytest.mark.parametrize("name", MODELS)
def test_per_prompt_token_limits(name: str) -> None:
    split = _backbone(name)
    prompts = _prompts()
    limits = [1, N, 3, 2, 5]
    full = greedy_generate(split, prompts, N, None, "c", "s")

    out = greedy_generate(split, prompts, limits, None, "c", "s", batch_size=2)

    assert out == [run[:n] for run, n in zip(full, limits, strict=True)]


def test_bad_inputs_raise_errors_that_name_the_fix() -> None:
    split = _backbone("gpt2-tiny")
    prompts = _prompts()
    with pytest.raises(ValueError, match=r"`max_new_tokens` must be an int >= 1"):
        greedy_generate(split, prompts, 0, None, "c", "s")
    with pytest.raises(ValueError, match=r"`max_new_tokens` must be an int >= 1"):
        greedy_generate(split, prompts, [2, 2, 0, 2, 2], None, "c", "s")
    with pytest.raises(ValueError, match="one int per prompt"):
        greedy_generate(split, prompts, [2, 2], None, "c", "s")
    with pytest.raises(ValueError, match=r"`batch_size` must be an int >= 1"):
        greedy_generate(split, prompts, 2, None, "c", "s", batch_size=0)
    with pytest.raises(ValueError, match="at least one prompt token"):
        greedy_generate(split, [[5, 6], []], 2, None, "c", "s")
    assert greedy_generate(split, [], 2, None, "c", "s") == []

    torch.manual_seed(0)
    bert = load_model("bert-tiny", "classification", overrides={"vocab_size": 1000})
    encoder = SplitBackbone(bert, cut_layer=1, pooling="mean")
    with pytest.raises(ValueError, match="needs a causal LM.*load a causal LM"):
        greedy_generate(encoder, [[5, 6]], 2, None)
