"""GPU benchmark: split vs monolithic LoRA step (fp32, bf16), a 64-client round, and the exact merge at d = 4096/8192.

Three sections, all in one process on one device (``--device auto|cuda|cpu``), on a config-built model with random
weights (no download): by default a Qwen2-0.5B-like shape built with ``LlamaConfig`` (24 blocks, hidden 896, MLP
4864, 14 heads / 2 KV heads, vocabulary 151,936, tied embeddings, q/k/v bias: 494 M parameters), with ``--tiny`` the
test model ``llama-tiny`` (4 blocks, hidden 64):

1. ``step``: one split step (``SplitClient.run_split_step`` of a one-client ``Federation``: client forward → in-process
   channel → server forward, loss and backward → gradient back → client backward → both AdamW steps) against a
   monolithic peft LoRA step (``mono_answer``: the same seeded model, one peft adapter on the same modules, the LM
   head only at the answer positions, as the split server computes it; one AdamW), for the backbone in float32 and in
   bfloat16 (the LoRA factors stay float32 in both, as peft upcasts them). Median step time over interleaved repeats
   (variant order alternates) after warm-up; tokens/s = batch × seq_len / median; peak memory of one more step (CUDA:
   ``max_memory_allocated`` above the memory allocated before it; CPU: the torch profiler's highest running total of
   tensor bytes); ``split / mono`` = ratio of the median step times.
2. ``round``: a ``Federation`` of 64 clients (``share: server``, LoRA r = 8, cut after block 2), one split step of
   every client in turn (each client its own AdamW, one shared server AdamW), then the exact per-cluster merge of the
   64 client adapters (``ClusterAggregation("exact").aggregate``). One warm-up round (it creates the AdamW states),
   then the median of ``--rounds`` timed rounds: steps, aggregation and total.
3. ``merge``: the exact heterogeneous-rank merge (``merge_lora`` + ``truncate_many``) against the dense-SVD baseline
   (``dense_svd_merge``, FlexLoRA) for square modules d = 4096 and 8192 and 10 clients of ranks 4-16 (the problems of
   ``benchmarks/aggregation.py``), on the device. The dense SVD runs only while its estimated time (cubic in d, from
   the last measured size) fits ``--dense-budget`` seconds; the merged update is checked against the float64
   ``Σ p_i s_i B_i A_i``.

Outputs (atomic): ``<out>/gpu.json`` (settings, machine, every time), ``gpu.csv`` (one row per variant, round and
merge) and ``gpu.png``. Any section that fails is recorded with its error and the script exits with status 1.

Usage::

    python benchmarks/gpu.py                               # one CUDA device: about 2-4 minutes (H100/H200)
    OMP_NUM_THREADS=1 python benchmarks/gpu.py --tiny --device cpu --out /tmp/gpu_tiny   # < 1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import aggregation  # noqa: E402
import split_overhead  # noqa: E402
from atlas_pl.profiling import cpu_peak_bytes, cuda_peak_bytes  # noqa: E402
from outputs import machine_info, save_png, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
VARIANTS = ("split", "mono_answer")
MERGE_METHODS = ("factored", "dense_svd")
# Qwen2-0.5B's shape as a LLaMA config (Qwen2 is LLaMA with q/k/v biases): 494 M parameters, random weights.
QWEN2_05B_SHAPE: dict[str, Any] = dict(
    num_hidden_layers=24,
    hidden_size=896,
    intermediate_size=4864,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=4096,
    attention_bias=True,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
)


@dataclass
class Settings:
    """What one run measures (``--tiny`` shrinks everything)."""

    device: str = "cuda"
    tiny: bool = False
    model: str = "llama-tiny"  # the config-built LLaMA; ``model_overrides`` give it its shape
    model_label: str = "qwen2-0.5b-shape"
    model_overrides: dict[str, Any] = field(default_factory=lambda: dict(QWEN2_05B_SHAPE))
    cut_layer: int = 2  # split_overhead.SPLIT_KW: the cut and LoRA of the other step benchmarks
    lora_rank: int = 8
    lora_alpha: int = 16
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    step_batch: int = 8
    step_seq_len: int = 512
    answer_len: int = 8
    warmup: int = 2
    repeats: int = 5
    round_clients: int = 64
    round_batch: int = 4
    round_seq_len: int = 256
    round_dtype: str = "bfloat16"
    rounds: int = 3
    server_group: int = 16  # clients per batched server pass in the synchronous rounds
    merge_dims: tuple[int, ...] = (4096, 8192)
    merge_clients: int = 10
    merge_calibration_d: int = 2048
    dense_budget_s: float = 75.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda when available")
    p.add_argument("--tiny", action="store_true", help="llama-tiny, 4 clients, d = 64/128, B=2, T=16 (CPU: < 1 min)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per variant and merges (default 5; tiny 3)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds after the warm-up one (default 3; tiny 2)")
    p.add_argument("--clients", type=int, default=None, help="clients of the round (default 64; tiny 4)")
    p.add_argument("--round-dtype", choices=("float32", "bfloat16"), default="bfloat16", help="backbone dtype")
    p.add_argument(
        "--dense-budget", type=float, default=None, help="seconds the dense SVDs of the merge may take (default 75)"
    )
    return p.parse_args(argv)


def make_settings(args: argparse.Namespace, device: str) -> Settings:
    s = Settings(device=device, tiny=args.tiny, round_dtype=args.round_dtype)
    if args.tiny:
        s.model_label, s.model_overrides = "llama-tiny", {}
        s.step_batch, s.step_seq_len, s.answer_len, s.warmup, s.repeats = 2, 16, 4, 1, 3
        s.round_clients, s.round_batch, s.round_seq_len, s.rounds, s.server_group = 4, 2, 16, 2, 2
        s.merge_dims, s.merge_clients, s.merge_calibration_d = (64, 128), 4, 32
    for name, value in (("repeats", args.repeats), ("rounds", args.rounds), ("clients", args.clients)):
        if value is not None and value < 1:
            raise SystemExit(f"--{name} must be >= 1, got {value}")
    s.repeats = args.repeats or s.repeats
    s.rounds = args.rounds or s.rounds
    s.round_clients = args.clients or s.round_clients
    s.dense_budget_s = s.dense_budget_s if args.dense_budget is None else args.dense_budget
    return s


def resolve_device(name: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; ``cuda`` without CUDA exits (status 1) with the reason."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--device cuda: CUDA is not available (torch {torch.__version__}, CUDA build: {torch.version.cuda}, "
            f"{torch.cuda.device_count()} device(s) visible). Run on a CUDA machine, or use --device cpu (with --tiny)."
        )
    return split_overhead.resolve_device(name)


# ---------------------------------------------------------------------------------------------------- building
def build_federation(s: Settings, dtype: str, num_clients: int) -> Any:
    """A seeded ``Federation`` of ``num_clients`` clients (``share: server``) on the benchmark model in ``dtype``."""
    import torch

    from atlas_pl.federation import Federation
    from atlas_pl.lora import LoraSpec

    torch.manual_seed(0)
    lora = LoraSpec(rank=s.lora_rank, alpha=s.lora_alpha)
    fed = Federation(
        model=s.model,
        model_overrides=dict(s.model_overrides),
        num_clients=num_clients,
        cut_layer=s.cut_layer,
        lora=lora,
        dtype=dtype,
        share="server",
    )
    return fed.to(s.device)


def build_monolith(s: Settings, dtype: str) -> Any:
    """The same seeded base model with one peft LoRA adapter on the split's client + server module names."""
    import torch
    from peft import LoraConfig, get_peft_model

    from atlas_pl.lora import LoraSpec
    from atlas_pl.models import load_model
    from atlas_pl.split.backbone import SplitBackbone

    torch.manual_seed(0)
    base = load_model(s.model, overrides=dict(s.model_overrides), dtype=dtype)
    split = SplitBackbone(base, s.cut_layer, LoraSpec(rank=s.lora_rank, alpha=s.lora_alpha))
    names = split.client_module_names() + split.server_module_names()  # only the names: no adapter is added
    config = LoraConfig(
        r=s.lora_rank, lora_alpha=s.lora_alpha, target_modules=names, fan_in_fan_out=split.arch.fan_in_fan_out
    )
    return get_peft_model(base, config).to(s.device)


