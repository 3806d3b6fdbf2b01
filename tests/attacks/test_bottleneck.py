"""The variational information bottleneck at the cut (``model.bottleneck``): learned noise per hidden dimension."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch

from atlas_pl.data import FederatedDataModule
from atlas_pl.federation import Federation
from atlas_pl.split.bottleneck import BottleneckSpec, InformationBottleneck
from atlas_pl.tensorboard_layout import CHARTS
from tests.conftest import tiny_data_kwargs, tiny_federation_kwargs


def test_the_noise_starts_at_its_scale_and_the_penalty_is_the_gaussian_channel_bound() -> None:
    vib = InformationBottleneck(BottleneckSpec(weight=0.5, init_scale=0.3), 16)
    vib.add("c")
    hidden = torch.randn(8, 64, 16, generator=torch.Generator().manual_seed(0)) * 2.0
    torch.manual_seed(1)
    z, penalty, nats = vib("c", hidden)
    rms = float(hidden.pow(2).mean().sqrt())
    assert float((z - hidden).detach().std()) == pytest.approx(0.3 * rms, rel=0.05)
    variance = hidden.reshape(-1, 16).var(dim=0, unbiased=False)
    expected = float(0.5 * torch.log1p(variance / (0.3 * rms) ** 2).mean())
    assert nats == pytest.approx(expected, rel=1e-5)
    assert float(penalty.detach()) == pytest.approx(0.5 * expected, rel=1e-5)


def test_the_penalty_raises_the_noise_and_the_task_gradient_reaches_the_scales() -> None:
    vib = InformationBottleneck(BottleneckSpec(weight=1.0, init_scale=0.3), 8)
    vib.add("c")
    hidden = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(0))
    _, penalty, _ = vib("c", hidden)
    penalty.backward()
    assert bool((vib.log_scale["c"].grad < 0).all())  # descending it raises every σ_d
    vib.log_scale["c"].grad = None
    z, _, _ = vib("c", hidden)
    z.pow(2).sum().backward()  # a task that is hurt by noise
    assert bool((vib.log_scale["c"].grad > 0).any())  # ... pushes the scales down


@pytest.mark.parametrize(("kwargs", "match"), [({"weight": -1.0}, "bottleneck.weight must be >= 0"),
                                               ({"init_scale": 0.0}, "bottleneck.init_scale must be > 0")])  # fmt: skip
def test_bad_bottleneck_settings_name_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BottleneckSpec(**kwargs)


def test_a_federation_trains_the_scales_checkpoints_them_and_refuses_dp_sgd(fast_trainer_kwargs, seeded) -> None:
    with pytest.raises(ValueError, match="cannot be combined"):
        Federation(**tiny_federation_kwargs(), bottleneck={"weight": 0.1}, dp_sgd={"noise_multiplier": 1.0})
    fed = Federation(**tiny_federation_kwargs(share="none"), bottleneck={"weight": 1.0, "init_scale": 0.5})
    assert fed.hparams["bottleneck"] == {"weight": 1.0, "init_scale": 0.5, "learning_rate": 0.05}
    start = fed.backbone.bottleneck.scales("client_0")  # type: ignore[union-attr]
    L.Trainer(max_epochs=1, **fast_trainer_kwargs).fit(fed, datamodule=FederatedDataModule(**tiny_data_kwargs()))
    after = fed.backbone.bottleneck.scales("client_0")  # type: ignore[union-attr]
    assert not torch.equal(start, after)  # the client's optimizer trains them, at their own rate
    groups = fed.optimizers()[0].optimizer.param_groups  # type: ignore[index,union-attr]
    assert [g["lr"] for g in groups] == [1e-2, 0.05] and groups[1]["weight_decay"] == 0.0
    assert fed.history[-1]["privacy/bottleneck_scale"] == pytest.approx(
        float(torch.stack([fed.backbone.bottleneck.scales(f"client_{i}") for i in range(4)]).mean()))  # type: ignore[union-attr]  # fmt: skip
    chart = CHARTS["privacy"]["bottleneck noise σ / rms(h) (mean, min, max over dimensions)"]
    assert {k for k in fed.history[-1] if re.match(chart, k)} == {
        "privacy/bottleneck_scale", "privacy/bottleneck_scale_min", "privacy/bottleneck_scale_max"}  # fmt: skip
    checkpoint: dict = {"state_dict": fed.state_dict()}
    fed.on_save_checkpoint(checkpoint)
    assert "backbone.bottleneck.log_scale.client_0" in checkpoint["state_dict"]
    with pytest.raises(ValueError, match="one process"):
        fed.shard(0, 2)
