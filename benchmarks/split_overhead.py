"""Overhead of split LoRA steps: split vs monolithic peft LoRA step, and process memory vs number of clients.

Part 1 (step): one split step (client forward → channel → server forward/loss/backward → gradient back → client
backward → both AdamW steps) against a monolithic peft LoRA step on the same model, the same batch and the same
LoRA modules (client + server module names). Two monolithic variants are timed:

* ``mono_full``: ``peft_model(**batch).loss``, the usual Hugging Face loss (LM head over the vocabulary at every
  position);
* ``mono_answer``: the same peft model, but the LM head runs only at the answer positions, exactly as the split
  server does, so ``split / mono_answer`` isolates the cost of the cut itself.

Times are medians over interleaved repeats after warm-up (one worker process per model, variants in rotating order so
load from other processes hits all of them alike). Peak memory of a step is measured in a fresh worker per variant:
on CUDA ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus ``memory_allocated`` before the step; on CPU
(a) the torch profiler (``profile_memory=True``): the highest running total of CPU tensor bytes allocated during one
step, the CPU analogue of the CUDA figure, and (b) peak RSS: ``VmHWM`` (reset through ``/proc/self/clear_refs``)
minus ``VmRSS`` before the step, for the first step (which also allocates the AdamW state) and a steady step.

Part 2 (clients): for each N a fresh worker builds ``Federation(num_clients=N)`` with the GPT-2-small shape, gives
every client one tiny split step (its AdamW state then exists; one shared server optimizer) and reads RSS (psutil)
after the build, after the steps with gradients set to ``None`` and after giving every client adapter a gradient
tensor again (``run_split_step`` leaves them set). RSS growth per added client is compared with the adapter's bytes
× 1 (build), × 3 (weights + two AdamW moments) and × 4 (+ gradients).

Outputs (written atomically): ``<out>/split_overhead.json``, ``.csv`` and ``.png``.

Usage::

    python benchmarks/split_overhead.py --quick        # < ~3 minutes on 2 CPU cores
    python benchmarks/split_overhead.py                # full run
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from atlas_pl.profiling import cpu_peak_bytes, cuda_peak_bytes

MIB = 2**20
VARIANTS = ("split", "mono_full", "mono_answer")
RSS_KEYS = ("build", "steps", "grads", "build_trim", "steps_trim", "grads_trim")
SPLIT_KW = dict(cut_layer=2, lora_rank=8, lora_alpha=16.0)  # the Federation's cut and LoRA, and the peft reference's


# ---------------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """What one run measures (``--quick`` shrinks everything)."""

    models: tuple[str, ...] = ("gpt2-small-shape", "gpt2-tiny")
    batch_size: int = 8
    seq_len: int = 128
    answer_len: int = 8
    warmup: int = 2
    repeats: int = 7
    clients: tuple[int, ...] = (10, 100, 500)
    client_batch: tuple[int, int] = (1, 8)
    device: str = "cpu"
    threads: int = 1
    timeout_s: int = 900


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small batch, few repeats, N in {10, 50} (< ~3 min)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per worker (default 1 on CPU: robust on a shared machine)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 7; quick 3)")
    p.add_argument("--clients", type=int, nargs="+", default=None, help="client counts N (default 10 100 500)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per worker process before it is given up")
    p.add_argument("--_worker", choices=("timing", "memory", "clients"), help=argparse.SUPPRESS)
    p.add_argument("--_config", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_settings(args: argparse.Namespace, device: str) -> Settings:
    s = Settings(device=device, timeout_s=args.timeout)
    if args.quick:
        s.batch_size, s.seq_len, s.answer_len, s.warmup, s.repeats, s.clients = 4, 64, 4, 1, 3, (10, 50)
    s.threads = args.threads or (1 if device == "cpu" else (os.cpu_count() or 1))
    s.repeats = args.repeats or s.repeats
    s.clients = tuple(args.clients or s.clients)
    return s


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    return name


# ---------------------------------------------------------------------------------------------------- models and steps
def make_batch(batch_size: int, seq_len: int, answer_len: int, device: str, vocab: int = 50257) -> dict:
    """Random token ids, full attention, targets on the last ``answer_len`` positions (-100 elsewhere)."""
    import torch

    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -answer_len:] = ids[:, -answer_len:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def build_split(model: str, device: str, num_clients: int = 1) -> Any:
    """A ``Federation`` of ``num_clients`` clients over one frozen model (seeded: same weights as the monolith)."""
    import torch

    from atlas_pl.federation import Federation
    from atlas_pl.lora import LoraSpec

    torch.manual_seed(0)
    lora = LoraSpec(rank=SPLIT_KW["lora_rank"], alpha=SPLIT_KW["lora_alpha"])
    return Federation(model=model, num_clients=num_clients, cut_layer=SPLIT_KW["cut_layer"], lora=lora).to(device)


def split_stepper(fed: Any) -> Callable[[dict], Any]:
    """One split step of client 0 with its own client and server AdamW."""
    client = fed.clients[0]
    opts = (client.client_optimizer(), client.server_optimizer())
    return lambda batch: client.run_split_step(batch, opts).loss


def build_monolith(model: str, device: str) -> Any:
    """The same seeded base model with one peft LoRA adapter on the split's client + server module names."""
    import torch
    from peft import LoraConfig, get_peft_model

    from atlas_pl.lora.adapters import LoraSpec
    from atlas_pl.models import load_model
    from atlas_pl.split.backbone import SplitBackbone

    torch.manual_seed(0)
    base = load_model(model)
    split = SplitBackbone(
        base, SPLIT_KW["cut_layer"], LoraSpec(rank=SPLIT_KW["lora_rank"], alpha=SPLIT_KW["lora_alpha"])
    )
    names = split.client_module_names() + split.server_module_names()  # only the names: no adapter is added
    config = LoraConfig(
        r=SPLIT_KW["lora_rank"],
        lora_alpha=SPLIT_KW["lora_alpha"],
        target_modules=names,
        fan_in_fan_out=split.arch.fan_in_fan_out,
    )
    return get_peft_model(base, config).to(device)