def answer_only_loss(peft_model: Any, batch: dict) -> Any:
    """Causal-LM loss with the LM head only at the (shifted) answer positions, as the split server computes it.

    ``split_overhead.answer_only_loss`` for any causal LM (``base_model``: GPT-2's ``transformer``, LLaMA's ``model``).
    """
    import torch.nn.functional as F

    lm = peft_model.get_base_model()
    hidden = lm.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    selected = targets != -100
    logits = lm.lm_head(hidden[:, :-1][selected]).float()
    return F.cross_entropy(logits, targets[selected])


def mono_answer_stepper(peft_model: Any) -> Callable[[dict], Any]:
    """One monolithic LoRA step (one AdamW over every LoRA tensor), LM head at the answer positions only."""
    import torch

    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)

    def step(batch: dict) -> Any:
        opt.zero_grad(set_to_none=True)
        loss = answer_only_loss(peft_model, batch)
        loss.backward()
        opt.step()
        return loss

    return step


def param_bytes(module: Any, trainable: bool | None = None) -> int:
    return sum(
        p.numel() * p.element_size() for p in module.parameters() if trainable is None or p.requires_grad == trainable
    )


def vocab_size(s: Settings) -> int:
    from atlas_pl.models import GPT2_VOCAB

    return int(s.model_overrides.get("vocab_size", GPT2_VOCAB))


