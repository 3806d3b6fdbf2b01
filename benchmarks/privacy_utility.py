"""Privacy–utility: main-task accuracy (MP) and attack success (AP) of every defence, and the DCS score.

For each cut layer × defence × strength of the grid (``DEFENCES``), the same federation is trained (``--seeds``, the
test split scored) and attacked:

* **utility (MP)** — ``atlas-pl fit`` + ``atlas-pl test`` of ``configs/minilm.yaml`` (all-MiniLM-L6-v2) reduced to
  two real tasks (``--tasks``: sst2, ag_news), 2 clients each, ``--rounds`` FedAvg rounds at the config's learning
  rate, with the defence as YAML options (``model.activation_noise``, ``model.dp_sgd``, ``model.split_shape``,
  ``model.gradient_sparsity``, ``model.cut_layer``); per-task test accuracy, mean ± std over seeds. Runs are cached
  in ``<out>/privacy_runs/<defence>/seed<S>/`` (a finished run is skipped, a killed one resumes).
* **text attack (AP)** — the two inversions of ``benchmarks/privacy.py`` on real test sentences of each task at the
  defence's cut and activation noise: white-box activation matching and the learned inverter (ridge regression fit
  on 300 public cola sentences); AP = the larger token recall. DP-SGD and the label defences do not change what
  the activations carry, so their AP is the undefended one at their cut: a defence is scored by what it hides.
* **label attack (AP)** — the two-part split sends every label (AP 1.0); the U-shaped split's returned gradients are
  scored by ``benchmarks/label_leakage.py`` on real sst2 batches (direction-scoring AUC; AP = 2·AUC − 1, the
  advantage over chance: 0 at chance, 1 with every label read).

DCS = 1 / (1 + sqrt(0.5·AP² + 0.5·max(MP₀ − MP, 0)²)) per task and attack, with MP₀ the undefended two-part split at
the smallest cut and accuracies as fractions. The target of the method description is DCS ≥ 0.7 (with no loss of
accuracy that needs AP ≤ 0.61) at ≤ 2 points of accuracy loss. DP-SGD's clip norm is calibrated, not hard-coded: the
median per-example gradient norm of a client adapter after ``--calibration-steps`` plain steps on a public proxy task
(``--proxy``, not a client's data). Attack cells are cached in ``<out>/privacy_utility.json`` (and read from
``privacy.json`` / ``label_leakage.json`` when their settings match). Outputs (atomic):
``<out>/privacy_utility.{json,csv,png}`` and the table between ``<!-- privacy:begin -->`` / ``<!-- privacy:end -->``
in ``benchmarks/README.md``.

Usage::

    python benchmarks/privacy_utility.py                     # the README's table: 14 settings x 3 seeds, ~45 min
    python benchmarks/privacy_utility.py --defences none noise_1 dp_1 --seeds 0   # a slice
    python benchmarks/privacy_utility.py --report-only       # re-read the runs and attack cells, rewrite outputs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402
from outputs import machine_info, save_png, write_readme_section, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "benchmarks" / "README.md"
WORKLOADS = {  # --model -> (model name, base config, folder of its runs under <out>/privacy_runs, output stem)
    "minilm": ("minilm-offline", "configs/minilm.yaml", "", "privacy_utility"),
    "smollm2": ("smollm2-offline", "configs/smollm2.yaml", "smollm2", "privacy_utility_smollm2"),
}
MODEL = "minilm-offline"  # the default workload's model
SMOLLM2_DEFENCES = ["none", "noise_1", "noise_3", "dp_1", "label_dp_1"]
MODEL_TITLES = {"minilm-offline": "all-MiniLM-L6-v2", "smollm2-offline": "SmolLM2-135M-Instruct"}

# name -> (label, cut, model options; "CALIBRATED" is replaced by the measured clip norm at that cut)
DEFENCES: dict[str, tuple[str, int, dict[str, Any]]] = {
    "none": ("none", 1, {}),
    "noise_0.3": ("activation noise 0.3", 1, {"activation_noise": {"multiplier": 0.3}}),
    "noise_1": ("activation noise 1", 1, {"activation_noise": {"multiplier": 1.0}}),
    "noise_3": ("activation noise 3", 1, {"activation_noise": {"multiplier": 3.0}}),
    "noise_10": ("activation noise 10", 1, {"activation_noise": {"multiplier": 10.0}}),
    "dp_0.5": ("DP-SGD σ 0.5", 1, {"dp_sgd": {"noise_multiplier": 0.5, "clip_norm": "CALIBRATED"}}),
    "dp_1": ("DP-SGD σ 1", 1, {"dp_sgd": {"noise_multiplier": 1.0, "clip_norm": "CALIBRATED"}}),
    "dp_2": ("DP-SGD σ 2", 1, {"dp_sgd": {"noise_multiplier": 2.0, "clip_norm": "CALIBRATED"}}),
    "u_shaped": ("U-shaped", 1, {"split_shape": "u_shaped"}),
    "u_shaped_sparse_0.01": (
        "U-shaped + sparse 0.01",
        1,
        {"split_shape": "u_shaped", "gradient_sparsity": {"keep": 0.01}},
    ),  # fmt: skip
    "label_dp_0.5": ("label DP ε 0.5", 1, {"label_dp_epsilon": 0.5}),
    "label_dp_1": ("label DP ε 1", 1, {"label_dp_epsilon": 1.0}),
    "label_dp_2": ("label DP ε 2", 1, {"label_dp_epsilon": 2.0}),
    "vib_0.1": ("bottleneck λ 0.1", 1, {"bottleneck": {"weight": 0.1, "init_scale": 1.0}}),
    "vib_1": ("bottleneck λ 1", 1, {"bottleneck": {"weight": 1.0, "init_scale": 1.0}}),
    "cut3": ("deeper cut", 3, {}),
    "cut3_noise_1": ("deeper cut + noise 1", 3, {"activation_noise": {"multiplier": 1.0}}),
    "cut3_noise_3": ("deeper cut + noise 3", 3, {"activation_noise": {"multiplier": 3.0}}),
    "cut5": ("deepest cut", 5, {}),
}


def config_of(name: str, clip: dict[int, float]) -> tuple[int, dict[str, Any]]:
    """Cut layer and model options of defence ``name`` (the calibrated clip norm filled in)."""
    _, cut, options = DEFENCES[name]
    options = json.loads(json.dumps(options))
    if "dp_sgd" in options:
        options["dp_sgd"]["clip_norm"] = clip[cut]
    return cut, options


def noise_of(options: dict[str, Any]) -> float:
    return float(options.get("activation_noise", {}).get("multiplier", 0.0))


def keep_of(options: dict[str, Any]) -> float:
    return float(options.get("gradient_sparsity", {}).get("keep", 1.0))


# ---------------------------------------------------------------------------------------------------- utility
def build_run(name: str, seed: int, args: argparse.Namespace, clip: dict[int, float]) -> dict[str, Any]:
    """The fit + test commands and overlay of one defence × seed (nothing is executed)."""
    cut, options = config_of(name, clip)
    model, config, sub, _ = WORKLOADS[args.model]
    folder = args.out / "privacy_runs" / sub / name / f"seed{seed}"
    rel = os.path.relpath(folder, ROOT)
    base = compare.load_yaml(ROOT / config)
    callbacks = [c for c in base["trainer"]["callbacks"] if "Checkpoint" not in c["class_path"]]
    checkpoint = {"class_path": "atlas_pl.callbacks.RoundCheckpoint", "init_args": {"dirpath": f"{rel}/checkpoints"}}
    callbacks.append(checkpoint)
    overlay = {
        "model": {"cut_layer": cut, **{k: v for k, v in options.items() if k != "label_dp_epsilon"}},
        "data": {
            "tasks": list(args.tasks),
            "num_clients": 2 * len(args.tasks),
            **{k: v for k, v in options.items() if k == "label_dp_epsilon"},
        },  # fmt: skip
        "trainer": {
            "max_epochs": args.rounds,
            "callbacks": callbacks,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {
                    "save_dir": os.path.relpath(folder.parents[1], ROOT),
                    "name": name,
                    "version": f"seed{seed}",
                },
            },  # fmt: skip
        },
    }
    common = ["--config", config, "--config", f"{rel}/overlay.yaml", "--seed_everything", str(seed),
              "--data.seed", str(seed)]  # fmt: skip
    return {"workload": f"privacy-{args.model}", "method": name, "lr": float(base["model"]["learning_rate"]),
            "seed": seed, "folder": folder, "overlay": overlay, "cmd": [compare.ATLAS_PL, "fit", *common],
            "test_cmd": [compare.ATLAS_PL, "test", *common, "--ckpt_path", f"{rel}/checkpoints/last.ckpt"]}  # fmt: skip


def parse_run(folder: Path, tasks: list[str]) -> dict[str, Any] | None:
    """Per-task test accuracy and the last round's DP ``ε`` of a finished run (None when it is not finished)."""
    if not compare.has_test(folder):
        return None
    metrics = json.loads((folder / "test_results.json").read_text())["metrics"]
    history = json.loads((folder / "results.json").read_text()).get("history", [])
    row: dict[str, Any] = {f"acc_{t}": metrics.get(f"test_task/{t}/acc") for t in tasks}
    row["dp_epsilon"] = history[-1].get("privacy/dp_epsilon") if history else None
    row["dp_clipped"] = history[-1].get("privacy/dp_clipped") if history else None
    return row


