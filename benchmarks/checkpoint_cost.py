"""What a round checkpoint costs: seconds and bytes of every ``last.ckpt`` write, per workload.

Each workload is one ``atlas-pl fit`` subprocess (one torch thread) whose ``RoundCheckpoint`` logs
``checkpoint/write_seconds`` and ``checkpoint/megabytes`` per round to TensorBoard; this script reads them back and
writes ``benchmarks/results/checkpoint_cost.{json,csv}``. The demo runs as shipped (6 rounds); MiniLM and SmolLM2 run
ATLAS (``configs/baselines/atlas.yaml``) for 2 short rounds (a checkpoint's size does not depend on the steps).

Usage::

    python benchmarks/checkpoint_cost.py                       # demo, minilm, smollm2
    python benchmarks/checkpoint_cost.py --workloads demo      # offline, about a minute
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from atlas_pl.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ATLAS = ["--config", "configs/baselines/atlas.yaml"]
SHORT = ["--trainer.max_epochs", "2", "--data.local_steps", "1", "--data.max_examples_per_client", "32",
         "--trainer.limit_val_batches", "2"]  # a checkpoint holds the same tensors whatever the steps
WORKLOADS: dict[str, list[str]] = {
    "demo": ["--config", "configs/demo.yaml"],
    "minilm": ["--config", "configs/minilm.yaml", *ATLAS, *SHORT],
    "smollm2": ["--config", "configs/smollm2.yaml", *ATLAS, *SHORT],
}


def run_workload(name: str, save_dir: Path) -> dict:
    """One fit subprocess; returns the per-round checkpoint writes read back from its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cmd = [sys.executable, "-m", "atlas_pl", "fit", *WORKLOADS[name], "--trainer.enable_progress_bar", "false",
           "--trainer.logger.init_args.save_dir", str(save_dir)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name}: atlas-pl exited with {proc.returncode}:\n{proc.stderr[-2000:]}")
    events = EventAccumulator(str(next(save_dir.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    seconds = [e.value for e in events.Scalars("checkpoint/write_seconds")]
    megabytes = [e.value for e in events.Scalars("checkpoint/megabytes")]
    ckpt = next(save_dir.rglob("last.ckpt"))
    return {"workload": name, "command": "atlas-pl fit " + " ".join(WORKLOADS[name]), "rounds": len(seconds),
            "write_seconds": seconds, "megabytes": megabytes, "last_ckpt_bytes": ckpt.stat().st_size,
            "fit_wall_seconds": wall}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    args = p.parse_args(argv)
    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
               "torch_threads": 1}  # fmt: skip
    path = RESULTS / "checkpoint_cost.json"
    runs = {r["workload"]: r for r in (json.loads(path.read_text())["runs"] if path.exists() else [])}
    for name in args.workloads:  # the outputs are rewritten after each workload: a stopped run keeps what it measured
        folder = Path(tempfile.mkdtemp(prefix=f"ckpt_cost_{name}_"))
        try:
            runs[name] = {**run_workload(name, folder / "logs"), "machine": machine}
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        r = runs[name]
        print(f"{name}: {r['rounds']} writes, {max(r['megabytes']):.2f} MB, "
              f"{min(r['write_seconds']):.3f}-{max(r['write_seconds']):.3f} s per write")  # fmt: skip
        write_outputs(path, [runs[w] for w in WORKLOADS if w in runs])


def write_outputs(path: Path, rows: list[dict]) -> None:
    atomic_write_json(path, {"runs": rows})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["workload", "round", "write_seconds", "megabytes"])
    for r in rows:
        for i, (s, mb) in enumerate(zip(r["write_seconds"], r["megabytes"])):
            writer.writerow([r["workload"], i, f"{s:.4f}", f"{mb:.3f}"])
    atomic_write_text(path.with_suffix(".csv"), buffer.getvalue())


if __name__ == "__main__":
    main()
