"""Fair comparison: ATLAS against its baselines, each with its own tuned learning rate, scored on the test split.

The protocol (the only way this script compares):

1. **tune** — every method × every learning rate of the grid (``--lrs``) × the tuning seed(s) (``--tune-seeds``):
   one ``atlas-pl fit``; the score is the final mean *validation* accuracy.
2. **choose** — per workload and method, the learning rate with the best mean validation accuracy over the tuning
   seeds (ties: the smaller rate). The test split is never read for a choice. A method whose best rate is the
   grid's largest (smallest) is tuned one step further, at twice (half) that rate, up to ``--extend`` steps, the
   same rule for every method: a best rate on the edge says the grid, not the method, set the limit.
3. **final** — every method at its chosen rate × every seed (``--seeds``): ``atlas-pl fit`` (runs of stage 1 are
   reused), then ``atlas-pl test`` on the last round's checkpoint → test accuracy overall and per task group.
4. **report** — test accuracy mean ± std over seeds, per task group, the chosen rate, bytes per round, client memory,
   the whole validation grid, and a paired t-test across seeds of ATLAS against the best other method.

Every run is one subprocess with one torch thread: the workload's base config, the method's config from
``configs/baselines/``, and a small overlay YAML in the run folder (logger folder, the method's callbacks, a
``RoundCheckpoint`` into the run folder, ablation settings), with ``--seed_everything S --data.seed S
--model.learning_rate LR``. Runs log into ``<results>/compare_runs/<workload>/<method>/lr<LR>/seed<S>/``; a finished
run is skipped and a killed one goes on from its last round (``checkpoints/last.ckpt``). Outputs (atomic):
``compare.json``, ``compare.csv``, ``compare_*.png`` and the table between ``<!-- compare:begin -->`` /
``<!-- compare:end -->`` in ``benchmarks/README.md``.

Usage::

    python benchmarks/compare.py --quick                       # minilm, 2 rates, 2 seeds, 2 short rounds
    python benchmarks/compare.py --workloads minilm --rounds 4 # the README's table (5 rates, 3 seeds)
    python benchmarks/compare.py --workloads minilm_scarce --rounds 3    # data-scarce: 36 clients x 50 examples
    python benchmarks/compare.py --workloads minilm_conflict --rounds 3  # shared heads, swapped label words
    python benchmarks/compare.py --workloads minilm_budgets --rounds 3 \
        --methods atlas splitlora hsplitlora flexlora atlas_zero_pad splitlora_strongest   # budgets that bind
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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import yaml

from atlas_pl.io import atomic_write_bytes, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "benchmarks" / "README.md"
BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"
ATLAS_PL = str(Path(sys.executable).with_name("atlas-pl"))
MIB = 2**20


def _flipped(task: str, group: str) -> dict:
    """``task`` with its two label words swapped: the same texts, the opposite answer (a conflicting task)."""
    return {"name": f"{task}_flipped", "path": f"../shared/data/{task}", "group": group,
            "label_words": [" positive", " negative"]}  # fmt: skip


# workload -> (base config, overrides of the base config written into every run's overlay); the key ``callbacks``
# instead overrides init args of the method's callbacks of that name (where the method has one), e.g. budgets

WORKLOADS: dict[str, tuple[str, dict[str, Any]]] = {
    "minilm": ("configs/minilm.yaml", {}),
    # data-scarce: 3x the clients, each with 50 examples (40 to train, 10 to validate), 4 local steps per round
    "minilm_scarce": ("configs/minilm.yaml", {"data": {"num_clients": 36, "max_examples_per_client": 50,
                                                       "local_steps": 4}}),
    "smollm2": ("configs/smollm2.yaml", {}),
    # conflict: a causal LM answers with label words shared by all tasks, and two tasks answer the opposite word for
    # the same kind of text (sst2 / mr with the words swapped), so one shared model is pulled two ways
    "smollm2_conflict": ("configs/smollm2.yaml", {"data": {"tasks": [
        "sst2", _flipped("sst2", "sentiment_flipped"), "mr", _flipped("mr", "sentiment_flipped"), "ag_news", "trec"]}}),
    # the same conflict for an encoder: tasks with the same label words share one classification head (one output per
    # word), so sst2 / mr and their swapped copies want opposite outputs of one head for the same kind of text
    "minilm_conflict": ("configs/minilm.yaml", {"data": {"heads": "per_label_words", "tasks": [
        "sst2", _flipped("sst2", "sentiment_flipped"), "mr", _flipped("mr", "sentiment_flipped"), "ag_news", "trec"]}}),
    # budgets that bind: 4 budget levels, each the estimated client peak at one uniform rank (2, 4, 8, 16) of the
    # workload's model, cut and batch, so budget-fitted methods give the clients different ranks (the 1-24 GB
    # budgets of the base configs all fit rank 16 on this model: nothing binds there)
    "minilm_budgets": ("configs/minilm.yaml", {"callbacks": {"RankAllocation": {"budgets": {"peak_at_ranks": [
        2, 4, 8, 16]}}}}),
    "demo": ("configs/demo.yaml", {}),  # synthetic tasks, random weights: exercises the protocol in seconds
    # tasks of different kinds (classification, extractive QA, two summarization tasks), budgets that bind; sized for
    # a CPU (shorter sequences, 2 local steps, 4 validation and 16 test examples per client, 4 signal batches)
    "smollm2_mixed": ("configs/smollm2_mixed.yaml", {
        "data": {"max_length": 160, "local_steps": 2, "max_val_examples_per_client": 4,
                 "max_eval_examples_per_client": 16},
        "callbacks": {"RankAllocation": {"budgets": {"peak_at_ranks": [4, 8, 16]}},
                      "TaskClustering": {"num_batches": 4}}}),
}  # fmt: skip
# workloads judged by each task's own metric (``score``: accuracy, SQuAD F1, ROUGE-L), grouped by task kind; the
# others by accuracy, grouped by task group
BY_KIND = {"smollm2_mixed"}
PRIMARY = {"classification": "acc", "qa": "f1", "summarization": "rougeL"}
KIND_OF_TYPE = {"extractive_qa": "qa", "qa": "qa", "summarization": "summarization"}
# method -> (baseline config, ablation); ablations are applied on top of the baseline config
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "atlas": ("atlas", {}),
    "splitlora": ("splitlora", {}),
    "hsplitlora": ("hsplitlora", {}),
    "flexlora": ("flexlora", {}),
    "fltac": ("fltac", {"TaskClustering": {"num_clusters": "TASKS"}}),
    "mira": ("mira", {}),
    "centralized": ("centralized", {}),
    "centralized_task": ("centralized_task", {}),
    "local": ("local", {}),
    "splitlora_strongest": ("splitlora_strongest", {}),
    "atlas_zero_pad": ("atlas", {"ClusterAggregation": {"method": {"class_path": "atlas_pl.algorithms.ZeroPad"}}}),
    "atlas_true_task": ("atlas", {"TaskClustering": {"assign": "true_task"}}),
    "atlas_true_group": ("atlas", {"TaskClustering": {"assign": "true_group"}}),
    "atlas_random": ("atlas", {"TaskClustering": {"assign": "random", "num_clusters": "GROUPS"}}),
    "atlas_one": ("atlas", {"TaskClustering": {"assign": "one"}}),
    "atlas_uniform": ("atlas", {"RankAllocation": {"pattern": "uniform"}}),
    "atlas_reset": ("atlas", {"ClusterAggregation": {"reset_optimizer": True}}),
    "atlas_mix": ("atlas", {"ClusterAggregation": {"global_weight": 0.25}}),
    "atlas_update": ("atlas", {"TaskClustering": {"signal": "update", "num_batches": 8}}),
    "atlas_grad_b": ("atlas", {"TaskClustering": {"signal": "grad_B", "k_tolerance": 0.0}}),
}
DESCRIPTION = {
    "atlas": "ATLAS: fingerprint clusters, importance ranks fitted to budgets, exact per-cluster merge",
    "splitlora": "SplitLoRA: one rank for all (the weakest client's), FedAvg, one global model",
    "hsplitlora": "HSplitLoRA: budget-fitted uniform ranks, exact merge, one global cluster",
    "flexlora": "FlexLoRA: budget-fitted uniform ranks, dense ΔW + SVD to each rank, one global cluster",
    "fltac": "FL-TAC-style: clusters of the first round's adapter change (K = tasks), FedAvg per cluster",
    "mira": "MIRA: per-client adapters mixed each round over a task-similarity graph of the clients' updates",
    "centralized": "centralized LoRA: one model over every client's pooled batches",
    "centralized_task": "centralized LoRA per task: one model per task over its pooled batches (upper bound)",
    "local": "local-only training, no aggregation (lower bound)",
    "splitlora_strongest": "SplitLoRA at the strongest client's rank (budgets ignored)",
    "atlas_zero_pad": "ATLAS with zero-pad aggregation instead of exact",
    "atlas_true_task": "ATLAS with oracle clusters (true task)",
    "atlas_true_group": "ATLAS with oracle clusters (true task group: sst2 with mr, ag_news with dbpedia14)",
    "atlas_random": "ATLAS with random clusters (K = number of task groups)",
    "atlas_one": "ATLAS with one cluster",
    "atlas_uniform": "ATLAS with uniform rank pattern instead of importance",
    "atlas_mix": "ATLAS with each cluster's merge mixed with the merge of all clients (global_weight 0.25)",
    "atlas_update": "ATLAS clustering on the adapters' change after one round of local steps instead of grad_B",
    "atlas_reset": "ATLAS forgetting the AdamW moments of every merged adapter (they describe the old factors)",
    "atlas_grad_b": "ATLAS as first specified: cross-entropy gradient fingerprints (grad_B), best-silhouette K",
}
# one model for everybody: the baselines ATLAS must at least match
SINGLE_MODEL = ("centralized", "splitlora", "hsplitlora", "flexlora")
MAIN_METHODS = ["atlas", "splitlora", "hsplitlora", "flexlora", "fltac", "mira", "centralized", "local"]
# the methods a workload runs when --methods is not given (default: MAIN_METHODS)
WORKLOAD_METHODS = {
    # budgets that bind: the budget-fitted methods, exact vs zero-pad vs dense-SVD merges, and one rank for all
    # (the weakest client's: SplitLoRA; the strongest client's, over the small budgets: what the budgets save)
    "minilm_budgets": ["atlas", "splitlora", "hsplitlora", "flexlora", "atlas_zero_pad", "splitlora_strongest"],
}
LRS = [5e-4, 1e-3, 2e-3, 5e-3, 1e-2]
QUICK_ARGS = ["--data.max_examples_per_client", "96", "--data.local_steps", "4"]
# shapes for the measured client step (memory_model.worker builds the model from a config: random weights, same sizes)
MEASURE_SHAPES = {
    "configs/minilm.yaml": ("bert-tiny", dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                              num_attention_heads=12, vocab_size=30522)),
    "configs/smollm2.yaml": ("llama-tiny", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                                num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                                max_position_embeddings=2048, tie_word_embeddings=True)),
}  # fmt: skip


class Paths:
    """Where runs and outputs go (``--results``; the README block is only rewritten for the default folder)."""

    def __init__(self, results: Path = DEFAULT_RESULTS, quick: bool = False) -> None:
        self.results = results
        self.runs = results / ("compare_runs_quick" if quick else "compare_runs")
        self.prefix = results / ("compare_quick" if quick else "compare")


PATHS = Paths()


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


def base_config(workload: str) -> dict:
    """The workload's base config with its overrides applied (what every run of the workload starts from)."""
    config = WORKLOADS[workload][0]
    base = load_yaml(ROOT / config)
    for section, values in config_overrides(workload).items():
        base[section] = {**base.get(section, {}), **values}
    return base