# ---------------------------------------------------------------------------------------------------- attacks
def calibrate_clip(workload: str, cut: int, proxy: str, steps: int, seed: int) -> float:
    """Median per-example gradient norm of a client adapter at ``cut`` after ``steps`` plain split steps on the
    public ``proxy`` task (batches built by the workload's own datamodule settings)."""
    import torch

    from atlas_pl.algorithms import DPSGD
    from atlas_pl.data import FederatedDataModule
    from atlas_pl.data.client_data import sample_client_batches
    from atlas_pl.lora.adapters import LoraSpec
    from atlas_pl.models import load_model
    from atlas_pl.split.backbone import SplitBackbone
    from atlas_pl.split.channel import InProcessChannel
    from atlas_pl.split.step import split_forward_backward

    model, config, _, _ = WORKLOADS[workload]
    cfg = compare.load_yaml(ROOT / config)
    data = {**cfg["data"], "tasks": [proxy], "num_clients": 1, "data_dir": str(ROOT.parent / "shared" / "data")}
    data.pop("max_eval_examples_per_client", None)
    dm = FederatedDataModule(**data)
    dm.setup()
    fmt = data.get("task_format", "causal_lm")
    torch.manual_seed(seed)
    split = SplitBackbone(load_model(model, fmt, 2, {}, "float32").train(), cut, LoraSpec(**cfg["model"]["lora"]))
    if fmt == "classification":
        split.configure_tasks([t.num_labels for t in dm.tasks])
    split.add_client_adapter("c")
    split.add_server_adapter("s")
    opt = torch.optim.AdamW([*split.bank.parameters("c"), *split.server_parameters("s")],
                            lr=cfg["model"]["learning_rate"])  # fmt: skip
    norms: list[float] = []
    params = split.bank.parameters("c")
    probe = DPSGD(noise_multiplier=0.0, clip_norm=1e30)

    def measure(hidden: torch.Tensor, grad: torch.Tensor) -> None:
        norms.extend(probe.backward(hidden, grad, params).tolist())

    batches = sample_client_batches(dm, 0, steps + 1, seed)
    for step, batch in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        if step < len(batches) - 1:
            split_forward_backward(split, InProcessChannel(), batch, "c", "s")
            opt.step()
        else:
            split_forward_backward(split, InProcessChannel(), batch, "c", "s", client_backward=measure)
    return float(statistics.median(norms))