def answer_only_loss(peft_model: Any, batch: dict) -> Any:
    """Causal-LM loss with the LM head only at the (shifted) answer positions, as the split server computes it."""
    import torch.nn.functional as F

    lm = peft_model.get_base_model()
    hidden = lm.transformer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    selected = targets != -100
    logits = lm.lm_head(hidden[:, :-1][selected]).float()
    return F.cross_entropy(logits, targets[selected])


def mono_stepper(peft_model: Any, answer_only: bool) -> Callable[[dict], Any]:
    """One monolithic LoRA step (single AdamW over every LoRA tensor)."""
    import torch

    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)

    def step(batch: dict) -> Any:
        opt.zero_grad(set_to_none=True)
        loss = answer_only_loss(peft_model, batch) if answer_only else peft_model(**batch).loss
        loss.backward()
        opt.step()
        return loss

    return step


def make_stepper(variant: str, model: str, device: str, monolith: Any = None) -> tuple[Callable[[dict], Any], Any]:
    """``(step, owner)`` of ``variant``; ``owner``: the federation or the peft model (reused by mono variants)."""
    if variant == "split":
        fed = build_split(model, device)
        return split_stepper(fed), fed
    monolith = monolith if monolith is not None else build_monolith(model, device)
    return mono_stepper(monolith, answer_only=variant == "mono_answer"), monolith


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def timed(step: Callable[[dict], Any], batch: dict, device: str) -> tuple[float, float]:
    """``(seconds, loss)`` of one step."""
    sync(device)
    t0 = time.perf_counter()
    loss = step(batch)
    sync(device)
    return time.perf_counter() - t0, float(loss.detach())


