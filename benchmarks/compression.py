"""Compressed activations and gradients across the cut: bytes per step and test accuracy against fp32.

The workload of ``benchmarks/privacy_utility.py`` (``configs/minilm.yaml`` — all-MiniLM-L6-v2 — on two real tasks,
``--tasks`` sst2 and ag_news, 2 clients each, cut after block 1, ``--rounds`` FedAvg rounds at the config's learning
rate, ``--seeds``) is trained with ``model.compression`` ``none`` (fp32), ``bf16`` and ``int8`` (one fp32 scale per
token vector) and scored on the test split. Both directions use the wire format: the activations the client sends and
the gradients the server returns. Bytes per step are the channel's own counts (``traffic`` of each run's
``results.json``) divided by the split steps of the run. The fp32 runs are the ``none`` runs of
``privacy_utility.py`` (the same command), so a finished one is reused; runs are cached in
``<out>/privacy_runs/<mode>/seed<S>/`` (``compression_bf16``, ``compression_int8``).

Outputs (atomic): ``<out>/compression.{json,csv,png}`` and the table between ``<!-- compression:begin -->`` /
``<!-- compression:end -->`` in ``benchmarks/README.md``.

Usage::

    python benchmarks/compression.py                 # 3 modes x 3 seeds (fp32 runs reused): ~10 min on 2 cores
    python benchmarks/compression.py --report-only   # re-read the runs, rewrite the outputs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402
import privacy_utility  # noqa: E402
from outputs import machine_info, save_png, write_readme_section, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "benchmarks" / "README.md"
MODES = {"none": "none", "bf16": "compression_bf16", "int8": "compression_int8"}  # mode -> run folder name
for _mode, _name in MODES.items():
    if _mode != "none":
        privacy_utility.DEFENCES.setdefault(_name, (f"{_mode} across the cut", 1, {"compression": _mode}))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--tasks", nargs="+", default=["sst2", "ag_news"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--report-only", action="store_true", help="run nothing: re-read the finished runs")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    args.model = "minilm"  # the privacy_utility workload these runs share
    return args


def steps_of(folder: Path) -> int:
    """Split steps the run took: rounds x clients x local steps (from the run's saved config)."""
    config = compare.load_yaml(folder / "config.yaml")
    data = config["data"]
    return int(config["trainer"]["max_epochs"]) * int(data["num_clients"]) * int(data["local_steps"])


def measure(folder: Path, tasks: list[str]) -> dict[str, Any] | None:
    """Test accuracy per task, and activation / gradient bytes per step, of a finished run (None otherwise)."""
    row = privacy_utility.parse_run(folder, tasks)
    if row is None:
        return None
    traffic = json.loads((folder / "results.json").read_text())["traffic"]
    steps = steps_of(folder)
    return {**{f"acc_{t}": row[f"acc_{t}"] for t in tasks}, "steps": steps,
            "activation_bytes_per_step": traffic["activations_up"] / steps,
            "gradient_bytes_per_step": traffic["gradients_down"] / steps}  # fmt: skip


def summarize(runs: dict[str, list[dict]], tasks: list[str]) -> list[dict[str, Any]]:
    """One row per mode: bytes per step and their ratio to fp32, accuracy per task (mean ± std) and its paired
    difference to fp32 per seed (mean ± std)."""
    base = runs.get("none", [])
    rows = []
    for mode, done in runs.items():
        if not done:
            continue
        row: dict[str, Any] = {"mode": mode, "seeds": len(done)}
        for key in ("activation_bytes_per_step", "gradient_bytes_per_step"):
            row[key] = statistics.fmean(r[key] for r in done)
            if base:
                row[key.replace("bytes_per_step", "reduction")] = statistics.fmean(r[key] for r in base) / row[key]
        for t in tasks:
            accs = [r[f"acc_{t}"] for r in done]
            row[f"acc_{t}"], row[f"acc_{t}_std"] = privacy_utility.mean_std(accs)
            if base and len(base) == len(done):
                diffs = [100 * (r[f"acc_{t}"] - b[f"acc_{t}"]) for r, b in zip(done, base)]
                row[f"delta_{t}_points"], row[f"delta_{t}_points_std"] = privacy_utility.mean_std(diffs)
        rows.append(row)
    return rows


def markdown(rows: list[dict], tasks: list[str], settings: dict, command: str) -> str:
    head = ["wire format", "activation bytes / step", "gradient bytes / step", "fewer bytes than fp32",
            *[f"{t} test acc" for t in tasks], *[f"{t} Δ vs fp32 (points)" for t in tasks]]  # fmt: skip
    lines = [f"`{command}` — all-MiniLM-L6-v2, {settings['clients']} clients ({', '.join(tasks)}), cut 1, "
             f"{settings['rounds']} FedAvg rounds, lr {settings['lr']:g}, {settings['seeds']} seeds, test split "
             "(accuracy mean ± std; Δ = paired difference to the fp32 run of the same seed, mean ± std):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for r in rows:
        cells = [r["mode"] if r["mode"] != "none" else "fp32 (none)", f"{r['activation_bytes_per_step']:,.0f}",
                 f"{r['gradient_bytes_per_step']:,.0f}", f"{r.get('activation_reduction', 1.0):.2f}×"]  # fmt: skip
        cells += [f"{r[f'acc_{t}']:.3f} ± {r[f'acc_{t}_std']:.3f}" for t in tasks]
        cells += [f"{r[f'delta_{t}_points']:+.2f} ± {r[f'delta_{t}_points_std']:.2f}"
                  if f"delta_{t}_points" in r else "–" for t in tasks]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [r["mode"] if r["mode"] != "none" else "fp32" for r in rows]
    kb = [r["activation_bytes_per_step"] / 1024 for r in rows]
    left.bar(names, kb, color="#4c72b0")
    for x, v in enumerate(kb):
        left.text(x, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    left.set_ylabel("activation KiB per split step (gradients: the same)")
    left.set_title("bytes across the cut")
    width = 0.8 / len(tasks)
    for k, t in enumerate(tasks):
        xs = [x + (k - (len(tasks) - 1) / 2) * width for x in range(len(rows))]
        right.bar(xs, [r[f"acc_{t}"] for r in rows], width, yerr=[r[f"acc_{t}_std"] for r in rows], capsize=3,
                  label=t)  # fmt: skip
    right.set_xticks(range(len(rows)), names)
    right.set_ylabel("test accuracy (mean ± std over seeds)")
    right.set_ylim(0, 1)
    right.legend(fontsize=8)
    right.set_title("accuracy")
    save_png(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out = args.out.resolve()
    planned = {mode: [privacy_utility.build_run(MODES[mode], s, args, {}) for s in args.seeds] for mode in args.modes}
    if not args.report_only:
        todo = [r for runs in planned.values() for r in runs if not compare.has_test(r["folder"])]
        failed = compare.run_all(todo, args.jobs, "compression runs")
        if failed:
            print(f"{len(failed)} run(s) failed; see their log.txt", file=sys.stderr)
    runs = {mode: [m for r in rs if (m := measure(r["folder"], args.tasks)) is not None]
            for mode, rs in planned.items()}  # fmt: skip
    rows = summarize(runs, args.tasks)
    lr = float(compare.load_yaml(ROOT / "configs" / "minilm.yaml")["model"]["learning_rate"])
    settings = {"tasks": args.tasks, "clients": 2 * len(args.tasks), "rounds": args.rounds, "seeds": len(args.seeds),
                "lr": lr, "cut_layer": 1}  # fmt: skip
    extra = [] if args.seeds == [0, 1, 2] else ["--seeds", *map(str, args.seeds)]
    extra += [] if args.rounds == 3 else ["--rounds", str(args.rounds)]
    command = " ".join(["python benchmarks/compression.py", *extra])
    report = {"settings": settings, "machine": machine_info(), "rows": rows, "runs": runs}
    write_report(args.out, "compression", report, rows)
    if rows:
        plot(rows, args.tasks, args.out / "compression.png")
    table = markdown(rows, args.tasks, settings, command)
    if args.out == (ROOT / "benchmarks" / "results").resolve():
        write_readme_section(README, "compression", "Compressed activations and gradients", table)
    print(table)
    return report


if __name__ == "__main__":
    main()
