"""Build cost of a federation per simulated client: time and memory at 10 / 100 / 1,000 GPT-2-small-shape clients.

Every client owns a peft LoRA adapter on one shared frozen model (``AdapterBank``). ``PeftModel.add_adapter`` walks
the whole model for every adapter it adds, and each LoRA layer holds one module per adapter, so the ``N``-th client
cost ``O(N)`` and ``N`` clients ``O(N²)``. ``AdapterBank`` now adds an adapter to layers that are LoRA layers already
through peft's per-module step only (bit-for-bit the same adapters: ``tests/lora/test_adapters.py``). This script
measures both paths side by side in one run, each ``N`` in a fresh worker process (``split_overhead.py``'s
``clients`` worker: build the ``Federation``, one tiny split step per client with its own AdamW, RSS readings):

* ``layerwise`` (the package's path) at ``--clients`` (default 1 10 100 1000; N = 1 is the model alone);
* ``peft_add_adapter`` (the path before) at ``--before`` (default 1 10 100 300: it is quadratic).

Reported per ``N``: build seconds, the clients' share of them (time inside ``Federation._make_client``: the model's
own construction, 5-10 s and noisy on a shared CPU, left out), seconds per client, and the growth of RSS per added
client (after each client's step, so adapter + gradients-free AdamW state) against the client adapter's bytes + its
AdamW moments; ratios of the two paths at the common ``N``. Outputs (atomic): ``<out>/build_cost.{json,csv,png}``.

Usage::

    python benchmarks/build_cost.py                 # about 3 minutes on 2 CPU cores
    python benchmarks/build_cost.py --clients 10 100 --before 10 100    # quick
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import platform
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import split_overhead  # noqa: E402
from atlas_pl.io import atomic_write_bytes  # noqa: E402

MIB = 2**20
PATHS = {"layerwise": False, "peft_add_adapter": True}


def measure(path: str, n: int, timeout_s: int) -> dict[str, Any]:
    cfg = {"device": "cpu", "threads": 1, "model": "gpt2-small-shape", "client_batch": [1, 8], "n": n,
           "peft_add_adapter": PATHS[path]}  # fmt: skip
    result = split_overhead.run_worker("clients", cfg, timeout_s)
    if "error" in result:
        raise SystemExit(f"{path} N={n}: {result['error']}")
    return {"path": path, **result}


def growth(rows: list[dict]) -> list[dict]:
    """Per consecutive pair of N of one path: seconds and RSS bytes per added client."""
    out = []
    for a, b in zip(rows, rows[1:]):
        per_client = a["adapter_bytes"] + a["opt_state_bytes"]
        rss = (b["rss_steps_trim"] - a["rss_steps_trim"]) / (b["n"] - a["n"])
        out.append({"path": a["path"], "from_n": a["n"], "to_n": b["n"],
                    "client_s_per_added_client": (b["clients_build_s"] - a["clients_build_s"]) / (b["n"] - a["n"]),
                    "rss_per_added_client_mib": rss / MIB, "adapter_plus_adamw_mib": per_client / MIB,
                    "rss_over_adapter_plus_adamw": rss / per_client})  # fmt: skip
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, style in (("layerwise", "o-"), ("peft_add_adapter", "s--")):
        sel = [r for r in rows if r["path"] == name]
        ax.plot([r["n"] for r in sel], [r["clients_build_s"] / r["n"] * 1e3 for r in sel], style, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("simulated clients N")
    ax.set_ylabel("client build time per client (ms)")
    ax.set_title("GPT-2-small shape, one process, 1 thread")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", nargs="+", type=int, default=[1, 10, 100, 1000], help="N for the layer-wise path")
    p.add_argument("--before", nargs="+", type=int, default=[1, 10, 100, 300], help="N for peft's add_adapter path")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per worker process")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    rows = []
    for path, ns in (("layerwise", args.clients), ("peft_add_adapter", args.before)):
        for n in sorted(ns):
            rows.append(measure(path, n, args.timeout))
            r = rows[-1]
            print(
                f"{path} N={n}: build {r['build_s']:.1f} s, of which clients {r['clients_build_s']:.2f} s", flush=True
            )
    steps = [g for name in PATHS for g in growth([r for r in rows if r["path"] == name])]
    by = {(r["path"], r["n"]): r for r in rows}
    common = sorted({n for path, n in by if path == "layerwise"} & {n for path, n in by if path == "peft_add_adapter"})
    ratios = [
        {
            "n": n,
            "clients_build_s_before_over_now": by["peft_add_adapter", n]["clients_build_s"]
            / by["layerwise", n]["clients_build_s"],
        }
        for n in common
    ]
    import torch

    report = {"settings": {"model": "gpt2-small-shape", "lora_rank": 8, "cut_layer": 2, "client_batch": [1, 8],
                           "threads": 1},
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "cpus": __import__("os").cpu_count()},
              "rows": [{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in rows],
              "growth": steps, "ratios": ratios}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "build_cost.json", json.dumps(report, indent=1).encode())
    buf = io.StringIO()
    fields = [
        "path",
        "n",
        "build_s",
        "clients_build_s",
        "steps_s",
        "rss_build",
        "rss_steps_trim",
        "adapter_bytes",
        "opt_state_bytes",
    ]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(args.out / "build_cost.csv", buf.getvalue().encode())
    plot(rows, args.out / "build_cost.png")
    for g in steps:
        print(g)
    print(ratios)
    return report


if __name__ == "__main__":
    main()