# ---------------------------------------------------------------------------------------------------- memory probes
def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def malloc_trim() -> bool:
    """Return the free pages glibc malloc holds to the OS (``malloc_trim(0)``); ``False`` without glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def rss_reading() -> tuple[int, int | None]:
    """RSS after ``gc.collect()``, then RSS after ``malloc_trim(0)`` (live memory without malloc's free pages)."""
    gc.collect()
    raw = rss_bytes()
    return raw, (rss_bytes() if malloc_trim() else None)


def proc_status_bytes(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in bytes, ``None`` off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_hwm() -> bool:
    """Reset the peak-RSS counter (``VmHWM``) to the current RSS (Linux >= 4.0); ``False`` when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_peak_of(step: Callable[[], Any]) -> dict[str, Any]:
    """Peak RSS during ``step()`` above the RSS before it (``VmHWM`` reset first; else ``ru_maxrss``, flagged)."""
    import resource

    gc.collect()
    before = proc_status_bytes("VmRSS") or rss_bytes()
    reset = reset_hwm()
    step()
    peak = proc_status_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "peak_rss_delta": max(0, (peak or 0) - before),
        "rss_before": before,
        "rss_after": rss_bytes(),
        "hwm_reset": reset,
    }


profiler_peak_of = cpu_peak_bytes


cuda_peak_of = cuda_peak_bytes


# ---------------------------------------------------------------------------------------------------- workers
def worker_timing(cfg: dict) -> dict:
    """Interleaved, rotating-order timing of the three variants on one model, plus bytes across the cut."""
    batch = make_batch(cfg["batch_size"], cfg["seq_len"], cfg["answer_len"], cfg["device"])
    steps: dict[str, Callable[[dict], Any]] = {}
    steps["split"], fed = make_stepper("split", cfg["model"], cfg["device"])
    steps["mono_full"], mono = make_stepper("mono_full", cfg["model"], cfg["device"])
    steps["mono_answer"], _ = make_stepper("mono_answer", cfg["model"], cfg["device"], monolith=mono)
    losses = {v: [timed(steps[v], batch, cfg["device"])[1] for _ in range(cfg["warmup"])] for v in VARIANTS}
    before = fed.channel.stats.as_dict()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(cfg["repeats"]):
        for v in VARIANTS[r % 3 :] + VARIANTS[: r % 3]:
            times[v].append(timed(steps[v], batch, cfg["device"])[0])
    after = fed.channel.stats.as_dict()
    per_step = {
        k: (after[k] - before[k]) // cfg["repeats"] for k in ("activations_up", "metadata_up", "gradients_down")
    }
    return {
        "times": times,
        "warmup_losses": losses,
        "cut_bytes_per_step": per_step,
        "trainable_bytes": trainable_bytes(fed, mono),
    }


def trainable_bytes(fed: Any, mono: Any) -> dict[str, Any]:
    """LoRA bytes trained by one split step (client + server adapter) and by the monolith (should be equal)."""
    client = fed.clients[0]
    bank = fed.backbone.bank
    mono_params = [p for p in mono.parameters() if p.requires_grad]
    return {
        "split": bank.nbytes(client.client_adapter) + bank.nbytes(client.server_adapter),
        "split_client": bank.nbytes(client.client_adapter),
        "split_server": bank.nbytes(client.server_adapter),
        "split_tensors": len(bank.parameters(client.client_adapter) + bank.parameters(client.server_adapter)),
        "mono": sum(p.numel() * p.element_size() for p in mono_params),
        "mono_tensors": len(mono_params),
    }


def worker_memory(cfg: dict) -> dict:
    """Peak memory of the first and of a steady step of one variant, in a fresh process."""
    batch = make_batch(cfg["batch_size"], cfg["seq_len"], cfg["answer_len"], cfg["device"])
    step, _ = make_stepper(cfg["variant"], cfg["model"], cfg["device"])
    run = lambda: step(batch)  # noqa: E731
    out: dict[str, Any] = {"first": rss_peak_of(run)}
    for _ in range(max(1, cfg["warmup"] - 1)):
        run()
    out["steady"] = rss_peak_of(run)
    if cfg["device"] == "cuda":
        out["peak_alloc"] = cuda_peak_of(run)
        out["peak_alloc_method"] = "cuda max_memory_allocated - memory_allocated before the step"
    else:
        out["peak_alloc"] = profiler_peak_of(run)
        out["peak_alloc_method"] = "torch profiler profile_memory: max running total of CPU tensor allocations"
    return out


def worker_clients(cfg: dict) -> dict:
    """RSS after building N clients, after one tiny step each (grads dropped), and with gradients kept."""
    out: dict[str, Any] = {"n": cfg["n"]}
    if cfg.get(
        "peft_add_adapter"
    ):  # the path before AdapterBank added adapters layer by layer (benchmarks/build_cost.py)
        from atlas_pl.lora.adapters import AdapterBank

        AdapterBank._add_on_existing_layers = lambda self, *args: False  # type: ignore[method-assign]
    from atlas_pl.federation import Federation

    make_client, spent = Federation._make_client, [0.0]

    def timed_make_client(self: Any, *args: Any, **kwargs: Any) -> Any:  # the clients' share of the build
        t = time.perf_counter()
        try:
            return make_client(self, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t

    Federation._make_client = timed_make_client  # type: ignore[method-assign]
    t0 = time.perf_counter()
    fed = build_split(cfg["model"], cfg["device"], num_clients=cfg["n"])
    out["build_s"] = time.perf_counter() - t0
    out["clients_build_s"] = spent[0]
    out["rss_build"], out["rss_build_trim"] = rss_reading()
    batch = make_batch(*cfg["client_batch"], answer_len=2, device=cfg["device"])
    server_opt = fed.clients[0].server_optimizer()  # one server adapter shared by all clients (per_cluster)
    t0 = time.perf_counter()
    opts = [client_step(c, batch, server_opt) for c in fed.clients]
    out["steps_s"] = time.perf_counter() - t0
    out["rss_steps"], out["rss_steps_trim"] = rss_reading()
    restore_grads(fed)
    out["rss_grads"], out["rss_grads_trim"] = rss_reading()
    bank = fed.backbone.bank
    return {
        **out,
        "adapter_bytes": bank.nbytes("client_0"),
        "opt_state_bytes": optimizer_state_bytes(opts[0]),
        "server_adapter_bytes": bank.nbytes("server_c0"),
    }


def client_step(client: Any, batch: dict, server_opt: Any) -> Any:
    """One split step of ``client`` with a fresh client AdamW (kept), then its gradients set to ``None``."""
    opt = client.client_optimizer()
    client.run_split_step(batch, (opt, server_opt))
    opt.zero_grad(set_to_none=True)
    server_opt.zero_grad(set_to_none=True)
    return opt


def restore_grads(fed: Any) -> None:
    """Give every client adapter tensor a gradient again: the state ``run_split_step`` leaves behind."""
    import torch

    for client in fed.clients:
        for p in fed.backbone.bank.parameters(client.client_adapter):
            p.grad = torch.zeros_like(p)


def optimizer_state_bytes(opt: Any) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if hasattr(t, "numel"))


WORKERS = {"timing": worker_timing, "memory": worker_memory, "clients": worker_clients}


def worker_main(args: argparse.Namespace) -> None:
    """Entry point of a worker process: run one measurement, write its JSON result."""
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    cfg = json.loads(args._config)
    torch.set_num_threads(cfg["threads"])
    result = WORKERS[args._worker](cfg)
    atomic_write_text(Path(args._result), json.dumps(result))


# ---------------------------------------------------------------------------------------------------- orchestration
def run_worker(kind: str, cfg: dict, timeout_s: int) -> dict:
    """Run one measurement in a fresh process of this script; ``{"error": ...}`` when it fails or times out."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": str(cfg["threads"]),
        "MKL_NUM_THREADS": str(cfg["threads"]),
        "TOKENIZERS_PARALLELISM": "false",
    }
    fd, result = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [sys.executable, __file__, "--_worker", kind, "--_config", json.dumps(cfg), "--_result", result]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            return {
                "error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"],
                "wall_s": time.perf_counter() - t0,
            }
        with open(result) as f:
            return {**json.load(f), "wall_s": time.perf_counter() - t0}
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s", "wall_s": time.perf_counter() - t0}
    finally:
        os.remove(result)


