"""The development lock (requirements/dev.lock, made by `make lock`): it satisfies pyproject's ranges, holds
every dependency with hashes, and is what this environment has installed (`make install` puts it there).

`make test-latest` runs the suite on the newest versions instead and sets POSEQUANT_UNLOCKED=1, which skips
the installed-equals-lock check only."""

from __future__ import annotations

import os
import re
import runpy
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "dev.lock"
lock_tools = runpy.run_path(str(REPO / "scripts" / "lock_diff.py"))
read_lock, normalize = lock_tools["read_lock"], lock_tools["normalize"]


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def _makefile_torch() -> str:
    m = re.search(r"^TORCH \?= torch==(\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert m, "the Makefile pins torch (TORCH ?= torch==X)"
    return m.group(1)


def test_lock_pins_every_package_with_hashes():
    text = LOCK.read_text()
    assert "make lock" in text.splitlines()[1], "made by `make lock` (its header says so)"
    pins = read_lock(LOCK)
    assert len(pins) > 20
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
    for entry in entries:
        if entry.strip() and not entry.startswith("#"):
            assert "--hash=sha256:" in entry, f"no hash: {entry.splitlines()[0]}"


def test_lock_satisfies_pyproject_ranges():
    """Each of pyproject's requirements (runtime and dev) is in the lock at a version its range allows;
    torch, installed first from the CPU build by the Makefile, at the Makefile's pin."""
    pins = read_lock(LOCK)
    wrong = []
    for req in _pyproject_requirements():
        name = normalize(req.name)
        version = _makefile_torch() if name == "torch" else pins.get(name)
        if version is None:
            wrong.append(f"{req.name} is not in the lock: run `make lock`")
        elif not req.specifier.contains(Version(version), prereleases=True):
            wrong.append(f"{req.name}=={version} is outside pyproject's {req}")
    assert not wrong, wrong
    assert "torch" not in pins  # one place pins torch: the Makefile, which installs the CPU build


def _requirements_of(dist: str, extras: tuple[str, ...] = ()) -> set[str]:
    """Every distribution ``dist`` (with ``extras``) needs here, recursively (markers evaluated)."""
    seen: set[str] = set()
    todo = [(dist, extras)]
    while todo:
        name, ex = todo.pop()
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in ex] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            key = normalize(req.name)
            if key not in seen:
                seen.add(key)
                todo.append((req.name, tuple(req.extras)))
    return seen


@pytest.mark.skipif(os.environ.get("POSEQUANT_UNLOCKED") == "1", reason="make test-latest: the newest versions")
def test_installed_versions_equal_the_lock():
    pins = read_lock(LOCK)
    differ = []
    for name, version in sorted(pins.items()):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = "not installed"
        if have != version:
            differ.append(f"{name} {have} (lock: {version})")
    torch = Version(metadata.version("torch")).base_version
    if torch != _makefile_torch():
        differ.append(f"torch {torch} (Makefile: {_makefile_torch()})")
    missing = sorted(_requirements_of("posequant", ("dev",)) - set(pins) - {"torch"})
    assert not differ and not missing, (
        f"installed differs from {LOCK.name}: {differ}; needed but not locked: {missing}. Run `make install` "
        "(or set POSEQUANT_UNLOCKED=1 for an environment you manage yourself)")
