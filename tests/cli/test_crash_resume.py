"""A killed ``atlas-pl fit`` loses no completed round: SIGKILL after a round, or during a checkpoint write, then resume.

Each run is a real ``python -m atlas_pl fit`` subprocess on the demo config shrunk to a tiny model (one torch thread, so
the killed-and-resumed run and the uninterrupted one compute bit for bit the same).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.cli.test_cli import TINY

ROOT = Path(__file__).parents[2]
ROUNDS = 8
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


def _args(save_dir: Path, *extra: str) -> list[str]:
    return ["fit", "--config", "configs/demo.yaml", "--trainer.logger.init_args.save_dir", str(save_dir),
            "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", str(ROUNDS), *TINY, *extra]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}  # fmt: skip


def _start(save_dir: Path, *extra: str, script: str | None = None) -> subprocess.Popen:
    head = [sys.executable, "-c", script] if script else [sys.executable, "-m", "atlas_pl"]
    log = open(save_dir.parent / f"{save_dir.name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([*head, *_args(save_dir, *extra)], cwd=ROOT, env=_env(), stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip


def _finish(proc: subprocess.Popen, save_dir: Path, timeout: float = 300) -> None:
    code = proc.wait(timeout=timeout)
    log = (save_dir.parent / f"{save_dir.name}.log").read_text()
    assert code == 0, f"atlas-pl exited with {code}:\n{log[-3000:]}"


def _rounds_in(path: Path) -> int:
    try:
        return len(torch.load(path, weights_only=False)["federation"]["history"])
    except (OSError, EOFError, RuntimeError):
        return 0


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "the run ended before the moment the test waits for"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def _final(save_dir: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    checkpoint = torch.load(save_dir / "demo" / "checkpoints" / "last.ckpt", weights_only=False)
    results = sorted((save_dir / "demo").glob("version_*/results.json"))[-1]
    return checkpoint["state_dict"], json.loads(results.read_text())["history"]


def _assert_same_run(a: tuple, b: tuple) -> None:
    (state_a, history_a), (state_b, history_b) = a, b
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], rtol=0, atol=0)
    assert len(history_a) == ROUNDS
    assert history_b == history_a


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple:
    save_dir = tmp_path_factory.mktemp("full") / "logs"
    _finish(_start(save_dir), save_dir)
    return _final(save_dir)


def test_sigkill_after_round_2_then_resume_from_last_matches_an_uninterrupted_run(tmp_path, uninterrupted) -> None:
    save_dir = tmp_path / "logs"
    last = save_dir / "demo" / "checkpoints" / "last.ckpt"
    proc = _start(save_dir)
    _wait_for(lambda: _rounds_in(last) >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survived = _rounds_in(last)
    assert 2 <= survived < ROUNDS, "the kill must land mid-run"
    _finish(_start(save_dir, "--ckpt_path", "last"), save_dir)
    _assert_same_run(uninterrupted, _final(save_dir))


BLOCKING_WRITE = textwrap.dedent(
    """
    import contextlib, pathlib, sys, time
    import atlas_pl.io
    from atlas_pl.cli import main

    real_open, writes = atlas_pl.io.atomic_open, []

    @contextlib.contextmanager
    def open_then_block(path):  # the 3rd last.ckpt write stops half-way through its bytes and never returns
        with real_open(path) as f:
            yield f
            if pathlib.Path(path).name == "last.ckpt":
                writes.append(path)
                if len(writes) == 3:
                    f.truncate(f.tell() // 2)
                    f.flush()
                    pathlib.Path(sys.argv[sys.argv.index("--trainer.logger.init_args.save_dir") + 1], "blocked").touch()
                    time.sleep(3600)

    atlas_pl.io.atomic_open = open_then_block
    main(sys.argv[1:])
    """
)


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_round_loadable(tmp_path, uninterrupted) -> None:
    save_dir = tmp_path / "logs"
    folder = save_dir / "demo" / "checkpoints"
    proc = _start(save_dir, script=BLOCKING_WRITE)
    _wait_for(lambda: (save_dir / "blocked").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = list(folder.glob(".last.ckpt.*.tmp"))
    assert len(partial) == 1, "the killed write left its temporary file"
    with pytest.raises((RuntimeError, EOFError, OSError)):
        torch.load(partial[0], weights_only=False)
    assert _rounds_in(folder / "last.ckpt") == 2, "last.ckpt still holds round 2 (the 3rd write never landed)"
    _finish(_start(save_dir, "--ckpt_path", "last"), save_dir)
    assert not partial[0].exists(), "the stale temporary file is removed on resume"
    _assert_same_run(uninterrupted, _final(save_dir))