def jobs(s: Settings) -> list[tuple[str, str, dict]]:
    """``(label, kind, config)`` of every worker run, in order."""
    base = {
        "device": s.device,
        "threads": s.threads,
        "batch_size": s.batch_size,
        "seq_len": s.seq_len,
        "answer_len": s.answer_len,
        "warmup": s.warmup,
        "repeats": s.repeats,
    }
    out: list[tuple[str, str, dict]] = []
    for model in s.models:
        out.append((f"time {model}", "timing", {**base, "model": model}))
        out += [(f"memory {model} {v}", "memory", {**base, "model": model, "variant": v}) for v in VARIANTS]
    client_cfg = {
        "device": s.device,
        "threads": s.threads,
        "model": "gpt2-small-shape",
        "client_batch": list(s.client_batch),
    }
    out += [(f"clients N={n}", "clients", {**client_cfg, "n": n}) for n in s.clients]
    return out


def run_all(s: Settings, console: Any) -> list[tuple[str, str, dict, dict]]:
    """Run every job with a rich progress display; returns ``(label, kind, config, result)``."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    todo = jobs(s)
    done: list[tuple[str, str, dict, dict]] = []
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("benchmark", total=len(todo))
        for label, kind, cfg in todo:
            progress.update(task, description=label)
            result = run_worker(kind, cfg, s.timeout_s)
            status = f"[red]failed: {result['error']}" if "error" in result else "[green]done"
            progress.console.print(f"{label}: {status} ({result['wall_s']:.0f} s)")
            done.append((label, kind, cfg, result))
            progress.advance(task)
    return done


# ---------------------------------------------------------------------------------------------------- summaries
def summarize_step(done: list[tuple[str, str, dict, dict]], model: str) -> dict:
    """Median times, ratios and peaks of one model's three variants."""
    timing = next(r for _, k, c, r in done if k == "timing" and c["model"] == model)
    mem = {c["variant"]: r for _, k, c, r in done if k == "memory" and c["model"] == model}
    out: dict[str, Any] = {"model": model, "timing_error": timing.get("error")}
    if "times" in timing:
        t = timing["times"]
        out["median_s"] = {v: statistics.median(t[v]) for v in VARIANTS}
        out["times_s"] = t
        for ref in ("mono_full", "mono_answer"):
            out[f"ratio_split_over_{ref}"] = out["median_s"]["split"] / out["median_s"][ref]
            out[f"paired_ratio_split_over_{ref}"] = statistics.median(a / b for a, b in zip(t["split"], t[ref]))
        out.update({k: timing[k] for k in ("cut_bytes_per_step", "trainable_bytes", "warmup_losses")})
    out["memory"] = {v: mem.get(v, {"error": "missing"}) for v in VARIANTS}
    return out


