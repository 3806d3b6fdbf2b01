"""End-to-end comparison: ATLAS against SplitLoRA, HSplitLoRA, centralized and local training on real data.

Every run is one ``atlas-pl fit`` subprocess: a base config (``configs/minilm.yaml`` or ``configs/smollm2.yaml``), a
method config from ``configs/baselines/`` and a small per-run overlay YAML written into the run folder (logger folder,
the method's callbacks, a ``RoundCheckpoint`` into the run folder, ablation settings). Same seeds (``--seed_everything S
--data.seed S``), data and budgets for every method. Runs log into
``benchmarks/results/compare_runs/<workload>/<method>/seed<S>/``; a run whose ``results.json`` exists is skipped
(``--force`` redoes it), and a run that was killed goes on from its last completed round (``checkpoints/last.ckpt``,
``--ckpt_path last``), also when an older ``results.json`` is still there (the checkpoint is newer). The script then
parses ``results.json`` / ``allocation.json`` of every run present and writes (atomically)
``benchmarks/results/compare.json``, ``compare.csv``, ``compare_*.png`` and the table between ``<!-- compare:begin -->``
/ ``<!-- compare:end -->`` in ``benchmarks/README.md``.

Usage::

    python benchmarks/compare.py --quick                       # minilm, 1 seed, 5 methods, 3 short rounds
    python benchmarks/compare.py --workloads minilm --methods atlas splitlora hsplitlora local centralized \\
        atlas_zero_pad atlas_true_task atlas_one atlas_uniform --seeds 0
    python benchmarks/compare.py --report-only                 # re-parse the runs present, rewrite the outputs
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import yaml

from atlas_pl.io import atomic_write_bytes, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = RESULTS / "compare_runs"
README = ROOT / "benchmarks" / "README.md"
BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"
ATLAS_PL = str(Path(sys.executable).with_name("atlas-pl"))
MIB = 2**20

WORKLOADS = {"minilm": "configs/minilm.yaml", "smollm2": "configs/smollm2.yaml"}
# method -> (baseline config, ablation); ablations are applied on top of the baseline config
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "atlas": ("atlas", {}),
    "splitlora": ("splitlora", {}),
    "splitlora_strongest": ("splitlora_strongest", {}),
    "hsplitlora": ("hsplitlora", {}),
    "centralized": ("centralized", {}),
    "centralized_task": ("centralized_task", {}),
    "local": ("local", {}),
    "atlas_zero_pad": ("atlas", {"ClusterAggregation": {"method": {"class_path": "atlas_pl.algorithms.ZeroPad"}}}),
    "atlas_true_task": ("atlas", {"TaskClustering": {"assign": "true_task"}}),
    "atlas_random": ("atlas", {"TaskClustering": {"assign": "random", "num_clusters": "GROUPS"}}),
    "atlas_one": ("atlas", {"TaskClustering": {"assign": "one"}}),
    "atlas_uniform": ("atlas", {"RankAllocation": {"pattern": "uniform"}}),
}
DESCRIPTION = {
    "atlas": "ATLAS: fingerprint clusters, importance ranks fitted to budgets, exact per-cluster merge",
    "splitlora": "SplitLoRA: one rank for all (the weakest client's), FedAvg, one global model",
    "splitlora_strongest": "SplitLoRA at the strongest client's rank (budgets ignored)",
    "hsplitlora": "HSplitLoRA: budget-fitted uniform ranks, exact merge, one global cluster",
    "centralized": "centralized LoRA: one model over every client's pooled batches",
    "centralized_task": "centralized LoRA per task: one model per task over its pooled batches (upper bound)",
    "local": "local-only training, no aggregation (lower bound)",
    "atlas_zero_pad": "ATLAS with zero-pad aggregation instead of exact",
    "atlas_true_task": "ATLAS with oracle clusters (true task)",
    "atlas_random": "ATLAS with random clusters (K = number of task groups)",
    "atlas_one": "ATLAS with one cluster",
    "atlas_uniform": "ATLAS with uniform rank pattern instead of importance",
}
QUICK_METHODS = ["atlas", "splitlora", "hsplitlora", "local", "centralized", "centralized_task"]
QUICK_ARGS = ["--data.max_examples_per_client", "96", "--data.local_steps", "4"]
POOLING_ORDER = ("mean", "cls", "pooler", None)  # table rows of one method: the current default first
# shapes for the measured client step (memory_model.worker builds the model from a config: random weights, same sizes)
MEASURE_SHAPES = {
    "minilm": ("bert-tiny", dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12,
                                 vocab_size=30522)),
    "smollm2": ("llama-tiny", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   max_position_embeddings=2048, tie_word_embeddings=True)),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- helpers


def load_yaml(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f) or {}


def deep_get(d: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def task_groups(base: dict) -> dict[str, str]:
    """Task name → group, from ``<data_dir>/<task>/meta.json``."""
    data_dir = ROOT / deep_get(base, "data", "data_dir", default="../shared/data")
    out = {}
    for t in deep_get(base, "data", "tasks", default=[]):
        name = t if isinstance(t, str) else t.get("name")
        meta = data_dir / name / "meta.json"
        out[name] = json.loads(meta.read_text()).get("group", name) if meta.exists() else name
    return out


def portable(text: str) -> str:
    """``text`` without this machine's paths: the checkout becomes ``.``, the environment ``<env>``, home ``~``."""
    for path, name in ((sys.prefix, "<env>"), (sys.base_prefix, "<python>"), (str(ROOT), "."), (str(Path.home()), "~")):
        text = text.replace(path + os.sep, name + "/").replace(path, name)
    return text