def config_overrides(workload: str) -> dict[str, Any]:
    """The workload's overrides of config sections (``data``, ``model``, ...), without its callback overrides."""
    return {k: v for k, v in WORKLOADS[workload][1].items() if k != "callbacks"}


def callback_overrides(workload: str, method: str, base: dict) -> dict[str, dict[str, Any]]:
    """Init args per callback name: the workload's (budgets resolved to bytes), then the method's ablation."""
    out: dict[str, dict[str, Any]] = {}
    for name, args in WORKLOADS[workload][1].get("callbacks", {}).items():
        args = dict(args)
        if isinstance(args.get("budgets"), dict):  # {"peak_at_ranks": [...]}: the estimated peak at each rank
            args["budgets"] = [estimate_peak(base, int(r)) for r in args["budgets"]["peak_at_ranks"]]
        out[name] = args
    for name, args in METHODS[method][1].items():
        out[name] = {**out.get(name, {}), **args}
    return out


def task_metas(base: dict) -> dict[str, tuple[str, str]]:
    """Task name → (group, kind), from the spec and ``<data_dir>/<task>/meta.json`` (``{}`` for synthetic tasks)."""
    data_dir = ROOT / deep_get(base, "data", "data_dir", default="../shared/data")
    out = {}
    for t in deep_get(base, "data", "tasks", default=None) or []:
        spec = {"name": t} if isinstance(t, str) else t
        meta_path = (ROOT / spec["path"] if spec.get("path") else data_dir / spec["name"]) / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        kind = spec.get("kind") or KIND_OF_TYPE.get(meta.get("task_type", ""), "classification")
        out[spec["name"]] = (spec.get("group", meta.get("group", spec["name"])), kind)
    return out


