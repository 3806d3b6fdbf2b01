"""Clients whose tasks differ in kind: zero-shot floors, trained scores per task and kind, generation cost, phase 1.

Workload ``smollm2_mixed`` (``configs/smollm2_mixed.yaml``: SmolLM2-135M-Instruct, 10 clients, 2 per task on sst2 and
ag_news (classification), squad (extractive QA), dialogsum and aeslc (summarization)). This script gathers:

1. **zero-shot** — per seed, ``atlas-pl test`` of the untrained federation (every LoRA ``B`` is zero, so this is the
   pretrained model with the workload's prompts): the floor of each task on the same test examples the trained runs
   are scored on (the test sample of each client depends on the seed).
2. **trained** — the runs of ``python benchmarks/compare.py --workloads smollm2_mixed`` (each method at the learning
   rate it chose on validation, test split, every final seed): per task its metrics (accuracy; SQuAD EM / F1, the best
   of the gold answers; ROUGE-1/2/L against the best reference), the gain over the floor.
3. **generation cost** — one profiled ATLAS fit of one round (``--trainer.profiler atlas_pl.profiling.RoundProfiler``):
   the share of the round spent generating answers, beside the rest of evaluation and training.
4. **phase 1** — the clusters the comparison's runs found (``cluster_ids`` of their ``results.json``; the truth from
   their ``partition.json``): ATLAS's (gradient fingerprints, ``contrast`` signal, K chosen by silhouette) and
   FL-TAC's (the adapter change of the first local steps, K = the number of tasks), ARI against the true task and the
   task kind (classification / qa / summarization).
5. **examples** — a few generated answers of ATLAS's seed-0 test run.

Outputs (atomic): ``results/mixed_kinds.{json,csv,png}`` and the section between ``<!-- mixed_kinds:begin -->`` and
``<!-- mixed_kinds:end -->`` in ``benchmarks/README.md`` and ``README.md``. Runs go to ``results/mixed_kinds_runs/``
(checkpoints and event files are not committed); a finished run is not repeated.

Usage::

    python benchmarks/compare.py --workloads smollm2_mixed --rounds 3 --lrs 1e-3 4e-3 --extend 0 --no-measure
    python benchmarks/mixed_kinds.py                    # zero-shot and profile runs, then the report
    python benchmarks/mixed_kinds.py --stage report     # re-read the runs present, rewrite the outputs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare  # noqa: E402
from outputs import machine_info, save_png, write_readme_section, write_report  # noqa: E402

WORKLOAD = "smollm2_mixed"
CONFIG = "configs/smollm2_mixed.yaml"
RESULTS = ROOT / "benchmarks" / "results"
RUNS = RESULTS / "mixed_kinds_runs"
KINDS = ("classification", "qa", "summarization")
METRICS = {"classification": ("acc", "macro_f1"), "qa": ("em", "f1"), "summarization": ("rouge1", "rouge2", "rougeL")}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip


def _run(cmd: list[str], folder: Path, done: Path) -> None:
    """Run ``cmd`` in the checkout (log in ``folder/log.txt``) unless ``done`` exists; raise if it does not after."""
    if done.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "command.txt").write_text(" ".join(["atlas-pl", *cmd[1:]]) + "\n")
    with open(folder / "log.txt", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    (folder / "log.txt").write_text(compare.portable((folder / "log.txt").read_text(errors="replace")))
    if proc.returncode != 0 or not done.exists():
        raise SystemExit(f"{' '.join(cmd[1:3])} failed (exit {proc.returncode}); see {folder / 'log.txt'}")


def _workload_args() -> list[str]:
    """The workload's data overrides of the base config (``compare.WORKLOADS``), as command-line arguments: the
    zero-shot and profile runs see the clients, sequences and test examples the comparison's runs see."""
    data = compare.config_overrides(WORKLOAD).get("data", {})
    return [arg for key, value in data.items() for arg in (f"--data.{key}", json.dumps(value))]


def _logger(folder: Path, name: str, version: str) -> list[str]:
    rel = os.path.relpath(folder, ROOT)
    return ["--trainer.logger.init_args.save_dir", rel, "--trainer.logger.init_args.name", name,
            "--trainer.logger.init_args.version", version, "--trainer.enable_progress_bar", "false"]  # fmt: skip