def text_attack(cache: list[dict], tasks: list[str], cut: int, noise: float | str, settings: dict,
                scales: Any = None) -> dict[str, dict]:  # fmt: skip
    """Token recall per task and attack (``whitebox``, ``learned``) at ``cut`` / ``noise``: cached rows, else run
    ``privacy.attack_cell`` / ``privacy.learned_cell`` (the same noise draw). A bottleneck defence is keyed by its name
    (``noise``) and attacked with its trained per-dimension ``scales``."""
    import privacy

    out: dict[str, dict] = {}
    for task in tasks:
        out[task] = {}
        for attack in ("whitebox", "learned"):
            key = (settings["model_name"], task, cut, noise, attack)
            hit = next((r for r in cache if (r["model"], r["task"], r["cut"], r["noise"],
                                             "learned" if r.get("attack") == "learned" else "whitebox") == key),
                       None)  # fmt: skip
            if hit is None:
                model = settings["model_name"]
                backbone, tokenizer = privacy.attack_backbone(model)
                ids, mask = privacy.encode(tokenizer, task, settings["examples"], settings["max_length"])
                if isinstance(noise, str) and scales is None:
                    raise SystemExit(f"no attack cell for {noise} and no checkpoint of its seed-0 run to attack")
                level = scales if isinstance(noise, str) else noise
                if attack == "whitebox":
                    cell = privacy.attack_cell(backbone, ids, mask, cut, level, privacy.MODES[model], settings["seed"])
                else:
                    cell = privacy.learned_cell(model, ids, mask, cut, level, settings["seed"], settings["aux_task"],
                                                settings["aux_examples"], settings["max_length"])  # fmt: skip
                hit = {"model": model, "task": task, "cut": cut, "noise": noise, **cell}
                cache.append(hit)
                print(f"{attack} inversion {task} cut {cut} noise {noise}: recall {hit['recall']:.3f}", flush=True)
            out[task][attack] = float(hit["recall"])
    return out