def peak_of(fn: Callable[[], Any], device: str) -> int:
    """Peak bytes of one call: CUDA ``max_memory_allocated`` above the start, CPU the profiler's running total."""
    return cuda_peak_bytes(fn) if device == "cuda" else cpu_peak_bytes(fn)


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- 1. step
def measure_step(s: Settings, dtype: str) -> list[dict[str, Any]]:
    """Split vs ``mono_answer`` step of the benchmark model with the backbone in ``dtype``: one row per variant."""
    dev = s.device
    batch = split_overhead.make_batch(s.step_batch, s.step_seq_len, s.answer_len, dev, vocab=vocab_size(s))
    fed = build_federation(s, dtype, num_clients=1)
    mono = build_monolith(s, dtype)
    steps = {"split": split_overhead.split_stepper(fed), "mono_answer": mono_answer_stepper(mono)}
    losses = {v: [split_overhead.timed(steps[v], batch, dev)[1] for _ in range(s.warmup)] for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(s.repeats):
        for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            times[v].append(split_overhead.timed(steps[v], batch, dev)[0])
    peaks = {v: peak_of(functools.partial(steps[v], batch), dev) for v in VARIANTS}
    weights = {
        "split": param_bytes(fed.backbone.model, trainable=False),
        "mono_answer": param_bytes(mono, trainable=False),
    }
    trainable = {"split": param_bytes(fed.backbone, trainable=True), "mono_answer": param_bytes(mono, trainable=True)}
    med = {v: statistics.median(t) for v, t in times.items()}
    tokens = s.step_batch * s.step_seq_len
    rows = []
    for v in VARIANTS:
        rows.append(
            {
                "section": "step",
                "model": s.model_label,
                "dtype": dtype,
                "variant": v,
                "batch": s.step_batch,
                "seq_len": s.step_seq_len,
                "answer_len": s.answer_len,
                "median_s": med[v],
                "tokens_per_s": tokens / med[v],
                "peak_bytes": peaks[v],
                "weight_bytes": weights[v],
                "trainable_bytes": trainable[v],
                "time_ratio_split_over_mono": med["split"] / med["mono_answer"],
                "paired_ratio_split_over_mono": statistics.median(
                    a / b for a, b in zip(times["split"], times["mono_answer"])
                ),
                "first_loss": losses[v][0],
                "times_s": times[v],
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------------- 2. round
def measure_round(s: Settings) -> dict[str, Any]:
    """Build a federation of ``round_clients`` clients; time rounds of one split step per client + exact merge."""
    import torch

    from atlas_pl.callbacks import ClusterAggregation

    dev, n = s.device, s.round_clients
    t0 = time.perf_counter()
    fed = build_federation(s, s.round_dtype, num_clients=n)
    split_overhead.sync(dev)
    build_s = time.perf_counter() - t0
    batch = split_overhead.make_batch(s.round_batch, s.round_seq_len, s.answer_len, dev, vocab=vocab_size(s))
    server_opt = fed.clients[0].server_optimizer()  # share: server, one cluster: one server adapter
    client_opts = [c.client_optimizer() for c in fed.clients]
    merge = ClusterAggregation("exact")

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warm = one_round(fed, batch, client_opts, server_opt, merge, 0)
    rounds = [one_round(fed, batch, client_opts, server_opt, merge, r) for r in range(1, s.rounds + 1)]
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else split_overhead.rss_bytes()
    # the synchronous schedule: groups of clients step together, the server batched or one client at a time
    group = max(1, min(s.server_group, n))
    sync: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for r in range(s.rounds + 1):  # interleaved, the first of each left out as warm-up
        for batched in (True, False):
            sync[batched].append(sync_round(fed, batch, client_opts, server_opt, merge, r, batched, group))
    batching = {
        "clients_per_server_batch": group,
        "batched_steps_s": statistics.median(r["steps_s"] for r in sync[True][1:]),
        "unbatched_steps_s": statistics.median(r["steps_s"] for r in sync[False][1:]),
        "batched_rounds": sync[True],
        "unbatched_rounds": sync[False],
    }
    batching["steps_ratio"] = batching["batched_steps_s"] / batching["unbatched_steps_s"]
    adapter_bytes = fed.backbone.bank.nbytes(fed.clients[0].client_adapter)
    server_adapter_bytes = fed.backbone.bank.nbytes(fed.clients[0].server_adapter)
    weights = param_bytes(fed.backbone.model, trainable=False)
    med = {k: statistics.median(r[k] for r in rounds) for k in ("round_s", "steps_s", "aggregate_s")}
    return {
        "section": "round",
        "model": s.model_label,
        "dtype": s.round_dtype,
        "variant": "split_round",
        "n_clients": n,
        "batch": s.round_batch,
        "seq_len": s.round_seq_len,
        "answer_len": s.answer_len,
        "build_s": build_s,
        "warmup_round_s": warm["round_s"],
        "median_s": med["round_s"],
        "median_steps_s": med["steps_s"],
        "median_aggregate_s": med["aggregate_s"],
        "per_client_step_s": med["steps_s"] / n,
        "tokens_per_s": n * s.round_batch * s.round_seq_len / med["steps_s"],
        "peak_bytes": peak,
        "peak_method": "cuda max_memory_allocated (absolute)" if dev == "cuda" else "process RSS",
        "weight_bytes": weights,
        "client_adapter_bytes": adapter_bytes,
        "server_adapter_bytes": server_adapter_bytes,
        "bytes_up_per_round": rounds[-1]["bytes_up"],
        "bytes_down_per_round": rounds[-1]["bytes_down"],
        "rounds": [warm, *rounds],
        "server_batching": batching,
    }


def sync_round(fed: Any, batch: dict, client_opts: list[Any], server_opt: Any, merge: Any, idx: int, batched: bool,
               group: int) -> dict[str, Any]:  # fmt: skip
    """A synchronous round: ``group`` clients at a time take one step together (``split_group_forward_backward``,
    the server batched or one client at a time, one server AdamW step per group), then the exact merge."""
    import torch

    from atlas_pl.split.step import split_group_forward_backward

    dev = fed.device.type
    fed.on_train_epoch_start()
    losses = []
    split_overhead.sync(dev)
    start = time.perf_counter()
    for first in range(0, len(fed.clients), group):
        ids = list(range(first, min(first + group, len(fed.clients))))
        server_opt.zero_grad(set_to_none=True)
        for i in ids:
            client_opts[i].zero_grad(set_to_none=True)
        outs = split_group_forward_backward(fed.backbone, fed.channel, [batch] * len(ids),
                                            [(fed.clients[i].client_adapter, fed.clients[i].server_adapter, i)
                                             for i in ids], batched=batched)  # fmt: skip
        server_opt.step()
        for i in ids:
            client_opts[i].step()
            fed._participants.add(i)
        losses += [o.loss.detach() for o in outs]
    split_overhead.sync(dev)
    steps_end = time.perf_counter()
    merge.aggregate(fed, idx)
    split_overhead.sync(dev)
    return {"steps_s": steps_end - start, "round_s": time.perf_counter() - start,
            "mean_loss": float(torch.stack(losses).float().mean())}  # fmt: skip


def one_round(fed: Any, batch: dict, client_opts: list[Any], server_opt: Any, merge: Any, idx: int) -> dict[str, Any]:
    """One round: a split step of every client in turn, then the exact merge of the client adapters; its times."""
    import torch

    dev = fed.device.type
    fed.on_train_epoch_start()  # what Lightning calls at a round's start: participants, byte counters, clock
    up, down = fed.channel.stats.bytes_up, fed.channel.stats.bytes_down
    losses = []
    split_overhead.sync(dev)
    start = time.perf_counter()
    for i, client in enumerate(fed.clients):
        losses.append(client.run_split_step(batch, (client_opts[i], server_opt)).loss.detach())
        fed._participants.add(i)  # as Federation.training_step records a client that trained
    split_overhead.sync(dev)
    steps_end = time.perf_counter()
    metrics = merge.aggregate(fed, idx)
    split_overhead.sync(dev)
    end = time.perf_counter()
    return {
        "steps_s": steps_end - start,
        "aggregate_s": end - steps_end,
        "round_s": end - start,
        "mean_loss": float(torch.stack(losses).float().mean()),
        "bytes_up": fed.channel.stats.bytes_up - up,
        "bytes_down": fed.channel.stats.bytes_down - down,
        "max_truncation_error": max((v for k, v in metrics.items() if "truncation" in k), default=None),
    }


# ---------------------------------------------------------------------------------------------------- 3. merge
def merge_problem(d: int, s: Settings) -> dict[str, Any]:
    """``aggregation.make_problem`` (ranks 4-16, seeded) with its factors on the device."""
    problem = aggregation.make_problem(d, s.merge_clients, aggregation.Settings())
    problem["factors"] = [(a.to(s.device), b.to(s.device), sc) for a, b, sc in problem["factors"]]
    return problem


def timed_call(fn: Callable[[], Any], device: str, peak: bool = False) -> tuple[float, Any, int | None]:
    """``(seconds, result, peak bytes)`` of one call; the CUDA peak is read on the same call, None elsewhere."""
    import torch

    if peak and device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    split_overhead.sync(device)
    t0 = time.perf_counter()
    out = fn()
    split_overhead.sync(device)
    seconds = time.perf_counter() - t0
    return seconds, out, (torch.cuda.max_memory_allocated() - before) if peak and device == "cuda" else None


def merged_error(problem: dict[str, Any], update: Any) -> float:
    """Relative Frobenius error of the merged update against the float64 ``Σ p_i s_i B_i A_i`` (on the device)."""
    import torch

    from atlas_pl.algorithms.merge import normalize_weights

    weights = normalize_weights(problem["counts"])
    a0, b0, _ = problem["factors"][0]
    ref = torch.zeros(b0.shape[0], a0.shape[1], dtype=torch.float64, device=a0.device)
    for (a, b, sc), p in zip(problem["factors"], weights):
        ref.addmm_(b.double(), a.double(), alpha=p * sc)
    err = float((update.dense().double() - ref).norm() / ref.norm())
    del ref
    return err


def measure_merge(s: Settings) -> list[dict[str, Any]]:
    """Exact factored merge vs dense SVD per d; the dense SVD only while its cubic estimate fits the budget."""
    dev = s.device
    calib = merge_problem(s.merge_calibration_d, s)
    for m in MERGE_METHODS:  # warm-up (solver handles, allocator), then the calibration of the dense estimate
        aggregation.runner(m, calib)()
    last = (s.merge_calibration_d, timed_call(aggregation.runner("dense_svd", calib), dev)[0])
    spent, rows = last[1], []
    for d in s.merge_dims:
        problem = merge_problem(d, s)
        for m in MERGE_METHODS:
            row: dict[str, Any] = {
                "section": "merge",
                "variant": m,
                "d": d,
                "n_clients": s.merge_clients,
                "stacked_rank": sum(problem["ranks"]),
            }
            estimate = last[1] * (d / last[0]) ** 3
            if m == "dense_svd" and spent + estimate > s.dense_budget_s:
                row["skipped"] = (
                    f"estimated {estimate:.0f} s (cubic from d={last[0]}: {last[1]:.2f} s) exceeds the "
                    f"dense budget left ({s.dense_budget_s - spent:.0f} s of {s.dense_budget_s:.0f})"
                )
                rows.append(row)
                continue
            run = aggregation.runner(m, problem)
            times: list[float] = []
            peak, out = None, None
            for r in range(s.repeats):
                if r and m == "dense_svd" and spent + times[-1] > s.dense_budget_s:
                    break  # keep what was measured
                seconds, out, p = timed_call(run, dev, peak=r == 0)
                times.append(seconds)
                peak = p if r == 0 else peak
                if m == "dense_svd":
                    spent += seconds
            if m == "dense_svd":
                last = (d, min(times))
            if dev != "cuda":  # the profiler needs a call of its own (its time counts against the dense budget)
                started = time.perf_counter()
                peak = cpu_peak_bytes(run)
                spent += time.perf_counter() - started if m == "dense_svd" else 0.0
            row.update(
                median_s=statistics.median(times),
                times_s=times,
                peak_bytes=peak,
                merged_update_rel_error=merged_error(problem, out[0]) if out is not None else None,
            )
            rows.append(row)
        factored, dense = rows[-2], rows[-1]
        if "median_s" in dense:
            factored["speedup_dense_over_factored"] = dense["median_s"] / factored["median_s"]
    return rows


# ---------------------------------------------------------------------------------------------------- report
def run_section(name: str, fn: Callable[[], Any], console: Any, device: str) -> tuple[Any, str | None]:
    """``(result, None)`` or ``(None, error)``: one failing section (out of memory, say) does not stop the others."""
    t0 = time.perf_counter()
    console.print(f"[bold]{name}[/] …")
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - recorded in the report; the script exits with status 1
        message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:400]
        message = message.replace(str(ROOT), "<repo>").replace(str(Path.home()), "~")
        console.print(f"[red]{name} failed: {message}")
        return None, message
    finally:
        free_memory(device)  # the section's models are gone with its frame
    console.print(f"{name}: done in {time.perf_counter() - t0:.1f} s")
    return result, None


def device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_bytes=props.total_memory,
            cuda=torch.version.cuda,
            cudnn_tf32=torch.backends.cudnn.allow_tf32,
        )
    return info


def table_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The CSV: one row per step variant and dtype, the round, and each merge method and d (lists left out)."""
    rows = [*report["step"], *([report["round"]] if report["round"] else []), *report["merge"]]
    return [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in rows]


def write_plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_step, ax_round, ax_merge) = plt.subplots(1, 3, figsize=(16, 4.8))
    steps = report["step"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in steps))
    for i, v in enumerate(VARIANTS):
        rs = [next(r for r in steps if r["dtype"] == dt and r["variant"] == v) for dt in dtypes]
        bars = ax_step.bar(
            [k + (i - 0.5) * 0.38 for k in range(len(rs))], [r["tokens_per_s"] for r in rs], 0.38, label=v
        )
        for bar, r in zip(bars, rs):
            ax_step.annotate(
                f"{r['peak_bytes'] / MIB:.0f} MiB",
                (bar.get_x() + 0.19, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax_step.set_xticks(range(len(dtypes)), dtypes)
    ax_step.set(
        ylabel="tokens / s (peak step memory on the bars)",
        title=f"split vs mono LoRA step ({steps[0]['model']}, B={steps[0]['batch']}, T={steps[0]['seq_len']})"
        if steps
        else "step",
    )
    ax_step.legend(fontsize=8, loc="lower right")
    rd = report["round"]
    if rd:
        parts = [r for r in rd["rounds"]]
        xs = range(len(parts))
        ax_round.bar(xs, [p["steps_s"] for p in parts], label="client steps")
        ax_round.bar(xs, [p["aggregate_s"] for p in parts], bottom=[p["steps_s"] for p in parts], label="exact merge")
        ax_round.set_xticks(list(xs), ["warm-up"] + [f"round {k}" for k in range(1, len(parts))])
        ax_round.set(
            ylabel="seconds",
            title=f"round: {rd['n_clients']} clients × 1 step ({rd['dtype']}, B={rd['batch']}, T={rd['seq_len']})",
        )
        ax_round.legend(fontsize=8)
    for m, style in zip(MERGE_METHODS, ("o-", "s--")):
        rs = [r for r in report["merge"] if r["variant"] == m and "median_s" in r]
        ax_merge.plot([r["d"] for r in rs], [r["median_s"] for r in rs], style, label=m)
    ax_merge.set(
        xscale="log", yscale="log", xlabel="d (d_out = d_in)", ylabel="seconds", title="exact LoRA merge vs dense SVD"
    )
    dims = sorted({r["d"] for r in report["merge"]})
    ax_merge.set_xticks(dims, [str(d) for d in dims])
    ax_merge.minorticks_off()
    ax_merge.legend(fontsize=8)
    info = report["device"]
    fig.suptitle(f"atlas-pl on {info.get('gpu', 'CPU')} ({'tiny' if report['settings']['tiny'] else 'full'})")
    save_png(fig, path)


def fmt(value: float | None, scale: float = 1.0, digits: str = ".3g") -> str:
    return "-" if value is None else f"{value / scale:{digits}}"


def print_summary(console: Any, report: dict[str, Any]) -> None:
    from rich.table import Table

    step = Table(title="split vs monolithic peft LoRA step (median, after warm-up)")
    for col in ("model", "dtype", "variant", "B×T", "median ms", "tokens/s", "peak MiB", "split/mono", "first loss"):
        step.add_column(col, justify="right")
    for r in report["step"]:
        step.add_row(
            r["model"],
            r["dtype"],
            r["variant"],
            f"{r['batch']}×{r['seq_len']}",
            fmt(r["median_s"], 1e-3),
            f"{r['tokens_per_s']:,.0f}",
            fmt(r["peak_bytes"], MIB),
            fmt(r["time_ratio_split_over_mono"]),
            f"{r['first_loss']:.4f}",
        )
    console.print(step)
    rd = report["round"]
    if rd:
        rounds = Table(title=f"one round: {rd['n_clients']} clients × 1 split step + exact merge (median)")
        for col in (
            "model",
            "dtype",
            "B×T",
            "build s",
            "round s",
            "steps s",
            "merge s",
            "per client ms",
            "tokens/s",
            "peak MiB",
        ):
            rounds.add_column(col, justify="right")
        rounds.add_row(
            rd["model"],
            rd["dtype"],
            f"{rd['batch']}×{rd['seq_len']}",
            fmt(rd["build_s"]),
            fmt(rd["median_s"]),
            fmt(rd["median_steps_s"]),
            fmt(rd["median_aggregate_s"]),
            fmt(rd["per_client_step_s"], 1e-3),
            f"{rd['tokens_per_s']:,.0f}",
            fmt(rd["peak_bytes"], MIB),
        )
        console.print(rounds)
        b = rd["server_batching"]
        console.print(f"synchronous round, {b['clients_per_server_batch']} clients per server batch: steps "
                      f"{fmt(b['batched_steps_s'])} s batched vs {fmt(b['unbatched_steps_s'])} s one client at a "
                      f"time ({b['steps_ratio']:.2f}×)")  # fmt: skip
    merge = Table(title="exact factored merge vs dense SVD (median; error vs float64 Σ p_i s_i B_i A_i)")
    for col in ("d", "n", "R", "method", "median ms", "speedup", "rel. error", "peak MiB", "note"):
        merge.add_column(col, justify="right")
    for r in report["merge"]:
        merge.add_row(
            str(r["d"]),
            str(r["n_clients"]),
            str(r["stacked_rank"]),
            r["variant"],
            fmt(r.get("median_s"), 1e-3),
            fmt(r.get("speedup_dense_over_factored")),
            fmt(r.get("merged_update_rel_error"), digits=".1e"),
            fmt(r.get("peak_bytes"), MIB),
            "skipped" if "skipped" in r else "",
        )
    console.print(merge)
    for name, err in report["errors"].items():
        console.print(f"[red]{name} failed: {err}")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Python warnings and transformers' log below errors off while the sections run; restored afterwards."""
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the three sections, write ``gpu.{json,csv,png}`` and return the report; exit 1 when a section failed."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    s = make_settings(args, device)
    from rich.console import Console

    console = Console(width=150)
    console.print(
        f"[bold]gpu benchmark[/] ({'tiny' if s.tiny else 'full'}, {device}): {s.model_label}, "
        f"step B={s.step_batch} T={s.step_seq_len}, round {s.round_clients} clients, merge d={s.merge_dims}"
    )
    t0 = time.perf_counter()
    errors: dict[str, str] = {}
    steps: list[dict[str, Any]] = []
    with quiet():
        for dtype in s.dtypes:
            rows, err = run_section(f"step {dtype}", functools.partial(measure_step, s, dtype), console, device)
            steps += rows or []
            if err:
                errors[f"step {dtype}"] = err
        rd, err = run_section("round", lambda: measure_round(s), console, device)
        if err:
            errors["round"] = err
        merge, err = run_section("merge", lambda: measure_merge(s), console, device)
        if err:
            errors["merge"] = err
    report: dict[str, Any] = {
        "settings": asdict(s),
        "machine": machine_info(),
        "device": device_info(device),
        "step": steps,
        "round": rd,
        "merge": merge or [],
        "errors": errors,
        "wall_s": time.perf_counter() - t0,
        "methods": METHODS,
    }
    write_report(args.out, "gpu", report, table_rows(report))
    write_plot(args.out / "gpu.png", report)
    print_summary(console, report)
    console.print(f"wrote gpu.{{json,csv,png}} to {args.out} in {report['wall_s']:.0f} s")
    if errors:
        raise SystemExit(f"{len(errors)} section(s) failed: {', '.join(errors)}")
    return report


METHODS = {
    "step": "median wall time of one step (optimizer steps included) over repeats with alternating variant order, "
    "after warm-up; tokens/s = batch x seq_len / median; split/mono = median split / median mono_answer",
    "peak_bytes": "step and merge: CUDA max_memory_allocated during one call minus memory_allocated before it; CPU: "
    "torch profiler profile_memory, max running total of tensor bytes allocated during one call. round: CUDA "
    "max_memory_allocated over the rounds (absolute, weights included); CPU: process RSS after the rounds",
    "round": "one split step of every client in turn (own client AdamW, shared server AdamW), then "
    "ClusterAggregation('exact').aggregate of the client adapters; median of the timed rounds after a warm-up one",
    "merge": "aggregation.make_problem adapters on the device; merge_lora / dense_svd_merge + truncate_many; dense "
    "SVD skipped when its cubic time estimate exceeds the dense budget; error vs float64 reference on the device",
}


if __name__ == "__main__":
    main()
