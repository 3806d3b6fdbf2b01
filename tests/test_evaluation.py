"""Task-aware evaluation: label-word predictions, generated-text scores, and the per-client/task/cluster roll-up."""

import torch

from atlas_pl.client import SplitClient
from atlas_pl.evaluation import FederatedEvaluator, TaskInfo
from atlas_pl.lora.adapters import LoraSpec
from atlas_pl.models import load_model
from atlas_pl.split.backbone import SplitBackbone

TINY = {"vocab_size": 1000, "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}
X, EOS = 7, 999


def _client(idx: int, split: SplitBackbone) -> SplitClient:
    return SplitClient(split, f"client_{idx}", "server", client_idx=idx, owns_backbone=False)


def _hand_built() -> SplitBackbone:
    """Every position predicts token ``X`` (final norm outputs X's embedding direction)."""
    torch.manual_seed(0)
    split = SplitBackbone(load_model("gpt2-tiny", overrides=dict(TINY)), 1, LoraSpec(rank=2))
    with torch.no_grad():
        wte = split.model.transformer.wte.weight
        wte[X] *= 5.0
        split.model.transformer.ln_f.weight.zero_()
        split.model.transformer.ln_f.bias.copy_(wte[X] / wte[X].norm() * 40.0)
    return split.eval()


def _batch(client_idx: int, task_id: int, gold: list[int], label: list[int], targets=None) -> dict:
    ids = torch.tensor([[20, 21, 22] + gold] * len(label))
    labels = torch.full_like(ids, -100)
    labels[:, 3:] = torch.tensor(gold)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "client_idx": client_idx,
             "task_id": task_id, "label": torch.tensor(label)}
    if targets is not None:
        batch["targets"] = targets
    return batch


def test_evaluator_scores_label_words_and_generated_text_per_client_task_and_cluster() -> None:
    split = _hand_built()
    clients = [_client(i, split) for i in range(3)]
    tasks = [
        TaskInfo("sentiment", "classification", 2, label_ids=[[5, EOS], [X, EOS]]),  # the model always says label 1
        TaskInfo("squad", "qa", 0),
    ]
    words = {X: "seven"}
    evaluator = FederatedEvaluator(3, tasks, max_new_tokens=1, eos_token_id=EOS,
                                   decode=lambda ids, **_: " ".join(words.get(i, f"t{i}") for i in ids))

    evaluator.update(clients[0], _batch(0, 0, [X, EOS], [1, 1, 0, 1]))  # 3 of 4 right
    evaluator.update(clients[1], _batch(1, 0, [X, EOS], [0, 0]))  # 0 of 2 right
    evaluator.update(clients[2], _batch(2, 1, [X, EOS], [-1, -1], targets=["seven", "eight"]))  # EM 1 of 2
    metrics = evaluator.compute("val", cluster_ids=[0, 0, 1])

    assert metrics["val_acc/client_000"] == 0.75
    assert metrics["val_acc/client_001"] == 0.0
    assert metrics["val_acc/cluster_0"] == 0.5
    assert "val_acc/client_002" not in metrics  # generative clients have no accuracy
    assert metrics["val_task/sentiment/acc"] == 0.5
    assert metrics["val_task/squad/em"] == 0.5
    assert metrics["val_score/client_002"] == 0.5  # per-example SQuAD F1: 1 and 0
    assert metrics["val_score_task_mean"] == 0.5
    assert {"val_loss/client_000", "val_loss/cluster_1", "val_loss"} <= set(metrics)
    shown = evaluator.examples_markdown()  # the TensorBoard text: generated answers of the generative task only
    assert list(shown) == ["squad"] and shown["squad"].count("generated: `seven`") == 2
    assert "references: `eight`" in shown["squad"] and "t20 t21 t22" in shown["squad"]


def test_first_token_scoring_judges_the_argmax_of_the_first_answer_token() -> None:
    split = _hand_built()
    tasks = [TaskInfo("sentiment", "classification", 2, label_ids=[[5, EOS], [X, EOS]])]
    evaluator = FederatedEvaluator(1, tasks, scoring="first_token")

    evaluator.update(_client(0, split), _batch(0, 0, [5, EOS], [0]))  # gold first token 5, the model says X

    assert evaluator.compute("val", [0])["val_acc"] == 0.0


def test_label_first_token_scoring_compares_label_words_at_the_first_answer_position() -> None:
    split = _hand_built()
    tasks = [TaskInfo("sentiment", "classification", 2, label_ids=[[5, EOS], [X, EOS]])]
    evaluator = FederatedEvaluator(1, tasks, scoring="label_first_token")

    evaluator.update(_client(0, split), _batch(0, 0, [5, EOS], [1, 0]))  # the model prefers X: label 1

    assert evaluator.compute("val", [0])["val_acc"] == 0.5
