import pytest
import torch

from atlas_pl.split.channel import InProcessChannel, compress_roundtrip, tensor_wire_bytes


def test_activation_bytes_follow_the_wire_format() -> None:
    h = torch.randn(2, 5, 8)
    assert tensor_wire_bytes(h) == 2 * 5 * 8 * 4
    assert tensor_wire_bytes(h, "fp16") == 2 * 5 * 8 * 2
    assert tensor_wire_bytes(h, "int8") == 2 * 5 * 8 + 4 * 2 * 5  # one fp32 scale per token vector


def test_int8_scales_every_row_on_its_own() -> None:
    h = torch.tensor([[1000.0, -500.0, 3.0], [0.01, -0.02, 0.005]])
    back = compress_roundtrip(h, "int8")
    assert torch.allclose(back[1], h[1], rtol=0, atol=0.02 / 127)  # a per-tensor scale would round row 1 to zeros
    assert (back[1] != 0).all() and back[0, 0] == 1000.0
    assert compress_roundtrip(torch.tensor(2.5), "int8") == pytest.approx(2.5, rel=1e-2)


@pytest.mark.parametrize(("compression", "tol"), [("none", 0.0), ("fp16", 1e-3), ("bf16", 1e-2), ("int8", 2e-2)])
def test_compression_roundtrip_error_is_bounded(compression: str, tol: float) -> None:
    h = torch.randn(64, 32)
    back = compress_roundtrip(h, compression)
    assert back.dtype == h.dtype
    assert (back - h).abs().max() <= tol * h.abs().max() + 1e-12


def test_channel_returns_a_leaf_that_collects_the_cut_gradient() -> None:
    channel = InProcessChannel()
    w = torch.randn(4, 4, requires_grad=True)
    h = torch.randn(3, 4) @ w
    received = channel.send_activations(h, {"mask": torch.ones(3, dtype=torch.int64)}, client_idx=7)
    assert received.is_leaf and received.requires_grad
    received.sum().backward()
    assert w.grad is None, "the server backward must stop at the cut"
    grad = channel.send_gradients(received.grad, client_idx=7)
    torch.autograd.backward(h, grad)
    assert w.grad is not None
    assert channel.stats.activations_up == channel.stats.gradients_down == 3 * 4 * 4
    assert channel.stats.metadata_up == 3 * 8
    assert channel.stats.per_client_up[7] == 3 * 4 * 4 + 3 * 8


def test_unknown_compression_is_rejected() -> None:
    with pytest.raises(ValueError, match="`compression` must be one of"):
        InProcessChannel("zip")  # type: ignore[arg-type]
