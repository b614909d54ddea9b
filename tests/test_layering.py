"""Dependencies point one way (DESIGN.md): checked by parsing every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TRANSPORTS = ["starlette", "hypercorn", "uvicorn", "grpc", "edgeserve.http", "edgeserve.grpc"]

# package (or module) prefix -> prefixes it must never import
RULES = {
    "updater": ["edgeserve"],
    # pure codecs: no web framework, no transport, no registry (the data plane is above them)
    "edgeserve.protocol": [
        *TRANSPORTS,
        "edgeserve.serving",
        "edgeserve.app",
        "edgeserve.auth",
        "edgeserve.telemetry",
        "edgeserve.experiments",
    ],
    "edgeserve.runtime": [
        *TRANSPORTS,
        "edgeserve.protocol",
        "edgeserve.serving",
        "edgeserve.app",
        "edgeserve.auth",
        "edgeserve.telemetry",
        "edgeserve.experiments",
    ],
    # the data plane serves every transport and knows none of them, nor their messages
    "edgeserve.serving": [
        *TRANSPORTS,
        "tritonclient",
        "edgeserve.protocol.grpc_codec",
        "edgeserve.app",
    ],
    "edgeserve.serving.registry": ["edgeserve.protocol"],
    "edgeserve.serving.batcher": ["edgeserve.protocol"],
    "edgeserve.serving.scheduler": ["edgeserve.protocol"],
    "edgeserve.experiments.stats": [
        *TRANSPORTS,
        "edgeserve.protocol",
        "edgeserve.serving",
        "scipy",
    ],
    "edgeserve.experiments.sequential": ["starlette", "scipy"],
    "edgeserve.experiments.distributions": ["scipy", "numpy"],
    "edgeserve.experiments.assignment": ["starlette", "edgeserve.serving"],
    "edgeserve.telemetry.store": [*TRANSPORTS, "edgeserve.protocol", "edgeserve.serving"],
    "edgeserve.errors": ["starlette", "edgeserve"],
    # one loader over the sections each package defines; no server parts
    "edgeserve.config.loader": [*TRANSPORTS, "edgeserve.serving", "edgeserve.app"],
    "edgeserve.config.schema": ["edgeserve"],
    # batch scoring and Spark run without a server
    "edgeserve.offline": [*TRANSPORTS, "edgeserve.app"],
    # what the process needs from its host knows nothing of what it serves
    "edgeserve.process": ["edgeserve"],
    "edgeserve.protocol.integers": ["edgeserve", "starlette", "numpy"],
}
# Pure leaves (they import nothing of ours, by the rule above) that every layer may use:
# the one parser of client integers is the registry's as much as the codecs'.
LEAVES = {"edgeserve.protocol.integers"}


def _modules() -> list[tuple[str, Path]]:
    found = []
    for package in ("edgeserve", "updater"):
        for path in (ROOT / package).rglob("*.py"):
            if "grpc_gen" in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found.append((".".join(parts), path))
    return found


MODULES = {module for module, _ in _modules()}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            submodules = (f"{node.module}.{alias.name}" for alias in node.names)
            names.update(name for name in submodules if name in MODULES)
    return names


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize(("module", "path"), _modules(), ids=[m for m, _ in _modules()])
def test_module_imports_follow_the_layering(module: str, path: Path) -> None:
    forbidden = [
        bad
        for owner, bans in RULES.items()
        if _matches(module, owner)
        for bad in bans
        if not _matches(module, bad)
    ]
    wrong = sorted(
        name for name in _imports(path) - LEAVES for bad in forbidden if _matches(name, bad)
    )
    assert not wrong, f"{module} imports {wrong}, against the layering in DESIGN.md"


def test_only_the_data_plane_runs_a_model() -> None:
    """Every transport infers through edgeserve/serving/pipeline.py (issue 17): a
    `.infer(...)` call anywhere else in the server is a copy of the path that will drift
    (the runtimes' own backend calls are below the batcher and do not count)."""
    callers = []
    for module, path in _modules():
        if module == "edgeserve.serving.pipeline" or module.startswith(
            ("edgeserve.runtime", "updater")
        ):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            call = node.func if isinstance(node, ast.Call) else None
            if isinstance(call, ast.Attribute) and call.attr == "infer":
                callers.append(f"{module}:{node.lineno}")
    assert not callers, f"model.infer called outside the data plane: {callers}"


def test_no_module_is_named_after_nothing() -> None:
    vague = {"utils", "helpers", "common", "misc"}
    assert not [m for m, _ in _modules() if m.rsplit(".", 1)[-1] in vague]


def test_only_the_entry_point_imports_the_cli_group() -> None:
    """Command modules import edgeserve/cli/options.py; the group imports them, so a
    command module that imported the group would be a cycle (issue 17)."""
    group = "edgeserve.cli.group"
    importers = sorted(
        module
        for module, path in _modules()
        if module not in (group, "edgeserve.__main__")
        and any(_matches(name, group) for name in _imports(path))
    )
    assert not importers, f"{importers} import {group}; import edgeserve.cli.options instead"


def test_the_readme_lists_every_package() -> None:
    """A newcomer reads the folder tree in README's "What is where": every package, one job."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## What is where", 1)[1].split("\n## ", 1)[0]
    packages = sorted(p.parent.relative_to(ROOT).as_posix() for p in ROOT.glob("*/*/__init__.py"))
    packages = [p for p in packages if p.startswith("edgeserve/")]
    missing = [p for p in packages if f"`{p}/`" not in section]
    assert not missing, f"README.md 'What is where' does not list {missing}"
