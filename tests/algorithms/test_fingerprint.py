"""Fingerprints: seeded chunked projection, LoRA gradient selection, and the DP helpers."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from torch import nn

from atlas_pl.algorithms import fingerprint as fp
from atlas_pl.algorithms.fingerprint import (
    SEED_BLOCK,
    fingerprint_bytes,
    lora_gradients,
    project_gradients,
    projection_block,
)
from atlas_pl.algorithms.privacy import clip_to_norm, dp_epsilon, privatize


def _grads(seed: int = 0, sizes: tuple[int, ...] = (3000, 7, 5200)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen) for n in sizes]


# --- projection ---------------------------------------------------------------------------------------------------


def test_projection_with_the_same_seed_is_deterministic():
    grads = _grads()

    first, second = project_gradients(grads, seed=3), project_gradients(grads, seed=3)

    assert torch.equal(first, second)


def test_projection_with_another_seed_differs():
    grads = _grads()

    assert not torch.allclose(project_gradients(grads, seed=0), project_gradients(grads, seed=1))


@pytest.mark.parametrize("chunk_size", [1, 4096, 5000, 3 * 4096, 1 << 20])
def test_projection_does_not_depend_on_chunk_size(chunk_size):
    grads = _grads(sizes=(3 * SEED_BLOCK + 17, 100))
    reference = project_gradients(grads, chunk_size=SEED_BLOCK)

    result = project_gradients(grads, chunk_size=chunk_size)

    torch.testing.assert_close(result, reference)


def test_projection_matches_dense_reference():
    g = torch.cat(_grads())
    num_blocks = math.ceil(g.numel() / SEED_BLOCK)
    dense = torch.cat([projection_block(5, b, 16) for b in range(num_blocks)], dim=1)[:, : g.numel()]
    expected = dense @ g / torch.linalg.vector_norm(dense @ g)

    result = project_gradients(_grads(), dim=16, seed=5)

    torch.testing.assert_close(result, expected)


def test_projection_of_a_mapping_uses_sorted_names_whatever_the_insertion_order():
    a, b, c = _grads()
    forward = {"layer.0.lora_B": a, "layer.1.lora_B": b, "layer.2.lora_B": c}
    backward = dict(reversed(list(forward.items())))

    result = project_gradients(backward)

    torch.testing.assert_close(result, project_gradients(forward))
    torch.testing.assert_close(result, project_gradients([a, b, c]))


def test_projection_does_not_depend_on_how_the_vector_is_split_into_tensors():
    whole = torch.cat(_grads())

    pieces = project_gradients([whole[:10], whole[10:5000].reshape(10, -1), whole[5000:]])

    torch.testing.assert_close(pieces, project_gradients([whole]))


def test_projection_never_holds_more_than_one_chunk_of_the_matrix(monkeypatch):
    num_cols: list[int] = []
    chunk_lengths: list[int] = []
    real_iter_chunks = fp._iter_chunks

    ones = torch.ones(2, SEED_BLOCK)

    def fake_block(seed, block_idx, dim, cols=SEED_BLOCK):
        num_cols.append(cols)
        return ones[:dim, :cols]

    def spy_chunks(flats, size):
        for chunk in real_iter_chunks(flats, size):
            chunk_lengths.append(chunk.numel())
            yield chunk

    monkeypatch.setattr(fp, "projection_block", fake_block)
    monkeypatch.setattr(fp, "_iter_chunks", spy_chunks)
    huge = torch.ones(1).expand(50_000_000)  # D = 5e7 without allocating it

    project_gradients([huge], dim=2, chunk_size=100_000)

    assert sum(num_cols) == 50_000_000
    assert max(chunk_lengths) <= math.ceil(100_000 / SEED_BLOCK) * SEED_BLOCK


def test_projection_approximately_preserves_cosines():
    gen = torch.Generator().manual_seed(0)
    u, w = torch.randn(2, 4000, generator=gen)
    u = u / u.norm()
    w = w - (w @ u) * u
    w = w / w.norm()
    for cosine in (0.9, 0.5, 0.0, -0.7):
        v = cosine * u + math.sqrt(1 - cosine**2) * w

        projected = project_gradients([u], dim=1024) @ project_gradients([v], dim=1024)

        assert abs(float(projected) - cosine) < 0.1


def test_projection_has_unit_norm_and_the_requested_length():
    result = project_gradients(_grads(), dim=32)

    assert result.shape == (32,) and result.dtype == torch.float32
    torch.testing.assert_close(torch.linalg.vector_norm(result), torch.tensor(1.0))


def test_per_tensor_normalization_ignores_the_scale_of_each_tensor():
    a, b, c = _grads()

    scaled = project_gradients([1000 * a, b, 0.01 * c], normalize="per_tensor")

    torch.testing.assert_close(scaled, project_gradients([a, b, c], normalize="per_tensor"))
    assert not torch.allclose(scaled, project_gradients([1000 * a, b, 0.01 * c]))


def test_zero_gradient_raises_and_points_to_lora_b():
    with pytest.raises(ValueError, match="∇_B"):
        project_gradients([torch.zeros(100)])


def test_non_finite_gradient_gives_a_non_finite_fingerprint():
    g = torch.ones(100)
    g[3] = float("nan")

    assert not torch.isfinite(project_gradients([g])).all()


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"dim": 0}, "`dim`"),
        ({"chunk_size": 0}, "`chunk_size`"),
        ({"seed": -1}, "`seed`"),
        ({"normalize": "layer"}, "`normalize`"),
    ],
)
def test_invalid_projection_argument_raises_naming_it(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        project_gradients(_grads(), **kwargs)


def test_empty_gradients_raise():
    with pytest.raises(ValueError, match="`grads` is empty"):
        project_gradients([])


def test_fingerprint_bytes_counts_dim_times_item_size():
    assert fingerprint_bytes(64, torch.float32) == 256
    assert fingerprint_bytes(64, torch.float16) == 128
    with pytest.raises(ValueError, match="`dim`"):
        fingerprint_bytes(0)


# --- LoRA gradients -----------------------------------------------------------------------------------------------


class _TinyLoRA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(6, 4)
        self.lora_A = nn.Linear(6, 2, bias=False)
        self.lora_B = nn.Linear(2, 4, bias=False)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x))


def _backward(model: nn.Module) -> None:
    model(torch.randn(8, 6, generator=torch.Generator().manual_seed(0))).pow(2).sum().backward()


def test_lora_gradients_selects_b_as_detached_flat_copies():
    model = _TinyLoRA()
    _backward(model)

    grads = lora_gradients(model.named_parameters(), which="B")

    assert list(grads) == ["lora_B.weight"]
    assert grads["lora_B.weight"].shape == (8,) and not grads["lora_B.weight"].requires_grad
    torch.testing.assert_close(grads["lora_B.weight"], model.lora_B.weight.grad.reshape(-1))


def test_lora_gradients_all_selects_a_and_b_only():
    model = _TinyLoRA()
    _backward(model)

    assert sorted(lora_gradients(model.named_parameters(), which="all")) == ["lora_A.weight", "lora_B.weight"]


def test_lora_a_gradient_is_zero_at_init_so_its_fingerprint_raises():
    model = _TinyLoRA()
    _backward(model)

    grads = lora_gradients(model.named_parameters(), which="A")

    with pytest.raises(ValueError, match="B = 0 at init"):
        project_gradients(grads)


def test_lora_gradients_without_backward_raises():
    with pytest.raises(ValueError, match="backward"):
        lora_gradients(_TinyLoRA().named_parameters())


def test_lora_gradients_with_unknown_selection_raises():
    with pytest.raises(ValueError, match="`which`"):
        lora_gradients(_TinyLoRA().named_parameters(), which="C")  # type: ignore[arg-type]


# --- differential privacy -----------------------------------------------------------------------------------------


def test_clipping_bounds_the_norm_and_keeps_short_vectors():
    long, short = torch.full((64,), 10.0), torch.full((64,), 0.01)

    torch.testing.assert_close(torch.linalg.vector_norm(privatize(long, 1.0, 0.0)), torch.tensor(1.0))
    torch.testing.assert_close(clip_to_norm(short, 1.0), short)


def test_privatize_adds_noise_of_std_sigma_times_c_reproducibly():
    vector = torch.zeros(20_000)

    first = privatize(vector, clip_norm=0.5, noise_multiplier=2.0, generator=torch.Generator().manual_seed(0))
    second = privatize(vector, clip_norm=0.5, noise_multiplier=2.0, generator=torch.Generator().manual_seed(0))

    assert torch.equal(first, second)
    assert abs(float(first.std()) - 1.0) < 0.03


@pytest.mark.parametrize(
    ("kwargs", "argument"), [({"clip_norm": 0.0}, "`clip_norm`"), ({"noise_multiplier": -1}, "`noise")]
)
def test_privatize_with_invalid_argument_raises(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        privatize(torch.ones(4), **{"clip_norm": 1.0, "noise_multiplier": 1.0, **kwargs})


def test_epsilon_decreases_as_noise_grows():
    epsilons = [dp_epsilon(sigma, steps=10, delta=1e-5) for sigma in (0.5, 1.0, 2.0, 4.0)]

    assert all(a > b for a, b in zip(epsilons, epsilons[1:]))


def test_pld_epsilon_of_composed_gaussians_matches_the_analytic_gaussian():
    # k releases with noise multiplier σ compose exactly to one release with σ / √k.
    expected = dp_accounting.get_epsilon_gaussian(2.0 / math.sqrt(4), 1e-5)

    pld = dp_epsilon(2.0, steps=4, delta=1e-5, accountant="pld")
    rdp = dp_epsilon(2.0, steps=4, delta=1e-5, accountant="rdp")

    assert pld == pytest.approx(expected, rel=0.01)
    assert expected <= rdp < 1.3 * expected


def test_subsampling_lowers_epsilon():
    assert dp_epsilon(1.0, steps=10, delta=1e-5, sampling_rate=0.1) < dp_epsilon(1.0, steps=10, delta=1e-5)


def test_epsilon_without_noise_is_infinite():
    assert dp_epsilon(0.0, steps=1, delta=1e-5) == math.inf


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"steps": 0}, "`steps`"),
        ({"delta": 0.0}, "`delta`"),
        ({"sampling_rate": 1.5}, "`sampling_rate`"),
        ({"accountant": "moments"}, "`accountant`"),
        ({"noise_multiplier": -0.1}, "`noise_multiplier`"),
    ],
)
def test_dp_epsilon_with_invalid_argument_raises(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        dp_epsilon(**{"noise_multiplier": 1.0, "steps": 1, "delta": 1e-5, **kwargs})
