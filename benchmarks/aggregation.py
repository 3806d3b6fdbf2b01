"""Exact factored LoRA merge vs the dense-SVD baseline (FlexLoRA): time, accuracy and peak memory.

For every module size ``d`` (square, ``d_out = d_in = d``) and number of clients ``n``, clients get seeded random
adapters of ranks drawn uniformly from ``[rank_lo, rank_hi]``, ``scaling = alpha / r`` and random example counts.
Both methods produce every client's adapter at its own rank:

* ``factored``: ``merge_lora(...).truncate_many(ranks, scalings)`` (QR of the two stacks, SVD of the small core);
* ``dense_svd``: ``dense_svd_merge(...).truncate_many(ranks, scalings)`` (form ``ΔW``, full ``torch.linalg.svd``).

Time: median over interleaved repeats (the order of the two methods alternates each repeat) after a warm-up on a small
problem, in one process with the same torch thread count for both (default 1). Accuracy, outside the timing: the merged
update (before truncation) and each client's ``s_j B_j A_j`` against the brute-force ``Σ p_i s_i B_i A_i`` in float64.
Peak memory: a fresh worker process per (d, n, method) runs the method twice: first ``VmHWM`` (reset through
``/proc/self/clear_refs``) minus ``VmRSS`` before the call, then the torch profiler (``profile_memory=True``): the
highest running total of CPU tensor bytes allocated during the call (tracemalloc does not see torch's allocator).

Outputs, written atomically (temp file + ``os.replace``): ``<out>/aggregation.json``, ``.csv`` and ``.png``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/aggregation.py --quick     # ~10 s
    OMP_NUM_THREADS=1 python benchmarks/aggregation.py             # full run, ~5-8 minutes on 2 CPU cores
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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from atlas_pl.io import atomic_write_text
from atlas_pl.profiling import cpu_peak_bytes

MIB = 2**20
METHODS = ("factored", "dense_svd")


@dataclass
class Settings:
    """What one run measures (``--quick`` shrinks everything)."""

    dims: tuple[int, ...] = (768, 2048, 4096)
    clients: tuple[int, ...] = (10, 100)
    rank_lo: int = 4
    rank_hi: int = 16
    alpha: float = 16.0
    repeats: int = 3
    seed: int = 0
    threads: int = 1
    memory: bool = True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="d in {256, 768}, n = 10, 2 repeats")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both methods (default 1)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--no-memory", action="store_true", help="skip the per-method worker processes")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_settings(args: argparse.Namespace) -> Settings:
    s = Settings(threads=args.threads, memory=not args.no_memory)
    if args.quick:
        s.dims, s.clients, s.repeats = (256, 768), (10,), 2
    if args.repeats:
        s.repeats = args.repeats
    return s


def set_threads(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------- problem
def make_problem(d: int, n: int, s: Settings) -> dict[str, Any]:
    """Seeded adapters: ``A ~ N(0, 1/d)``, ``B ~ N(0, 1/r)``, ranks in ``[rank_lo, rank_hi]``, counts in [50, 500]."""
    import torch

    gen = torch.Generator().manual_seed(s.seed * 1_000_003 + d * 1009 + n)
    ranks = torch.randint(s.rank_lo, s.rank_hi + 1, (n,), generator=gen).tolist()
    counts = torch.randint(50, 501, (n,), generator=gen).tolist()
    scalings = [s.alpha / r for r in ranks]
    factors = [
        (torch.randn(r, d, generator=gen) / d**0.5, torch.randn(d, r, generator=gen) / r**0.5, sc)
        for r, sc in zip(ranks, scalings)
    ]
    return {"factors": factors, "counts": counts, "ranks": ranks, "scalings": scalings}


def runner(method: str, problem: dict[str, Any]) -> Callable[[], Any]:
    from atlas_pl.algorithms.merge import dense_svd_merge, merge_lora

    merge = merge_lora if method == "factored" else dense_svd_merge

    def run() -> Any:
        update = merge(problem["factors"], problem["counts"])
        return update, update.truncate_many(problem["ranks"], problem["scalings"])

    return run


# ---------------------------------------------------------------------------------------------------- timing
def time_pair(problem: dict[str, Any], repeats: int) -> dict[str, list[float]]:
    """Wall times of both methods, interleaved; the order alternates every repeat."""
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    runs = {m: runner(m, problem) for m in METHODS}
    for rep in range(repeats):
        for m in METHODS if rep % 2 == 0 else METHODS[::-1]:
            gc.collect()
            t0 = time.perf_counter()
            runs[m]()
            times[m].append(time.perf_counter() - t0)
    return times


def accuracy(problem: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    """Relative Frobenius errors against the float64 reference ``Σ p_i s_i B_i A_i`` (one check per distinct rank)."""
    import torch

    from atlas_pl.algorithms.merge import normalize_weights

    weights = normalize_weights(problem["counts"])
    ref = torch.zeros(problem["factors"][0][1].shape[0], problem["factors"][0][0].shape[1], dtype=torch.float64)
    for (a, b, sc), p in zip(problem["factors"], weights):
        ref.addmm_(b.double(), a.double(), alpha=p * sc)
    norm = float(ref.norm())
    out: dict[str, Any] = {"reference_norm": norm}
    for m, (update, pairs) in outputs.items():
        seen: dict[int, tuple[float, float]] = {}
        for r, sc, (a, b, reported) in zip(problem["ranks"], problem["scalings"], pairs):
            if r not in seen:
                achieved = float((ref - sc * (b.double() @ a.double())).norm()) / norm
                seen[r] = (achieved, reported)
        out[m] = {
            "merged_update_rel_error": float((update.dense().double() - ref).norm()) / norm,
            "update_norm_rel_error": abs(update.norm - norm) / norm,
            "merged_rank": update.rank,
            "client_rel_error": {str(r): v[0] for r, v in sorted(seen.items())},
            "max_gap_achieved_vs_reported": max(abs(x - y) for x, y in seen.values()),
        }
    out["max_gap_between_methods"] = max(
        abs(out["factored"]["client_rel_error"][r] - out["dense_svd"]["client_rel_error"][r])
        for r in out["factored"]["client_rel_error"]
    )
    return out


# ---------------------------------------------------------------------------------------------------- memory
def proc_status_bytes(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in bytes; ``None`` off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_peak_delta(step: Callable[[], Any]) -> int | None:
    """``VmHWM`` during ``step()`` minus ``VmRSS`` before it (``None`` when the peak counter cannot be reset)."""
    gc.collect()
    before = proc_status_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    step()
    peak = proc_status_bytes("VmHWM")
    return None if peak is None or before is None else max(0, peak - before)


profiler_peak = cpu_peak_bytes


def worker_memory(cfg: dict[str, Any]) -> dict[str, Any]:
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["settings"].items()})
    set_threads(s.threads)
    run = runner(cfg["method"], make_problem(cfg["d"], cfg["n"], s))
    rss = rss_peak_delta(run)
    return {"peak_rss_delta": rss, "peak_alloc": profiler_peak(run)}


def run_memory_worker(method: str, d: int, n: int, s: Settings) -> dict[str, Any]:
    cfg = json.dumps({"method": method, "d": d, "n": n, "settings": asdict(s)})
    env = {**os.environ, "OMP_NUM_THREADS": str(s.threads), "MKL_NUM_THREADS": str(s.threads)}
    proc = subprocess.run(
        [sys.executable, __file__, "--_worker", cfg], capture_output=True, text=True, env=env, timeout=1800
    )
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- driver
def measure(d: int, n: int, s: Settings, console: Any) -> dict[str, Any]:
    problem = make_problem(d, n, s)
    times = time_pair(problem, s.repeats)
    outputs = {m: runner(m, problem)() for m in METHODS}
    med = {m: statistics.median(t) for m, t in times.items()}
    row: dict[str, Any] = {
        "d": d,
        "n_clients": n,
        "stacked_rank": sum(problem["ranks"]),
        "ranks": problem["ranks"],
        "times_s": times,
        "median_s": med,
        "speedup": med["dense_svd"] / med["factored"],
        "paired_speedup_median": statistics.median(x / y for x, y in zip(times["dense_svd"], times["factored"])),
        "accuracy": accuracy(problem, outputs),
    }
    if s.memory:
        row["memory"] = {m: run_memory_worker(m, d, n, s) for m in METHODS}
    console.print(
        f"d={d:5d} n={n:4d} R={row['stacked_rank']:5d}: factored {med['factored'] * 1e3:9.2f} ms, dense_svd "
        f"{med['dense_svd'] * 1e3:10.1f} ms, speedup {row['speedup']:8.1f}x"
    )
    return row


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


# ---------------------------------------------------------------------------------------------------- outputs


def csv_rows(report: dict[str, Any]) -> list[list[Any]]:
    """Long-format rows: ``d, n_clients, method, metric, value, unit``."""
    rows: list[list[Any]] = []
    for r in report["results"]:
        key = [r["d"], r["n_clients"]]
        rows.append([*key, "both", "speedup_dense_over_factored", r["speedup"], "x"])
        for m in METHODS:
            acc = r["accuracy"][m]
            rows.append([*key, m, "median_time", r["median_s"][m], "s"])
            rows.append([*key, m, "merged_update_rel_error", acc["merged_update_rel_error"], "1"])
            rows.append([*key, m, "max_client_rel_error", max(acc["client_rel_error"].values()), "1"])
            for metric, value in r.get("memory", {}).get(m, {}).items():
                if metric != "error":
                    rows.append([*key, m, metric, value, "B"])
    return rows


def write_csv(path: Path, rows: list[list[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["d", "n_clients", "method", "metric", "value", "unit"])
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for n in sorted({r["n_clients"] for r in results}):
        rs = [r for r in results if r["n_clients"] == n]
        ds = [r["d"] for r in rs]
        for m, style in zip(METHODS, ("o-", "s--")):
            axes[0].plot(ds, [r["median_s"][m] for r in rs], style, label=f"{m}, n={n}")
            mem = [r.get("memory", {}).get(m, {}).get("peak_alloc") for r in rs]
            if all(x is not None for x in mem):
                axes[2].plot(ds, [x / MIB for x in mem], style, label=f"{m}, n={n}")
        axes[1].plot(ds, [r["speedup"] for r in rs], "o-", label=f"n={n}")
        for r in rs:
            axes[1].annotate(f"{r['speedup']:.0f}x", (r["d"], r["speedup"]), textcoords="offset points", xytext=(4, 4))
    axes[1].axhline(100, color="grey", ls=":", label="100x")
    titles = ("median time (s)", "speedup dense_svd / factored", "peak tensor memory (MiB, profiler)")
    for ax, title in zip(axes, titles):
        ax.set(xscale="log", yscale="log", xlabel="d (d_out = d_in)", title=title)
        ax.legend(fontsize=8)
    m = report["machine"]
    fig.suptitle(f"exact LoRA merge vs dense SVD (CPU, {m['cpu_count']} cores, {m['torch_num_threads']} torch thread)")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def print_summary(console: Any, report: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="factored merge vs dense SVD (median time, error vs float64 reference, peak tensor memory)")
    cols = ("d", "n", "R", "factored ms", "dense_svd ms", "speedup", "merge err f/d", "client err gap", "mem f/d MiB")
    for col in cols:
        table.add_column(col, justify="right")
    for r in report["results"]:
        acc, mem = r["accuracy"], r.get("memory", {})
        peaks = [mem.get(m, {}).get("peak_alloc") for m in METHODS]
        table.add_row(
            str(r["d"]),
            str(r["n_clients"]),
            str(r["stacked_rank"]),
            f"{r['median_s']['factored'] * 1e3:.2f}",
            f"{r['median_s']['dense_svd'] * 1e3:.1f}",
            f"{r['speedup']:.1f}x",
            f"{acc['factored']['merged_update_rel_error']:.1e}/{acc['dense_svd']['merged_update_rel_error']:.1e}",
            f"{acc['max_gap_between_methods']:.1e}",
            "/".join("-" if p is None else f"{p / MIB:.1f}" for p in peaks),
        )
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._worker:
        print(json.dumps(worker_memory(json.loads(args._worker))))
        return
    s = make_settings(args)
    set_threads(s.threads)
    from rich.console import Console

    console = Console(width=150)
    console.print(f"[bold]aggregation benchmark[/] ({'quick' if args.quick else 'full'}): {asdict(s)}")
    t0 = time.perf_counter()
    time_pair(make_problem(256, 10, s), 1)  # warm-up: LAPACK/BLAS code paths, allocator
    report = {"settings": asdict(s), "quick": args.quick, "machine": machine_info(s), "methods": METHOD_NOTES}
    report["results"] = [measure(d, n, s, console) for d in s.dims for n in s.clients]
    report["wall_s"] = time.perf_counter() - t0
    atomic_write_text(args.out / "aggregation.json", json.dumps(report, indent=2))
    write_csv(args.out / "aggregation.csv", csv_rows(report))
    write_plot(args.out / "aggregation.png", report)
    print_summary(console, report)
    console.print(f"wrote {args.out}/aggregation.{{json,csv,png}} in {report['wall_s']:.0f} s")


METHOD_NOTES = {
    "factored": "merge_lora (float32): QR of [p_i s_i B_i] and [A_i]^T, SVD of the core, truncate_many to each rank",
    "dense_svd": "dense_svd_merge (float32): form dense dW = B_stack @ A_stack, full torch.linalg.svd, truncate_many",
    "time": "median wall time over interleaved repeats (order alternates), same process, same torch thread count",
    "accuracy": "relative Frobenius error vs brute-force sum p_i s_i B_i A_i in float64; client errors per distinct "
    "rank r are ||s_j B_j A_j - dW|| / ||dW||, compared with the reported truncation error",
    "peak_alloc": "fresh worker per (d, n, method): torch profiler profile_memory, max running total of CPU tensor "
    "bytes allocated during one call (inputs excluded)",
    "peak_rss_delta": "same worker, call before the profiled one: VmHWM (reset via /proc/self/clear_refs) - VmRSS "
    "before the call",
}


if __name__ == "__main__":
    main()
