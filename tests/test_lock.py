"""packaging/lock/: the dev environment is pinned with hashes and matches pyproject.toml, so
that a fresh machine installs what the suite passed with (install.sh --dev reads it)."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "packaging" / "lock" / "dev.txt"
SERVE_LOCK = ROOT / "packaging" / "lock" / "serve.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\]+)", re.M)


def pins(text: str) -> dict[str, str]:
    return {canonicalize_name(name): version for name, version in PIN.findall(text)}


def locked_python(text: str) -> str | None:
    """The version install.sh reads from the first line (its `sed` expression)."""
    match = re.match(r"# python ([0-9.]+),", text)
    return match[1] if match else None


def dev_requirements() -> list[Requirement]:
    """pyproject.toml's dependencies and every extra that `dev` pulls in, for this Python."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    found = [Requirement(r) for r in project["dependencies"]]
    todo, seen = ["dev"], set()
    while todo:
        extra = todo.pop()
        seen.add(extra)
        for text in extras[extra]:
            req = Requirement(text)
            if req.name == "edgeserve":
                todo += [e for e in req.extras if e not in seen]
            else:
                found.append(req)
    return [r for r in found if r.marker is None or r.marker.evaluate()]


def test_every_direct_dependency_is_pinned_within_its_range() -> None:
    locked = pins(LOCK.read_text())
    for req in dev_requirements():
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is not in {LOCK.name}: run packaging/lock/refresh.sh"
        assert req.specifier.contains(locked[name], prereleases=True), (req, locked[name])


@pytest.mark.parametrize("lock", [LOCK, SERVE_LOCK], ids=["dev", "serve"])
def test_every_pin_carries_a_hash(lock: Path) -> None:
    entries = re.split(r"\n(?=[A-Za-z0-9])", lock.read_text())
    unhashed = [e.split()[0] for e in entries if PIN.match(e) and "--hash=sha256:" not in e]
    assert not unhashed


def test_install_sh_requires_the_hashes_for_both_sets() -> None:
    """A tampered mirror or index cannot swap a package under `install.sh --serve` either."""
    script = (ROOT / "install.sh").read_text()
    assert 'hashes=""' not in script
    assert "--require-hashes" in script
    refresh = (ROOT / "packaging" / "lock" / "refresh.sh").read_text()
    serve_line = next(
        line for line in refresh.splitlines() if "compile packaging/lock/serve" in line
    )
    assert "--generate-hashes" in serve_line


def test_the_header_names_the_python_install_sh_compares() -> None:
    assert locked_python(LOCK.read_text()) == "3.11"
    assert locked_python("aiohttp==1\n") is None


def test_this_environment_is_the_locked_one() -> None:
    text = LOCK.read_text()
    running = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if locked_python(text) != running:
        pytest.skip(f"the lock is for Python {locked_python(text)}; install.sh went unpinned")
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    drift = {
        name: (version, installed.get(name))
        for name, version in pins(text).items()
        if installed.get(name) != version
    }
    assert not drift, f"installed differs from {LOCK.name} (rerun ./install.sh --dev): {drift}"