def label_attack(cache: list[dict], keep: float, settings: dict, epsilon: float | None = None) -> dict[str, float]:
    """Direction / norm AUC of the U-shaped label attack on the label task at ``keep`` and label-DP ``epsilon``
    (cached, else measured), and the AUC of the labels a two-part server receives. A model that
    ``label_leakage.py`` does not split U-shaped (a causal LM) gets the received labels' AUC only."""
    import label_leakage

    task, model = settings["label_task"], settings["model_name"]
    hit = next((r for r in cache if (r["model"], r["task"], r["keep"], r.get("label_dp_epsilon")) ==
                (model, task, keep, epsilon)), None)  # fmt: skip
    if hit is None:
        from atlas_pl.data.tokenizers import load_tokenizer

        n = settings["label_batch"] * settings["label_batches"]
        if model in label_leakage.TASK_FORMAT:
            split = label_leakage.u_shaped_split(model, 1, settings["seed"])
            cell = label_leakage.leakage_cell(split, load_tokenizer(model), task, keep, settings["label_batch"],
                                              settings["label_batches"], settings["label_max_length"],
                                              epsilon)  # fmt: skip
        else:
            cell = {"norm_auc": None, "direction_auc": None, "sent_label_auc": label_leakage.sent_label_auc(
                task, n, epsilon)}  # fmt: skip
        hit = {"model": model, "task": task, "cut": 1, "keep": keep, "label_dp_epsilon": epsilon, **cell}
        cache.append(hit)
        print(f"label attack {task} keep {keep:g} ε {epsilon}: direction AUC {hit['direction_auc']}, received "
              f"labels AUC {hit['sent_label_auc']:.3f}", flush=True)  # fmt: skip
    return {"direction_auc": hit["direction_auc"], "norm_auc": hit["norm_auc"],
            "sent_label_auc": float(hit.get("sent_label_auc", 1.0))}  # fmt: skip


def trained_scales(args: argparse.Namespace, name: str) -> Any:
    """``σ / rms(h)`` per dimension of client 0's bottleneck in defence ``name``'s seed-0 run (None without it)."""
    import torch

    _, _, sub, _ = WORKLOADS[args.model]
    path = args.out / "privacy_runs" / sub / name / "seed0" / "checkpoints" / "last.ckpt"
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return state["backbone.bottleneck.log_scale.client_0"].exp()


