"""The committed tree is portable: no text file holds a path of one developer's machine."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# an absolute path into a home, work or virtual-environment folder (Linux, macOS, Windows)
MACHINE_PATH = re.compile(
    r"(?<![\w.<~-])(/(home|root|work|Users)/[\w.-]+|/[\w./-]*\bv?env/(bin|lib)/|[A-Za-z]:\\+Users\\+)"
)


def _committed_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = []
    for name in out.decode().split("\0"):
        path = ROOT / name
        if name and path.is_file() and b"\0" not in path.read_bytes()[:8192]:
            files.append(path)
    return files


def test_the_pattern_catches_machine_paths_and_spares_relative_ones() -> None:
    slash, back = "/", "\\"  # the examples are built, so that this file does not hold them literally
    bad = [f"{slash}home/ada/atlas/x.py", f"cd {slash}root/project", f"{slash}opt/venv/bin/python",
           f"C:{back}Users{back}ada", f"{slash}work/main/a"]  # fmt: skip
    good = [".venv/bin/atlas-pl", "../shared/data", "python benchmarks/compare.py", "<env>/lib/python3.11", "~/x"]
    assert all(MACHINE_PATH.search(s) for s in bad)
    assert not any(MACHINE_PATH.search(s) for s in good)


def test_no_committed_text_file_contains_an_absolute_machine_path() -> None:
    offenders = []
    for path in _committed_text_files():
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            match = MACHINE_PATH.search(line)
            if match:
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {match.group(0)}")
    assert not offenders, "machine paths committed:\n" + "\n".join(offenders[:20])


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements-lock.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            assert pinned, f"requirements-lock.txt: {line!r} is not an exact pin"
            pins[name.strip().lower().replace("_", "-")] = pinned.strip()
    return pins


def test_the_lock_pins_every_declared_dependency_inside_its_declared_range() -> None:
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    pins = _lock()
    assert pins["torch"] == "2.13.0"
    for spec in declared:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is declared in pyproject.toml but not pinned in requirements-lock.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req.specifier}"
