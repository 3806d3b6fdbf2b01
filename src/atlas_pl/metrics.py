"""Per-client running means as a torchmetrics ``Metric`` (synchronised across processes), plus cluster roll-ups."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class PerClientMean(Metric):
    """Weighted mean of a value per client; ``compute()`` returns ``[num_clients]`` (NaN where a client had no data).

    Args:
        num_clients: Number of clients (length of the state vectors).
    """

    full_state_update = False
    total: torch.Tensor
    weight: torch.Tensor

    def __init__(self, num_clients: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_clients = num_clients
        self.add_state("total", default=torch.zeros(num_clients, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.zeros(num_clients, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, client_idx: int, weight: float = 1.0) -> None:  # type: ignore[override]
        self.total[client_idx] += value.detach().to(torch.float64) * weight
        self.weight[client_idx] += weight

    def compute(self) -> torch.Tensor:
        return self.total / self.weight

    def seen(self) -> torch.Tensor:
        """Bool mask of clients that received at least one update."""
        return self.weight > 0

    def grouped(self, groups: list[int]) -> dict[int, float]:
        """Weighted mean per group id (e.g. cluster), over the clients that had data."""
        out: dict[int, float] = {}
        ids = torch.tensor(groups, device=self.total.device)
        for g in sorted(set(groups)):
            sel = ids == g
            w = self.weight[sel].sum()
            if w > 0:
                out[g] = float(self.total[sel].sum() / w)
        return out

    def overall(self) -> float:
        w = self.weight.sum()
        return float(self.total.sum() / w) if w > 0 else float("nan")
