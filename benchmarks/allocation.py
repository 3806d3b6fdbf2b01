"""Client memory of budget-fitted allocations versus one rank for all, from the validated memory model.

For three model shapes (all-MiniLM-L6-v2, SmolLM2-135M, a LLaMA-7B-shaped config) and clients with memory budgets of
1, 2, 4, 8, 16 and 24 GB (batch 4, sequence 512, LoRA on q/v), it compares per-client estimated peak memory of:

* ``one_rank_strongest``: every client at the strongest client's allocation (one size for all, budgets ignored);
* ``one_rank_weakest``: every client at the weakest client's rank (SplitLoRA: feasible for everyone);
* ``fitted_fixed_cut``: budget-fitted ranks at a fixed cut layer (what ``RankAllocation`` does in a ``Federation``);
* ``fitted_cut_choice``: budget-fitted ranks with the cut layer chosen per client among ``CUTS`` by the allocator
  (smallest estimated round latency among the cuts that fit; the pure allocator supports it, the federation runs one
  cut for all clients).

Only the memory model is evaluated (``atlas_pl.memory``, within ±15% of measurement: ``benchmarks/memory_model.py``);
nothing is trained. Writes ``benchmarks/results/allocation.{json,csv,png}`` atomically.

    python benchmarks/allocation.py
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from transformers import BertConfig, LlamaConfig

from atlas_pl.algorithms.rank_allocation import RankAllocator, client_memory_fn
from atlas_pl.io import atomic_write_bytes as atomic_write
from atlas_pl.memory import DEVICE_PROFILES, ModelShape, estimate_client_memory, estimate_latency, parse_size

BUDGETS = ["1GB", "2GB", "4GB", "8GB", "16GB", "24GB"]
PROFILE_OF = {"1GB": "phone-1gb", "2GB": "phone-4gb", "4GB": "phone-4gb", "8GB": "jetson-8gb", "16GB": "laptop-16gb",
              "24GB": "gpu-24gb"}  # fmt: skip
BATCH, SEQ, R_MIN, R_MAX = 4, 512, 2, 64
CUTS = [1, 2, 4, 8]


def shapes() -> dict[str, tuple[ModelShape, list[str], str, int]]:
    """name → (shape, LoRA targets, dtype, fixed cut layer)."""
    minilm = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    smollm2 = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    llama7b = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        max_position_embeddings=4096,
    )
    return {
        "minilm": (ModelShape.from_config(minilm), ["attention.self.query", "attention.self.value"], "float32", 2),
        "smollm2-135m": (ModelShape.from_config(smollm2), ["self_attn.q_proj", "self_attn.v_proj"], "float32", 2),
        "llama-7b-shape": (ModelShape.from_config(llama7b), ["self_attn.q_proj", "self_attn.v_proj"], "bfloat16", 2),
    }  # fmt: skip


def module_names(shape: ModelShape, targets: list[str], cut: int) -> list[str]:
    prefix = {"bert": "bert.encoder.layer", "gpt2": "transformer.h"}.get(shape.arch, "model.layers")
    return [f"{prefix}.{b}.{t}" for b in range(cut) for t in targets]


def allocate(shape: ModelShape, targets: list[str], dtype: str, cuts: list[int]) -> list[dict[str, Any]]:
    """Budget-fitted allocation of each budget, uniform pattern over the client modules of the largest cut."""
    fixed = len(cuts) == 1
    estimate = client_memory_fn(shape, BATCH, SEQ, cuts[0] if fixed else None, target_modules=targets, dtype=dtype,
                                adapter_dtype="float32", device="cuda")  # fmt: skip
    rows = []
    for budget in BUDGETS:
        profile = DEVICE_PROFILES[PROFILE_OF[budget]]

        def latency(cut: int | None, ranks: dict[str, int], profile: Any = profile) -> float:
            return estimate_latency(shape, cut or cuts[0], profile, BATCH, SEQ).total_s

        allocator = RankAllocator(estimate, R_MIN, R_MAX, None if fixed else cuts, None if fixed else latency)
        pattern = dict.fromkeys(module_names(shape, targets, max(cuts)), 1.0)
        try:
            a = allocator.allocate(pattern, budget, budget)
            rows.append({"budget": budget, "cut_layer": a.cut_layer or cuts[0], "peak_bytes": a.peak_bytes,
                         "rank": max(a.rank_pattern.values()), "fits": True})  # fmt: skip
        except ValueError as err:
            rows.append({"budget": budget, "cut_layer": None, "peak_bytes": None, "rank": None, "fits": False,
                         "error": str(err).split(";")[0]})  # fmt: skip
    return rows


def one_rank(shape: ModelShape, targets: list[str], dtype: str, cut: int, rank: int) -> int:
    return estimate_client_memory(shape, cut, BATCH, SEQ, rank=rank, target_modules=targets, dtype=dtype,
                                  device="cuda").total  # fmt: skip


def run() -> dict[str, Any]:
    settings = {"budgets": BUDGETS, "batch": BATCH, "seq": SEQ, "r_min": R_MIN, "r_max": R_MAX, "cuts": CUTS}
    report: dict[str, Any] = {"settings": {**settings, "device_model": "cuda"}, "models": {}}
    for name, (shape, targets, dtype, cut) in shapes().items():
        fixed = allocate(shape, targets, dtype, [cut])
        choice = allocate(shape, targets, dtype, [c for c in CUTS if c < shape.num_layers])
        fitting = [r for r in fixed if r["fits"]]
        strongest = max((r["rank"] for r in fitting), default=None)
        weakest = min((r["rank"] for r in fitting), default=None)
        report["models"][name] = {
            "dtype": dtype, "fixed_cut": cut, "fitted_fixed_cut": fixed, "fitted_cut_choice": choice,
            "one_rank_strongest": None if strongest is None else one_rank(shape, targets, dtype, cut, strongest),
            "one_rank_weakest": None if weakest is None else one_rank(shape, targets, dtype, cut, weakest),
            "strongest_rank": strongest, "weakest_rank": weakest,
        }  # fmt: skip
    return report


def rows_of(report: dict[str, Any]) -> list[list[Any]]:
    rows = [["model", "budget", "method", "cut_layer", "rank", "peak_bytes", "fits_budget"]]
    for name, m in report["models"].items():
        for method in ("fitted_fixed_cut", "fitted_cut_choice"):
            for r in m[method]:
                ok = r["fits"]
                rows.append([name, r["budget"], method, r["cut_layer"], r["rank"], r["peak_bytes"], ok])
        for method, rank in (("one_rank_strongest", m["strongest_rank"]), ("one_rank_weakest", m["weakest_rank"])):
            for budget in BUDGETS:
                peak = m[method]
                fits = peak is not None and peak <= parse_size(budget)
                rows.append([name, budget, method, m["fixed_cut"], rank, peak, fits])
    return rows


def plot(report: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report["models"]), figsize=(5 * len(report["models"]), 4))
    for ax, (name, m) in zip(axes, report["models"].items()):
        x = range(len(BUDGETS))
        for method, style in (("fitted_fixed_cut", "o-"), ("fitted_cut_choice", "s-")):
            ys = [r["peak_bytes"] / 2**30 if r["fits"] else float("nan") for r in m[method]]
            ax.plot(x, ys, style, label=method)
        if m["one_rank_strongest"] is not None:
            ax.axhline(m["one_rank_strongest"] / 2**30, color="red", ls="--", label="one rank (strongest)")
        ax.plot(x, [parse_size(b) / 2**30 for b in BUDGETS], "k:", label="budget")
        ax.set_xticks(list(x), BUDGETS)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("client budget")
        ax.set_ylabel("estimated peak client memory (GiB)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def main() -> None:
    report = run()
    out = Path("benchmarks/results")
    atomic_write(out / "allocation.json", (json.dumps(report, indent=2) + "\n").encode())
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows_of(report))
    atomic_write(out / "allocation.csv", buffer.getvalue().encode())
    atomic_write(out / "allocation.png", plot(report))
    table = Table(title="estimated peak client memory (MiB) per budget")
    for col in ("model", "method", *BUDGETS):
        table.add_column(col)
    for name, m in report["models"].items():
        for method in ("fitted_fixed_cut", "fitted_cut_choice"):
            table.add_row(name, method, *(f"{r['peak_bytes'] / 2**20:.0f} c{r['cut_layer']} r{r['rank']}"
                                          if r["fits"] else "does not fit" for r in m[method]))  # fmt: skip
        for method in ("one_rank_strongest", "one_rank_weakest"):
            peak = m[method]
            table.add_row(name, method, *(["-" if peak is None else f"{peak / 2**20:.0f}"] * len(BUDGETS)))
    Console().print(table)


if __name__ == "__main__":
    main()
