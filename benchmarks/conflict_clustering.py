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

Outputs (atomic): ``<out>/conflict_clustering.json`` (settings, machine, rows, per-setting summary),
``conflict_clustering.csv`` and ``conflict_clustering_fingerprints.npz`` (``<signal>_seed<S>``: clients × 64, and
``groups_seed<S>``); ``--workload minilm`` (6 tasks in 4 groups, per-task heads, no conflict) writes
``minilm_clustering.{json,csv}``, ``--workload minilm_scarce`` (36 clients of 50 examples) ``minilm_scarce_clustering``,
``--workload minilm_one_task`` (the minilm workload with every client on sst2: nothing to find, the null check of
the "no structure" rule) ``minilm_one_task_clustering`` and ``--workload smollm2_conflict`` (the same conflict for the
causal LM SmolLM2-135M: label words shared by all tasks) ``smollm2_conflict_clustering`` and ``--workload
smollm2_mixed`` (tasks of three kinds: classification, QA, summarization; also scored against the true task and the
task kind, and with a third signal, ``update``: the adapter change of one round of local steps)
``smollm2_mixed_clustering``. Besides the bar each run
used, ``K_at_min_silhouette`` re-reads K per seed had the bar been each of ``BARS``; ``"chance"`` is the bar of
:func:`atlas_pl.algorithms.clustering.chance_silhouette` for the workload's client count.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/conflict_clustering.py              # seeds 0-4, ~10 minutes on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/conflict_clustering.py --seeds 0    # one seed
    OMP_NUM_THREADS=1 python benchmarks/conflict_clustering.py --workload minilm   # the 6-task workload
    OMP_NUM_THREADS=1 python benchmarks/conflict_clustering.py --workload minilm_one_task   # one task: want K = 1
    python benchmarks/conflict_clustering.py --workload minilm --rescore   # re-cluster the stored fingerprints
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
RUN_BARS = ("chance", 0.25)  # min_silhouette of the clusterings scored
BARS = ("chance", "uniform", 0.25, 0.2, 0.15)  # min_silhouette values re-read from the stored silhouettes
# workload -> (workload of benchmarks/compare.py, overrides of its data section)
WORKLOADS = {"minilm_conflict": ("minilm_conflict", {}), "minilm": ("minilm", {}),
             "minilm_scarce": ("minilm_scarce", {}), "minilm_one_task": ("minilm", {"tasks": ["sst2"]}),
             "smollm2_conflict": ("smollm2_conflict", {}), "smollm2_mixed": ("smollm2_mixed", {})}  # fmt: skip
# workloads scored against more than their groups: the true task of each client and its kind (classification / qa /
# summarization), with the one-round adapter change (``update``, as FL-TAC clusters) as a third signal
EXTRA_TRUTHS = {"smollm2_mixed": ("task", "kind")}
EXTRA_SIGNALS = {"smollm2_mixed": ("update",)}
NUM_BATCHES = 8


def build(seed: int, workload: str = "minilm_conflict") -> tuple[Any, Any, list[int]]:
    """Datamodule, Trainer-less Federation and true group per client of ``workload`` at ``seed`` (see
    :func:`truths` for the task and kind)."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compare
    from atlas_pl.data.datamodule import FederatedDataModule
    from atlas_pl.federation import Federation
    from atlas_pl.lora import LoraSpec

    name, data_overrides = WORKLOADS[workload]
    base = compare.base_config(name)
    base["data"] = {**base["data"], **data_overrides}
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
        fed = Federation(model=model["model"], task_format=dm.task_format, num_clients=dm.num_clients,
                         cut_layer=model["cut_layer"], lora=LoraSpec(**model["lora"]), learning_rate=2e-3,
                         share="server", pooling=model.get("pooling", "auto"))  # fmt: skip
    fed.num_examples = dm.num_examples
    fed.client_task_ids = dm.client_task_ids
    fed._configure_tasks(dm)
    fed.train()
    groups = compare.task_groups(base)
    names = [t.name for t in dm.tasks]
    order = list(dict.fromkeys(groups[n] for n in names))
    return dm, fed, [order.index(groups[names[t]]) for t in dm.client_task_ids]


def truths(dm: Any, workload: str) -> dict[str, list[int]]:
    """Per name in ``EXTRA_TRUTHS[workload]``, each client's true task id or task-kind id."""
    kinds = [t.kind for t in dm.tasks]
    order = list(dict.fromkeys(kinds))
    out = {"task": [int(t) for t in dm.client_task_ids], "kind": [order.index(kinds[t]) for t in dm.client_task_ids]}
    return {name: out[name] for name in EXTRA_TRUTHS.get(workload, ())}