def run_dir(workload: str, method: str, seed: int) -> Path:
    return RUNS / workload / method / f"seed{seed}"


def is_done(folder: Path) -> bool:
    """A run is done when its ``results.json`` exists and no round checkpoint is newer (a newer ``last.ckpt`` is a
    later attempt, e.g. a ``--force`` re-run, that was killed: it resumes from there instead of being skipped)."""
    results, last = folder / "results.json", folder / "checkpoints" / "last.ckpt"
    return results.exists() and not (last.exists() and last.stat().st_mtime > results.stat().st_mtime)


def machine_info() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "omp_num_threads_per_run": 1}  # fmt: skip
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


# ---------------------------------------------------------------------------------------------------- one run
def build_run(workload: str, method: str, seed: int, rounds: int | None, quick: bool) -> dict:
    """The command and overlay of one run (nothing is executed)."""
    baseline, ablation = METHODS[method]
    base_cfg, method_cfg = WORKLOADS[workload], f"configs/baselines/{baseline}.yaml"
    base, over = load_yaml(ROOT / base_cfg), load_yaml(ROOT / method_cfg)
    callbacks = deep_get(over, "trainer", "callbacks", default=deep_get(base, "trainer", "callbacks", default=[]))
    callbacks = [dict(c) for c in callbacks or [] if "Checkpoint" not in c.get("class_path", "")]
    groups = task_groups(base)
    for cb in callbacks:
        name = cb["class_path"].rsplit(".", 1)[-1]
        if name in ablation:
            args = {**(cb.get("init_args") or {}), **ablation[name]}
            if args.get("num_clusters") == "GROUPS":
                args["num_clusters"] = len(set(groups.values()))
            cb["init_args"] = args
    folder = run_dir(workload, method, seed)
    rel = folder.relative_to(ROOT)  # the fit runs in ROOT: relative paths keep the commands portable
    # last.ckpt after every round in the run's own folder (ignored by git): a killed run resumes where it stopped
    checkpoints = {"dirpath": str(rel / "checkpoints")}
    callbacks.append({"class_path": "atlas_pl.callbacks.RoundCheckpoint", "init_args": checkpoints})
    overlay = {
        "trainer": {
            "callbacks": callbacks,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(rel.parents[1]), "name": method, "version": f"seed{seed}"},
            },
        }
    }
    cmd = [ATLAS_PL, "fit", "--config", base_cfg, "--config", method_cfg, "--config", str(rel / "overlay.yaml")]
    cmd += ["--seed_everything", str(seed), "--data.seed", str(seed)]
    cmd += list(ablation.get("args", []))
    if rounds is not None:
        cmd += ["--trainer.max_epochs", str(rounds)]
    if quick:
        cmd += QUICK_ARGS
    return {"workload": workload, "method": method, "seed": seed, "folder": folder, "overlay": overlay, "cmd": cmd}