def task_groups(base: dict, by_kind: bool = False) -> dict[str, str]:
    """Task name → group (or, with ``by_kind``, its kind: classification / qa / summarization)."""
    return {t: kind if by_kind else group for t, (group, kind) in task_metas(base).items()}


def task_metric(base: dict) -> dict[str, str]:
    """Task name → the key of its primary metric (``acc``, ``f1``, ``rougeL``)."""
    return {t: PRIMARY[kind] for t, (_, kind) in task_metas(base).items()}


def portable(text: str) -> str:
    """``text`` without this machine's paths: the checkout becomes ``.``, the environment ``<env>``, home ``~``, the
    folders of ``$PYTHONPATH`` ``<pythonpath>``."""
    extra = [(p, "<pythonpath>") for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p.startswith(os.sep)]
    for path, name in ((sys.prefix, "<env>"), (sys.base_prefix, "<python>"), (str(ROOT), "."), *extra,
                       (str(Path.home()), "~")):  # fmt: skip
        text = text.replace(path + os.sep, name + "/").replace(path, name)
    return text


def lr_tag(lr: float) -> str:
    return f"lr{lr:g}"


def run_dir(workload: str, method: str, lr: float, seed: int) -> Path:
    return PATHS.runs / workload / method / lr_tag(lr) / f"seed{seed}"


def is_done(folder: Path, test: bool = False) -> bool:
    """A run is done when its ``results.json`` exists and no round checkpoint is newer (a newer ``last.ckpt`` is a
    later attempt, e.g. a ``--force`` re-run, that was killed: it resumes from there instead of being skipped); with
    ``test``, also ``test_results.json`` from after that fit."""
    results, last = folder / "results.json", folder / "checkpoints" / "last.ckpt"
    fitted = results.exists() and not (last.exists() and last.stat().st_mtime > results.stat().st_mtime)
    return fitted and (not test or has_test(folder))


def has_test(folder: Path) -> bool:
    """The fit is tested: a new fit deletes the old ``test_results.json`` first (``execute``), so no file times are
    compared (a copy or a git checkout does not keep them)."""
    return (folder / "test_results.json").exists() and (folder / "results.json").exists()


def machine_info() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "omp_num_threads_per_run": 1}  # fmt: skip
    info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


# ---------------------------------------------------------------------------------------------------- one run
def build_run(workload: str, method: str, lr: float, seed: int, rounds: int | None = None, quick: bool = False,
              test: bool = False) -> dict:  # fmt: skip
    """The commands and overlay of one run (nothing is executed): the fit, and with ``test`` the test after it."""
    baseline, _ = METHODS[method]
    base_cfg = WORKLOADS[workload][0]
    method_cfg = f"configs/baselines/{baseline}.yaml"
    base, over = base_config(workload), load_yaml(ROOT / method_cfg)
    callbacks = deep_get(over, "trainer", "callbacks", default=deep_get(base, "trainer", "callbacks", default=[]))
    callbacks = [dict(c) for c in callbacks or [] if "Checkpoint" not in c.get("class_path", "")]
    groups = task_groups(base)
    counts = {"GROUPS": len(set(groups.values())), "TASKS": len(groups)}
    ablation = callback_overrides(workload, method, base)
    for cb in callbacks:
        name = cb["class_path"].rsplit(".", 1)[-1]
        if name in ablation:
            args = {**(cb.get("init_args") or {}), **ablation[name]}
            if args.get("num_clusters") in counts:  # a placeholder: the workload's number of groups / tasks
                k = counts[args["num_clusters"]]
                if k:
                    args["num_clusters"] = k
                else:  # synthetic tasks: no task list, keep the config's K
                    args.pop("num_clusters")
            cb["init_args"] = args
    folder = run_dir(workload, method, lr, seed)
    rel = os.path.relpath(folder, ROOT)  # the fit runs in ROOT: relative paths keep the commands portable
    # last.ckpt after every round in the run's own folder (ignored by git): a killed run resumes where it stopped
    callbacks.append({"class_path": "atlas_pl.callbacks.RoundCheckpoint",
                      "init_args": {"dirpath": f"{rel}/checkpoints"}})  # fmt: skip
    logger = {"save_dir": os.path.relpath(folder.parents[1], ROOT), "name": lr_tag(lr), "version": f"seed{seed}"}
    overlay = {
        **config_overrides(workload),
        "trainer": {
            "callbacks": callbacks,
            "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": logger},
        },
    }
    configs = ["--config", base_cfg, "--config", method_cfg, "--config", f"{rel}/overlay.yaml"]
    common = [*configs, "--seed_everything", str(seed), "--data.seed", str(seed), "--model.learning_rate", f"{lr:g}"]
    common += QUICK_ARGS if quick else []
    fit = [ATLAS_PL, "fit", *common] + (["--trainer.max_epochs", str(rounds)] if rounds is not None else [])
    tested = [ATLAS_PL, "test", *common, "--ckpt_path", f"{rel}/checkpoints/last.ckpt"] if test else None
    return {"workload": workload, "method": method, "lr": lr, "seed": seed, "folder": folder, "overlay": overlay,
            "cmd": fit, "test_cmd": tested}  # fmt: skip