def fingerprints(dm: Any, fed: Any, seed: int, signals: tuple[str, ...] = SIGNALS) -> dict[str, np.ndarray]:
    """``{signal: [clients × 64]}``: what each client would send, every signal on the same batches."""
    import torch

    from atlas_pl.algorithms.fingerprint import project_gradients
    from atlas_pl.data.client_data import sample_client_batches

    out: dict[str, list[np.ndarray]] = {s: [] for s in signals}
    for idx in range(dm.num_clients):
        batches = sample_client_batches(dm, idx, NUM_BATCHES, 0)
        for kind in signals:
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


def score(prints: np.ndarray, truth: list[int], seed: int, signal: str,
          extra: dict[str, list[int]] | None = None) -> list[dict]:  # fmt: skip
    """One row per (``min_silhouette`` in ``RUN_BARS``, ``k_tolerance``): K, ARI and pair errors of the clustering
    (and ``ari_<name>`` against each of ``extra``'s truths, e.g. task and kind)."""
    from atlas_pl.algorithms.clustering import chance_silhouette, cluster_clients, clustering_scores

    rows = []
    chance = chance_silhouette(prints)
    uniform = uniform_bar(*prints.shape)
    at_true_k = clustering_scores(cluster_clients(prints, len(set(truth)), seed=0).labels, truth)["ari"]
    for bar in RUN_BARS:
        for tol in TOLERANCES:
            result = cluster_clients(prints, "auto", seed=0, min_silhouette=bar, k_tolerance=tol)
            rows.append({"seed": seed, "signal": signal, "min_silhouette": bar, "k_tolerance": tol,
                         "bar": result.min_silhouette, "K": result.num_clusters, "silhouette": result.silhouette,
                         "ari_group": clustering_scores(result.labels, truth)["ari"],
                         **pair_errors(result.labels, truth), "labels": result.labels, "groups": truth,
                         "silhouette_by_k": result.silhouette_by_k, "chance_bar": chance,
                         "uniform_bar": uniform, "ari_group_at_true_k": at_true_k,
                         **{f"ari_{n}": clustering_scores(result.labels, t)["ari"] for n, t in (extra or {}).items()},
                         **{f"ari_{n}_at_true_k": clustering_scores(cluster_clients(prints, len(set(t)), seed=0).labels,
                                                                    t)["ari"] for n, t in (extra or {}).items()},
                         })  # fmt: skip
    return rows


def uniform_bar(num_clients: int, dim: int, draws: int = 40) -> float:
    """The rejected null: the 95th percentile of the best silhouette of ``num_clients`` directions uniform on the
    sphere (0.146 for 12 clients, 0.090 for 36 at ``dim`` 64), for the comparison table."""
    from atlas_pl.algorithms.clustering import cluster_clients

    rng = np.random.default_rng(0)
    best = [max(cluster_clients(rng.standard_normal((num_clients, dim)), "auto", min_silhouette=-1.0)
                .silhouette_by_k.values()) for _ in range(draws)]  # fmt: skip
    return float(np.quantile(best, 0.95))


