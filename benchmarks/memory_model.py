"""Check the client memory model (``atlas_pl.memory``) against measured peaks of real client steps.

For every configuration (model shape, cut layer, LoRA rank and targets, batch, sequence length, dtype) a fresh worker
process builds the model (random weights from the config), cuts it with ``SplitBackbone``, adds a client adapter and
runs what a client device runs: ``client_forward`` → a random ``∂L/∂h`` of the shape of ``h`` → backward into the
client half → AdamW step. One warm-up step creates the AdamW state; the second step is measured.

Measured peak = steady + transient:

* steady: bytes of the tensors the client holds between steps: the client-half weights (embeddings + blocks
  ``[0, cut)``, parameters and buffers, storages counted once), the client adapter and the AdamW state;
* transient: CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus ``memory_allocated`` before the
  step; CPU: the torch profiler (``profile_memory=True``), the highest running total of CPU tensor bytes allocated
  during the step (tracemalloc does not see torch's allocator).

Also measured, to locate errors: the bytes autograd keeps for backward during the forward (``saved_tensors_hooks``,
unique storages that are not parameters), against the model's ``activations``.

Outputs (written atomically): ``<out>/memory_model.json``, ``.csv`` and ``.png`` (estimate vs measured, ±15% band).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/memory_model.py --quick   # tiny shapes, < 1 minute
    OMP_NUM_THREADS=1 python benchmarks/memory_model.py           # GPT-2-small / SmolLM2 / MiniLM shapes
    python benchmarks/memory_model.py --device cuda               # on a GPU
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from atlas_pl.io import atomic_write_text
from atlas_pl.profiling import cpu_peak_bytes, cuda_peak_bytes

MIB = 2**20
BAND = 0.15
GPT2_6 = {"n_layer": 6}
SMOLLM2_8 = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9, num_key_value_heads=3,
    vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
)  # fmt: skip
MINILM = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12, vocab_size=30522)
LLAMA_ALL = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
GPT2_ALL = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def config(label: str, model: str, overrides: dict, cut: int, rank: int, batch: int, seq: int, **kw: Any) -> dict:
    return dict(label=label, model=model, overrides=overrides, cut_layer=cut, rank=rank, batch_size=batch,
                seq_len=seq, targets=kw.get("targets"), dtype=kw.get("dtype", "float32"))  # fmt: skip


FULL = [
    config("gpt2s cut1 r8 B4", "gpt2-small-shape", GPT2_6, 1, 8, 4, 128),
    config("gpt2s cut2 r8 B8", "gpt2-small-shape", GPT2_6, 2, 8, 8, 128),
    config("gpt2s cut4 r16 B8", "gpt2-small-shape", GPT2_6, 4, 16, 8, 128),
    config("gpt2s cut3 r4 B2 T512", "gpt2-small-shape", GPT2_6, 3, 4, 2, 512),
    config("gpt2s cut2 r32 all B4", "gpt2-small-shape", GPT2_6, 2, 32, 4, 128, targets=GPT2_ALL),
    config("gpt2s cut2 r8 B8 bf16", "gpt2-small-shape", GPT2_6, 2, 8, 8, 128, dtype="bfloat16"),
    config("smollm2 cut2 r8 B8", "llama-tiny", SMOLLM2_8, 2, 8, 8, 128),
    config("smollm2 cut4 r16 all B4 T256", "llama-tiny", SMOLLM2_8, 4, 16, 4, 256, targets=LLAMA_ALL),
    config("minilm cut2 r8 B16", "bert-tiny", MINILM, 2, 8, 16, 128),
    config("minilm cut4 r4 B8 T256", "bert-tiny", MINILM, 4, 4, 8, 256),
]
QUICK = [
    config("gpt2t cut1 r8 B4", "gpt2-tiny", {}, 1, 8, 4, 64),
    config("gpt2t cut3 r16 B4", "gpt2-tiny", {}, 3, 16, 4, 64),
    config("gpt2t cut2 r4 all B2 T128", "gpt2-tiny", {}, 2, 4, 2, 128, targets=GPT2_ALL),
    config("llamat cut2 r8 B4", "llama-tiny", {}, 2, 8, 4, 64),
    config("llamat cut3 r8 all B4", "llama-tiny", {}, 3, 8, 4, 64, targets=LLAMA_ALL),
    config("bertt cut2 r8 B4", "bert-tiny", {}, 2, 8, 4, 64),
]


# ---------------------------------------------------------------------------------------------------- worker
def client_storages(model: Any, backbone: Any) -> int:
    """Bytes of the frozen tensors the client half holds (parameters and buffers, each storage once)."""
    arch = backbone.arch
    server = [f"{arch.blocks_path}.{i}." for i in range(backbone.cut_layer, backbone.num_layers)]
    server += [f"{p}." for p in (arch.final_norm_path, arch.head_path, *arch.extra.values()) if p]
    seen: dict[int, int] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if "lora_" in name or any(name.startswith(p) for p in server):
            continue
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def saved_bytes(backbone: Any, model: Any, ids: Any, mask: Any) -> int:
    """Bytes autograd keeps for backward during one client forward (unique non-parameter storages)."""
    import torch

    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        backbone.client_forward(ids, mask)
    return sum(seen.values())


profiler_peak_of = cpu_peak_bytes


cuda_peak_of = cuda_peak_bytes


def worker(cfg: dict) -> dict:
    """Measure one configuration in this (fresh) process and compute its estimate."""
    import torch

    from atlas_pl.lora.adapters import LoraSpec
    from atlas_pl.memory import ModelShape, estimate_client_memory
    from atlas_pl.models import load_model
    from atlas_pl.split.backbone import SplitBackbone

    torch.manual_seed(0)
    device = cfg["device"]
    model = load_model(cfg["model"], overrides=cfg["overrides"], dtype=cfg["dtype"]).to(device)
    backbone = SplitBackbone(model, cfg["cut_layer"], LoraSpec(rank=cfg["rank"], target_modules=cfg["targets"]))
    backbone.add_client_adapter("client")
    backbone.activate("client", None)
    model.train()
    opt = torch.optim.AdamW(backbone.bank.parameters("client"), lr=1e-4)
    b, t = cfg["batch_size"], cfg["seq_len"]
    ids = torch.randint(0, model.config.vocab_size, (b, t), device=device)
    mask = torch.ones(b, t, dtype=torch.long, device=device)

    def step() -> None:
        hidden = backbone.client_forward(ids, mask)
        grad = torch.randn_like(hidden)  # the ∂L/∂h the server sends back
        torch.autograd.backward(hidden, grad)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    steady = {
        "weights": client_storages(model, backbone),
        "lora_params": backbone.bank.nbytes("client"),
        "optimizer_state": sum(v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v)),
    }
    saved = saved_bytes(backbone, model, ids, mask)
    transient = cuda_peak_of(step) if device == "cuda" else profiler_peak_of(step)
    shape = ModelShape.from_config(model.config)
    est = estimate_client_memory(
        shape, cfg["cut_layer"], b, t, rank=cfg["rank"], target_modules=cfg["targets"], dtype=cfg["dtype"],
        device="cuda" if device == "cuda" else "cpu",
    )  # fmt: skip
    measured = {**steady, "saved_activations": saved, "transient": transient, "total": sum(steady.values()) + transient}
    return {"measured": measured, "estimate": est.as_dict()}


def worker_main(args: argparse.Namespace) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = json.loads(args._config)
    torch.set_num_threads(cfg["threads"])
    atomic_write_text(Path(args._result), json.dumps(worker(cfg)))


# ---------------------------------------------------------------------------------------------------- orchestration
def run_worker(cfg: dict, timeout_s: int) -> dict:
    """Run one configuration in a fresh process of this script; ``{"error": ...}`` when it fails."""
    threads = str(cfg["threads"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    fd, result = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [sys.executable, __file__, "--_config", json.dumps(cfg), "--_result", result]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
        with open(result) as f:
            return {**json.load(f), "wall_s": round(time.perf_counter() - t0, 2)}
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s"}
    finally:
        os.remove(result)


def summarize(cfg: dict, out: dict) -> dict:
    """Relative errors of the total and of the step's dynamic part (grads, activations, workspace, cut buffers)."""
    if "error" in out:
        return {**cfg, **out}
    m, e = out["measured"], out["estimate"]
    dynamic = e["lora_grads"] + e["activations"] + e["workspace"] + e["cut_buffers"]
    return {
        **cfg,
        **out,
        "error_total": e["total"] / m["total"] - 1,
        "error_dynamic": dynamic / m["transient"] - 1,
        "error_activations": e["activations"] / m["saved_activations"] - 1,
        "within_band": abs(e["total"] / m["total"] - 1) <= BAND,
    }