def zero_shot(seed: int) -> dict[str, float]:
    """Test metrics of the untrained federation at ``seed`` (the pretrained model behind zero LoRA updates)."""
    folder = RUNS / "zero_shot" / f"seed{seed}"
    cmd = [compare.ATLAS_PL, "test", "--config", CONFIG, *_workload_args(), "--seed_everything", str(seed),
           "--data.seed", str(seed), *_logger(RUNS, "zero_shot", f"seed{seed}")]  # fmt: skip
    _run(cmd, folder, folder / "test_results.json")
    return json.loads((folder / "test_results.json").read_text())["metrics"]


def profile(rounds: int = 1) -> dict[str, Any]:
    """Median seconds per part of a round (the rounds after the first, if more than one) of the comparison's ATLAS
    run (its overlay: budgets, signal batches, sequences) under ``RoundProfiler``."""
    from statistics import median

    import yaml

    folder = RUNS / "profile"
    out = folder / "profile.rounds.json"
    run = compare.build_run(WORKLOAD, "atlas", 2e-3, 0, rounds)
    overlay = run["overlay"]
    callbacks = overlay["trainer"]["callbacks"]
    overlay["trainer"]["callbacks"] = [c for c in callbacks if "Checkpoint" not in c["class_path"]]
    overlay["trainer"]["logger"]["init_args"] = {"save_dir": os.path.relpath(RUNS, ROOT), "name": "profile",
                                                 "version": "seed0"}  # fmt: skip
    overlay["trainer"]["profiler"] = {"class_path": "atlas_pl.profiling.RoundProfiler",
                                      "init_args": {"dirpath": os.path.relpath(folder, ROOT), "filename": "profile"}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "overlay.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))
    cmd = [compare.ATLAS_PL, "fit", "--config", CONFIG, "--config", "configs/baselines/atlas.yaml", "--config",
           os.path.relpath(folder / "overlay.yaml", ROOT), "--seed_everything", "0", "--model.learning_rate", "2e-3",
           "--trainer.max_epochs", str(rounds)]  # fmt: skip
    _run(cmd, folder, out)
    data = json.loads(out.read_text())
    rounds_ = data["rounds"][1:] or data["rounds"]
    med = {p: float(median(r.get(p, 0.0) for r in rounds_)) for p in (*data["parts"], "round")}
    return {"rounds_measured": len(rounds_), "seconds": med,
            "share": {p: med[p] / med["round"] for p in data["parts"]}}  # fmt: skip


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def task_kinds() -> dict[str, str]:
    return {t: kind for t, (_, kind) in compare.task_metas(compare.base_config(WORKLOAD)).items()}


def trained(seeds: list[int], tune_seeds: list[int]) -> dict[str, dict[str, Any]]:
    """Per method at its chosen rate: the test metrics of each final seed (``test_task/<task>/<metric>``)."""
    rows = [r for r in compare.collect_rows(False, {}) if r["workload"] == WORKLOAD]
    out: dict[str, dict[str, Any]] = {}
    for method in compare.METHODS:
        lr, _ = compare.choose_lr(rows, WORKLOAD, method, tune_seeds)
        if lr is None:
            continue
        mine = [r for r in rows if r["method"] == method and r["lr"] == lr and r["seed"] in seeds]
        finals = {r["seed"]: r["test_task_metrics"] for r in mine if r["test_task_metrics"]}
        if finals:
            out[method] = {"lr": lr, "by_seed": finals}
    return out


def table(floors: dict[int, dict[str, float]], runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, task, metric): mean ± std over seeds, the zero-shot floor on the same seeds, the gain."""
    kinds = task_kinds()
    rows = []
    for method, run in [("zero_shot", {"lr": None, "by_seed": {s: _tasks(m) for s, m in floors.items()}}),
                        *runs.items()]:  # fmt: skip
        for task, kind in kinds.items():
            for metric in METRICS[kind]:
                vals = {s: m.get(f"{task}/{metric}") for s, m in run["by_seed"].items()}
                vals = {s: v for s, v in vals.items() if v is not None}
                if not vals:
                    continue
                floor = [floors[s][f"test_task/{task}/{metric}"] for s in vals if s in floors]
                mean, std, n = compare.mean_std(list(vals.values()))  # type: ignore[misc]
                row = {"method": method, "lr": run["lr"], "task": task, "kind": kind, "metric": metric,
                       "mean": mean, "std": std, "seeds": n}  # fmt: skip
                if len(floor) == len(vals):
                    row["zero_shot"] = sum(floor) / len(floor)
                    row["gain"] = mean - row["zero_shot"]
                rows.append(row)
    return rows


def _tasks(metrics: dict[str, float]) -> dict[str, float]:
    return {k[len("test_task/"):]: v for k, v in metrics.items() if k.startswith("test_task/")}


def clusters() -> list[dict[str, Any]]:
    """Phase 1 of every finished ATLAS and FL-TAC run: K and ARI of its clusters against the true task and kind."""
    from atlas_pl.algorithms.clustering import clustering_scores

    out = []
    for method, signal in (("atlas", "fingerprint (contrast), K by silhouette"),
                           ("fltac", "first local steps' adapter change, K = 5")):  # fmt: skip
        for folder in sorted((compare.PATHS.runs / WORKLOAD / method).glob("lr*/seed*")):
            res, part = folder / "results.json", folder / "partition.json"
            if not (res.exists() and part.exists()):
                continue
            labels = json.loads(res.read_text())["cluster_ids"]
            rows = sorted(json.loads(part.read_text()), key=lambda r: r["client_idx"])
            kinds = list(dict.fromkeys(r["kind"] for r in rows))
            task = clustering_scores(labels, [r["task_id"] for r in rows])["ari"]
            kind = clustering_scores(labels, [kinds.index(r["kind"]) for r in rows])["ari"]
            out.append({"method": method, "signal": signal, "run": f"{folder.parent.name}/{folder.name}",
                        "K": len(set(labels)), "clusters": labels, "ari_task": task, "ari_kind": kind})  # fmt: skip
    return out


def examples(per_task: int = 1) -> dict[str, list[dict[str, Any]]]:
    """A few generated answers of ATLAS's seed-0 test run (from its ``test_results.json``)."""
    rows = [r for r in compare.collect_rows(False, {}) if r["workload"] == WORKLOAD and r["method"] == "atlas"]
    lr, _ = compare.choose_lr(rows, WORKLOAD, "atlas", [0])
    if lr is None:
        return {}
    path = compare.run_dir(WORKLOAD, "atlas", lr, 0) / "test_results.json"
    found = json.loads(path.read_text()).get("examples", {}) if path.exists() else {}
    return {task: rows_[:per_task] for task, rows_ in found.items()}


def markdown(report: dict[str, Any]) -> str:
    rows, kinds = report["table"], task_kinds()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    primary = {t: compare.PRIMARY[k] for t, k in kinds.items()}
    lines = [f"SmolLM2-135M-Instruct, 10 clients (2 per task), {report['settings']['rounds']} rounds, test split, "
             f"seeds {report['settings']['seeds']} (mean ± std); each method at the learning rate it chose on "
             "validation. Zero-shot = the pretrained model with the same prompts, on the same test examples. "
             "Classification: accuracy; squad: SQuAD F1 (best of the gold answers); dialogsum / aeslc: ROUGE-L F "
             "(best reference).", "",
             "| method | " + " | ".join(f"{t} ({primary[t]})" for t in kinds) + " | " +
             " | ".join(f"mean {k}" for k in KINDS) + " |",
             "|---|" + "---|" * (len(kinds) + len(KINDS))]  # fmt: skip
    for m in methods:
        cells, by_kind = [], {k: [] for k in KINDS}
        for t, kind in kinds.items():
            r = next((x for x in rows if x["method"] == m and x["task"] == t and x["metric"] == primary[t]), None)
            cells.append("–" if r is None else f"{r['mean']:.3f} ± {r['std']:.3f}" if r["seeds"] > 1
                         else f"{r['mean']:.3f}")  # fmt: skip
            if r is not None:
                by_kind[kind].append(r["mean"])
        cells += [f"{sum(v) / len(v):.3f}" if v else "–" for v in by_kind.values()]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    prof = report.get("profile")
    if prof:
        s = prof["share"]
        lines += ["", f"Generation cost (one ATLAS fit under `RoundProfiler`, median of rounds after the first, "
                      f"{prof['seconds']['round']:.0f} s a round on this CPU): generating answers "
                      f"{100 * s.get('generation', 0):.1f} % of a round, the rest of evaluation "
                      f"{100 * s['evaluation']:.1f} %, client + server steps "
                      f"{100 * (s['client'] + s['server']):.1f} %."]  # fmt: skip
    clus = report.get("clustering")
    if clus:
        lines += ["", "Phase 1 in the comparison's runs (every finished ATLAS / FL-TAC fit, each learning rate and "
                      "seed): the clusters against the true task and the task kind.", "",
                  "| method | signal | runs | K | ARI vs task | ARI vs kind |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for method in dict.fromkeys(c["method"] for c in clus):
            mine = [c for c in clus if c["method"] == method]
            ks = sorted({c["K"] for c in mine})
            task = [c["ari_task"] for c in mine]
            kind = [c["ari_kind"] for c in mine]
            lines.append(f"| {method} | {mine[0]['signal']} | {len(mine)} | {', '.join(map(str, ks))} | "
                         f"{min(task):.2f}–{max(task):.2f} | {min(kind):.2f}–{max(kind):.2f} |")  # fmt: skip
    ex = report.get("examples")
    if ex:
        lines += ["", "Generated answers (ATLAS, seed 0, test split, first example of each task):", ""]
        for task, items in ex.items():
            for e in items:
                refs = " / ".join(f"`{x}`" for x in e["references"][:3])
                lines.append(f"- **{task}** — generated `{e['prediction']}`; references {refs} "
                             f"(score {e['score']:.2f})")  # fmt: skip
    lines += ["", f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs, one torch thread per "
                  "run. Regenerate: the commands at the top of `benchmarks/mixed_kinds.py`.", ""]  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    kinds = task_kinds()
    primary = {t: compare.PRIMARY[k] for t, k in kinds.items()}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        vals = [next((r for r in rows if r["method"] == m and r["task"] == t and r["metric"] == primary[t]), None)
                for t in kinds]  # fmt: skip
        xs = [j + i * width for j in range(len(kinds))]
        ax.bar(xs, [v["mean"] if v else 0 for v in vals], width, yerr=[v["std"] if v else 0 for v in vals],
               label=m)  # fmt: skip
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(kinds))])
    ax.set_xticklabels([f"{t}\n({primary[t]})" for t in kinds])
    ax.set_ylabel("test score")
    ax.legend(fontsize=7, ncol=3)
    save_png(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="final seeds (as compare.py's --seeds)")
    p.add_argument("--tune-seeds", nargs="+", type=int, default=[0])
    p.add_argument("--stage", choices=("all", "runs", "report"), default="all",
                   help="runs: the zero-shot and profile runs only; report: only what is present")  # fmt: skip
    args = p.parse_args(argv)
    if args.stage != "report":
        for s in args.seeds:
            zero_shot(s)
        profile()
        if args.stage == "runs":
            return {}
    floors = {s: _read(RUNS / "zero_shot" / f"seed{s}" / "test_results.json")["metrics"] for s in args.seeds
              if (RUNS / "zero_shot" / f"seed{s}" / "test_results.json").exists()}  # fmt: skip
    runs = trained(args.seeds, args.tune_seeds)
    rows = table(floors, runs)
    prof = profile() if (RUNS / "profile" / "profile.rounds.json").exists() else None
    rounds = max((len(r.get("acc_per_round") or []) for r in compare.collect_rows(False, {})
                  if r["workload"] == WORKLOAD), default=0)  # fmt: skip
    report = {"settings": {"workload": WORKLOAD, "config": CONFIG, "seeds": args.seeds, "rounds": rounds,
                           "tune_seeds": args.tune_seeds},
              "machine": machine_info(), "table": rows, "zero_shot": floors,
              "profile": prof, "clustering": clusters(),
              "examples": examples()}  # fmt: skip
    write_report(RESULTS, "mixed_kinds", report, rows)
    plot(rows, RESULTS / "mixed_kinds.png")
    text = markdown(report)
    for readme in (ROOT / "benchmarks" / "README.md", ROOT / "README.md"):
        write_readme_section(readme, "mixed_kinds", "Tasks of different kinds", text)
    print(text)
    return report


if __name__ == "__main__":
    main()