def summarize(rows: list[dict]) -> list[dict]:
    """Per (signal, ``min_silhouette``, k_tolerance): mean ARI, seeds with merged groups, K per seed, and K per seed
    had the bar been each of ``BARS`` (re-read from the silhouettes, ``pick_k``)."""
    from atlas_pl.algorithms.clustering import pick_k

    def bar_value(bar: str | float, row: dict) -> float:
        return row[f"{bar}_bar"] if bar in ("chance", "uniform") else float(bar)

    out = []
    for signal in dict.fromkeys(r["signal"] for r in rows):
        for run_bar in RUN_BARS:
            for tol in TOLERANCES:
                sel = [
                    r for r in rows if (r["signal"], r["min_silhouette"], r["k_tolerance"]) == (signal, run_bar, tol)
                ]
                if sel:
                    out.append({"signal": signal, "min_silhouette": run_bar, "bar": sel[0]["bar"], "k_tolerance": tol,
                                "seeds": len(sel), "ari_group_mean": statistics.fmean(r["ari_group"] for r in sel),
                                "ari_group": [r["ari_group"] for r in sel],
                                "seeds_with_merged_groups": sum(r["merged"] > 0 for r in sel),
                                "merged_pairs": [r["merged"] for r in sel], "split_pairs": [r["split"] for r in sel],
                                "K": [r["K"] for r in sel],
                                "best_silhouette": [max(r["silhouette_by_k"].values(), default=None) for r in sel],
                                "chance_bar": [r["chance_bar"] for r in sel], "uniform_bar": sel[0]["uniform_bar"],
                                "ari_group_at_true_k": [r["ari_group_at_true_k"] for r in sel],
                                "K_at_min_silhouette": {bar: [pick_k(r["silhouette_by_k"], bar_value(bar, r), tol)
                                                              for r in sel] for bar in BARS},
                                **{f"{k}_mean": statistics.fmean(r[k] for r in sel) for k in sel[0]
                                   if k.startswith(("ari_task", "ari_kind"))},
                                **{k: [r[k] for r in sel] for k in sel[0] if k.startswith(("ari_task", "ari_kind"))},
                                })  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--workload", choices=tuple(WORKLOADS), default="minilm_conflict")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--rescore", action="store_true",
                   help="re-cluster the fingerprints stored by an earlier run (<out>/<stem>_fingerprints.npz) "
                        "instead of computing them: seconds instead of minutes, for a change of the rule")  # fmt: skip
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    stem = "conflict_clustering" if args.workload == "minilm_conflict" else f"{args.workload}_clustering"
    rows: list[dict] = []
    arrays: dict[str, np.ndarray] = {}
    stored = np.load(args.out / f"{stem}_fingerprints.npz") if args.rescore else None
    signals = SIGNALS + EXTRA_SIGNALS.get(args.workload, ())
    for seed in args.seeds:
        if stored is not None:
            if f"groups_seed{seed}" not in stored:
                raise SystemExit(f"{stem}_fingerprints.npz has no seed {seed}; run without --rescore to compute it")
            truth = [int(g) for g in stored[f"groups_seed{seed}"]]
            extra = {n: [int(g) for g in stored[f"{n}_seed{seed}"]] for n in EXTRA_TRUTHS.get(args.workload, ())}
            prints_by_signal = {s: stored[f"{s}_seed{seed}"].astype(np.float64) for s in signals}
        else:
            dm, fed, truth = build(seed, args.workload)
            extra = truths(dm, args.workload)
            prints_by_signal = fingerprints(dm, fed, seed, signals)
        for signal, prints in prints_by_signal.items():
            rows.extend(score(prints, truth, seed, signal, extra))
            arrays[f"{signal}_seed{seed}"] = prints.astype(np.float32)
        arrays[f"groups_seed{seed}"] = np.asarray(truth)
        arrays.update({f"{n}_seed{seed}": np.asarray(t) for n, t in extra.items()})
        print(json.dumps([{k: r[k] for k in ("seed", "signal", "min_silhouette", "k_tolerance", "K", "ari_group",
                                             "merged", "split")}
                          for r in rows[-4 * len(signals):]]), flush=True)  # fmt: skip
    summary = summarize(rows)
    report = {"settings": {"workload": args.workload, "num_batches": NUM_BATCHES, "dim": 64,
                           "k_range": [2, 10], "min_silhouette": list(RUN_BARS), "seeds": args.seeds},
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "threads": 1},
              "summary": summary, "rows": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / f"{stem}.json", json.dumps(report, indent=1, default=str).encode())
    buf = io.StringIO()
    fields = [
        "seed",
        "signal",
        "min_silhouette",
        "bar",
        "k_tolerance",
        "K",
        "silhouette",
        "ari_group",
        *[f"ari_{n}" for n in EXTRA_TRUTHS.get(args.workload, ())],
        "merged",
        "split",
    ]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(args.out / f"{stem}.csv", buf.getvalue().encode())
    npz = io.BytesIO()
    np.savez_compressed(npz, **arrays)  # the fingerprints, to try other rules without recomputing them
    atomic_write_bytes(args.out / f"{stem}_fingerprints.npz", npz.getvalue())
    for s in summary:
        print(s)
    return report


if __name__ == "__main__":
    main()
