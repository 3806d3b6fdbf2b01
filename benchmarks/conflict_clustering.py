"""Phase 1 on the conflict workload: which fingerprints keep a task apart from its label-swapped copy.

Workload ``minilm_conflict`` of ``benchmarks/compare.py`` (all-MiniLM-L6-v2, 12 clients, 2 per task: sst2, mr,
their label-swapped copies, ag_news, trec; ``heads: per_label_words``, so a task and its swapped copy want opposite
outputs of one head for the same kind of text; 4 groups). Per seed the datamodule and the Trainer-less
``Federation`` are built as ``TaskClustering`` sees them at fit start (train mode, dropout seeded per client), and
every client computes two signals on the same 8 seeded batches:

* ``grad_B``: the gradient of the LoRA ``B`` factors under cross-entropy (the method as first specified);
* ``contrast``: the same gradient under :func:`atlas_pl.split.backbone.contrast_loss` (class-balanced, free of the
  model's predictions).

Each is projected to 64-D (``project_gradients``) and clustered with ``"auto"`` K (silhouette over 2..10), with
``k_tolerance`` 0 (the best silhouette) and 0.1 (the largest K within 10 % of it). Scores against the true groups:
ARI, and the two kinds of error counted over client pairs: ``merged`` (two groups in one cluster: the conflict
ATLAS must avoid) and ``split`` (one group in two clusters: less sharing).

Outputs (atomic): ``<out>/conflict_clustering.json`` (settings, machine, rows, per-setting summary) and
``conflict_clustering.csv``; ``--workload minilm`` (6 tasks in 4 groups, per-task heads, no conflict) writes
``minilm_clustering.{json,csv}``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/conflict_clustering.py              # seeds 0-4, ~10 minutes on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/conflict_clustering.py --seeds 0    # one seed
    OMP_NUM_THREADS=1 python benchmarks/conflict_clustering.py --workload minilm   # the 6-task workload
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import platform
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from atlas_pl.io import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]
SIGNALS = ("grad_B", "contrast")
TOLERANCES = (0.0, 0.1)
BARS = (0.25, 0.2, 0.15)  # min_silhouette values re-read from the stored silhouettes
NUM_BATCHES = 8


def build(seed: int, workload: str = "minilm_conflict") -> tuple[Any, Any, list[int]]:
    """Datamodule, Trainer-less Federation and true group per client of ``workload`` at ``seed``."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compare
    from atlas_pl.data.datamodule import FederatedDataModule
    from atlas_pl.federation import Federation
    from atlas_pl.lora import LoraSpec

    base = compare.base_config(workload)
    data = {k: v for k, v in base["data"].items() if k != "seed"}
    data["data_dir"] = str(ROOT / data["data_dir"])
    data["tasks"] = [
        {**t, "path": str(ROOT / t["path"])} if isinstance(t, dict) and "path" in t else t for t in data["tasks"]
    ]
    dm = FederatedDataModule(**data, seed=seed)
    dm.setup("fit")
    model = base["model"]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fed = Federation(model=model["model"], task_format="classification", num_clients=dm.num_clients,
                         cut_layer=model["cut_layer"], lora=LoraSpec(**model["lora"]), learning_rate=2e-3,
                         share="server", pooling=model["pooling"])  # fmt: skip
    fed.num_examples = dm.num_examples
    fed.client_task_ids = dm.client_task_ids
    fed._configure_tasks(dm)
    fed.train()
    groups = compare.task_groups(base)
    names = [t.name for t in dm.tasks]
    order = list(dict.fromkeys(groups[n] for n in names))
    return dm, fed, [order.index(groups[names[t]]) for t in dm.client_task_ids]


