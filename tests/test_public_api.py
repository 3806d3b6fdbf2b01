"""The public API is importable as documented: sorted ``__all__`` everywhere, every name the docs use resolves."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
PACKAGES = [
    "atlas_pl",
    "atlas_pl.algorithms",
    "atlas_pl.callbacks",
    "atlas_pl.data",
    "atlas_pl.lora",
    "atlas_pl.memory",
    "atlas_pl.split",
]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md")), ROOT / "benchmarks" / "README.md"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_exports_a_sorted_all_whose_names_resolve(package: str) -> None:
    module = importlib.import_module(package)
    names = list(module.__all__)
    assert names == sorted(names), f"{package}.__all__ is not sorted"
    assert len(names) == len(set(names))
    for name in names:
        assert getattr(module, name) is not None, f"{package}.{name}"


def test_version_is_the_installed_distributions() -> None:
    import atlas_pl

    assert atlas_pl.__version__ == importlib.metadata.version("atlas-pl")


def _documented_imports() -> set[tuple[str, str]]:
    """``(module, name)`` for every ``from atlas_pl... import a, b`` and dotted ``atlas_pl.x.Name`` in the docs."""
    found: set[tuple[str, str]] = set()
    for doc in DOCS:
        if not doc.exists():
            continue
        text = doc.read_text()
        for module, grouped, inline in re.findall(r"from (atlas_pl[\w.]*) import (?:\(([^)]*)\)|([\w, ]+))", text):
            names = (grouped or inline).replace("\n", ",").split(",")
            found |= {(module, n.split(" as ")[0].strip()) for n in names if n.strip()}
        for dotted in re.findall(r"\b(atlas_pl(?:\.\w+)+)", text):
            module, _, name = dotted.rpartition(".")
            if name[:1].isupper():  # a class reference such as atlas_pl.callbacks.RoundCheckpoint
                found.add((module, name))
    return found


def _config_class_paths() -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for config in sorted((ROOT / "configs").glob("**/*.yaml")):
        for path in re.findall(r"class_path:\s*(atlas_pl[\w.]+)", config.read_text()):
            module, _, name = path.rpartition(".")
            found.add((module, name))
        yaml.safe_load(config.read_text())
    return found


def test_every_name_the_docs_and_configs_use_imports() -> None:
    names = _documented_imports() | _config_class_paths()
    assert ("atlas_pl.callbacks", "TaskClustering") in names, "the README shows the reusable callbacks' import"
    for module, name in sorted(names):
        assert hasattr(importlib.import_module(module), name), f"documented `{module}.{name}` does not exist"


def test_the_phase_callbacks_import_as_the_design_note_shows() -> None:
    from atlas_pl.callbacks import ClusterAggregation, RankAllocation, TaskClustering

    assert {c.__name__ for c in (ClusterAggregation, RankAllocation, TaskClustering)} == {
        "ClusterAggregation", "RankAllocation", "TaskClustering"}  # fmt: skip