def execute(run: dict) -> dict:
    """Run the fit subprocess (one torch thread) unless it is done, then the test if asked; status and seconds."""
    folder: Path = run["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "overlay.yaml", yaml.safe_dump(run["overlay"], sort_keys=False))
    commands = [shlex.join(["atlas-pl", *run["cmd"][1:]])]
    if run.get("test_cmd"):
        commands.append(shlex.join(["atlas-pl", *run["test_cmd"][1:]]))
    atomic_write_text(folder / "command.txt", "\n".join(commands) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    t0 = time.perf_counter()
    status = "ok"
    last = folder / "checkpoints" / "last.ckpt"
    if run.get("force"):
        last.unlink(missing_ok=True)
        (folder / "results.json").unlink(missing_ok=True)
        (folder / "test_results.json").unlink(missing_ok=True)
    steps = []
    # a final run whose fit was kept (results.json, committed) but whose checkpoint was not (checkpoints are never
    # committed): fit it again, deterministically, so that the test split can be scored from its checkpoint
    lost = bool(run.get("test_cmd")) and not has_test(folder) and not last.exists()
    if not is_done(folder) or lost:
        resume = ["--ckpt_path", "last"] if last.exists() else []  # a killed earlier attempt: go on from there
        steps.append(("fit", list(run["cmd"]) + resume, "a" if resume else "w"))
        (folder / "test_results.json").unlink(missing_ok=True)  # it scored the fit this one replaces
    if run.get("test_cmd") and (steps or not has_test(folder)):  # a new fit needs a new test
        steps.append(("test", list(run["test_cmd"]), "a"))
    for name, cmd, mode in steps:
        with open(folder / "log.txt", mode) as log:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        done = (folder / ("results.json" if name == "fit" else "test_results.json")).exists()
        if proc.returncode != 0 or not done:
            status = f"{name} failed (exit {proc.returncode})"
            break
    log_file = folder / "log.txt"
    if log_file.exists():
        atomic_write_text(log_file, portable(log_file.read_text(errors="replace")))
    return {**run, "status": status, "subprocess_seconds": time.perf_counter() - t0}


def run_all(runs: list[dict], jobs: int, title: str) -> list[dict]:
    """Execute ``runs``, ``jobs`` at a time, with a progress bar; returns the failed ones."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    failed: list[dict] = []
    if not runs:
        return failed
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task(f"{title}: {len(runs)} runs, {jobs} at a time", total=len(runs))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(execute, r): r for r in runs}
            for fut in as_completed(futures):
                r = fut.result()
                bar.console.print(f"{r['workload']}/{r['method']}/{lr_tag(r['lr'])}/seed{r['seed']}: {r['status']} "
                                  f"in {r['subprocess_seconds']:.0f} s")  # fmt: skip
                if r["status"] != "ok":
                    failed.append(r)
                bar.advance(task)
    return failed


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
            target_modules=deep_get(model, "lora", "target_modules"), device="cpu",
        )  # fmt: skip
        _ESTIMATES[key] = est.total
    return _ESTIMATES[key]


def measure_peak(workload: str, base: dict, rank: int, cache: dict) -> int | None:
    """Measured client step peak (bytes) at one rank: ``memory_model.run_worker`` (torch profiler, fresh process)."""
    config = WORKLOADS[workload][0]
    key = f"{config}/r{rank}"
    if key in cache or config not in MEASURE_SHAPES:
        return cache.get(key)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import memory_model

    name, overrides = MEASURE_SHAPES[config]
    cfg = dict(model=name, overrides=overrides, cut_layer=base["model"]["cut_layer"], rank=rank,
               batch_size=base["data"]["batch_size"], seq_len=base["data"]["max_length"],
               targets=deep_get(base, "model", "lora", "target_modules"), dtype="float32", device="cpu",
               threads=1)  # fmt: skip
    out = memory_model.run_worker(cfg, timeout_s=300)
    cache[key] = None if "error" in out else int(out["measured"]["total"])
    return cache[key]


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


# ---------------------------------------------------------------------------------------------------- parsing
def group_means(metrics: dict, groups: dict[str, str], prefix: str,
                metric: dict[str, str] | None = None) -> dict[str, float]:  # fmt: skip
    """Mean score per task group: the mean over the group's tasks of ``<prefix>_task/<task>/<metric>`` (``acc``
    unless ``metric`` names a task's own)."""
    out: dict[str, float] = {}
    for g in sorted(set(groups.values())):
        keys = [f"{prefix}_task/{t}/{(metric or {}).get(t, 'acc')}" for t, gg in groups.items() if gg == g]
        found = [metrics.get(k) for k in keys]
        vals = [float(v) for v in found if v is not None]
        if vals:
            out[g] = sum(vals) / len(vals)
    return out


def parse_run(workload: str, method: str, lr: float, seed: int, measured_cache: dict, measure: bool) -> dict | None:
    """One run's row: validation curve and final accuracy, test accuracy (if tested), traffic, client memory."""
    folder = run_dir(workload, method, lr, seed)
    path = folder / "results.json"
    if not is_done(folder):
        return None
    res = json.loads(path.read_text())
    base = base_config(workload)
    by_kind = workload in BY_KIND
    groups, metric = task_groups(base, by_kind), task_metric(base) if by_kind else None
    key = "score" if by_kind else "acc"  # the tuned and reported metric
    history = res.get("history", [])
    final = res.get("final", {})
    cum = [(h.get("bytes_up") or 0) + (h.get("bytes_down") or 0) for h in history]
    per_round = [b - a for a, b in zip([0, *cum[:-1]], cum)]
    test = json.loads((folder / "test_results.json").read_text())["metrics"] if has_test(folder) else {}
    alloc_path = folder / "allocation.json"
    hparams = res.get("hparams", {})
    rank = int(deep_get(hparams, "lora", "rank", default=deep_get(base, "model", "lora", "rank", default=8)))
    if alloc_path.exists():
        alloc = json.loads(alloc_path.read_text())
        peaks = [a["peak_bytes"] for a in alloc]
        budgets = [a["budget_bytes"] for a in alloc]
        ranks = [max(a["rank_pattern"].values()) for a in alloc]
        weak = min(range(len(alloc)), key=lambda i: (budgets[i], i))
        strong = max(range(len(alloc)), key=lambda i: (budgets[i], -i))
        mem_source = "allocation.json"
    elif workload == "demo":
        peaks, budgets, ranks, weak, strong, mem_source = [0], [], [rank], 0, 0, "none (demo)"
    else:
        n = len(res.get("cluster_ids") or []) or int(deep_get(base, "data", "num_clients", default=1))
        peaks, budgets, ranks = [estimate_peak(base, rank)] * n, [], [rank] * n
        weak, strong = 0, 0
        mem_source = f"estimate_client_memory at lora.rank={rank}"
    measured = {}
    for label, i in (("weakest", weak), ("strongest", strong)):
        if measure or f"{WORKLOADS[workload][0]}/r{ranks[i]}" in measured_cache:  # cached: also with --no-measure
            measured[label] = {"client": i, "rank": ranks[i],
                               "bytes": measure_peak(workload, base, ranks[i], measured_cache)}  # fmt: skip
    cmd_file = folder / "command.txt"
    log = folder / "log.txt"
    used_gpu = log.exists() and "GPU available: True (cuda), used: True" in log.read_text(errors="replace")
    return {
        "workload": workload, "method": method, "lr": lr, "seed": seed,
        "folder": os.path.relpath(folder, ROOT) if folder.is_relative_to(ROOT) else folder.name,
        "command": cmd_file.read_text().strip() if cmd_file.exists() else None,
        "pooling": run_pooling(hparams), "rounds": len(history), "device": "CUDA GPU" if used_gpu else "CPU",
        "metric": key,
        "val_acc": final.get(f"val_{key}"), "val_group_acc": group_means(final, groups, "val", metric),
        "acc_per_round": [h.get(f"val_{key}") for h in history],
        "test_acc": test.get(f"test_{key}"), "test_group_acc": group_means(test, groups, "test", metric),
        "test_task_acc": {t: test.get(f"test_task/{t}/{(metric or {}).get(t, 'acc')}") for t in groups} if test else {},
        "test_task_metrics": {k[len("test_task/"):]: v for k, v in test.items() if k.startswith("test_task/")},
        "bytes_cumulative": cum, "bytes_per_round": per_round,
        "mean_bytes_per_round": sum(per_round) / len(per_round) if per_round else None,
        "wall_seconds": res.get("wall_seconds"), "traffic": res.get("traffic"), "cluster_ids": res.get("cluster_ids"),
        "client_peak_bytes": peaks, "client_budget_bytes": budgets, "client_max_rank": ranks,
        "peak_bytes_max": max(peaks), "peak_source": mem_source, "measured_peak": measured,
    }  # fmt: skip


def collect_rows(measure: bool, measured_cache: dict) -> list[dict]:
    """Every finished run present under the runs folder."""
    rows = []
    for wl in WORKLOADS:
        for m in METHODS:
            for lr_folder in sorted((PATHS.runs / wl / m).glob("lr*")):
                for sd in sorted(lr_folder.glob("seed*")):
                    r = parse_run(wl, m, float(lr_folder.name[2:]), int(sd.name[4:]), measured_cache, measure)
                    if r is not None:
                        rows.append(r)
    return rows


# ---------------------------------------------------------------------------------------------------- the protocol
def choose_lr(rows: list[dict], workload: str, method: str, tune_seeds: list[int]) -> tuple[float | None, dict]:
    """The learning rate with the best mean *validation* accuracy over ``tune_seeds`` (ties: the smaller rate), and
    the grid ``{lr: mean val acc}``. Test accuracy is never read here."""
    grid: dict[float, list[float]] = {}
    for r in rows:
        if r["workload"] == workload and r["method"] == method and r["seed"] in tune_seeds and r["val_acc"] is not None:
            grid.setdefault(r["lr"], []).append(r["val_acc"])
    means = {lr: sum(v) / len(v) for lr, v in sorted(grid.items()) if len(v) == len(tune_seeds)}
    if not means:
        return None, {}
    best = max(means, key=lambda lr: (means[lr], -lr))
    return best, means


def edge_step(rows: list[dict], workload: str, method: str, tune_seeds: list[int], grid: list[float]) -> float | None:
    """The next rate to tune when ``method``'s chosen rate is at the edge of what it has tried, else None.

    The edge is the largest (smallest) rate it has tried, once every rate of ``grid`` is tried: then twice (half)
    that rate. The test split is never read (``choose_lr``)."""
    best, means = choose_lr(rows, workload, method, tune_seeds)
    if best is None or not set(grid) <= set(means):
        return None
    if best == max(means) and best >= max(grid):
        return best * 2
    if best == min(means) and best <= min(grid):
        return best / 2
    return None


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int] | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, s, len(vals)


def paired_test(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """Paired t-test across the seeds both have: mean and std of ``a - b``, t and two-sided p (``None``: < 2 seeds)."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    from scipy.stats import ttest_rel

    diffs = [a[s] - b[s] for s in seeds]
    m, sd, n = mean_std(diffs)  # type: ignore[misc]
    if sd == 0.0:
        return {"seeds": seeds, "mean_diff": m, "std_diff": 0.0, "t": None, "p": None}
    res = ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])
    return {"seeds": seeds, "mean_diff": m, "std_diff": sd, "t": float(res.statistic), "p": float(res.pvalue)}


def summarize(rows: list[dict], workloads: list[str], methods: list[str], tune_seeds: list[int],
              seeds: list[int]) -> dict:  # fmt: skip
    """Per workload: each method's chosen lr, validation grid, and final test results over ``seeds``; the paired
    tests of ATLAS against the best other method and the best single-model baseline (by mean test accuracy)."""
    out: dict[str, Any] = {}
    for wl in workloads:
        per_method: dict[str, Any] = {}
        for m in methods:
            lr, grid = choose_lr(rows, wl, m, tune_seeds)
            if lr is None:
                continue
            final = [r for r in rows if r["workload"] == wl and r["method"] == m and r["lr"] == lr
                     and r["seed"] in seeds]  # fmt: skip
            tested = {r["seed"]: r["test_acc"] for r in final if r["test_acc"] is not None}
            groups = sorted({g for r in final for g in r["test_group_acc"]})
            per_method[m] = {
                "lr": lr, "val_grid": grid, "seeds": sorted(tested), "test_by_seed": tested,
                "test_acc": mean_std(list(tested.values())),
                "test_group_acc": {g: mean_std([r["test_group_acc"].get(g) for r in final]) for g in groups},
                "val_acc": mean_std([r["val_acc"] for r in final]),
                "mean_bytes_per_round": mean_std([r["mean_bytes_per_round"] for r in final]),
                "peak_bytes_max": mean_std([r["peak_bytes_max"] for r in final]),
                "measured_peak": {k: mean_std([r["measured_peak"].get(k, {}).get("bytes") for r in final])
                                  for k in ("weakest", "strongest")},
                "wall_seconds": mean_std([r["wall_seconds"] for r in final]),
                "rounds": max((r["rounds"] for r in final), default=None),
            }  # fmt: skip
        comparisons = {}
        if "atlas" in per_method and per_method["atlas"]["test_acc"]:
            pools = {"best other method": [m for m in per_method if not m.startswith("atlas")],
                     "best single-model baseline": [m for m in per_method if m in SINGLE_MODEL]}  # fmt: skip
            for label, pool in pools.items():
                scored = [m for m in pool if per_method[m]["test_acc"] and m != "centralized_task"]
                if scored:
                    best = max(scored, key=lambda m: per_method[m]["test_acc"][0])
                    test = paired_test(per_method["atlas"]["test_by_seed"], per_method[best]["test_by_seed"])
                    comparisons[label] = {"method": best, "paired_test": test}
        devices = sorted({r.get("device") or "?" for r in rows if r["workload"] == wl and r["method"] in per_method})
        out[wl] = {"methods": per_method, "atlas_vs": comparisons, "devices": devices}
    return out


# ---------------------------------------------------------------------------------------------------- outputs
def fmt(ms: tuple[float, float, int] | None, scale: float = 1.0, digits: int = 3) -> str:
    if ms is None:
        return "–"
    m, s, n = ms
    return f"{m * scale:.{digits}f}" + (f" ± {s * scale:.{digits}f}" if n > 1 else "")


def markdown_tables(summary: dict, lrs: list[float], commands: dict[str, str] | None = None) -> str:
    out = []
    for wl, block in summary.items():
        per = block["methods"]
        if not per:
            continue
        if commands and wl in commands:
            out += [f"```bash\n{commands[wl]}\n```", ""]
        groups = sorted({g for v in per.values() for g in v["test_group_acc"]})
        key = "score" if wl in BY_KIND else "acc"
        head = ["method", "chosen lr", "seeds", f"**test {key}**", *[f"test {g}" for g in groups], f"val {key}",
                "MB / round", "client peak MiB est. (max)", "measured MiB (weakest / strongest)", "wall s"]  # fmt: skip
        ran = f" (runs on: {', '.join(block['devices'])}, by their logs)" if block.get("devices") else ""
        out += [f"**{wl}** — test split, each method at its own learning rate (chosen on validation){ran}", ""]
        if key == "score":
            out += ["score = each task's own metric (accuracy, SQuAD F1, ROUGE-L F) per example, averaged over all "
                    "test examples; a kind's column is the mean over its tasks.", ""]  # fmt: skip
        out += [
                "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
        for m, v in per.items():
            meas = " / ".join(fmt(v["measured_peak"][k], 1 / MIB, 0) for k in ("weakest", "strongest"))
            cells = [m, f"{v['lr']:g}", ",".join(map(str, v["seeds"])) or "–", f"**{fmt(v['test_acc'])}**",
                     *[fmt(v["test_group_acc"].get(g)) for g in groups], fmt(v["val_acc"]),
                     fmt(v["mean_bytes_per_round"], 1e-6, 2), fmt(v["peak_bytes_max"], 1 / MIB, 1), meas,
                     fmt(v["wall_seconds"], 1, 0)]  # fmt: skip
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        for label, c in block["atlas_vs"].items():
            t = c["paired_test"]
            if t is None:
                out.append(f"ATLAS vs {label} (`{c['method']}`): fewer than 2 common seeds, no test.")
            else:
                p = "–" if t["p"] is None else f"{t['p']:.3f}"
                out.append(f"ATLAS vs {label} (`{c['method']}`), paired over seeds {t['seeds']}: "
                           f"{100 * t['mean_diff']:+.1f} ± {100 * t['std_diff']:.1f} points, p = {p}.")  # fmt: skip
        out.append("")
        grid = [lr for lr in lrs if any(lr in v["val_grid"] for v in per.values())]
        head = ["method", *[f"lr {lr:g}" for lr in grid]]
        title = "score" if key == "score" else "accuracy"
        out += [f"Validation {title} of the tuning runs ({wl}; mean over the tuning seeds; chosen in bold):", "",
                "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
        for m, v in per.items():
            cells = [m] + [("–" if lr not in v["val_grid"] else
                            (f"**{v['val_grid'][lr]:.3f}**" if lr == v["lr"] else f"{v['val_grid'][lr]:.3f}"))
                           for lr in grid]  # fmt: skip
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["workload", "method", "lr", "seed", "metric", "round", "value"])
    for r in rows:
        key = (r["workload"], r["method"], f"{r['lr']:g}", r["seed"])
        for metric in ("val_acc", "test_acc", "peak_bytes_max", "mean_bytes_per_round", "wall_seconds"):
            w.writerow([*key, metric, "", r[metric]])
        for split in ("val", "test"):
            for g, v in r[f"{split}_group_acc"].items():
                w.writerow([*key, f"{split}_group_acc/{g}", "", v])
        for t, v in r["test_task_acc"].items():
            w.writerow([*key, f"test_task_acc/{t}", "", v])
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


def write_plots(prefix: Path, rows: list[dict], summary: dict) -> list[str]:
    """``_tuning.png`` (validation accuracy vs lr per method), ``_test.png`` (test accuracy per task group, mean and
    std over seeds), ``_accuracy.png`` (validation accuracy per round at the chosen lr, mean and min–max band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    workloads = [wl for wl, b in summary.items() if b["methods"]]
    if not workloads:
        return []
    colors = {m: plt.cm.tab20((2 * i) % 20 + (2 * i) // 20) for i, m in enumerate(METHODS)}
    written = []
    n = len(workloads)

    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.5), squeeze=False)
    for ax, wl in zip(axes[0], workloads):
        for m, v in summary[wl]["methods"].items():
            lrs = sorted(v["val_grid"])
            ax.plot(lrs, [v["val_grid"][lr] for lr in lrs], marker="o", ms=4, color=colors[m], label=m)
            ax.plot([v["lr"]], [v["val_grid"][v["lr"]]], marker="*", ms=12, color=colors[m])
        ax.set(xscale="log", xlabel="learning rate", ylabel="final mean val accuracy (tuning seeds)",
               title=f"{wl}: tuning (star = chosen)")  # fmt: skip
        ax.legend(fontsize=7)
    save_fig(fig, prefix.with_name(prefix.name + "_tuning.png"))
    written.append(prefix.name + "_tuning.png")

    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.5), squeeze=False)
    for ax, wl in zip(axes[0], workloads):
        per = {m: v for m, v in summary[wl]["methods"].items() if v["test_acc"]}
        groups = ["all", *sorted({g for v in per.values() for g in v["test_group_acc"]})]
        width = 0.8 / max(len(per), 1)
        for j, (m, v) in enumerate(per.items()):
            stats = [v["test_acc"], *[v["test_group_acc"].get(g) for g in groups[1:]]]
            means = [s[0] if s else np.nan for s in stats]
            stds = [s[1] if s else 0.0 for s in stats]
            ax.bar(np.arange(len(groups)) + j * width, means, width, yerr=stds, capsize=2, color=colors[m],
                   label=f"{m} (lr {v['lr']:g}, {len(v['seeds'])} seeds)")  # fmt: skip
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
        ax.set(ylabel="test accuracy (mean ± std over seeds)", title=f"{wl}: test split", ylim=(0, 1))
        ax.legend(fontsize=7, loc="lower right")
    save_fig(fig, prefix.with_name(prefix.name + "_test.png"))
    written.append(prefix.name + "_test.png")

    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.5), squeeze=False)
    for ax, wl in zip(axes[0], workloads):
        for m, v in summary[wl]["methods"].items():
            curves = [r["acc_per_round"] for r in rows if r["workload"] == wl and r["method"] == m
                      and r["lr"] == v["lr"] and r["seed"] in v["seeds"]]  # fmt: skip
            if not curves:
                continue
            k = min(len(c) for c in curves)
            c = np.array([[np.nan if x is None else x for x in cv[:k]] for cv in curves], dtype=float)
            x = np.arange(1, k + 1)
            ax.plot(x, c.mean(0), marker="o", ms=3, color=colors[m], label=f"{m} (lr {v['lr']:g})")
            if c.shape[0] > 1:
                ax.fill_between(x, c.min(0), c.max(0), color=colors[m], alpha=0.12)
        ax.set(xlabel="round", ylabel="mean val accuracy", title=f"{wl}: chosen lr, band = min..max over seeds")
        ax.legend(fontsize=7)
    save_fig(fig, prefix.with_name(prefix.name + "_accuracy.png"))
    written.append(prefix.name + "_accuracy.png")
    return written


