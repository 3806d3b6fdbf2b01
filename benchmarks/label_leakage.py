"""What a U-shaped split's returned gradients disclose about the labels, per gradient-sparsification level.

In the U-shaped split (``model.split_shape: u_shaped``) the client keeps the head and the loss, so the labels never
leave it, but the gradient it returns for each example carries them (see :mod:`atlas_pl.attacks.labels`). The
client's defence ``model.gradient_sparsity`` sends only the largest ``keep`` fraction of each position's gradient
entries. For each pretrained offline model and real binary task (``--tasks``, the test split of
``../shared/data/<task>``), cut layer and ``keep``, one U-shaped step per batch of ``--batch`` real examples runs with
fresh adapters and the server's copy of the returned gradient is scored by the norm and direction attacks (folded ROC
AUC: 0.5 chance, 1.0 every label disclosed), mean over ``--batches`` batches. The two-part split discloses every label
(1.0) without an attack. Bytes per returned gradient are counted as the channel counts them.

Not here: the accuracy under each setting (the utility side), which needs training runs.
Outputs (atomic): ``<out>/label_leakage.{json,csv,png}``.

Usage::

    python benchmarks/label_leakage.py                       # MiniLM, sst2 and mr, cut 1, 6 keep levels
    python benchmarks/label_leakage.py --cuts 1 3            # the committed table (cuts 1 and 3 give the same)
    python benchmarks/label_leakage.py --keep 1 0.1 0.01 --batches 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from atlas_pl.algorithms import randomized_response
from atlas_pl.attacks import label_leakage
from atlas_pl.data.tokenizers import load_tokenizer
from atlas_pl.lora.adapters import LoraSpec
from atlas_pl.models import load_model
from atlas_pl.split.backbone import SplitBackbone
from atlas_pl.split.channel import GradientSparsity, InProcessChannel
from atlas_pl.split.step import split_forward_backward

sys.path.insert(0, str(Path(__file__).resolve().parent))
from outputs import machine_info, save_png, write_report  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TASK_FORMAT = {"minilm-offline": "classification"}


class _Received(InProcessChannel):
    """What the server receives from the client's head: the returned gradient after the client's defence."""

    received: torch.Tensor

    def send_head_gradients(self, grad: torch.Tensor, client_idx: int = 0) -> torch.Tensor:
        self.received = super().send_head_gradients(grad, client_idx)
        return self.received


def examples(task: str, n: int) -> tuple[list[str], list[int]]:
    """``n`` test examples of a binary ``task``, the two labels alternating (each batch holds both, half each)."""
    path = DATA / task / "test.jsonl"
    if not path.exists():
        raise SystemExit(f"no {path}: put the shared data folder beside the repository (see ../shared/data/README)")
    by_label: dict[int, list[str]] = {}
    with path.open() as f:
        for line in f:
            row = json.loads(line)
            by_label.setdefault(int(row["label"]), []).append(row["text"])
    if sorted(by_label) != [0, 1] or min(len(v) for v in by_label.values()) < n // 2:
        raise SystemExit(f"{task}: the label attacks need a binary task with {n // 2} test examples of each label")
    texts = [t for pair in zip(by_label[0][: n // 2], by_label[1][: n // 2]) for t in pair]
    return texts, [0, 1] * (n // 2)


def u_shaped_split(model_name: str, cut: int, seed: int) -> SplitBackbone:
    """The pretrained model as a U-shaped split at ``cut`` with fresh adapters ``c`` (client) and ``s`` (server)."""
    torch.manual_seed(seed)
    base = load_model(model_name, TASK_FORMAT[model_name], 2, {}, "float32").eval()
    split = SplitBackbone(base, cut, LoraSpec())
    split.shape = "u_shaped"
    split.add_client_adapter("c")
    split.add_server_adapter("s")
    return split


def leakage_cell(split: SplitBackbone, tokenizer: Any, task: str, keep: float, batch: int, batches: int,
                 max_length: int, label_dp_epsilon: float | None = None) -> dict[str, float]:  # fmt: skip
    """Norm and direction AUC (mean over ``batches`` U-shaped steps) and bytes per returned gradient at ``keep``.

    With ``label_dp_epsilon`` the client trains on randomized-response labels (``data.label_dp_epsilon``) and the
    attacks are scored against the true ones; ``sent_label_auc`` is then the AUC of the noisy labels themselves
    against the true ones (what a two-part server, which receives them, reads).
    """
    texts, truth = examples(task, batch * batches)
    labels = received_labels(truth, label_dp_epsilon)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    scores, nbytes = [], 0
    for b in range(batches):
        sl = slice(b * batch, (b + 1) * batch)
        step = {"input_ids": enc["input_ids"][sl], "attention_mask": enc["attention_mask"][sl],
                "labels": torch.tensor(labels[sl])}  # fmt: skip
        channel = _Received(sparsity=GradientSparsity(keep))
        split.zero_grad(set_to_none=True)
        split_forward_backward(split, channel, step, "c", "s")
        scores.append(label_leakage(channel.received, torch.tensor(truth[sl])))
        nbytes += channel.stats.head_gradients_up
    sent = folded_auc(truth, labels)
    return {"norm_auc": sum(s["norm_auc"] for s in scores) / len(scores),
            "direction_auc": sum(s["direction_auc"] for s in scores) / len(scores),
            "bytes_per_batch": nbytes / batches, "sent_label_auc": sent}  # fmt: skip


def sent_label_auc(task: str, n: int, label_dp_epsilon: float | None) -> float:
    """Folded AUC of the labels a two-part server receives against the true ones (1.0 without label DP), on the same
    ``n`` examples and randomized-response draw as :func:`leakage_cell`."""
    _, truth = examples(task, n)
    return folded_auc(truth, received_labels(truth, label_dp_epsilon))


def received_labels(truth: list[int], label_dp_epsilon: float | None) -> list[int]:
    """The labels the client trains on: ``truth``, or its randomized-response draw (seed 0) with label DP."""
    if label_dp_epsilon is None:
        return truth
    return randomized_response(np.asarray(truth), 2, label_dp_epsilon, seed=0).tolist()


def folded_auc(truth: list[int], received: list[int]) -> float:
    """ROC AUC of ``received`` as a score for ``truth``, folded to ``max(AUC, 1 − AUC)``."""
    auc = float(roc_auc_score(truth, received))
    return max(auc, 1 - auc)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.2, 3.6))
    for ax, score in zip(axes, ("direction_auc", "norm_auc")):
        for key in dict.fromkeys((r["model"], r["task"], r["cut"]) for r in rows):
            sel = sorted((r for r in rows if (r["model"], r["task"], r["cut"]) == key), key=lambda r: r["keep"])
            ax.plot([r["keep"] for r in sel], [r[score] for r in sel], "o-", label=f"{key[1]}, cut {key[2]}")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("fraction of gradient entries sent (keep)")
        ax.set_ylabel(f"label attack: {score.replace('_', ' ')} (folded)")
        ax.set_ylim(0.45, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    save_png(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(TASK_FORMAT), choices=list(TASK_FORMAT))
    p.add_argument("--tasks", nargs="+", default=["sst2", "mr"])
    # with fresh adapters the returned gradient does not depend on the cut (measured: cuts 1 and 3 equal), so one
    p.add_argument("--cuts", nargs="+", type=int, default=[1])
    p.add_argument("--keep", nargs="+", type=float, default=[1.0, 0.5, 0.1, 0.03, 0.01, 0.003])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--max_length", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    for keep in args.keep:
        GradientSparsity(keep)  # a bad level fails here, before any model is loaded
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    rows = []
    for model_name in args.models:
        tokenizer = load_tokenizer(model_name)
        for cut in args.cuts:
            split = u_shaped_split(model_name, cut, args.seed)
            for task in args.tasks:
                for keep in args.keep:
                    cell = leakage_cell(split, tokenizer, task, keep, args.batch, args.batches, args.max_length)
                    row = {"model": model_name, "task": task, "cut": cut, "keep": keep, **cell}
                    rows.append(row)
                    print(f"{model_name} {task} cut {cut} keep {keep:g}: direction AUC {row['direction_auc']:.3f} "
                          f"norm AUC {row['norm_auc']:.3f} ({row['bytes_per_batch'] / 1e3:.0f} kB)",
                          flush=True)  # fmt: skip
    report = {
        "settings": {"batch": args.batch, "batches": args.batches, "max_length": args.max_length, "seed": args.seed,
                     "adapters": "fresh (B = 0)", "labels_disclosed_two_part_split": 1.0},
        "machine": machine_info(),
        "rows": rows,
    }  # fmt: skip
    write_report(args.out, "label_leakage", report, rows)
    plot(rows, args.out / "label_leakage.png")
    return report


if __name__ == "__main__":
    main()
