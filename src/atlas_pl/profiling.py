"""Where a step's memory and a round's time go, measured the same way by benchmarks, tests and users.

Time: :func:`section` marks the parts of a split step as actions of the Trainer's profiler, and
:class:`RoundProfiler` (``--trainer.profiler atlas_pl.profiling.RoundProfiler``) adds every action up per round and
splits each round into client steps, server steps, channel, optimizers, aggregation, evaluation (the generation of
QA / summarization answers apart), checkpointing, logging, data and the rest.

Memory: peak memory of one step.

CPU: the torch profiler's memory events (``profile_memory=True``); the peak is the highest running total of CPU
tensor bytes allocated during the step — the CPU analogue of CUDA's ``max_memory_allocated``. CUDA:
``max_memory_allocated`` after ``reset_peak_memory_stats`` minus ``memory_allocated`` before the step.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from statistics import median
from typing import Any

import torch


def cpu_peak_bytes(step: Callable[[], Any]) -> int:
    """Highest running total of CPU tensor bytes allocated during ``step()`` (torch profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    finally:
        os.remove(path)
    total = peak = 0
    for e in sorted((e for e in events if e["args"].get("Device Type", 0) == 0), key=lambda e: e["ts"]):
        total += e["args"]["Bytes"]
        peak = max(peak, total)
    return peak


def cuda_peak_bytes(step: Callable[[], Any]) -> int:
    """``max_memory_allocated`` during ``step()`` minus ``memory_allocated`` before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


# ---------------------------------------------------------------------------------------------- round profile
_PROFILER: Any = None  # the Lightning profiler that ``section`` reports to (set by ``Federation`` while it fits)
_SYNC = False  # synchronize CUDA around sections (only while a profiler records, so timings land where they belong)


def use_profiler(profiler: Any) -> None:
    """Report :func:`section` timings to ``profiler`` (a Lightning ``Profiler``); ``None`` or a pass-through stops it.

    ``Federation`` calls it when fitting starts (with ``trainer.profiler``) and ends.
    """
    global _PROFILER, _SYNC
    from lightning.pytorch.profilers import PassThroughProfiler

    _PROFILER = None if profiler is None or isinstance(profiler, PassThroughProfiler) else profiler
    _SYNC = _PROFILER is not None and torch.cuda.is_available() and torch.cuda.is_initialized()


@contextmanager
def section(name: str) -> Iterator[None]:
    """Time the block as the profiler action ``name`` (a no-op unless a profiler is in use: see :func:`use_profiler`).

    The split step marks ``split/client_forward``, ``split/channel``, ``split/server``, ``split/client_backward``
    and ``split/optimizers``; the federation marks ``federation/logging``;
    evaluation marks ``evaluation/generate``. On CUDA the device is synchronized at both
    ends while profiling, so asynchronous kernels are charged to the section that launched them.
    """
    profiler = _PROFILER
    if profiler is None:
        yield
        return
    if _SYNC:
        torch.cuda.synchronize()
    with profiler.profile(name):
        yield
        if _SYNC:
            torch.cuda.synchronize()


PARTS = ("client", "server", "channel", "optimizers", "step_other", "aggregation", "evaluation", "generation",
         "checkpoint", "logging", "data", "other")  # fmt: skip
"""The parts of a round :class:`RoundProfiler` reports, in table order (``round`` is their sum)."""

_RULES: tuple[tuple[str, str], ...] = (  # (substring of the action name, part); the first match wins
    ("split/client_", "client"),
    ("split/server", "server"),
    ("split/channel", "channel"),
    ("split/optimizers", "optimizers"),
    ("federation/logging", "logging"),
    ("evaluation/generate", "generation"),
    ("FederatedResults", "logging"),
    ("FederatedProgress", "logging"),
    ("Aggregation", "aggregation"),
    ("checkpoint", "checkpoint"),
    ("Checkpoint", "checkpoint"),
    ("validation", "evaluation"),
    ("val_next", "evaluation"),
    ("train_dataloader_next", "data"),
    ("batch_to_device", "data"),
    (".training_step", "step_other"),
)


_FIT_END = (".on_train_end", ".on_fit_end", ".teardown")  # hooks after the last round's own work (not counted)


def part_of(action: str, parent: str | None) -> str:
    """The part of a round an action's own time belongs to: by its name, else its enclosing action's part."""
    for key, part in _RULES:
        if key in action:
            return part
    return parent or "other"


try:
    from lightning.pytorch.profilers import SimpleProfiler as _SimpleProfiler
except ImportError:  # pragma: no cover - lightning is a dependency
    _SimpleProfiler = object  # type: ignore[assignment,misc]


class RoundProfiler(_SimpleProfiler):  # type: ignore[misc,valid-type]
    """Lightning's ``SimpleProfiler`` that also splits every federated round into its parts.

    ``--trainer.profiler atlas_pl.profiling.RoundProfiler`` (or ``Trainer(profiler=RoundProfiler())``). Every
    action's *own* time (its duration minus that of the actions nested in it) goes to one part of :data:`PARTS`: the
    split step's sections (:func:`section`) to ``client``, ``server``, ``channel`` and ``optimizers``, the rest of the
    training step to ``step_other``, aggregation callbacks to ``aggregation``, the validation loop to ``evaluation``,
    checkpoint writing to ``checkpoint``, round logging, results and progress bars to ``logging``, batch fetching to
    ``data``, and the loop itself to ``other``; an action with no rule of its own takes its enclosing action's part
    (a callback's ``on_after_backward`` inside the server's backward is server time). A round ends when Lightning's
    ``run_training_epoch`` action ends (validation runs inside it); what runs between two rounds (the round-end hooks:
    checkpoint, results) counts to the earlier one, what runs after the last one up to ``on_train_end`` to the last
    one, what runs before the first (phases 1 and 2 in ``on_fit_start``) to :attr:`before_rounds`.

    Args:
        dirpath, filename: As ``SimpleProfiler``; with a ``filename`` the per-round breakdown is also written as
            ``<filename>.rounds.json`` next to the report.
        extended: As ``SimpleProfiler``.

    Attributes:
        rounds: One dict per finished round: seconds per part and ``round`` (their sum).
        before_rounds: Seconds per part before the first round.
    """

    def __init__(self, dirpath: Any = None, filename: str | None = None, extended: bool = True) -> None:
        super().__init__(dirpath=dirpath, filename=filename, extended=extended)
        self.rounds: list[dict[str, float]] = []
        self.before_rounds: dict[str, float] = {}
        self._stack: list[tuple[str, str]] = []  # (action, part) of the running actions, outermost first
        self._nested: list[float] = []  # time of the actions nested in each running action
        self._bucket: dict[str, float] = dict.fromkeys(PARTS, 0.0)
        self._tail: bool | None = False  # True between a round's end and the next action that starts a round or ends

    def start(self, action_name: str) -> None:  # noqa: D102
        if not self._stack:
            if action_name == "run_training_epoch":  # what ran since the last round (or before the first) is closed
                self._close_bucket(into_last=True)
            elif self._tail and any(k in action_name for k in _FIT_END):  # the fit ends: the last round is complete
                self._close_bucket(into_last=True)
                self._tail = None  # what follows is not a round's
        super().start(action_name)
        parent = self._stack[-1][1] if self._stack else None
        self._stack.append((action_name, part_of(action_name, parent)))
        self._nested.append(0.0)

    def stop(self, action_name: str) -> None:  # noqa: D102
        super().stop(action_name)
        duration = self.recorded_durations[action_name][-1]
        at = max((i for i, (a, _) in enumerate(self._stack) if a == action_name), default=None)
        if at is None:  # started before this profiler saw it
            return
        _, part = self._stack.pop(at)
        nested = self._nested.pop(at)
        if self._tail is not None:  # after the fit's end nothing is counted (``_tail`` is None)
            self._bucket[part] += max(0.0, duration - nested)
        if at > 0:
            self._nested[at - 1] += duration
        if action_name == "run_training_epoch" and not self._stack:
            self._close_bucket(into_last=False)
            self._tail = True

    def _close_bucket(self, into_last: bool) -> None:
        bucket, self._bucket = self._bucket, dict.fromkeys(PARTS, 0.0)
        if not into_last:  # a round just ended
            self.rounds.append({**bucket, "round": sum(bucket.values())})
            return
        if self._tail is None:
            return
        target = self.rounds[-1] if self.rounds else self.before_rounds  # between rounds: the earlier one's; else setup
        for part, seconds in bucket.items():
            target[part] = target.get(part, 0.0) + seconds
        if self.rounds:
            target["round"] = sum(target[p] for p in PARTS)

    def breakdown(self, skip_first: bool = True) -> dict[str, float]:
        """Median seconds per part over the rounds (the first left out as warm-up when there are more than one)."""
        rounds = self.rounds[1:] if skip_first and len(self.rounds) > 1 else self.rounds
        if not rounds:
            return {}
        return {k: float(median(r[k] for r in rounds)) for k in (*PARTS, "round")}

    def summary(self) -> str:  # noqa: D102
        out = super().summary()
        med = self.breakdown()
        if not med:
            return out
        rows = [f"{'part':<12}  {'s / round':>10}  {'share':>7}"]
        rows += [f"{p:<12}  {med[p]:>10.4f}  {100 * med[p] / max(med['round'], 1e-12):>6.1f}%" for p in PARTS]
        rows.append(f"{'round':<12}  {med['round']:>10.4f}  {100.0:>6.1f}%")
        head = f"Round profile: median of {max(1, len(self.rounds) - 1)} round(s), first left out as warm-up"
        return out + os.linesep + head + os.linesep + os.linesep.join(rows) + os.linesep

    def teardown(self, stage: str | None) -> None:  # noqa: D102
        if self._tail:
            self._close_bucket(into_last=True)
        self._tail = None
        if self.filename and self.rounds and self.dirpath is not None:
            os.makedirs(self.dirpath, exist_ok=True)
            path = os.path.join(str(self.dirpath), self._prepare_filename(extension=".rounds.json"))
            with open(path, "w") as f:
                json.dump({"parts": list(PARTS), "before_rounds": self.before_rounds, "rounds": self.rounds}, f,
                          indent=1)  # fmt: skip
        super().teardown(stage)