def machine_info(device: str, threads: int) -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "device": device, "torch_threads": threads}  # fmt: skip
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------------------------------------------- outputs


CSV_FIELDS = ["label", "model", "cut_layer", "rank", "batch_size", "seq_len", "dtype", "component", "estimate_bytes",
              "measured_bytes"]  # fmt: skip
PAIRS = [("weights", "weights"), ("lora_params", "lora_params"), ("optimizer_state", "optimizer_state"),
         ("activations", "saved_activations"), ("total", "total")]  # fmt: skip


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_FIELDS)
    for r in (r for r in rows if "error" not in r):
        for est_key, meas_key in PAIRS:
            w.writerow([*(r[k] for k in CSV_FIELDS[:7]), est_key, r["estimate"][est_key], r["measured"][meas_key]])
        dyn = sum(r["estimate"][k] for k in ("lora_grads", "activations", "workspace", "cut_buffers"))
        w.writerow([*(r[k] for k in CSV_FIELDS[:7]), "dynamic", dyn, r["measured"]["transient"]])
    atomic_write_text(path, buf.getvalue())


def write_plot(path: Path, rows: list[dict], machine: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, key, title in ((axes[0], "total", "peak client memory"), (axes[1], "dynamic", "step's dynamic part")):
        meas = [r["measured"]["total" if key == "total" else "transient"] / MIB for r in ok]
        est = [(r["estimate"]["total"] - (0 if key == "total" else r["estimate"]["steady"])) / MIB for r in ok]
        lo, hi = min(meas + est) * 0.8, max(meas + est) * 1.2
        line = [lo, hi]
        ax.plot(line, line, "k-", lw=1, label="estimate = measured")
        ax.fill_between(line, [v * (1 - BAND) for v in line], [v * (1 + BAND) for v in line], alpha=0.2,
                        label=f"±{BAND:.0%}")  # fmt: skip
        for r, x, y in zip(ok, meas, est):
            ax.scatter(x, y, s=30)
            ax.annotate(r["label"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xscale="log", yscale="log", xlabel="measured MiB", ylabel="estimated MiB", title=title)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"client memory model vs measurement ({machine['device']}, torch {machine['torch']})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"client memory: estimate vs measured (band ±{BAND:.0%})")
    for col in ("config", "est MiB", "meas MiB", "err total", "err dynamic", "err saved act", "ok"):
        table.add_column(col, justify="left" if col == "config" else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["label"], "-", "-", "-", "-", "-", str(r["error"])[:60])
            continue
        table.add_row(
            r["label"], f"{r['estimate']['total'] / MIB:.1f}", f"{r['measured']['total'] / MIB:.1f}",
            f"{r['error_total']:+.1%}", f"{r['error_dynamic']:+.1%}", f"{r['error_activations']:+.1%}",
            "yes" if r["within_band"] else "NO",
        )  # fmt: skip
    Console(width=140).print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (< 1 minute on 2 CPU cores)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--timeout", type=int, default=600, help="seconds per worker")
    p.add_argument("--_config", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._config:
        return worker_main(args)
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    rows = []
    for cfg in QUICK if args.quick else FULL:
        out = run_worker({**cfg, "device": device, "threads": args.threads}, args.timeout)
        rows.append(summarize(cfg, out))
        print(f"{cfg['label']}: {'error ' + str(out['error']) if 'error' in out else 'done'}", flush=True)
    machine = machine_info(device, args.threads)
    ok = [r for r in rows if "error" not in r]
    report = {
        "settings": {"quick": args.quick, "band": BAND},
        "machine": machine,
        "method": __doc__.split("\n\n")[1:4],
        "within_band": sum(r["within_band"] for r in ok),
        "configurations": len(rows),
        "rows": rows,
    }
    atomic_write_text(args.out / "memory_model.json", json.dumps(report, indent=2))
    write_csv(args.out / "memory_model.csv", rows)
    write_plot(args.out / "memory_model.png", rows, machine)
    print_table(rows)
    print(f"{report['within_band']}/{len(rows)} configurations within ±{BAND:.0%}; results in {args.out}")


if __name__ == "__main__":
    main()