def write_readme(summary_json: Path) -> None:
    """Rewrite the block between the markers from ``compare.json``."""
    d = json.loads(summary_json.read_text())
    m = d["machine"]
    where = m.get("cuda") or f"{m.get('cpu', m['processor'])}, {m['cpu_count']} cores"
    block = (f"{BEGIN}\n_Generated by `benchmarks/compare.py` ({time.strftime('%Y-%m-%d %H:%M')}); each workload's "
             f"table below its command (finished runs are skipped, so a command re-reports them)._\n\n"
             f"Report made on: {where}, torch {m['torch']}; one torch thread per run. "
             f"Learning rates {d['lrs']}, tuning seeds {d['tune_seeds']}, final seeds {d['seeds']}.\n\n"
             f"{d['table']}\n{d['notes']}\n{END}")  # fmt: skip
    text = README.read_text()
    if BEGIN in text and END in text:
        pre, rest = text.split(BEGIN, 1)
        text = pre + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(README, text)


NOTES = (
    "Each method's learning rate is the one with the best final mean validation accuracy over the tuning seeds "
    "(validation split only); `test acc` is the final round's mean accuracy over every client's test split at that "
    "rate, mean ± sample std over the final seeds; `test <group>`: mean over the group's tasks; `val acc`: the "
    "same runs' final validation accuracy; `MB / round`: mean up + down bytes per round (activations, gradients and "
    "adapters); `client peak MiB est.`: the largest estimated client peak (RankAllocation's `allocation.json`, or "
    "`estimate_client_memory` at the config's rank); `measured`: one client step of the weakest / strongest "
    "client's rank, torch profiler on CPU (random weights of the same shape). The paired t-test compares ATLAS with "
    "the method of the best mean test accuracy, seed by seed."
)