def fingerprints(dm: Any, fed: Any, seed: int) -> dict[str, np.ndarray]:
    """``{signal: [clients × 64]}``: what each client would send, both signals on the same batches."""
    import torch

    from atlas_pl.algorithms.fingerprint import project_gradients
    from atlas_pl.data.client_data import sample_client_batches

    out: dict[str, list[np.ndarray]] = {s: [] for s in SIGNALS}
    for idx in range(dm.num_clients):
        batches = sample_client_batches(dm, idx, NUM_BATCHES, 0)
        for kind in SIGNALS:
            torch.manual_seed(seed * 1000 + idx)  # the same dropout draws for both signals
            out[kind].append(project_gradients(fed.task_signal(idx, batches, kind), 64, 0).numpy())
    return {k: np.stack(v) for k, v in out.items()}


def pair_errors(labels: list[int], truth: list[int]) -> dict[str, int]:
    """Client pairs of two groups put in one cluster (``merged``) and of one group put apart (``split``)."""
    merged = split = 0
    for i in range(len(truth)):
        for j in range(i + 1, len(truth)):
            same_cluster, same_group = labels[i] == labels[j], truth[i] == truth[j]
            merged += same_cluster and not same_group
            split += same_group and not same_cluster
    return {"merged": merged, "split": split}


def score(prints: np.ndarray, truth: list[int], seed: int, signal: str) -> list[dict]:
    from atlas_pl.algorithms.clustering import cluster_clients, clustering_scores

    rows = []
    for tol in TOLERANCES:
        result = cluster_clients(prints, "auto", seed=0, k_tolerance=tol)
        rows.append({"seed": seed, "signal": signal, "k_tolerance": tol, "K": result.num_clusters,
                     "silhouette": result.silhouette, "ari_group": clustering_scores(result.labels, truth)["ari"],
                     **pair_errors(result.labels, truth), "labels": result.labels, "groups": truth,
                     "silhouette_by_k": result.silhouette_by_k})  # fmt: skip
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per (signal, k_tolerance): mean ARI, seeds with merged groups, K per seed, and K per seed had the
    ``min_silhouette`` bar been each of ``BARS`` (re-read from the silhouettes, ``pick_k``)."""
    from atlas_pl.algorithms.clustering import pick_k

    out = []
    for signal in SIGNALS:
        for tol in TOLERANCES:
            sel = [r for r in rows if r["signal"] == signal and r["k_tolerance"] == tol]
            if sel:
                out.append({"signal": signal, "k_tolerance": tol, "seeds": len(sel),
                            "ari_group_mean": statistics.fmean(r["ari_group"] for r in sel),
                            "seeds_with_merged_groups": sum(r["merged"] > 0 for r in sel),
                            "merged_pairs": [r["merged"] for r in sel], "split_pairs": [r["split"] for r in sel],
                            "K": [r["K"] for r in sel],
                            "K_at_min_silhouette": {bar: [pick_k(r["silhouette_by_k"], bar, tol) for r in sel]
                                                    for bar in BARS}})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--workload", choices=("minilm_conflict", "minilm"), default="minilm_conflict")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows: list[dict] = []
    for seed in args.seeds:
        dm, fed, truth = build(seed, args.workload)
        for signal, prints in fingerprints(dm, fed, seed).items():
            rows.extend(score(prints, truth, seed, signal))
        print(json.dumps([{k: r[k] for k in ("seed", "signal", "k_tolerance", "K", "ari_group", "merged", "split")}
                          for r in rows[-4:]]), flush=True)  # fmt: skip
    summary = summarize(rows)
    report = {"settings": {"workload": args.workload, "num_batches": NUM_BATCHES, "dim": 64,
                           "k_range": [2, 10], "min_silhouette": 0.25, "seeds": args.seeds},
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "threads": 1},
              "summary": summary, "rows": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "conflict_clustering" if args.workload == "minilm_conflict" else f"{args.workload}_clustering"
    atomic_write_bytes(args.out / f"{stem}.json", json.dumps(report, indent=1, default=str).encode())
    buf = io.StringIO()
    fields = ["seed", "signal", "k_tolerance", "K", "silhouette", "ari_group", "merged", "split"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(args.out / f"{stem}.csv", buf.getvalue().encode())
    for s in summary:
        print(s)
    return report


if __name__ == "__main__":
    main()