def adapter_change(args: argparse.Namespace, name: str, reference: str = "none") -> float | None:
    """Relative norm difference of client 0's client adapter between defence ``name``'s and ``reference``'s seed-0
    runs (their checkpoints; None without them)."""
    import torch

    _, _, sub, _ = WORKLOADS[args.model]
    states = []
    for run in (name, reference):
        path = args.out / "privacy_runs" / sub / run / "seed0" / "checkpoints" / "last.ckpt"
        if not path.exists():
            return None
        states.append(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
    keys = [k for k in states[1] if ".client_0." in k and "lora_" in k]
    diff = sum(float((states[0][k] - states[1][k]).pow(2).sum()) for k in keys)
    return (diff / sum(float(states[1][k].pow(2).sum()) for k in keys)) ** 0.5


def matching_rows(path: Path, settings: dict[str, Any], keys: list[str]) -> list[dict]:
    """Rows of an earlier report whose settings agree with ``settings`` on ``keys`` (else none)."""
    if not path.exists():
        return []
    report = json.loads(path.read_text())
    return list(report["rows"]) if all(report["settings"].get(k) == settings[k] for k in keys) else []


# ---------------------------------------------------------------------------------------------------- report
def dcs(ap: float, mp: float, mp0: float) -> float:
    """The method description's privacy score: 1 / (1 + sqrt(0.5·AP² + 0.5·max(MP₀ − MP, 0)²))."""
    return 1.0 / (1.0 + math.sqrt(0.5 * ap**2 + 0.5 * max(mp0 - mp, 0.0) ** 2))


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: dict[str, list[dict]], attacks: dict[str, dict], tasks: list[str]) -> list[dict[str, Any]]:
    """One row per defence: MP per task (mean ± std), AP per attack, DCS per task and attack, ε."""
    base = [r for r in runs.get("none", []) if r]
    if not base:
        raise SystemExit("no finished undefended run ('none'): it is MP₀ of every DCS; run it first")
    mp0 = {t: statistics.fmean(r[f"acc_{t}"] for r in base) for t in tasks}
    rows = []
    for name, found in runs.items():
        done = [r for r in found if r]
        if not done:
            continue
        label, cut, _ = DEFENCES[name]
        att = attacks[name]
        row: dict[str, Any] = {"defence": name, "label": label, "cut": cut, "seeds": len(done)}
        for t in tasks:
            m, s = mean_std([r[f"acc_{t}"] for r in done])
            row[f"mp_{t}"], row[f"mp_std_{t}"], row[f"mp_drop_{t}"] = m, s, mp0[t] - m
            ap = max(att["text"][t].values())  # the stronger inversion
            row[f"ap_text_{t}"] = ap
            row[f"ap_whitebox_{t}"], row[f"ap_learned_{t}"] = att["text"][t]["whitebox"], att["text"][t]["learned"]
            row[f"dcs_text_{t}"] = dcs(ap, m, mp0[t])
        lt = att["label_task"]
        row["ap_label"] = att["label_ap"]
        row["label_direction_auc"] = att.get("direction_auc")
        row[f"dcs_label_{lt}"] = dcs(att["label_ap"], row[f"mp_{lt}"], mp0[lt])
        eps = [r["dp_epsilon"] for r in done if r.get("dp_epsilon") is not None]
        row["dp_epsilon"] = max(eps) if eps else None
        clipped = [r["dp_clipped"] for r in done if r.get("dp_clipped") is not None]
        row["dp_clipped"] = statistics.fmean(clipped) if clipped else None
        rows.append(row)
    return rows