def regenerate_command(workload: str, rows: list[dict], tune_seeds: list[int], seeds: list[int]) -> str:
    """The ``compare.py`` command(s) that make (or, finished runs being skipped, re-report) ``workload``'s runs.

    Every method's tested seeds are read from the runs (``seeds`` where none is tested yet): one command for the
    seeds all methods share, then one per larger seed set with the methods that have it (e.g. 5 seeds for two).
    """
    mine = [r for r in rows if r["workload"] == workload]
    tested: dict[str, tuple[int, ...]] = {}
    for m in dict.fromkeys(r["method"] for r in mine):
        have = sorted({r["seed"] for r in mine if r["method"] == m and r.get("test_acc") is not None})
        tested[m] = tuple(have or seeds)
    common = sorted(set.intersection(*(set(v) for v in tested.values()))) if tested else list(seeds)
    lines = [_command(workload, mine, tune_seeds, common)]
    for extra in dict.fromkeys(v for v in tested.values() if list(v) != common):
        methods = [m for m in METHODS if tested.get(m) == extra]
        lines.append(_command(workload, [r for r in mine if r["method"] in methods], tune_seeds, list(extra), methods))
    return "\n".join(lines)


def _command(workload: str, mine: list[dict], tune_seeds: list[int], seeds: list[int],
             only: list[str] | None = None) -> str:  # fmt: skip
    methods = [m for m in METHODS if any(r["method"] == m for r in mine)]
    tried = [{r["lr"] for r in mine if r["method"] == m and r["seed"] in tune_seeds} for m in methods]
    lrs = sorted(set.intersection(*tried)) if tried else []  # the grid; a step beyond its edge is --extend's
    cmd = ["python", "benchmarks/compare.py", "--workloads", workload]
    rounds = {r["rounds"] for r in mine}
    if len(rounds) == 1:
        cmd += ["--rounds", str(rounds.pop())]
    if only is not None or set(methods) != set(methods_of(workload, None)):
        cmd += ["--methods", *(only or methods)]
    if lrs != LRS:
        cmd += ["--lrs", *(f"{lr:g}" for lr in lrs)]
    if tune_seeds != [0]:
        cmd += ["--tune-seeds", *map(str, tune_seeds)]
    if seeds != [0, 1, 2]:
        cmd += ["--seeds", *map(str, seeds)]
    return shlex.join(cmd)