def summarize_clients(done: list[tuple[str, str, dict, dict]]) -> dict:
    """Per-N RSS and the growth per added client between consecutive N, with the expected per-client bytes."""
    rows = sorted((r for _, k, _, r in done if k == "clients" and "error" not in r), key=lambda r: r["n"])
    failed = [{"n": c["n"], **r} for _, k, c, r in done if k == "clients" and "error" in r]
    growth = []
    for a, b in zip(rows, rows[1:]):
        dn = b["n"] - a["n"]
        growth.append(
            {
                "from_n": a["n"],
                "to_n": b["n"],
                **{
                    f"per_client_{k}": (b[f"rss_{k}"] - a[f"rss_{k}"]) / dn
                    for k in RSS_KEYS
                    if a[f"rss_{k}"] is not None
                },
            }
        )
    adapter = rows[0]["adapter_bytes"] if rows else None
    expected = (
        None if adapter is None else {"x1_build": adapter, "x3_weights_adam": 3 * adapter, "x4_with_grads": 4 * adapter}
    )
    return {"per_n": rows, "growth": growth, "expected_per_client": expected, "failed": failed}


def machine_info(s: Settings) -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "device": s.device,
        "torch_threads_per_worker": s.threads,
        "load_avg_at_start": list(os.getloadavg()),
    }
    if s.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------------------------------------------- outputs
