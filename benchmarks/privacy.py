"""What a split server reads back from the cut activations: inversion success per model, cut layer and noise level.

For each pretrained offline model (``minilm-offline``: BERT family; ``smollm2-offline``: LLaMA family), each real task
(``--tasks``, read from ``../shared/data/<task>/test.jsonl``), each cut layer and each activation-noise multiplier
(``model.activation_noise``: Gaussian noise in units of the activations' RMS, added by the client before sending),
the server runs the white-box inversion of :mod:`atlas_pl.attacks` on the activations of ``--examples`` real
sentences and the scores are recorded: token recall (the attack's success AP), precision, position accuracy, ROUGE-L
over token ids. The attack mode per model is the one that works on it (``relaxed`` for BERT, whose embedding block
normalizes; ``embedding`` for LLaMA), overridable with ``--modes``. The client adapter is fresh (``B = 0``), so the
client half is the pretrained model itself, which the server knows. The learned inverter (``attack: learned``) is
fit per model and cut on ``--aux-examples`` train sentences of a public auxiliary task (``--aux-task``, not a
client's) and reads each cell's activations at once, without optimisation (``--attacks`` picks the attacks). A run
merges its cells into an existing report with the same settings (a cell it measures replaces the old one).

The accuracy side of each defence, the label attacks and DCS are ``benchmarks/privacy_utility.py``'s (which reuses
these cells). Outputs (atomic): ``<out>/privacy.{json,csv,png}``.

Usage::

    python benchmarks/privacy.py                                      # 2 models x 2 tasks x 2 cuts x 4 noise levels
    python benchmarks/privacy.py --models smollm2-offline --cuts 1 2 3 --noise 0 1
    python benchmarks/privacy.py --attacks learned --cuts 1 2 3 --noise 0 1 3   # the learned inverter only: ~2 min
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from atlas_pl.attacks import LearnedInverter, invert_activations, learned_inversion, token_scores
from atlas_pl.data.tokenizers import load_tokenizer
from atlas_pl.lora.adapters import LoraSpec
from atlas_pl.models import load_model
from atlas_pl.split.backbone import SplitBackbone
from atlas_pl.split.channel import ActivationNoise

sys.path.insert(0, str(Path(__file__).resolve().parent))
from outputs import machine_info, save_png, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MODES = {"minilm-offline": "relaxed", "smollm2-offline": "embedding"}
TASK_FORMAT = {"minilm-offline": "classification", "smollm2-offline": "causal_lm"}
SETTINGS = {"embedding": (300, 0.05), "relaxed": (250, 0.3)}  # Adam steps, learning rate


@functools.cache
def attack_backbone(model_name: str) -> tuple[SplitBackbone, Any]:
    """The pretrained model with fresh adapters as the attack's client half (the server knows it), its tokenizer."""
    base = load_model(model_name, TASK_FORMAT[model_name], 2, {}, "float32").eval()
    backbone = SplitBackbone(base, 1, LoraSpec())
    backbone.add_client_adapter("client")
    backbone.add_server_adapter("server")
    backbone.activate("client", "server")
    return backbone, load_tokenizer(model_name)


def encode(tokenizer: Any, task: str, n: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of the first ``n`` test sentences of ``task``."""
    enc = tokenizer(sentences(task, n), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def sentences(task: str, n: int) -> list[str]:
    path = DATA / task / "test.jsonl"
    if not path.exists():
        raise SystemExit(f"no {path}: put the shared data folder beside the repository (see ../shared/data/README)")
    with path.open() as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


def observe(hidden: torch.Tensor, mask: torch.Tensor, noise: float | torch.Tensor) -> torch.Tensor:
    """What the server receives: ``hidden`` plus the client's noise, ``noise`` × rms(h) (``activation_noise``), or
    per dimension when ``noise`` is a ``[hidden]`` vector of scales (a trained ``bottleneck``'s ``σ / rms(h)``)."""
    if not isinstance(noise, torch.Tensor):
        return ActivationNoise(noise).apply(hidden, mask)
    rms = hidden[mask.bool()].float().pow(2).mean().sqrt()
    return hidden + torch.randn_like(hidden) * noise.to(hidden.dtype) * rms


def attack_cell(backbone: SplitBackbone, ids: torch.Tensor, mask: torch.Tensor, cut: int, noise: float | torch.Tensor,
                mode: str, seed: int) -> dict[str, Any]:  # fmt: skip
    torch.manual_seed(seed)
    with torch.no_grad():
        hidden = backbone.client_forward(ids, mask, cut)
        observed = observe(hidden, mask, noise)
    steps, lr = SETTINGS[mode]
    start = time.perf_counter()
    result = invert_activations(lambda i, m: backbone.client_forward(i, m, cut), backbone.model.get_input_embeddings(),
                                observed, mask, mode=mode, steps=steps, lr=lr, seed=seed)  # type: ignore[arg-type]  # fmt: skip
    return {**token_scores(result.tokens, ids, mask), "relative_error": result.relative_error,
            "seconds": time.perf_counter() - start, "attack": mode, "steps": steps}  # fmt: skip


@functools.cache
def inverter(model_name: str, cut: int, aux_task: str, aux_examples: int, max_length: int) -> LearnedInverter:
    """The learned inverter of ``model_name``'s client half at ``cut``, fit on ``aux_examples`` train sentences of the
    public auxiliary task ``aux_task`` (not a client's)."""
    backbone, tokenizer = attack_backbone(model_name)
    path = DATA / aux_task / "train.jsonl"
    if not path.exists():
        raise SystemExit(f"no {path}: put the shared data folder beside the repository (see ../shared/data/README)")
    with path.open() as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(aux_examples), f)]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return LearnedInverter.fit(lambda i, m: backbone.client_forward(i, m, cut), backbone.model.get_input_embeddings(),
                               enc["input_ids"], enc["attention_mask"])  # fmt: skip