def tuned_everywhere(rows: list[dict], workload: str, tune_seeds: list[int], grid: list[float]) -> bool:
    """Whether every method with runs on ``workload`` has every rate of ``grid`` tuned on every tuning seed."""
    mine = [r for r in rows if r["workload"] == workload]
    done = {(r["method"], r["lr"], r["seed"]) for r in mine}
    return all((m, lr, s) in done for m in {r["method"] for r in mine} for lr in grid for s in tune_seeds)


def report(measure: bool, tune_seeds: list[int], seeds: list[int], grid: list[float] | None = None) -> dict:
    """Parse every run present (every workload and method) and rewrite ``compare.json``, ``compare.csv``, the plots
    and the README block; each workload's table comes with the command that regenerates it."""
    out_json = PATHS.prefix.with_suffix(".json")
    old = json.loads(out_json.read_text()) if out_json.exists() else {}
    measured_cache: dict = dict(old.get("measured_cache", {}))
    rows = collect_rows(measure, measured_cache)
    workloads = [wl for wl in WORKLOADS if any(r["workload"] == wl for r in rows)]
    unfinished = [wl for wl in workloads if not tuned_everywhere(rows, wl, tune_seeds, grid or LRS)]
    if unfinished:  # a chosen rate from part of the grid is not the protocol's: leave the workload out until done
        print(f"not reported yet (tuning grid incomplete, run its command again): {', '.join(unfinished)}")
        rows = [r for r in rows if r["workload"] not in unfinished]
        workloads = [wl for wl in workloads if wl not in unfinished]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    lrs = sorted({r["lr"] for r in rows})
    summary = summarize(rows, workloads, methods, tune_seeds, seeds)
    commands = {wl: regenerate_command(wl, rows, tune_seeds, seeds) for wl in workloads}
    table = markdown_tables(summary, lrs, commands)
    plots = write_plots(PATHS.prefix, rows, summary)
    PATHS.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_json, json.dumps(
        {"commands": commands, "machine": machine_info(), "lrs": lrs, "tune_seeds": tune_seeds, "seeds": seeds,
         "methods": {m: DESCRIPTION[m] for m in methods}, "plots": plots, "notes": NOTES, "table": table,
         "summary": summary, "measured_cache": measured_cache, "runs": rows}, indent=1, default=str))  # fmt: skip
    write_csv(PATHS.prefix.with_suffix(".csv"), rows)
    if PATHS.results == DEFAULT_RESULTS and PATHS.prefix.name == "compare":
        write_readme(out_json)
    print(table)
    return summary


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=["minilm"], choices=list(WORKLOADS))
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=list(METHODS),
        help="methods to run (default: the workload's set, WORKLOAD_METHODS, else MAIN_METHODS)",
    )
    p.add_argument("--lrs", nargs="+", type=float, default=LRS, help="the learning-rate grid every method tunes over")
    p.add_argument("--extend", type=int, default=1, help="steps beyond the grid's edge for a best rate on it")
    p.add_argument("--tune-seeds", nargs="+", type=int, default=[0], help="seeds of the tuning runs")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the final (test) runs")
    p.add_argument("--rounds", type=int, default=None, help="override trainer.max_epochs")
    p.add_argument("--quick", action="store_true", help="minilm, lrs 1e-3 5e-3, seeds 0 1, 2 short rounds")
    p.add_argument("--jobs", type=int, default=2, help="subprocesses at a time (one torch thread each)")
    p.add_argument("--force", action="store_true", help="redo runs that are done")
    p.add_argument("--report-only", action="store_true", help="parse the runs present and rewrite the outputs")
    p.add_argument("--no-measure", action="store_true", help="skip the measured client step peaks")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="folder of the runs and outputs")
    args = p.parse_args(argv)
    if args.quick:
        args.workloads, args.lrs, args.tune_seeds, args.seeds, args.rounds = ["minilm"], [1e-3, 5e-3], [0], [0, 1], 2
        args.extend = 0
    if any(lr <= 0 for lr in args.lrs):
        p.error(f"--lrs must be positive, got {args.lrs}")
    return args


