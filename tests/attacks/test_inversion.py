"""White-box inversion of the cut activations: it reads the tokens back from an undefended tiny model of each family,
and calibrated activation noise (``model.activation_noise``) brings it near chance."""

from __future__ import annotations

import pytest
import torch

from atlas_pl.attacks import LearnedInverter, invert_activations, learned_inversion, token_scores
from atlas_pl.federation import Federation
from atlas_pl.lora.adapters import LoraSpec
from atlas_pl.models import load_model
from atlas_pl.split.backbone import SplitBackbone
from atlas_pl.split.channel import ActivationNoise, InProcessChannel

NO_DROPOUT = {  # a 5,000-token vocabulary keeps the attack's read-out cheap; chance recall stays near 0
    "gpt2-tiny": {"n_layer": 2, "n_embd": 32, "n_head": 2, "embd_pdrop": 0, "resid_pdrop": 0, "attn_pdrop": 0,
                  "vocab_size": 5000},
    "llama-tiny": {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "vocab_size": 5000},
    "bert-tiny": {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "hidden_dropout_prob": 0,
                  "attention_probs_dropout_prob": 0, "vocab_size": 5000},
}  # fmt: skip


def _victim(model: str, cut: int = 1) -> tuple[SplitBackbone, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    task = "classification" if model.startswith("bert") else "causal_lm"
    base = load_model(model, task, 2, dict(NO_DROPOUT[model]), "float32").eval()
    backbone = SplitBackbone(base, cut, LoraSpec())
    backbone.add_client_adapter("client")
    backbone.add_server_adapter("server")
    backbone.activate("client", "server")
    ids = torch.randint(0, 5000, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # a padded example: the attack scores real tokens only
    with torch.no_grad():
        hidden = backbone.client_forward(ids, mask, cut)
    return backbone, ids, mask, hidden


def _attack(
    backbone: SplitBackbone, observed: torch.Tensor, mask: torch.Tensor, mode: str = "embedding"
) -> torch.Tensor:
    embedding = backbone.model.get_input_embeddings()
    steps, lr = (250, 0.05) if mode == "embedding" else (200, 0.3)
    result = invert_activations(lambda i, m: backbone.client_forward(i, m, 1), embedding, observed, mask,
                                mode=mode, steps=steps, lr=lr)  # type: ignore[arg-type]  # fmt: skip
    return result.tokens


@pytest.mark.parametrize(("model", "mode"), [("gpt2-tiny", "embedding"), ("llama-tiny", "embedding"),
                                             ("bert-tiny", "relaxed")])  # fmt: skip
def test_inversion_reads_the_tokens_back_from_undefended_activations_at_cut_1(model: str, mode: str) -> None:
    backbone, ids, mask, hidden = _victim(model)
    scores = token_scores(_attack(backbone, hidden, mask, mode), ids, mask)
    assert scores["recall"] >= 0.9, scores


def test_free_embeddings_match_bert_activations_but_not_its_tokens() -> None:
    """BERT normalizes the embedding sum (LayerNorm), so many embeddings give one ``h``: the relaxed mode is needed."""
    backbone, ids, mask, hidden = _victim("bert-tiny")
    embedding = backbone.model.get_input_embeddings()
    result = invert_activations(lambda i, m: backbone.client_forward(i, m, 1), embedding, hidden, mask, steps=250,
                                lr=0.05)  # fmt: skip
    assert result.relative_error < 1e-3  # the activations are matched ...
    assert token_scores(result.tokens, ids, mask)["recall"] < 0.5  # ... by embeddings that are not the tokens


def test_calibrated_noise_brings_the_attack_near_chance_and_weak_noise_does_not() -> None:
    backbone, ids, mask, hidden = _victim("gpt2-tiny")
    torch.manual_seed(2)
    weak = token_scores(_attack(backbone, ActivationNoise(0.1).apply(hidden, mask), mask), ids, mask)
    strong = token_scores(_attack(backbone, ActivationNoise(3.0).apply(hidden, mask), mask), ids, mask)
    assert weak["recall"] >= 0.9, weak
    assert strong["recall"] <= 0.1, strong  # chance: a few hits among 5,000 tokens


def _inverter(backbone: SplitBackbone) -> LearnedInverter:
    """Fit on 400 auxiliary sequences: other token ids than the victim's (the server's public text)."""
    aux = torch.randint(0, 5000, (400, 12), generator=torch.Generator().manual_seed(7))
    return LearnedInverter.fit(lambda i, m: backbone.client_forward(i, m, 1), backbone.model.get_input_embeddings(),
                               aux, torch.ones_like(aux))  # fmt: skip


@pytest.mark.parametrize(("model", "mode"), [("gpt2-tiny", "embedding"), ("llama-tiny", "embedding"),
                                             ("bert-tiny", "relaxed")])  # fmt: skip
def test_the_learned_inverter_reads_most_tokens_at_once_and_refinement_the_rest(model: str, mode: str) -> None:
    backbone, ids, mask, hidden = _victim(model)
    embedding = backbone.model.get_input_embeddings()
    inverter = _inverter(backbone)
    forward = lambda i, m: backbone.client_forward(i, m, 1)  # noqa: E731
    alone = learned_inversion(inverter, forward, embedding, hidden, mask)
    assert alone.steps == 0 and token_scores(alone.tokens, ids, mask)["recall"] >= 0.7  # no optimisation at all
    refined = learned_inversion(inverter, forward, embedding, hidden, mask, refine_steps=50, mode=mode,  # type: ignore[arg-type]
                                lr=0.05 if mode == "embedding" else 0.3)  # fmt: skip
    assert token_scores(refined.tokens, ids, mask)["recall"] >= 0.9  # 50 steps from its reading, 250 from noise


def test_calibrated_noise_also_defeats_the_learned_inverter() -> None:
    backbone, ids, mask, hidden = _victim("gpt2-tiny")
    torch.manual_seed(2)
    noisy = ActivationNoise(3.0).apply(hidden, mask)
    tokens = _inverter(backbone).predict(noisy, backbone.model.get_input_embeddings())
    assert token_scores(tokens, ids, mask)["recall"] <= 0.1


def test_init_tokens_must_match_the_mask() -> None:
    backbone, ids, mask, hidden = _victim("gpt2-tiny")
    with pytest.raises(ValueError, match="init_tokens"):
        invert_activations(lambda i, m: backbone.client_forward(i, m, 1), backbone.model.get_input_embeddings(),
                           hidden, mask, steps=1, init_tokens=ids[:, :3])  # fmt: skip


def test_token_scores_on_a_hand_example() -> None:
    truth = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]])
    predicted = torch.tensor([[1, 3, 9, 4], [5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    scores = token_scores(predicted, truth, mask)
    # row 0: hits {1, 3, 4} of 4 true, of 4 predicted; positions 1 and 4 right; LCS 1-3-4 = 3 -> F1 0.75
    assert scores["recall"] == pytest.approx((3 / 4 + 1) / 2)
    assert scores["precision"] == pytest.approx((3 / 4 + 1) / 2)
    assert scores["position_accuracy"] == pytest.approx((2 / 4 + 1) / 2)
    assert scores["rouge_l"] == pytest.approx((0.75 + 1) / 2)


@pytest.mark.parametrize("kind", ["gaussian", "laplace"])
def test_activation_noise_has_the_standard_deviation_it_is_calibrated_to(kind: str) -> None:
    hidden = torch.randn(64, 32, 48, generator=torch.Generator().manual_seed(0)) * 3.0
    torch.manual_seed(0)
    noise = ActivationNoise(0.5, kind).apply(hidden) - hidden
    rms = float(hidden.pow(2).mean().sqrt())
    assert float(noise.std()) == pytest.approx(0.5 * rms, rel=0.02)
    assert ActivationNoise(0.0).apply(hidden) is hidden


def test_bad_noise_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match="multiplier must be >= 0"):
        ActivationNoise(-1.0)
    with pytest.raises(ValueError, match="kind must be 'gaussian' or 'laplace'"):
        ActivationNoise(1.0, "uniform")  # type: ignore[arg-type]


def test_the_federation_option_puts_the_noise_on_what_the_server_receives() -> None:
    overrides = {k: v for k, v in NO_DROPOUT["gpt2-tiny"].items() if k != "vocab_size"}  # the GPT-2 tokenizer's
    fed = Federation(model="gpt2-tiny", model_overrides=overrides, num_clients=2,
                     activation_noise={"multiplier": 1.0})  # fmt: skip
    assert fed.hparams["activation_noise"] == {"multiplier": 1.0, "kind": "gaussian"}
    hidden, mask = torch.randn(2, 5, 32), torch.ones(2, 5)
    received = fed.channel.send_activations(hidden, {"attention_mask": mask})
    clean = InProcessChannel().send_activations(hidden, {"attention_mask": mask})
    assert torch.equal(clean, hidden) and received.requires_grad
    assert float((received - hidden).pow(2).mean().sqrt()) == pytest.approx(float(hidden.pow(2).mean().sqrt()), rel=0.3)