def execute(run: dict) -> dict:
    """Run one fit subprocess (one torch thread); returns status and seconds."""
    folder: Path = run["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "overlay.yaml", yaml.safe_dump(run["overlay"], sort_keys=False))
    atomic_write_text(folder / "command.txt", shlex.join(["atlas-pl", *run["cmd"][1:]]) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    cmd = list(run["cmd"])
    last = folder / "checkpoints" / "last.ckpt"
    if run.get("force"):
        last.unlink(missing_ok=True)
    elif last.exists():  # an earlier attempt was killed after completing some rounds: go on from there
        cmd += ["--ckpt_path", "last"]
    t0 = time.perf_counter()
    with open(folder / "log.txt", "a" if "--ckpt_path" in cmd else "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    log_file = folder / "log.txt"
    atomic_write_text(log_file, portable(log_file.read_text(errors="replace")))
    status = "ok" if proc.returncode == 0 and (folder / "results.json").exists() else f"failed (exit {proc.returncode})"
    return {**run, "status": status, "subprocess_seconds": time.perf_counter() - t0}


def run_all(runs: list[dict], jobs: int) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not runs:
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task(f"{len(runs)} runs, {jobs} at a time", total=len(runs))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(execute, r): r for r in runs}
            for fut in as_completed(futures):
                r = fut.result()
                bar.console.print(
                    f"{r['workload']}/{r['method']}/seed{r['seed']}: {r['status']} in {r['subprocess_seconds']:.0f} s"
                )
                bar.advance(task)


# ---------------------------------------------------------------------------------------------------- memory
_ESTIMATES: dict[tuple, int] = {}


def estimate_peak(base: dict, rank: int) -> int:
    """Estimated client peak (bytes) at one rank for every target, from ``atlas_pl.memory`` (CPU model)."""
    from transformers import AutoConfig

    from atlas_pl.memory import ModelShape, estimate_client_memory
    from atlas_pl.models import resolve_path

    model = base["model"]
    key = (model["model"], model["cut_layer"], rank)
    if key not in _ESTIMATES:
        shape = ModelShape.from_config(AutoConfig.from_pretrained(resolve_path(model["model"])))
        est = estimate_client_memory(
            shape, model["cut_layer"], base["data"]["batch_size"], base["data"]["max_length"], rank=rank,
            target_modules=model.get("target_modules"), device="cpu",
        )  # fmt: skip
        _ESTIMATES[key] = est.total
    return _ESTIMATES[key]


def measure_peak(workload: str, base: dict, rank: int, cache: dict) -> int | None:
    """Measured client step peak (bytes) at one rank: ``memory_model.run_worker`` (torch profiler, fresh process)."""
    key = f"{workload}/r{rank}"
    if key in cache:
        return cache[key]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import memory_model

    name, overrides = MEASURE_SHAPES[workload]
    cfg = dict(model=name, overrides=overrides, cut_layer=base["model"]["cut_layer"], rank=rank,
               batch_size=base["data"]["batch_size"], seq_len=base["data"]["max_length"],
               targets=base["model"].get("target_modules"), dtype="float32", device="cpu", threads=1)  # fmt: skip
    out = memory_model.run_worker(cfg, timeout_s=300)
    cache[key] = None if "error" in out else int(out["measured"]["total"])
    return cache[key]


# ---------------------------------------------------------------------------------------------------- parsing
_AUTO_POOLING: dict[str, str] = {}


def run_pooling(hparams: dict) -> str | None:
    """How a run's encoder classifier pooled its token states; ``None`` for causal LMs.

    Runs from before the ``pooling`` option read the model's pooler; ``auto`` is resolved by the package's rule
    (``atlas_pl.split.pooling``) for the run's model, once per model.
    """
    if hparams.get("task_format") != "classification":
        return None
    pooling = hparams.get("pooling", "pooler")
    if pooling != "auto":
        return str(pooling)
    name = str(hparams.get("model"))
    if name not in _AUTO_POOLING:
        from atlas_pl.models import load_model, resolve_path
        from atlas_pl.split.backbone import SplitBackbone
        from atlas_pl.split.pooling import sentence_transformers_pooling

        found = sentence_transformers_pooling(resolve_path(name)) if Path(resolve_path(name)).is_dir() else None
        if found is None:
            model = load_model(name, "classification", overrides=hparams.get("model_overrides"))
            found = SplitBackbone(model, int(hparams.get("cut_layer", 1))).pooling
        _AUTO_POOLING[name] = found
    return _AUTO_POOLING[name]


def parse_run(workload: str, method: str, seed: int, measured_cache: dict, measure: bool) -> dict | None:
    folder = run_dir(workload, method, seed)
    path = folder / "results.json"
    if not path.exists():
        return None
    res = json.loads(path.read_text())
    base = load_yaml(ROOT / WORKLOADS[workload])
    groups = task_groups(base)
    history = res.get("history", [])
    final = res.get("final", {})
    acc = [h.get("val_acc") for h in history]
    cum = [(h.get("bytes_up") or 0) + (h.get("bytes_down") or 0) for h in history]
    per_round = [b - a for a, b in zip([0, *cum[:-1]], cum)]
    group_acc: dict[str, float] = {}
    for g in sorted(set(groups.values())):
        vals = [final.get(f"val_task/{t}/acc") for t, gg in groups.items() if gg == g]
        vals = [v for v in vals if v is not None]
        if vals:
            group_acc[g] = sum(vals) / len(vals)
    task_acc = {t: final.get(f"val_task/{t}/acc") for t in groups}
    alloc_path = folder / "allocation.json"
    hparams = res.get("hparams", {})
    configured = deep_get(base, "model", "lora", "rank", default=8)
    rank = int(deep_get(hparams, "lora", "rank", default=hparams.get("lora_rank", configured)))  # (older runs: flat)
    if alloc_path.exists():
        alloc = json.loads(alloc_path.read_text())
        peaks = [a["peak_bytes"] for a in alloc]
        budgets = [a["budget_bytes"] for a in alloc]
        ranks = [max(a["rank_pattern"].values()) for a in alloc]
        weak = min(range(len(alloc)), key=lambda i: (budgets[i], i))
        strong = max(range(len(alloc)), key=lambda i: (budgets[i], -i))
        mem_source = "allocation.json"
    else:
        n = int(deep_get(base, "data", "num_clients", default=1))
        peaks, budgets, ranks = [estimate_peak(base, rank)] * n, [], [rank] * n
        weak, strong = 0, 0
        mem_source = f"estimate_client_memory at lora_rank={rank}"
    measured = {}
    for label, i in (("weakest", weak), ("strongest", strong)):
        if measure or f"{workload}/r{ranks[i]}" in measured_cache:  # cached: also with --no-measure
            measured[label] = {"client": i, "rank": ranks[i], "bytes": measure_peak(workload, base, ranks[i],
                                                                                     measured_cache)}  # fmt: skip
    cmd_file = folder / "command.txt"
    return {
        "workload": workload, "method": method, "seed": seed, "folder": str(folder.relative_to(ROOT)),
        "command": cmd_file.read_text().strip() if cmd_file.exists() else None,
        "overlay": load_yaml(folder / "overlay.yaml") if (folder / "overlay.yaml").exists() else None,
        "pooling": run_pooling(res.get("hparams", {})),
        "rounds": len(history), "final_acc": final.get("val_acc"), "group_acc": group_acc, "task_acc": task_acc,
        "acc_per_round": acc, "bytes_cumulative": cum, "bytes_per_round": per_round,
        "mean_bytes_per_round": sum(per_round) / len(per_round) if per_round else None,
        "wall_seconds": res.get("wall_seconds"), "traffic": res.get("traffic"),
        "cluster_ids": res.get("cluster_ids"), "client_peak_bytes": peaks, "client_budget_bytes": budgets,
        "client_max_rank": ranks, "peak_bytes_max": max(peaks), "peak_bytes_mean": sum(peaks) / len(peaks),
        "peak_source": mem_source, "measured_peak": measured,
        "over_budget": sum(p > b for p, b in zip(peaks, budgets)) if budgets else 0,
    }  # fmt: skip


def add_rounds_to_target(rows: list[dict]) -> None:
    """Rounds until ``val_acc`` reaches 95% of the upper bound's final accuracy (same workload and seed): the better
    of the two centralized runs (``centralized``: one model on all pooled data, ``centralized_task``: one model per
    task); also of the best final accuracy of any method present (same workload and seed), a reference that does not
    depend on one method. Only runs of the same ``pooling`` are compared."""
    central = best_final(rows, ("centralized", "centralized_task"))
    best = best_final(rows)
    for r in rows:
        key = (r["workload"], r["seed"], r.get("pooling"))
        r["best_final_acc"] = best.get(key)
        r["rounds_to_95_best"] = first_round_reaching(r["acc_per_round"], best.get(key))
        target = central.get(key)
        r["target_acc"] = None if target is None else 0.95 * target
        r["rounds_to_95"] = first_round_reaching(r["acc_per_round"], target)


def best_final(rows: list[dict], methods: tuple[str, ...] | None = None) -> dict[tuple, float]:
    """(workload, seed, pooling) → the best final accuracy among ``methods`` (all methods when ``None``); runs that
    pooled differently are never compared."""
    best: dict[tuple, float] = {}
    for r in rows:
        if r["final_acc"] is not None and (methods is None or r["method"] in methods):
            key = (r["workload"], r["seed"], r.get("pooling"))
            best[key] = max(best.get(key, 0.0), r["final_acc"])
    return best


def first_round_reaching(acc: list[float | None], reference: float | None) -> int | None:
    """First round (1-based) whose accuracy reaches 95% of ``reference``; ``None`` if never (or no reference)."""
    if reference is None:
        return None
    return next((i + 1 for i, a in enumerate(acc) if a is not None and a >= 0.95 * reference), None)


# ---------------------------------------------------------------------------------------------------- outputs
def mean_std(values: list[float | None]) -> tuple[float, float, int] | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, s, len(vals)


def fmt(ms: tuple[float, float, int] | None, scale: float = 1.0, digits: int = 3) -> str:
    if ms is None:
        return "–"
    m, s, n = ms
    return f"{m * scale:.{digits}f}" + (f" ± {s * scale:.{digits}f}" if n > 1 else "")


def markdown_table(rows: list[dict], methods_order: list[str]) -> str:
    out = []
    for wl in [w for w in WORKLOADS if any(r["workload"] == w for r in rows)]:
        wrows = [r for r in rows if r["workload"] == wl]
        groups = sorted({g for r in wrows for g in r["group_acc"]})
        poolings = any(r.get("pooling") for r in wrows)
        head = ["method", "seeds", "rounds", "val acc", *(["pooling"] if poolings else []),
                *[f"acc {g}" for g in groups], "peak client MiB est. (max)",
                "measured MiB (weakest / strongest)", "MB / round", "wall s", "rounds to 95% upper bound",
                "rounds to 95% best"]  # fmt: skip
        out += [f"**{wl}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        pairs = [(m, p) for m in methods_order for p in POOLING_ORDER if any(
            r["method"] == m and r.get("pooling") == p for r in wrows)]  # fmt: skip
        for m, pooling in pairs:
            mr = [r for r in wrows if r["method"] == m and r.get("pooling") == pooling]
            meas = []
            for label in ("weakest", "strongest"):
                vals = [r["measured_peak"].get(label, {}).get("bytes") for r in mr]
                meas.append(fmt(mean_std(vals), 1 / MIB, 0))
            r95 = [r["rounds_to_95"] for r in mr]
            r95_txt = fmt(mean_std(r95), 1, 1)
            never = sum(v is None for v in r95) if mr[0]["target_acc"] is not None else 0
            if never:
                r95_txt = f"{r95_txt} ({never}/{len(mr)} never)" if never < len(mr) else "never"
            rb = [r["rounds_to_95_best"] for r in mr]
            rb_txt = fmt(mean_std(rb), 1, 1) if any(v is not None for v in rb) else "never"
            if 0 < sum(v is None for v in rb) < len(rb):
                rb_txt += f" ({sum(v is None for v in rb)}/{len(rb)} never)"
            cells = [m, ",".join(str(r["seed"]) for r in sorted(mr, key=lambda r: r["seed"])),
                     str(mr[0]["rounds"]), fmt(mean_std([r["final_acc"] for r in mr])),
                     *([pooling or "–"] if poolings else []),
                     *[fmt(mean_std([r["group_acc"].get(g) for r in mr])) for g in groups],
                     fmt(mean_std([r["peak_bytes_max"] for r in mr]), 1 / MIB, 1), " / ".join(meas),
                     fmt(mean_std([r["mean_bytes_per_round"] for r in mr]), 1e-6, 1),
                     fmt(mean_std([r["wall_seconds"] for r in mr]), 1, 0), r95_txt, rb_txt]  # fmt: skip
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["workload", "method", "seed", "metric", "round", "value"])
    for r in rows:
        key = (r["workload"], r["method"], r["seed"])
        w.writerow([*key, "pooling", "", r.get("pooling")])
        for metric in ("final_acc", "peak_bytes_max", "peak_bytes_mean", "mean_bytes_per_round", "wall_seconds",
                       "rounds_to_95", "rounds_to_95_best"):  # fmt: skip
            w.writerow([*key, metric, "", r[metric]])
        for g, v in r["group_acc"].items():
            w.writerow([*key, f"group_acc/{g}", "", v])
        for t, v in r["task_acc"].items():
            w.writerow([*key, f"task_acc/{t}", "", v])
        for label, m in r["measured_peak"].items():
            w.writerow([*key, f"measured_peak_bytes/{label}", "", m["bytes"]])
        for i, (a, b) in enumerate(zip(r["acc_per_round"], r["bytes_per_round"])):
            w.writerow([*key, "val_acc", i + 1, a])
            w.writerow([*key, "bytes", i + 1, b])
    atomic_write_text(path, buf.getvalue())


