"""Bytes and time per split step: both halves in one process vs client and server over loopback gRPC (fp32, bf16).

One client of ``configs/demo.yaml`` (or ``--config``) trains ``--steps`` batches three ways, side by side in one run:

* ``in_process``: ``SplitClient.run_split_step`` with the in-process channel (what ``atlas-pl fit`` does);
* ``network``: the client half here, the server half in an ``atlas-pl serve`` process on 127.0.0.1 (activations up,
  activation gradients down, each as one safetensors message on a gRPC stream);
* ``network_bf16``: the same with ``compression: bf16`` on the wire.

Reported per mode: median and mean seconds per step (the first ``--warmup`` steps left out), bytes up and down per
step (the in-process channel's count of activation + metadata and gradient bytes; for the network, the encoded
messages), and the ratios to ``in_process``. Both processes use one torch thread. Outputs (atomic):
``<out>/network.{json,csv,png}``.

Usage::

    python benchmarks/network.py                      # demo model, 40 steps per mode: about a minute
    python benchmarks/network.py --steps 10 --config configs/gpt2.yaml
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from atlas_pl.cli import AtlasCLI, AtlasTrainer
from atlas_pl.data import FederatedDataModule
from atlas_pl.federation import Federation
from atlas_pl.transport import LinkClient, Message, RemoteClients

sys.path.insert(0, str(Path(__file__).resolve().parent))
from outputs import machine_info, save_png, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NO_PHASES = "trainer:\n  callbacks: []\n"  # only split training is measured (phases 1-2 are not networked)


def build(config_args: list[str]) -> tuple[Federation, FederatedDataModule]:
    """The federation and datamodule of a config, as ``atlas-pl`` builds them (same seed as the server)."""
    cli = AtlasCLI(Federation, FederatedDataModule, trainer_class=AtlasTrainer, args=config_args, run=False,
                   auto_configure_optimizers=False)  # fmt: skip
    fed, dm = cli.model, cli.datamodule
    dm.setup("fit")
    fed.attach_data(dm)
    return fed, dm  # type: ignore[return-value]


def in_process(fed: Federation, dm: FederatedDataModule, batches: list[dict]) -> list[dict[str, float]]:
    client = fed.clients[0]
    opts = fed.configure_optimizers()
    ci, si = fed.optimizer_index(0)
    rows = []
    for batch in batches:
        before = (fed.channel.stats.bytes_up, fed.channel.stats.bytes_down)
        start = time.perf_counter()
        client.run_split_step(batch, (opts[ci], opts[si]))
        rows.append({"seconds": time.perf_counter() - start, "bytes_up": fed.channel.stats.bytes_up - before[0],
                     "bytes_down": fed.channel.stats.bytes_down - before[1]})  # fmt: skip
    return rows


def networked(fed: Federation, dm: FederatedDataModule, batches: list[dict], address: str, wire: str) -> list[dict]:
    with LinkClient(address, timeout_s=600) as link:
        remote = RemoteClients(fed, dm, link, [0], wire)
        rows = []
        for batch in batches:
            before = (remote.bytes_up, remote.bytes_down)
            start = time.perf_counter()
            remote.train_step(0, batch)
            rows.append({"seconds": time.perf_counter() - start, "bytes_up": remote.bytes_up - before[0],
                         "bytes_down": remote.bytes_down - before[1]})  # fmt: skip
    return rows


def serve(config_args: list[str], tmp: Path) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, "-m", "atlas_pl", "serve", *config_args, "--address", "127.0.0.1:0", "--clients", "[0]",
            "--output_dir", str(tmp / "server")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    path, deadline = tmp / "server" / "address", time.monotonic() + 300
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start:\n{(proc.stderr.read() if proc.stderr else '')[-3000:]}")
        time.sleep(0.1)
    return proc, path.read_text()


def summarize(rows: dict[str, list[dict]], warmup: int) -> list[dict[str, Any]]:
    base = rows["in_process"][warmup:]
    base_s = statistics.median(r["seconds"] for r in base)
    base_up = statistics.mean(r["bytes_up"] for r in base)
    out = []
    for mode, mine in rows.items():
        kept = mine[warmup:]
        median = statistics.median(r["seconds"] for r in kept)
        up, down = statistics.mean(r["bytes_up"] for r in kept), statistics.mean(r["bytes_down"] for r in kept)
        out.append({"mode": mode, "steps": len(kept), "median_s": median,
                    "mean_s": statistics.mean(r["seconds"] for r in kept), "bytes_up_per_step": up,
                    "bytes_down_per_step": down, "seconds_over_in_process": median / base_s,
                    "bytes_up_over_in_process": up / base_up})  # fmt: skip
    return out


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    modes = [s["mode"] for s in summary]
    left.bar(modes, [s["median_s"] * 1e3 for s in summary], color="tab:blue")
    left.set_ylabel("median ms per split step")
    right.bar([m + "\nup" for m in modes], [s["bytes_up_per_step"] / 1024 for s in summary], color="tab:orange")
    right.bar([m + "\ndown" for m in modes], [s["bytes_down_per_step"] / 1024 for s in summary], color="tab:green")
    right.set_ylabel("KiB per split step")
    for ax in (left, right):
        ax.grid(True, axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("one client's split steps: in-process vs loopback gRPC")
    save_png(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        overlay = Path(tmp) / "no_phases.yaml"
        overlay.write_text(NO_PHASES)
        config_args = ["--config", args.config, "--config", str(overlay), "--trainer.logger", "false"]
        fed, dm = build(config_args)
        sampler = dm.train_sampler()
        from atlas_pl.data.formats import collate
        from atlas_pl.data.sampling import RoundExamples

        examples = RoundExamples(item for client in dm.train_datasets for item in client)
        rounds = range(-(-args.steps // dm.local_steps))
        indices = [idx for r in rounds for idx in sampler.client_batches(0, r)][: args.steps]
        batches = [collate([examples[i] for i in idx], dm.pad_id) for idx in indices]
        rows["in_process"] = in_process(fed, dm, batches)
        server, address = serve(config_args, Path(tmp))
        try:
            for mode, wire in (("network", "none"), ("network_bf16", "bf16")):
                rows[mode] = networked(build(config_args)[0], dm, batches, address, wire)
                print(f"{mode}: median {statistics.median(r['seconds'] for r in rows[mode]) * 1e3:.1f} ms", flush=True)
            with LinkClient(address) as link:
                link.request(Message("bye", {"client": "0"}))
            server.wait(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
    summary = summarize(rows, args.warmup)
    report = {
        "settings": {"config": args.config, "steps": args.steps, "warmup": args.warmup, "threads": 1,
                     "batch_size": dm.batch_size, "max_length": dm.max_length},
        "machine": machine_info(),
        "summary": summary,
        "steps": rows,
    }  # fmt: skip
    write_report(args.out, "network", report, summary)
    plot(summary, args.out / "network.png")
    for s in summary:
        print(s)
    return report


if __name__ == "__main__":
    main()
