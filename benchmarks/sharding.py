"""A federation sharded over P worker processes: time per round and accuracy against one process, side by side.

Runs ``atlas-pl fit`` on ``configs/demo.yaml`` (ATLAS: 9 clients, 3 task groups, all four phases) under
``--trainer.strategy client_parallel --trainer.devices P`` for every ``P`` in ``--devices`` (CPU gloo here; NCCL with
``--accelerator gpu`` on a multi-GPU machine, unchanged), for two sharing policies:

* ``share: none`` (every client its own client and server adapter, both merged per cluster): a sharded run should be
  the one-process run bit for bit; reported as the largest difference of any adapter tensor in the final checkpoints;
* ``share: server`` (ATLAS's config: one server adapter per cluster): each process trains its copy of a cluster's
  server adapter on its own clients and the copies are averaged at round end (SplitFed-V1), instead of one adapter
  trained by the cluster's clients in turn — reported as the paired accuracy difference over ``--seeds``.

Time per round is the mean of the ``round/seconds`` scalar (training and aggregation of a round, validation left out)
over the rounds after the first; the P = 1 run uses the same strategy on one process. On a machine with fewer free
cores than ``P`` the processes share cores: the ratio then says little about a real cluster. Outputs (atomic):
``<out>/sharding.{json,csv,png}``.

Usage::

    python benchmarks/sharding.py                                  # 2 x (1 + 3) runs of 10 rounds: ~20 min on 2 cores
    python benchmarks/sharding.py --rounds 3 --seeds 0 --devices 1 2
    python benchmarks/sharding.py --accelerator gpu --devices 1 2 4 8   # a multi-GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from outputs import machine_info, save_png, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARES = {"none": 1, "server": 3}  # share -> default number of seeds


def round_seconds(log_dir: Path) -> list[float]:
    """The ``round/seconds`` scalars of a run's TensorBoard events, in round order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in sorted(log_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "round/seconds" in acc.Tags().get("scalars", []):
            values.update({e.step: e.value for e in acc.Scalars("round/seconds")})
    return [values[k] for k in sorted(values)]


def fit(save_dir: Path, share: str, devices: int, seed: int, rounds: int, accelerator: str, timeout_s: int) -> dict:
    """One ``atlas-pl fit`` run; returns its timings, final metrics and checkpointed adapters."""
    args = [sys.executable, "-m", "atlas_pl", "fit", "--config", "configs/demo.yaml",
            "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.enable_progress_bar", "false",
            "--trainer.max_epochs", str(rounds), "--trainer.strategy", "client_parallel",
            "--trainer.devices", str(devices), "--trainer.accelerator", accelerator, "--model.share", share,
            "--seed_everything", str(seed), "--data.seed", str(seed)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise SystemExit(f"share={share} P={devices} seed={seed} failed:\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - start
    version = sorted((save_dir / "demo").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    results = json.loads((version / "results.json").read_text())
    ckpt = torch.load(save_dir / "demo" / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    seconds = round_seconds(version)
    final = results["final"]
    return {
        "share": share, "devices": devices, "seed": seed, "rounds": rounds, "wall_s": wall,
        "round_s": statistics.mean(seconds[1:] or seconds), "val_acc": final["val_acc"],
        "val_loss": final["val_loss"], "num_clusters": len(set(results["cluster_ids"])),
        "bytes_up": results["traffic"]["bytes_up"], "bytes_down": results["traffic"]["bytes_down"],
        "state": ckpt["state_dict"],
    }  # fmt: skip


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference over every adapter tensor (inf if the two hold other tensors)."""
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return float("inf")
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def summarize(rows: list[dict], devices: list[int]) -> list[dict]:
    """Per share and P > 1: time-per-round ratio to P = 1, accuracy mean ± std, paired difference, tensor gap."""
    out = []
    base = min(devices)
    for share in dict.fromkeys(r["share"] for r in rows):
        ones = {r["seed"]: r for r in rows if r["share"] == share and r["devices"] == base}
        for p in devices:
            mine = {r["seed"]: r for r in rows if r["share"] == share and r["devices"] == p}
            seeds = sorted(set(mine) & set(ones))
            diffs = [mine[s]["val_acc"] - ones[s]["val_acc"] for s in seeds]
            accs = [mine[s]["val_acc"] for s in seeds]
            out.append({
                "share": share, "devices": p, "seeds": len(seeds),
                "round_s": statistics.mean(mine[s]["round_s"] for s in seeds),
                "round_s_over_one_process": statistics.mean(mine[s]["round_s"] / ones[s]["round_s"] for s in seeds),
                "val_acc_mean": statistics.mean(accs), "val_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "val_acc_minus_one_process_mean": statistics.mean(diffs),
                "val_acc_minus_one_process_std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                "max_adapter_difference": max(max_difference(mine[s]["state"], ones[s]["state"]) for s in seeds),
                "same_traffic": all(mine[s]["bytes_up"] == ones[s]["bytes_up"] for s in seeds),
            })  # fmt: skip
    return out


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    shares = list(dict.fromkeys(s["share"] for s in summary))
    devices = sorted({s["devices"] for s in summary})
    width = 0.8 / max(1, len(devices))
    for j, p in enumerate(devices):
        sel = [next(s for s in summary if s["share"] == share and s["devices"] == p) for share in shares]
        xs = [i + j * width for i in range(len(shares))]
        left.bar(xs, [s["round_s"] for s in sel], width, label=f"P = {p}")
        right.bar(xs, [s["val_acc_mean"] for s in sel], width, yerr=[s["val_acc_std"] for s in sel], capsize=3,
                  label=f"P = {p}")  # fmt: skip
    for ax, label in ((left, "seconds per round"), (right, "final validation accuracy")):
        ax.set_xticks([i + width * (len(devices) - 1) / 2 for i in range(len(shares))], [f"share: {s}" for s in shares])
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("configs/demo.yaml sharded over P processes (client_parallel)")
    save_png(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", nargs="+", type=int, default=[1, 2], help="worker processes P (the first is the base)")
    p.add_argument("--shares", nargs="+", choices=sorted(SHARES), default=list(SHARES))
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 1 for share none, 3 for server")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    devices = sorted(set(args.devices))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for share in args.shares:
            for seed in args.seeds if args.seeds is not None else range(SHARES[share]):
                for n in devices:
                    save_dir = Path(tmp) / f"{share}_p{n}_s{seed}"
                    rows.append(fit(save_dir, share, n, seed, args.rounds, args.accelerator, args.timeout))
                    r = rows[-1]
                    print(f"share={share} P={n} seed={seed}: {r['round_s']:.2f} s/round, val_acc {r['val_acc']:.3f}, "
                          f"{r['num_clusters']} clusters", flush=True)  # fmt: skip
    summary = summarize(rows, devices)
    report = {
        "settings": {"config": "configs/demo.yaml", "strategy": "client_parallel", "rounds": args.rounds,
                     "accelerator": args.accelerator, "threads_per_process": 1},
        "machine": machine_info(),
        "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "state"} for r in rows],
    }  # fmt: skip
    write_report(args.out, "sharding", report, summary)
    plot(summary, args.out / "sharding.png")
    for s in summary:
        print(s)
    return report


if __name__ == "__main__":
    main()