def markdown(rows: list[dict], tasks: list[str], settings: dict, command: str) -> str:
    lt = settings["label_task"]
    head = ["defence", "cut", *[f"MP {t}" for t in tasks], *[f"AP text {t}" for t in tasks],
            *[f"DCS text {t}" for t in tasks], f"AP labels ({lt})", f"DCS labels ({lt})", "DP ε"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], str(r["cut"])]
        cells += [f"{r[f'mp_{t}']:.3f} ± {r[f'mp_std_{t}']:.3f}" for t in tasks]
        cells += [f"{r[f'ap_text_{t}']:.2f}" for t in tasks]
        cells += [(f"**{v:.2f}**" if (v := r[f"dcs_text_{t}"]) >= 0.7 else f"{v:.2f}") for t in tasks]
        cells += [f"{r['ap_label']:.2f}", f"{r[f'dcs_label_{lt}']:.2f}"]
        cells.append("–" if r["dp_epsilon"] is None else f"{r['dp_epsilon']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = max(r["seeds"] for r in rows)
    return (
        f"`{command}` — {MODEL_TITLES[settings['model_name']]}, {len(tasks) * 2} clients ({', '.join(tasks)}, 2 each), "
        f"{settings['rounds']} FedAvg rounds, lr {settings['lr']:g}, {seeds} seeds (test split, mean ± std); "
        f"inversion on {settings['examples']} test sentences per task; label attack on {settings['label_batches']} "
        f"{lt} batches of {settings['label_batch']}; DP-SGD clip norm = median per-example norm on "
        f"{settings['proxy']} ({', '.join(f'cut {c}: {v:.2g}' for c, v in settings['clip'].items())}), δ = 1e-5, "
        f"ε of the most-exposed client after the last round. **Bold**: DCS ≥ 0.7.\n\n" + "\n".join(lines) + "\n"
    )


def plot(rows: list[dict], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.2))
    families = {"none": "none", "noise": "activation noise (cut 1)", "dp": "DP-SGD (cut 1)",
                "vib": "information bottleneck", "label_dp": "label DP", "u_shaped": "U-shaped",
                "cut": "deeper cut"}  # fmt: skip
    for ax, kind in zip(axes, ("text", "label")):
        for fam, title in families.items():
            sel = [r for r in rows if r["defence"].startswith(fam) and (fam != "none" or r["defence"] == "none")]
            if fam == "cut":
                sel = [r for r in rows if r["cut"] > 1]
            if not sel:
                continue
            acc = [statistics.fmean(r[f"mp_{t}"] for t in tasks) for r in sel]
            ap = [statistics.fmean(r[f"ap_text_{t}"] for t in tasks) if kind == "text" else r["ap_label"] for r in sel]
            ax.plot(acc, ap, "o-" if len(sel) > 1 else "o", label=title)
            for a, p, r in zip(acc, ap, sel):
                ax.annotate(r["label"].replace("activation ", "").replace("DP-SGD ", ""), (a, p), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax.axhline(0.61, color="grey", lw=0.8, ls="--")
        ax.text(ax.get_xlim()[0], 0.62, "DCS 0.7 at no accuracy loss", fontsize=7, color="grey")
        ax.set_xlabel(f"test accuracy, mean of {', '.join(tasks)}")
        ax.set_ylabel("inversion token recall (AP)" if kind == "text" else "label attack advantage 2·AUC − 1 (AP)")
        ax.set_ylim(-0.03, 1.05)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    save_png(fig, path)


def write_readme(text: str, workload: str) -> None:
    write_readme_section(README, f"privacy-{workload}", f"Privacy–utility, {workload}", text)


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", choices=list(WORKLOADS))
    p.add_argument("--defences", nargs="+", default=None, choices=list(DEFENCES),
                   help="default: all for minilm, a subset (SMOLLM2_DEFENCES) for smollm2")  # fmt: skip
    p.add_argument("--tasks", nargs="+", default=["sst2", "ag_news"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--proxy", default="mr", help="public proxy task of the clip-norm calibration")
    p.add_argument("--calibration-steps", type=int, default=8)
    p.add_argument("--examples", type=int, default=4, help="sentences per task attacked by the inversion")
    p.add_argument("--report-only", action="store_true", help="run nothing: re-read the runs and cached cells")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out = args.out.resolve()
    default_defences = list(DEFENCES) if args.model == "minilm" else SMOLLM2_DEFENCES
    args.defences = args.defences or default_defences
    model, config, _, stem = WORKLOADS[args.model]
    previous = args.out / f"{stem}.json"
    old = json.loads(previous.read_text()) if previous.exists() else {}
    settings = {"model_name": model, "examples": args.examples, "max_length": 24, "seed": 0, "aux_task": "cola",
                "aux_examples": 300, "label_task": "sst2", "label_batch": 32, "label_batches": 4,
                "label_max_length": 48, "rounds": args.rounds, "proxy": args.proxy,
                "calibration_steps": args.calibration_steps,
                "lr": float(compare.load_yaml(ROOT / config)["model"]["learning_rate"])}  # fmt: skip
    cuts = sorted({DEFENCES[d][1] for d in args.defences if "dp_sgd" in DEFENCES[d][2]})
    same = old.get("settings", {}).get("proxy") == args.proxy and old.get("settings", {}).get(
        "calibration_steps") == args.calibration_steps  # fmt: skip
    clip = {int(c): float(v) for c, v in (old.get("settings", {}).get("clip", {}) if same else {}).items()}
    for cut in cuts:
        if cut not in clip and not args.report_only:
            clip[cut] = calibrate_clip(args.model, cut, args.proxy, args.calibration_steps, 0)
            print(f"DP-SGD clip norm at cut {cut}: {clip[cut]:.3g} (median per-example norm on {args.proxy})")
    settings["clip"] = clip
    torch_threads = max(1, min(4, os.cpu_count() or 1))
    runs: dict[str, list[dict]] = {}
    planned = [build_run(d, s, args, clip) for d in args.defences for s in args.seeds
               if "dp_sgd" not in DEFENCES[d][2] or DEFENCES[d][1] in clip]  # fmt: skip
    if not args.report_only:
        failed = compare.run_all([r for r in planned if not compare.has_test(r["folder"])], args.jobs,
                                 "privacy–utility runs")  # fmt: skip
        if failed:
            print(f"{len(failed)} run(s) failed; see their log.txt", file=sys.stderr)
    for r in planned:
        runs.setdefault(r["method"], []).append(parse_run(r["folder"], args.tasks))  # type: ignore[arg-type]
    # attacks: cached cells of an earlier report of this script, of privacy.py and of label_leakage.py
    text_cache = [r for r in old.get("text_attacks", []) if old.get("settings", {}).get("examples") == args.examples]
    same_aux = bool(matching_rows(args.out / "privacy.json", settings, ["aux_task", "aux_examples"]))
    text_cache += [r for r in matching_rows(args.out / "privacy.json", settings, ["examples", "max_length", "seed"])
                   if r.get("attack") != "learned" or same_aux]  # fmt: skip
    label_cache = list(old.get("label_attacks", []))
    wanted = {"batch": settings["label_batch"], "batches": settings["label_batches"],
              "max_length": settings["label_max_length"], "seed": settings["seed"]}  # fmt: skip
    label_cache += matching_rows(args.out / "label_leakage.json", wanted, list(wanted))
    attacks: dict[str, dict] = {}
    import torch

    torch.set_num_threads(torch_threads)
    for name in runs:
        _, cut, options = DEFENCES[name]
        if "bottleneck" in options:  # the trained noise scales of the seed-0 run's client 0
            text = text_attack(text_cache, args.tasks, cut, name, settings, trained_scales(args, name))
        else:
            text = text_attack(text_cache, args.tasks, cut, noise_of(options), settings)
        entry: dict[str, Any] = {"text": text, "label_task": settings["label_task"], "label_ap": 1.0}
        epsilon = options.get("label_dp_epsilon")
        if options.get("split_shape") == "u_shaped" or epsilon is not None:
            scores = label_attack(label_cache, keep_of(options), settings, epsilon)
            direction = scores["direction_auc"] if scores["direction_auc"] is not None else 0.5
            best = direction if options.get("split_shape") == "u_shaped" else scores["sent_label_auc"]
            if epsilon is not None:  # the server reads the noisy labels (two-part) or the gradients: the better
                best = max(direction, scores["sent_label_auc"])
            entry.update(scores, label_ap=max(0.0, 2 * best - 1))
        attacks[name] = entry
    rows = summarize(runs, attacks, args.tasks)
    dp_runs = [r["defence"] for r in rows if r["defence"].startswith("dp_")]
    for r in rows:  # DP-SGD: how far its client adapter moved from the undefended one's, and from the lowest σ's
        old_row = next((o for o in old.get("rows", []) if o["defence"] == r["defence"]), {})
        for key, ref in (("client_adapter_change_vs_none", "none"),
                         ("client_adapter_change_vs_lowest_sigma", dp_runs[0] if dp_runs else "")):  # fmt: skip
            change = None
            if r["defence"] in dp_runs:
                change = adapter_change(args, r["defence"], ref) if r["defence"] != ref else 0.0
            r[key] = change if change is not None else old_row.get(key)
    extra = [] if args.seeds == [0, 1, 2] else ["--seeds", *map(str, args.seeds)]
    extra += [] if args.rounds == 3 else ["--rounds", str(args.rounds)]
    extra += [] if args.defences == default_defences else ["--defences", *args.defences]
    extra = ([] if args.model == "minilm" else ["--model", args.model]) + extra
    command = " ".join(["python benchmarks/privacy_utility.py", *extra])
    report = {"settings": settings, "machine": machine_info(), "rows": rows,
              "text_attacks": [r for r in text_cache if r["model"] == model],
              "label_attacks": [r for r in label_cache if r["model"] == model]}  # fmt: skip
    write_report(args.out, stem, report, rows)
    plot(rows, args.tasks, args.out / f"{stem}.png")
    table = markdown(rows, args.tasks, settings, command)
    if args.out == (ROOT / "benchmarks" / "results").resolve():
        write_readme(table, args.model)
    print(table)
    return report


if __name__ == "__main__":
    main()