def learned_cell(model_name: str, ids: torch.Tensor, mask: torch.Tensor, cut: int, noise: float | torch.Tensor,
                 seed: int, aux_task: str, aux_examples: int, max_length: int) -> dict[str, Any]:  # fmt: skip
    """The learned inverter (no refinement) on the same noisy activations as :func:`attack_cell` draws."""
    backbone, _ = attack_backbone(model_name)
    start = time.perf_counter()
    fitted = inverter(model_name, cut, aux_task, aux_examples, max_length)
    torch.manual_seed(seed)
    with torch.no_grad():
        observed = observe(backbone.client_forward(ids, mask, cut), mask, noise)
    result = learned_inversion(fitted, lambda i, m: backbone.client_forward(i, m, cut),
                               backbone.model.get_input_embeddings(), observed, mask)  # fmt: skip
    with torch.no_grad():  # how the clean activations' energy spreads over dimensions (the noise is rms-scaled)
        energy = backbone.client_forward(ids, mask, cut)[mask.bool()].float().pow(2).mean(dim=0)
        top = energy.sort(descending=True).values / energy.sum()
    return {**token_scores(result.tokens, ids, mask), "relative_error": result.relative_error,
            "seconds": time.perf_counter() - start, "attack": "learned", "steps": 0,
            "energy_top1": float(top[0]), "energy_top16": float(top[:16].sum())}  # fmt: skip


def row_key(row: dict[str, Any]) -> tuple:
    return row["model"], row["task"], row["cut"], row["noise"], row["attack"]


def merged(path: Path, settings: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of an earlier report with the same settings, with ``rows`` replacing those of the same cell (model,
    task, cut, noise, attack): a run adds cells to the report instead of discarding the others."""
    if not path.exists():
        return rows
    old = json.loads(path.read_text())
    same = all(old["settings"].get(k, settings[k]) == settings[k] for k in ("examples", "max_length", "seed",
                                                                            "aux_task", "aux_examples"))  # fmt: skip
    new = {row_key(r) for r in rows}
    kept = [r for r in old["rows"] if same and row_key(r) not in new]
    return sorted(kept + rows, key=lambda r: (r["model"], r["task"], r["cut"], r["attack"] == "learned", r["noise"]))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        for task, cut, learned in dict.fromkeys((r["task"], r["cut"], r["attack"] == "learned") for r in rows
                                                if r["model"] == model):  # fmt: skip
            sel = sorted((r for r in rows if (r["model"], r["task"], r["cut"], r["attack"] == "learned") ==
                          (model, task, cut, learned)), key=lambda r: r["noise"])  # fmt: skip
            ax.plot([r["noise"] for r in sel], [r["recall"] for r in sel], "s--" if learned else "o-",
                    label=f"{task}, cut {cut}" + (", learned inverter" if learned else ", white-box"))  # fmt: skip
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel("activation noise (× rms(h))")
        ax.set_ylabel("token recall of the inversion (AP)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(model)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    save_png(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--tasks", nargs="+", default=["sst2", "ag_news"])
    p.add_argument("--cuts", nargs="+", type=int, default=[1, 2])
    p.add_argument("--noise", nargs="+", type=float, default=[0.0, 0.1, 0.3, 1.0])
    p.add_argument("--modes", nargs="+", default=None, help="attack modes (default: the one that works per model)")
    p.add_argument("--examples", type=int, default=4)
    p.add_argument("--max_length", type=int, default=24)
    p.add_argument("--attacks", nargs="+", default=["whitebox", "learned"], choices=["whitebox", "learned"])
    p.add_argument("--aux-task", default="cola", help="public auxiliary text of the learned inverter (its train split)")
    p.add_argument("--aux-examples", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    rows: list[dict[str, Any]] = []
    for model_name in args.models:
        backbone, tokenizer = attack_backbone(model_name)
        for task in args.tasks:
            ids, mask = encode(tokenizer, task, args.examples, args.max_length)
            for cut in args.cuts:
                for mode in (args.modes or [MODES[model_name]]) if "whitebox" in args.attacks else []:
                    for noise in args.noise:
                        row = {"model": model_name, "task": task, "cut": cut, "noise": noise,
                               **attack_cell(backbone, ids, mask, cut, noise, mode, args.seed)}  # fmt: skip
                        rows.append(row)
                        print(f"{model_name} {task} cut {cut} noise {noise} {mode}: recall {row['recall']:.3f} "
                              f"rouge-L {row['rouge_l']:.3f} ({row['seconds']:.0f} s)", flush=True)  # fmt: skip
                if "learned" not in args.attacks:
                    continue
                for noise in args.noise:
                    cell = learned_cell(model_name, ids, mask, cut, noise, args.seed, args.aux_task, args.aux_examples,
                                        args.max_length)  # fmt: skip
                    rows.append({"model": model_name, "task": task, "cut": cut, "noise": noise, **cell})
                    print(f"{model_name} {task} cut {cut} noise {noise} learned: recall {cell['recall']:.3f}",
                          flush=True)  # fmt: skip
    settings = {"examples": args.examples, "max_length": args.max_length, "seed": args.seed,
                "attack_settings": SETTINGS, "labels_disclosed_two_part_split": 1.0, "aux_task": args.aux_task,
                "aux_examples": args.aux_examples}  # fmt: skip
    rows = merged(args.out / "privacy.json", settings, rows)
    report = {"settings": settings, "machine": machine_info(), "rows": rows}
    write_report(args.out, "privacy", report, rows)
    plot(rows, args.out / "privacy.png")
    return report


if __name__ == "__main__":
    main()
