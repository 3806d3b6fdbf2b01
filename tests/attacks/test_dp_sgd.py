"""DP-SGD of the client adapters (``model.dp_sgd``): per-example gradients through the split, clipping, noise, ε."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch

from atlas_pl.algorithms import DPSGD, dp_epsilon
from atlas_pl.callbacks.results import summary_table
from atlas_pl.data import FederatedDataModule
from atlas_pl.federation import Federation
from atlas_pl.lora.adapters import LoraSpec
from atlas_pl.models import load_model
from atlas_pl.split.backbone import SplitBackbone
from atlas_pl.split.channel import InProcessChannel
from atlas_pl.split.step import split_forward_backward
from atlas_pl.tensorboard_layout import CHARTS
from tests.conftest import tiny_data_kwargs, tiny_federation_kwargs

TINY = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "vocab_size": 1000,
        "hidden_dropout_prob": 0, "attention_probs_dropout_prob": 0}  # fmt: skip


def _split() -> SplitBackbone:
    torch.manual_seed(0)
    split = SplitBackbone(load_model("bert-tiny", "classification", 2, TINY).eval(), 1, LoraSpec(rank=4),
                          pooling="cls")  # fmt: skip
    split.add_client_adapter("c")
    split.add_server_adapter("s")
    for p in split.bank.parameters("c"):  # B = 0 at the start: give the client adapter a gradient in A too
        torch.nn.init.normal_(p, std=0.1)
    return split


def _batch(n: int = 6) -> dict:
    ids = torch.randint(5, 1000, (n, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # padding must not mix examples either
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(n) % 2}


def _client_grads(split: SplitBackbone, dp: DPSGD | None, batch: dict) -> list[torch.Tensor]:
    params = split.bank.parameters("c")
    for p in [*params, *split.server_parameters("s")]:
        p.grad = None
    split_forward_backward(split, InProcessChannel(), batch, "c", "s",
                           client_backward=None if dp is None else lambda h, g: dp.backward(h, g, params))  # fmt: skip
    return [p.grad.detach().clone() for p in params]


def _one_example_grads(split: SplitBackbone, batch: dict, i: int) -> list[torch.Tensor]:
    """Example ``i``'s gradient of the client adapter, from a split step on that example alone."""
    return _client_grads(split, None, {k: v[i : i + 1] for k, v in batch.items()})


def test_without_noise_or_clipping_dp_sgd_is_the_plain_split_gradient() -> None:
    split, batch = _split(), _batch()
    plain = _client_grads(split, None, batch)
    private = _client_grads(split, DPSGD(noise_multiplier=0.0, clip_norm=1e9), batch)
    for a, b in zip(plain, private):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_each_example_is_clipped_on_its_own_gradient() -> None:
    split, batch = _split(), _batch()
    singles = [_one_example_grads(split, batch, i) for i in range(6)]  # the mean loss of one example = its loss
    norms = [float(torch.sqrt(sum(g.pow(2).sum() for g in s))) for s in singles]
    clip = sorted(norms)[2]  # half the examples are clipped
    expected = [sum(s[j] * min(1.0, clip / n) for s, n in zip(singles, norms)) / 6 for j in range(len(singles[0]))]
    got = _client_grads(split, DPSGD(noise_multiplier=0.0, clip_norm=clip), batch)
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    total = float(torch.sqrt(sum(g.pow(2).sum() for g in got)))
    assert total <= clip + 1e-6  # the mean of clipped gradients is within the bound


def test_the_noise_has_standard_deviation_sigma_c_over_the_batch() -> None:
    split, batch = _split(), _batch()
    clean = _client_grads(split, DPSGD(noise_multiplier=0.0, clip_norm=0.5), batch)
    torch.manual_seed(3)
    noisy = _client_grads(split, DPSGD(noise_multiplier=2.0, clip_norm=0.5), batch)
    noise = torch.cat([(b - a).flatten() for a, b in zip(clean, noisy)])
    assert noise.numel() >= 500
    assert float(noise.std()) == pytest.approx(2.0 * 0.5 / 6, rel=0.15)


def test_epsilon_is_the_accountants_and_grows_with_steps() -> None:
    dp = DPSGD(noise_multiplier=1.0, clip_norm=1.0, delta=1e-5)
    assert dp.epsilon(100, 0.1) == pytest.approx(dp_epsilon(1.0, 100, 1e-5, 0.1))
    assert dp.epsilon(10, 0.1) < dp.epsilon(100, 0.1) < dp.epsilon(100, 0.5)
    assert dp.epsilon(0, 0.1) == 0.0
    assert DPSGD(noise_multiplier=0.0).epsilon(5, 0.1) == float("inf")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"noise_multiplier": -1.0}, "noise_multiplier must be >= 0"),
    ({"clip_norm": 0.0}, "clip_norm must be > 0"),
    ({"delta": 1.0}, r"delta must be in \(0, 1\)"),
])  # fmt: skip
def test_bad_dp_settings_name_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DPSGD(**kwargs)


def test_a_federation_with_dp_sgd_logs_epsilon_and_resumes_its_step_count(fast_trainer_kwargs, seeded) -> None:
    fed = Federation(**tiny_federation_kwargs(share="none"), dp_sgd={"noise_multiplier": 1.1, "clip_norm": 1.0})
    assert fed.hparams["dp_sgd"] == {"noise_multiplier": 1.1, "clip_norm": 1.0, "delta": 1e-5}
    dm = FederatedDataModule(**tiny_data_kwargs())
    L.Trainer(max_epochs=2, **fast_trainer_kwargs).fit(fed, datamodule=dm)
    steps = [c.dp_steps for c in fed.clients]
    assert steps == [4] * 4  # 2 rounds x 2 local steps
    batch, examples = fed.clients[0].dp_batch_size, min(fed.num_examples)
    logged = fed.history[-1]["privacy/dp_epsilon"]
    assert logged == pytest.approx(dp_epsilon(1.1, 4, 1e-5, batch / examples))
    assert fed.history[0]["privacy/dp_epsilon"] < logged  # ε grows round by round
    table = summary_table(fed.history)
    assert table.columns[-1].header == "DP ε (max client)" and list(table.columns[-1].cells)[-1] == f"{logged:.2f}"
    chart = CHARTS["privacy"]["DP-SGD ε of the client adapters (largest, median client)"]
    assert {k for k in fed.history[-1] if re.match(chart, k)} == {"privacy/dp_epsilon", "privacy/dp_epsilon_median"}
    checkpoint: dict = {"state_dict": fed.state_dict()}
    fed.on_save_checkpoint(checkpoint)
    again = Federation(**tiny_federation_kwargs(share="none"), dp_sgd={"noise_multiplier": 1.1})
    again.on_load_checkpoint(checkpoint)
    assert [c.dp_steps for c in again.clients] == steps


def test_without_dp_sgd_no_privacy_metrics_are_logged(fast_trainer_kwargs, seeded) -> None:
    fed = Federation(**tiny_federation_kwargs(share="none"))
    L.Trainer(max_epochs=1, **fast_trainer_kwargs).fit(fed, datamodule=FederatedDataModule(**tiny_data_kwargs()))
    assert not any(k.startswith("privacy/") for k in fed.history[-1])