def methods_of(workload: str, methods: list[str] | None) -> list[str]:
    """The methods to run on ``workload``: the ones asked for, else the workload's own set, else MAIN_METHODS."""
    return list(methods) if methods else WORKLOAD_METHODS.get(workload, MAIN_METHODS)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    global PATHS
    PATHS = Paths(args.results, args.quick)
    failed: list[dict] = []
    if not args.report_only:

        def plan(runs: list[dict], test: bool) -> list[dict]:
            todo = [{**r, "force": args.force} for r in runs if args.force or not is_done(r["folder"], test)]
            print(f"{len(runs)} runs, {len(runs) - len(todo)} done already, {len(todo)} to run")
            return todo

        tune = [build_run(wl, m, lr, s, args.rounds, args.quick) for s in args.tune_seeds for wl in args.workloads
                for m in methods_of(wl, args.methods) for lr in args.lrs]  # fmt: skip
        failed += run_all(plan(tune, test=False), args.jobs, "tune")
        args.force = False  # the final stage reuses the tuning runs just made
        rows = collect_rows(False, {})
        for _ in range(args.extend):  # a best rate on the grid's edge: one step further, for every method alike
            more = [build_run(wl, m, lr, s, args.rounds, args.quick) for wl in args.workloads
                    for m in methods_of(wl, args.methods)
                    if (lr := edge_step(rows, wl, m, args.tune_seeds, args.lrs)) is not None
                    for s in args.tune_seeds]  # fmt: skip
            if not more:
                break
            failed += run_all(plan(more, test=False), args.jobs, "tune beyond the grid's edge")
            rows = collect_rows(False, {})
        final = []
        for wl in args.workloads:
            for m in methods_of(wl, args.methods):
                lr, _ = choose_lr(rows, wl, m, args.tune_seeds)
                if lr is not None:
                    final += [build_run(wl, m, lr, s, args.rounds, args.quick, test=True) for s in args.seeds]
        failed += run_all(plan(final, test=True), args.jobs, "final")
    summary = report(not args.no_measure, args.tune_seeds, args.seeds, args.lrs)
    if failed:
        names = ", ".join(f"{r['workload']}/{r['method']}/{lr_tag(r['lr'])}/seed{r['seed']}" for r in failed)
        sys.exit(f"{len(failed)} runs failed ({names}); see log.txt in their folders, then run the same command again")
    return summary


if __name__ == "__main__":
    main()