def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def csv_rows(report: dict) -> list[list[Any]]:
    """Long-format rows: ``section, model, variant, n_clients, metric, value, unit``."""
    rows: list[list[Any]] = []
    for st in report["step"]:
        for v in VARIANTS:
            if "median_s" in st:
                rows.append(["step", st["model"], v, "", "median_step_time", st["median_s"][v], "s"])
            mem = st["memory"][v]
            for key, value in (
                ("peak_alloc", mem.get("peak_alloc")),
                ("peak_rss_delta_first", mem.get("first", {}).get("peak_rss_delta")),
                ("peak_rss_delta_steady", mem.get("steady", {}).get("peak_rss_delta")),
            ):
                rows.append(["step", st["model"], v, "", key, value, "bytes"])
        for key in ("ratio_split_over_mono_full", "ratio_split_over_mono_answer"):
            if key in st:
                rows.append(["step", st["model"], "split", "", key, st[key], "x"])
        for key, value in st.get("cut_bytes_per_step", {}).items():
            rows.append(["step", st["model"], "split", "", key, value, "bytes"])
    for r in report["clients"]["per_n"]:
        rows += [
            ["clients", "gpt2-small-shape", "split", r["n"], k, r[k], "bytes" if k.startswith("rss") else "s"]
            for k in (*(f"rss_{k}" for k in RSS_KEYS), "build_s", "steps_s")
        ]
    return rows