def save_fig(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_plots(prefix: Path, rows: list[dict], methods_order: list[str]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    workloads = [w for w in WORKLOADS if any(r["workload"] == w for r in rows)]
    if not workloads:
        return []
    # distinct colors: tab20's dark shades first, then its light ones
    colors = {m: plt.cm.tab20((2 * i) % 20 + (2 * i) // 20) for i, m in enumerate(METHODS)}

    def label(wl: str, m: str) -> str:
        pools = sorted({str(r.get("pooling")) for r in rows if r["workload"] == wl and r["method"] == m} - {"None"})
        return f"{m} [{'+'.join(pools)}]" if pools else m

    def curves(wl: str, m: str, key: str) -> np.ndarray | None:
        mr = [r[key] for r in rows if r["workload"] == wl and r["method"] == m]
        if not mr:
            return None
        n = min(len(c) for c in mr)
        return np.array([[np.nan if v is None else v for v in c[:n]] for c in mr], dtype=float)

    written = []
    # accuracy per round: methods (top row), ATLAS and its ablations (bottom row); mean over seeds, band = min..max
    panels = [("methods", [m for m in methods_order if not m.startswith("atlas_")]),
              ("ATLAS ablations", [m for m in methods_order if m.startswith("atlas")])]  # fmt: skip
    fig, axes = plt.subplots(2, len(workloads), figsize=(6.5 * len(workloads), 8.5), squeeze=False)
    for row, (title, group) in enumerate(panels):
        for ax, wl in zip(axes[row], workloads):
            for m in group:
                c = curves(wl, m, "acc_per_round")
                if c is None:
                    continue
                x = np.arange(1, c.shape[1] + 1)
                ls = "--" if m.startswith("atlas_") else "-"
                name = f"{label(wl, m)} ({c.shape[0]} seeds)"
                ax.plot(x, c.mean(0), marker="o", ms=3, color=colors[m], label=name, ls=ls)
                if c.shape[0] > 1:
                    ax.fill_between(x, c.min(0), c.max(0), color=colors[m], alpha=0.12)
            ax.set(xlabel="round", ylabel="mean val accuracy", title=f"{wl}: {title}")
            ax.legend(fontsize=7)
    save_fig(fig, prefix.with_name(prefix.name + "_accuracy.png"))
    written.append(prefix.name + "_accuracy.png")
    # accuracy vs bytes communicated
    fig, axes = plt.subplots(1, len(workloads), figsize=(6.5 * len(workloads), 4.5), squeeze=False)
    for ax, wl in zip(axes[0], workloads):
        for m in methods_order:
            a, b = curves(wl, m, "acc_per_round"), curves(wl, m, "bytes_cumulative")
            if a is None or b is None:
                continue
            n = min(a.shape[1], b.shape[1])
            ax.plot(b[:, :n].mean(0) / 1e6, a[:, :n].mean(0), marker="o", ms=3, color=colors[m], label=label(wl, m),
                    ls="--" if m.startswith("atlas_") else "-")  # fmt: skip
        ax.set(xlabel="cumulative MB communicated (up + down)", ylabel="mean val accuracy", title=wl, xscale="log")
        ax.legend(fontsize=7)
    save_fig(fig, prefix.with_name(prefix.name + "_acc_vs_bytes.png"))
    written.append(prefix.name + "_acc_vs_bytes.png")
    # memory per client
    fig, axes = plt.subplots(1, len(workloads), figsize=(6.5 * len(workloads), 4.5), squeeze=False)
    for ax, wl in zip(axes[0], workloads):
        present = [m for m in methods_order if any(r["workload"] == wl and r["method"] == m for r in rows)]
        width = 0.8 / max(len(present), 1)
        budgets = None
        for j, m in enumerate(present):
            r = next(r for r in rows if r["workload"] == wl and r["method"] == m)
            peaks = np.array(r["client_peak_bytes"]) / MIB
            ax.bar(np.arange(len(peaks)) + j * width, peaks, width, color=colors[m], label=label(wl, m))
            budgets = budgets or r["client_budget_bytes"]
        if budgets:
            for i, b in enumerate(budgets):
                ax.hlines(b / MIB, i - 0.1, i + 0.9, color="k", lw=1, label="budget" if i == 0 else None)
        ax.set(xlabel="client", ylabel="estimated peak client memory (MiB)", yscale="log", title=wl, ylim=(50, None))
        ax.legend(fontsize=7, loc="center right")
    save_fig(fig, prefix.with_name(prefix.name + "_memory.png"))
    written.append(prefix.name + "_memory.png")
    return written


def write_readme() -> None:
    """Rewrite the block between the markers from ``compare.json`` (main grid) and ``compare_quick.json``."""
    parts = [f"_Generated by `benchmarks/compare.py` ({time.strftime('%Y-%m-%d %H:%M')})._"]
    for name, title in (("compare.json", "Main grid"), ("compare_quick.json", "Quick run (`--quick`)")):
        path = RESULTS / name
        if not path.exists():
            continue
        d = json.loads(path.read_text())
        m = d["machine"]
        parts.append(
            f"#### {title}\n\n```bash\n{d['command']}\n```\n\nMachine: {m.get('cpu', m['processor'])}, "
            f"{m['cpu_count']} cores, torch {m['torch']}, one torch thread per run, two runs at a time.\n\n"
            f"{d['table']}"
        )
    found = [RESULTS / n for n in ("compare.json", "compare_quick.json") if (RESULTS / n).exists()]
    notes = json.loads(found[0].read_text()).get("notes", "") if found else ""
    block = BEGIN + "\n" + "\n\n".join(parts) + ("\n\n" + notes if notes else "") + "\n" + END
    text = README.read_text()
    if BEGIN in text and END in text:
        pre, rest = text.split(BEGIN, 1)
        text = pre + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(README, text)


def report(command: str | None, measure: bool, quick: bool = False) -> list[dict]:
    """Parse every run present under ``compare_runs`` (``compare_runs_quick``) and rewrite all outputs."""
    prefix = RESULTS / ("compare_quick" if quick else "compare")
    out_json = prefix.with_suffix(".json")
    old = json.loads(out_json.read_text()) if out_json.exists() else {}
    measured_cache: dict = {}
    for other in ("compare_quick.json", "compare.json"):  # same shapes (batch, length, cut): reuse measurements
        if (RESULTS / other).exists():
            measured_cache.update(json.loads((RESULTS / other).read_text()).get("measured_cache", {}))
    command = command or old.get("command", "")  # --report-only keeps the command that produced the runs
    rows = []
    for wl in WORKLOADS:
        for m in METHODS:
            folder = RUNS / wl / m
            if not folder.exists():
                continue
            for sd in sorted(folder.glob("seed*")):
                r = parse_run(wl, m, int(sd.name[4:]), measured_cache, measure)
                if r is not None:
                    rows.append(r)
    add_rounds_to_target(rows)
    order = list(METHODS)
    machine = machine_info()
    notes = (
        "Mean ± std over seeds (sample std; no ± with one seed). `val acc`: final mean validation accuracy over "
        "all clients; `acc <group>`: mean of the group's tasks' final accuracies; `peak client MiB est.`: the largest "
        "estimated client peak (RankAllocation's `allocation.json`, or `estimate_client_memory` at `lora_rank` for "
        "methods without it); `pooling` (encoder classifiers): what the head reads, `mean` = the attention-mask-"
        "weighted mean of the last hidden states (the default for all-MiniLM-L6-v2 since the `pooling` option), "
        "`pooler` = the checkpoint's pooler, which all-MiniLM-L6-v2 ships untrained (runs from before the option); a "
        "method with runs of both pooling modes gets one row per mode, and the `rounds to 95%` columns compare only "
        "runs of the same pooling (`–`: no reference run of that pooling); `measured`: one client step (forward, "
        "backward of ∂L/∂h, AdamW) of the weakest / "
        "strongest client's rank, torch profiler on CPU (`memory_model.py`'s worker; random weights of the same "
        "shape); `MB / round`: mean per round of the up + down bytes; `rounds to 95% upper bound`: first round "
        "whose accuracy reaches 95% of the better final accuracy of `centralized` and `centralized_task` (same "
        "seed); `rounds to 95% best`: the same "
        "against the best final accuracy of any method in the table (same seed)."
    )
    table = markdown_table(rows, order)
    plots = write_plots(prefix, rows, order)
    atomic_write_text(
        out_json,
        json.dumps(
            {
                "command": command,
                "machine": machine,
                "methods": DESCRIPTION,
                "plots": plots,
                "notes": notes,
                "table": table,
                "measured_cache": measured_cache,
                "runs": rows,
            },
            indent=1,
            default=str,
        ),  # fmt: skip
    )
    write_csv(prefix.with_suffix(".csv"), rows)
    write_readme()
    print(table)
    return rows


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=["minilm", "smollm2"], choices=list(WORKLOADS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=None, help="override trainer.max_epochs")
    p.add_argument("--quick", action="store_true", help="minilm, seed 0, 5 methods, 3 short rounds")
    p.add_argument("--jobs", type=int, default=2, help="fit subprocesses at a time (one torch thread each)")
    p.add_argument("--force", action="store_true", help="redo runs whose results.json exists")
    p.add_argument("--report-only", action="store_true", help="parse the runs present and rewrite the outputs")
    p.add_argument("--no-measure", action="store_true", help="skip the measured client step peaks")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/compare.py", *(sys.argv[1:] if argv is None else argv)])
    global RUNS
    if args.quick:
        args.workloads, args.seeds, args.rounds = ["minilm"], [0], 3
        if args.methods == list(METHODS):
            args.methods = QUICK_METHODS
        RUNS = RESULTS / "compare_runs_quick"
    if not args.report_only:
        runs = [
            build_run(wl, m, s, args.rounds, args.quick)
            for s in args.seeds
            for wl in args.workloads
            for m in args.methods
        ]
        todo = [{**r, "force": args.force} for r in runs if args.force or not is_done(r["folder"])]
        print(f"{len(runs)} runs, {len(runs) - len(todo)} done already, {len(todo)} to run")
        run_all(todo, args.jobs)
    report(None if args.report_only else command, measure=not args.no_measure, quick=args.quick)


if __name__ == "__main__":
    main()
