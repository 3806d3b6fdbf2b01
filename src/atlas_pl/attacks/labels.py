"""Label inference from the gradients a U-shaped split sends up (the client's ``∂L/∂`` of the last hidden states).

In a U-shaped split the client keeps the labels, but the gradient it returns for each example carries them: at the
logits it is ``softmax(z) − onehot(y)``, so for a binary task the per-example gradients of the two classes point in
opposite directions (direction scoring), and the rarer or harder class has larger norms (norm scoring; Li et al.,
"Label Leakage and Protection in Two-party Split Learning", 2022). Both scores need no training: the direction score
projects each example's gradient on the first principal direction of the batch's gradients.

Each score is reported as a ROC AUC against the true labels, folded to ``max(AUC, 1 − AUC)`` (which side is which
class costs the attacker one known label): 0.5 is chance, 1.0 is every label disclosed. In the two-part split the
server receives the labels themselves: disclosure 1.0 without an attack.
"""

from __future__ import annotations

import torch
from sklearn.metrics import roc_auc_score


def label_leakage(gradients: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Norm and direction scores of per-example gradients against binary labels (folded ROC AUC).

    Args:
        gradients: ``[B, ...]`` one gradient per example (flattened internally).
        labels: ``[B]`` binary labels (0/1).

    Raises:
        ValueError: Labels that are not binary with both classes present, or one gradient per example missing.
    """
    flat = gradients.detach().reshape(gradients.shape[0], -1).double()
    y = labels.detach().cpu().long()
    if y.numel() != flat.shape[0] or set(y.tolist()) != {0, 1}:
        raise ValueError(f"need one gradient per example and binary labels with both classes, got {y.tolist()}")
    norm = flat.norm(dim=1)
    centered = flat - flat.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centered, full_matrices=False)
    direction = flat @ vh[0]

    def folded(score: torch.Tensor) -> float:
        auc = float(roc_auc_score(y.numpy(), score.cpu().numpy()))
        return max(auc, 1.0 - auc)

    return {"norm_auc": folded(norm), "direction_auc": folded(direction)}