def write_csv(path: Path, rows: list[list[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["section", "model", "variant", "n_clients", "metric", "value", "unit"])
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def plot_step_panel(ax: Any, steps: list[dict]) -> None:
    """Bars of step time and peak tensor memory per variant, relative to ``mono_full`` (absolute values on top)."""
    groups, width = [], 0.27
    for st in steps:
        if "median_s" in st:
            groups.append((f"time\n{st['model']}", {v: st["median_s"][v] for v in VARIANTS}, "s"))
        peaks = {v: st["memory"][v].get("peak_alloc") for v in VARIANTS}
        if all(peaks.values()):
            groups.append((f"peak mem\n{st['model']}", {v: p / MIB for v, p in peaks.items()}, "MiB"))
    for i, v in enumerate(VARIANTS):
        xs = [g + (i - 1) * width for g in range(len(groups))]
        heights = [vals[v] / vals["mono_full"] for _, vals, _ in groups]
        bars = ax.bar(xs, heights, width, label=v)
        for bar, (_, vals, unit) in zip(bars, groups):
            ax.annotate(
                f"{vals[v]:.3g}{unit}",
                (bar.get_x() + width / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=6,
                rotation=90,
            )
    ax.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=7)
    ax.set_ylim(0, 1.35 * max([1.0] + [vals[v] / vals["mono_full"] for _, vals, _ in groups for v in VARIANTS]))
    ax.set_ylabel("relative to mono_full (absolute value on each bar)")
    ax.set_title("split vs monolithic peft LoRA step")
    ax.legend(fontsize=7)


CLIENT_SERIES = (
    ("rss_build", "after build", "x1_build", 1),
    ("rss_steps", "after steps (grads None)", "x3_weights_adam", 3),
    ("rss_grads", "with grads", "x4_with_grads", 4),
)


def plot_clients_panel(ax: Any, clients: dict) -> None:
    """Measured RSS vs N (solid) and the lines expected from adapter bytes × 1/3/4 (dashed, from the smallest N)."""
    rows = clients["per_n"]
    if not rows:
        return
    ns = [r["n"] for r in rows]
    exp = clients["expected_per_client"]
    for i, (key, label, exp_key, factor) in enumerate(CLIENT_SERIES):
        ax.plot(ns, [r[key] / MIB for r in rows], "o-", color=f"C{i}", label=label)
        if rows[0][key + "_trim"] is not None:
            ax.plot(ns, [r[key + "_trim"] / MIB for r in rows], "x:", color=f"C{i}", label=f"{label}, malloc_trim")
        line = [(rows[0][key] + (n - ns[0]) * exp[exp_key]) / MIB for n in ns]
        ax.plot(ns, line, "--", color=f"C{i}", alpha=0.7, label=f"expected: + adapter bytes × {factor} per client")
    ax.set_xlabel("simulated clients N")
    ax.set_ylabel("process RSS (MiB)")
    ax.set_title("memory vs number of clients (gpt2-small-shape)")
    ax.legend(fontsize=7)


def write_plot(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    plot_step_panel(left, report["step"])
    plot_clients_panel(right, report["clients"])
    fig.suptitle(f"atlas-pl split overhead ({report['machine']['device']}, {report['machine']['cpu_count']} CPUs)")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def print_summary(console: Any, report: dict) -> None:
    """Rich tables of the step comparison and of the per-client growth."""
    from rich.table import Table

    table = Table(title="step: median time and peak memory")
    for col in ("model", "variant", "median s", "peak alloc MiB", "peak RSS Δ first MiB", "peak RSS Δ steady MiB"):
        table.add_column(col)
    for st in report["step"]:
        for v in VARIANTS:
            mem = st["memory"][v]
            table.add_row(
                st["model"],
                v,
                fmt(st.get("median_s", {}).get(v)),
                fmt(mem.get("peak_alloc"), MIB),
                fmt(mem.get("first", {}).get("peak_rss_delta"), MIB),
                fmt(mem.get("steady", {}).get("peak_rss_delta"), MIB),
            )
    console.print(table)
    for st in report["step"]:
        console.print(
            f"{st['model']}: split/mono_full {fmt(st.get('ratio_split_over_mono_full'))}, split/mono_answer "
            f"{fmt(st.get('ratio_split_over_mono_answer'))}; cut bytes/step {st.get('cut_bytes_per_step')}"
        )
    growth = Table(title="RSS growth per added client (KiB)", caption="* after malloc_trim(0); exp ×k: adapter × k")
    for col in ("N", "build", "steps", "grads", "build*", "steps*", "grads*", "exp ×1", "exp ×3", "exp ×4"):
        growth.add_column(col)
    exp = report["clients"]["expected_per_client"] or {}
    for g in report["clients"]["growth"]:
        growth.add_row(
            f"{g['from_n']}→{g['to_n']}",
            *(fmt(g.get(f"per_client_{k}"), 1024) for k in RSS_KEYS),
            *(fmt(x, 1024) for x in exp.values()),
        )
    console.print(growth)


def fmt(value: float | None, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value / scale:.3g}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._worker:
        worker_main(args)
        return
    from rich.console import Console

    console = Console()
    s = make_settings(args, resolve_device(args.device))
    console.print(f"[bold]split overhead[/] ({'quick' if args.quick else 'full'}): {asdict(s)}")
    t0 = time.perf_counter()
    done = run_all(s, console)
    report = {
        "settings": asdict(s),
        "quick": args.quick,
        "machine": machine_info(s),
        "step": [summarize_step(done, m) for m in s.models],
        "clients": summarize_clients(done),
        "wall_s": time.perf_counter() - t0,
        "methods": METHODS,
    }
    out = args.out
    atomic_write_text(out / "split_overhead.json", json.dumps(report, indent=2))
    write_csv(out / "split_overhead.csv", csv_rows(report))
    write_plot(out / "split_overhead.png", report)
    print_summary(console, report)
    console.print(f"wrote {out}/split_overhead.{{json,csv,png}} in {report['wall_s']:.0f} s")


METHODS = {
    "time": "median wall time of a step (optimizer steps included) over interleaved repeats after warm-up",
    "peak_alloc": "CPU: torch profiler profile_memory, max running total of CPU tensor bytes allocated during one "
    "steady step; CUDA: max_memory_allocated - memory_allocated before the step",
    "peak_rss_delta": "VmHWM (reset via /proc/self/clear_refs) - VmRSS before the step, fresh process per variant; "
    "'first' includes creating the AdamW state; freed memory kept by malloc lowers 'steady'",
    "clients": "psutil RSS of a fresh process per N after the build, after one tiny step per client (grads set to "
    "None), and after giving every client adapter a zero gradient again; each reading is taken after "
    "gc.collect() ('rss_*') and again after glibc malloc_trim(0) ('rss_*_trim': without the free pages "
    "malloc keeps)",
}

if __name__ == "__main__":
    main()
