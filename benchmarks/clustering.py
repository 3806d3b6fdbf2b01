"""Phase-1 task clustering on real data: ARI / NMI of k-means on client fingerprints vs task identity and task group.

Workload: the pretrained MiniLM encoder (``minilm-offline``, classification heads per task, cut layer 2, LoRA rank 8
on query/value, lr 0.002) and clients on six real tasks of ``../shared/data`` in four groups: sst2, mr (sentiment),
ag_news, dbpedia14 (topic), trec (question), sick (nli). Workload ``12x2`` has 12 clients (2 per task), ``18x3`` has
18 (3 per task). Per seed the datamodule (partition and batch choice) and the ``Federation`` (LoRA ``A`` and head
init) are built once, without a Trainer, exactly as ``TaskClustering`` sees them at fit start; the model is in train
mode as in fit, so dropout is on, its generator seeded per (seed, client) before the client's signals.

Raw signals, per client, on its first ``max(num_batches)`` seeded batches (``client_batches`` of the callback):

* ``grad_B``: ``Federation.task_signal(idx, [batch], "grad_B")`` per batch, summed cumulatively, so the signal for
  ``b`` batches is the callback's ``task_signal(idx, batches[:b], "grad_B")`` (checked in ``--quick``); its
  ``server.*`` part, ``client.*`` part or both.
* ``update``: the LoRA change after ``b`` local split steps with a fresh AdamW, a copy of
  ``Federation.task_signal(..., "update")`` that snapshots the change after every step, so the trajectory to 8
  steps also gives the signals for 1 and 4 (checked in ``--quick`` against ``task_signal``; equal given the same
  dropout draws). Adapters and heads are restored afterwards.
* ``warmup`` (12-client workload): one local split step on the first batch, then ``grad_B`` summed over ``b``
  batches at that point (server side, both sides); restored afterwards.

Each signal is projected to 64-D with the seeded shared projection (``project_gradients``, ``global`` or
``per_tensor`` normalization), then, offline, optionally privatized as the callback does (``privatize(f, clip=1,
σ)``, noise generator seeded ``seed * 1_000_003 + idx + 7919 * draw``; ``cluster_clients`` re-normalizes the rows), and
clustered with ``K`` = number of tasks, number of groups, or ``"auto"`` (silhouette over 2..10, one cluster below
0.25). Scores: ``clustering_scores`` (ARI, NMI) against the client's task and its group, the silhouette, and ``K``
chosen by ``"auto"``; ``ε`` of one release from ``dp_epsilon(σ, 1, 1e-5)``.

Outputs, written atomically (temp file + ``os.replace``): ``<out>/clustering.json`` (settings, machine, checks, every
row), ``clustering.csv`` (every row), ``clustering.npz`` (the noiseless fingerprints) and ``clustering.png``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/clustering.py --quick     # 12 clients, 1 seed, ~3 minutes on 2 loaded cores
    OMP_NUM_THREADS=1 python benchmarks/clustering.py             # full run, ~20 minutes on 2 loaded cores
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import statistics
import time
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from atlas_pl.io import atomic_write_bytes

TASKS = ("sst2", "mr", "ag_news", "dbpedia14", "trec", "sick")
SIGNALS = {  # name -> (raw signal, sides kept)
    "grad_B/server": ("grad_B", "server"),
    "grad_B/client": ("grad_B", "client"),
    "grad_B/both": ("grad_B", "both"),
    "update/both": ("update", "both"),
    "warmup/server": ("warmup", "server"),
    "warmup/both": ("warmup", "both"),
}
METRICS = ("ari_task", "nmi_task", "ari_group", "nmi_group")


@dataclass
class Workload:
    name: str
    clients_per_task: int
    seeds: tuple[int, ...]
    warmup: bool = True


@dataclass
class Settings:
    """What one run measures (``--quick`` shrinks it)."""

    workloads: list[Workload] = field(
        default_factory=lambda: [Workload("12x2", 2, (0, 1, 2), True), Workload("18x3", 3, (0, 1, 2), False)]
    )
    tasks: tuple[str, ...] = TASKS
    data_dir: str = "../shared/data"
    model: str = "minilm-offline"
    cut_layer: int = 2
    lora_rank: int = 8
    target_modules: tuple[str, ...] = ("attention.self.query", "attention.self.value")
    learning_rate: float = 0.002
    server_adapters: str = "per_cluster"
    max_examples_per_client: int = 200
    max_length: int = 64
    batch_size: int = 16
    num_batches: tuple[int, ...] = (1, 4, 8)
    normalizations: tuple[str, ...] = ("global", "per_tensor")
    sigmas: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2)
    noise_draws: int = 3
    dim: int = 64
    dp_clip: float = 1.0
    dp_delta: float = 1e-5
    k_range: tuple[int, int] = (2, 10)
    min_silhouette: float = 0.25
    threads: int = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="12 clients, 1 seed, 1 and 4 batches, no warm-up, σ ∈ {0, 0.1}")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--data-dir", default=None, help="task folders (default ../shared/data)")
    p.add_argument("--server-adapters", choices=("per_cluster", "per_client"), default="per_cluster")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def make_settings(args: argparse.Namespace) -> Settings:
    s = Settings(threads=args.threads, server_adapters=args.server_adapters)
    if args.data_dir:
        s.data_dir = args.data_dir
    if args.quick:
        s.workloads = [Workload("12x2", 2, (0,), False)]
        s.num_batches, s.sigmas, s.noise_draws = (1, 4), (0.0, 0.1), 1
    return s


# ---------------------------------------------------------------------------------------------------- signals
def build(s: Settings, w: Workload, seed: int) -> tuple[Any, Any]:
    """The datamodule and the Trainer-less ``Federation`` of one (workload, seed)."""
    import torch

    from atlas_pl.data.datamodule import FederatedDataModule
    from atlas_pl.federation import Federation
    from atlas_pl.lora import LoraSpec

    n = w.clients_per_task * len(s.tasks)
    dm = FederatedDataModule(
        num_clients=n,
        tokenizer=s.model,
        task_format="classification",
        data_dir=s.data_dir,
        tasks=list(s.tasks),
        max_examples_per_client=s.max_examples_per_client,
        max_length=s.max_length,
        batch_size=s.batch_size,
        seed=seed,
    )
    dm.setup()
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fed = Federation(
            model=s.model,
            task_format="classification",
            num_clients=n,
            cut_layer=s.cut_layer,
            lora=LoraSpec(rank=s.lora_rank, target_modules=list(s.target_modules)),
            learning_rate=s.learning_rate,
            share={"per_cluster": "server", "per_client": "none"}[s.server_adapters],  # type: ignore[arg-type]
        )
    fed.num_examples = dm.num_examples
    fed.client_task_ids = dm.client_task_ids
    fed._configure_tasks(dm)
    return dm, fed


def _add(total: dict | None, part: dict) -> dict:
    return {k: v.clone() for k, v in part.items()} if total is None else {k: total[k] + part[k] for k in total}


def cumulative_grad_b(fed: Any, idx: int, batches: list[dict], marks: set[int]) -> dict[int, dict]:
    """``client_signal(idx, batches[:b], "grad_B")`` for every ``b`` in ``marks``, from one pass per batch."""
    total, out = None, {}
    for j, batch in enumerate(batches, 1):
        total = _add(total, fed.task_signal(idx, [batch], "grad_B"))
        if j in marks:
            out[j] = {k: v.clone() for k, v in total.items()}
    return out


def update_trajectory(
    fed: Any, idx: int, batches: list[dict], marks: set[int], warmup: bool
) -> tuple[dict[int, dict], dict[int, dict]]:
    """The ``update`` signal after ``b`` steps for ``b`` in ``marks`` (as ``task_signal(..., "update")`` computes
    it), and, with ``warmup``, ``grad_B`` summed over ``batches[:b]`` after the first step; state restored after."""
    import torch

    client = fed.clients[idx]
    sides = {"client": client.client_adapter, "server": client.server_adapter}
    saved = {n: fed.backbone.adapter_state(n) for n in sides.values()}
    opts = (client.client_optimizer(), client.server_optimizer())
    updates: dict[int, dict] = {}
    warm: dict[int, dict] = {}
    with torch.enable_grad():
        for j, batch in enumerate(batches, 1):
            client.run_split_step(batch, opts)
            if j in marks:
                signal = {}
                for side, name in sides.items():
                    for module, (a, b, _) in fed.backbone.bank.factors(name).items():
                        signal[f"{side}.{module}.lora_A"] = (a.detach() - saved[name][f"{module}.lora_A"]).flatten()
                        signal[f"{side}.{module}.lora_B"] = (b.detach() - saved[name][f"{module}.lora_B"]).flatten()
                updates[j] = signal
            if j == 1 and warmup:  # task_signal restores the post-step state; the next step zeroes the grads
                warm = cumulative_grad_b(fed, idx, batches, marks)
    for name in sides.values():
        for param in fed.backbone.server_parameters(name) + fed.backbone.bank.parameters(name):
            param.grad = None
        fed.backbone.load_adapter_state(name, saved[name])
    return updates, warm


def raw_signals(fed: Any, dm: Any, idx: int, seed: int, s: Settings, warmup: bool) -> dict[tuple[str, int], dict]:
    """``{(raw signal, num_batches): {name: tensor}}`` of one client."""

    from atlas_pl.data.client_data import sample_client_batches

    marks = set(s.num_batches)
    batches = sample_client_batches(dm, idx, max(marks), seed)
    out = {("grad_B", b): v for b, v in cumulative_grad_b(fed, idx, batches, marks).items()}
    updates, warm = update_trajectory(fed, idx, batches, marks, warmup)
    out.update({("update", b): v for b, v in updates.items()})
    out.update({("warmup", b): v for b, v in warm.items()})
    return out


def fingerprint(signal: dict, sides: str, normalize: str, dim: int, seed: int) -> np.ndarray:
    from atlas_pl.algorithms.fingerprint import project_gradients

    if sides != "both":
        signal = {k: v for k, v in signal.items() if k.startswith(f"{sides}.")}
    try:
        return project_gradients(signal, dim, seed, normalize=normalize).numpy()  # type: ignore[arg-type]
    except ValueError:  # all-zero signal: the callback leaves the client out
        return np.full(dim, np.nan, dtype=np.float32)


def equivalence_check(fed: Any, dm: Any, seed: int) -> dict[str, float]:
    """Max |difference| between the cumulative signals used here and ``Federation.task_signal`` (client 0)."""
    import torch

    from atlas_pl.data.client_data import sample_client_batches

    batches = sample_client_batches(dm, 0, 4, seed)
    out = {}
    torch.manual_seed(1234)
    ref = fed.task_signal(0, batches, "grad_B")
    torch.manual_seed(1234)
    mine = cumulative_grad_b(fed, 0, batches, {4})[4]
    out["grad_B_max_abs_diff"] = max(float((ref[k] - mine[k]).abs().max()) for k in ref)
    out["grad_B_max_abs"] = max(float(v.abs().max()) for v in ref.values())
    torch.manual_seed(1234)
    ref = fed.task_signal(0, batches, "update")
    torch.manual_seed(1234)
    mine = update_trajectory(fed, 0, batches, {4}, warmup=False)[0][4]
    out["update_max_abs_diff"] = max(float((ref[k] - mine[k]).abs().max()) for k in ref)
    out["update_max_abs"] = max(float(v.abs().max()) for v in ref.values())
    names = (fed.clients[0].client_adapter, fed.clients[0].server_adapter)
    before = {n: fed.backbone.adapter_state(n) for n in names}
    raw_signals(fed, dm, 0, seed, Settings(num_batches=(1, 2)), warmup=True)
    after = {n: fed.backbone.adapter_state(n) for n in names}
    out["restore_max_abs_diff"] = max(float((before[n][k] - after[n][k]).abs().max()) for n in names for k in before[n])
    return out


# ---------------------------------------------------------------------------------------------------- clustering
def codes(names: list[str]) -> list[int]:
    order = {n: i for i, n in enumerate(dict.fromkeys(names))}
    return [order[n] for n in names]


def score_set(prints: np.ndarray, key: dict[str, Any], truth: dict[str, list[int]], s: Settings) -> list[dict]:
    """Rows for one fingerprint set: every σ (and noise draw) × every ``K`` setting."""
    import torch

    from atlas_pl.algorithms.clustering import cluster_clients, clustering_scores
    from atlas_pl.algorithms.privacy import privatize

    seed = key["seed"]
    ks = {"tasks": len(set(truth["task"])), "groups": len(set(truth["group"])), "auto": "auto"}
    rows = []
    for sigma in s.sigmas:
        for draw in range(1 if sigma == 0 else s.noise_draws):
            x = prints.copy()
            if sigma > 0:
                for i in range(len(x)):
                    gen = torch.Generator().manual_seed(seed * 1_000_003 + i + 7919 * draw)
                    x[i] = privatize(torch.from_numpy(x[i]), s.dp_clip, sigma, gen).numpy()
            for k_name, k in ks.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = cluster_clients(x, k, seed, s.k_range, s.min_silhouette)  # type: ignore[arg-type]
                row = {**key, "sigma": sigma, "draw": draw, "k_setting": k_name, "k": res.num_clusters}
                row["silhouette"] = res.silhouette
                for t in ("task", "group"):
                    sc = clustering_scores(res.labels, truth[t])
                    row[f"ari_{t}"], row[f"nmi_{t}"] = sc["ari"], sc["nmi"]
                row["left_out"] = len(res.left_out)
                row["labels"] = res.labels
                rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------- summary
def summarize(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds (noise draws averaged within a seed first) per configuration."""
    per_seed: dict[tuple, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        key = (r["workload"], r["signal"], r["normalize"], r["num_batches"], r["sigma"], r["k_setting"])
        per_seed[key][r["seed"]].append(r)
    out = []
    for key, seeds in per_seed.items():
        agg: dict[str, Any] = dict(zip(("workload", "signal", "normalize", "num_batches", "sigma", "k_setting"), key))
        agg["seeds"] = len(seeds)
        for m in (*METRICS, "k", "silhouette"):
            vals = []
            for rs in seeds.values():
                xs = [r[m] for r in rs if r[m] is not None]
                if xs:
                    vals.append(statistics.fmean(xs))
            agg[m] = statistics.fmean(vals) if vals else None
            agg[f"{m}_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        out.append(agg)
    return out


def pm(agg: dict, m: str, digits: int = 2) -> str:
    v = agg.get(m)
    return "-" if v is None else f"{v:.{digits}f}±{agg[f'{m}_std']:.{digits}f}"


def find(summary: list[dict], **kw: Any) -> dict | None:
    for a in summary:
        if all(a[k] == v for k, v in kw.items()):
            return a
    return None


def print_summary(console: Any, report: dict[str, Any]) -> None:
    from rich.table import Table

    summary = report["summary"]
    for w in report["settings"]["workloads"]:
        table = Table(
            title=f"workload {w['name']} (σ = 0, global normalization; mean±std over {len(w['seeds'])} seeds)"
        )
        cols = ("signal", "b", "K=tasks ARI/NMI task", "K=groups ARI/NMI group", "auto K", "auto ARI task/group")
        for col in cols:
            table.add_column(col, justify="right")
        for sig in SIGNALS:
            for b in report["settings"]["num_batches"]:
                common = dict(workload=w["name"], signal=sig, normalize="global", num_batches=b, sigma=0.0)
                kt, kg, ka = (find(summary, **common, k_setting=k) for k in ("tasks", "groups", "auto"))
                if kt is None or kg is None or ka is None:
                    continue
                table.add_row(
                    sig,
                    str(b),
                    f"{pm(kt, 'ari_task')} / {pm(kt, 'nmi_task')}",
                    f"{pm(kg, 'ari_group')} / {pm(kg, 'nmi_group')}",
                    pm(ka, "k", 1),
                    f"{pm(ka, 'ari_task')} / {pm(ka, 'ari_group')}",
                )
        console.print(table)
    table = Table(title="DP noise (global normalization, largest b, K = tasks: ARI vs task)")
    table.add_column("workload / signal")
    for sigma in report["settings"]["sigmas"]:
        eps = report["epsilon"][str(sigma)]
        table.add_column(f"σ={sigma} (ε={'∞' if eps is None else f'{eps:.3g}'})", justify="right")
    b = max(report["settings"]["num_batches"])
    for w in report["settings"]["workloads"]:
        for sig in SIGNALS:
            cells = [
                find(
                    summary,
                    workload=w["name"],
                    signal=sig,
                    normalize="global",
                    num_batches=b,
                    sigma=sg,
                    k_setting="tasks",
                )
                for sg in report["settings"]["sigmas"]
            ]
            if all(c is not None for c in cells):
                table.add_row(f"{w['name']} {sig}", *(pm(c, "ari_task") for c in cells))  # type: ignore[arg-type]
    console.print(table)


# ---------------------------------------------------------------------------------------------------- outputs
def machine_info(s: Settings) -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "device": "cpu",
        "torch_num_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "load_avg_at_start": list(os.getloadavg()),
    }


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def report_json(report: dict[str, Any]) -> bytes:
    """The report with floats to 5 significant digits; one line per row so that diffs stay readable."""
    head = {k: v for k, v in report.items() if k != "rows"}
    text = json.dumps(_rounded(head), indent=1)[:-2]
    rows = ",\n".join(json.dumps(_rounded(r), separators=(",", ":")) for r in report["rows"])
    return f'{text},\n "rows": [\n{rows}\n ]\n}}\n'.encode()


CSV_COLUMNS = (
    "workload",
    "num_clients",
    "seed",
    "signal",
    "normalize",
    "num_batches",
    "sigma",
    "epsilon",
    "draw",
    "k_setting",
    "k",
    "silhouette",
    *METRICS,
    "left_out",
)


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    writer.writerows([[_rounded(r.get(c)) for c in CSV_COLUMNS] for r in rows])
    atomic_write_bytes(path, buf.getvalue().encode())


def write_plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, st = report["summary"], report["settings"]
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    panels = (("tasks", "ari_task", "K = #tasks: ARI vs task"), ("groups", "ari_group", "K = #groups: ARI vs group"))
    panels += (("auto", "ari_task", "K auto: ARI vs task"),)
    styles = ("-", "--", ":")
    for col, (k_setting, metric, title) in enumerate(panels):
        ax = axes[0, col]
        for wi, w in enumerate(st["workloads"]):
            for si, sig in enumerate(SIGNALS):
                pts = [
                    find(
                        summary,
                        workload=w["name"],
                        signal=sig,
                        normalize="global",
                        num_batches=b,
                        sigma=0.0,
                        k_setting=k_setting,
                    )
                    for b in st["num_batches"]
                ]
                if any(p is None for p in pts):
                    continue
                ax.errorbar(
                    st["num_batches"],
                    [p[metric] for p in pts],  # type: ignore[index]
                    yerr=[p[f"{metric}_std"] for p in pts],  # type: ignore[index]
                    ls=styles[wi % 3],
                    marker="o",
                    color=f"C{si}",
                    capsize=2,
                    label=f"{w['name']} {sig}",
                )
        ax.set(xlabel="fingerprint batches", ylabel=metric, title=f"{title} (σ=0, global norm)")
        ax.set_xticks(st["num_batches"])
        ax.axhline(0, color="grey", lw=0.5)
    axes[0, 0].legend(fontsize=7)
    b = max(st["num_batches"])
    for col, (k_setting, metric, title) in enumerate(panels):
        ax = axes[1, col]
        for wi, w in enumerate(st["workloads"]):
            for si, sig in enumerate(SIGNALS):
                pts = [
                    find(
                        summary,
                        workload=w["name"],
                        signal=sig,
                        normalize="global",
                        num_batches=b,
                        sigma=sg,
                        k_setting=k_setting,
                    )
                    for sg in st["sigmas"]
                ]
                if any(p is None for p in pts):
                    continue
                ax.plot(st["sigmas"], [p[metric] for p in pts], ls=styles[wi % 3], marker="o", color=f"C{si}")  # type: ignore[index]
        ax.set(xlabel="DP noise multiplier σ (clip 1)", ylabel=metric, title=f"{title} vs σ ({b} batches)")
        ax.axhline(0, color="grey", lw=0.5)
    m = report["machine"]
    fig.suptitle(f"phase-1 clustering, MiniLM on 6 real tasks / 4 groups (CPU, {m['cpu_count']} cores)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    s = make_settings(args)
    import torch

    torch.set_num_threads(s.threads)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from atlas_pl.algorithms.privacy import dp_epsilon

    console = Console(width=160)
    console.print(f"[bold]clustering benchmark[/] ({'quick' if args.quick else 'full'}): {asdict(s)}")
    t0 = time.perf_counter()
    report: dict[str, Any] = {"settings": asdict(s), "quick": args.quick, "machine": machine_info(s)}
    report["epsilon"] = {str(sg): (dp_epsilon(sg, 1, s.dp_delta) if sg > 0 else None) for sg in s.sigmas}  # None: ∞
    rows: list[dict] = []
    prints_out: dict[str, np.ndarray] = {}
    checks: dict[str, Any] = {}
    timing: dict[str, float] = {}
    total = sum(w.clients_per_task * len(s.tasks) * len(w.seeds) for w in s.workloads)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("signals", total=total)
        for w in s.workloads:
            for seed in w.seeds:
                t_seed = time.perf_counter()
                dm, fed = build(s, w, seed)
                n = fed.num_clients
                truth = {"task": codes(dm.client_tasks), "group": codes(dm.client_groups)}
                if args.quick and seed == w.seeds[0]:
                    checks[f"{w.name}/seed{seed}"] = equivalence_check(fed, dm, seed)
                raws = []
                for idx in range(n):
                    progress.update(bar, description=f"{w.name} seed {seed} client {idx + 1}/{n}")
                    torch.manual_seed(seed * 100_003 + idx)  # dropout draws: per client, whatever ran before
                    raws.append(raw_signals(fed, dm, idx, seed, s, w.warmup))
                    progress.advance(bar)
                timing[f"{w.name}/seed{seed}/signals_s"] = time.perf_counter() - t_seed
                t_cluster = time.perf_counter()
                progress.update(bar, description=f"{w.name} seed {seed}: clustering")
                for sig, (raw, sides) in SIGNALS.items():
                    if raw == "warmup" and not w.warmup:
                        continue
                    for b in s.num_batches:
                        for norm in s.normalizations:
                            x = np.stack([fingerprint(r[(raw, b)], sides, norm, s.dim, seed) for r in raws])
                            prints_out[f"{w.name}|seed{seed}|{sig}|{norm}|b{b}"] = x.astype(np.float32)
                            key = {"workload": w.name, "num_clients": n, "seed": seed, "signal": sig}
                            key.update(normalize=norm, num_batches=b)
                            for row in score_set(x, key, truth, s):
                                row["epsilon"] = report["epsilon"][str(row["sigma"])]
                                rows.append(row)
                timing[f"{w.name}/seed{seed}/clustering_s"] = time.perf_counter() - t_cluster
                report.setdefault("partitions", {})[f"{w.name}/seed{seed}"] = {
                    "client_tasks": dm.client_tasks,
                    "client_groups": dm.client_groups,
                    "num_train": dm.num_examples,
                }
                del fed, dm
    report["checks"], report["timing_s"] = checks, timing
    report["summary"] = summarize(rows)
    report["rows"] = rows
    report["wall_s"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "clustering.json", report_json(report))
    write_csv(args.out / "clustering.csv", rows)
    buf = io.BytesIO()
    np.savez_compressed(buf, **prints_out)
    atomic_write_bytes(args.out / "clustering.npz", buf.getvalue())
    write_plot(args.out / "clustering.png", report)
    print_summary(console, report)
    if checks:
        console.print(f"equivalence checks: {checks}")
    console.print(f"wall time {report['wall_s']:.0f} s; wrote {args.out}/clustering.{{json,csv,npz,png}}")


if __name__ == "__main__":
    main()
