"""Dependencies point one way (DESIGN.md): checked by parsing every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package (or module) prefix -> prefixes it must never import
RULES = {
    "updater": ["edgeserve"],
    "edgeserve.runtime": [
        "edgeserve.protocol",
        "edgeserve.web",
        "edgeserve.app",
        "edgeserve.auth",
        "edgeserve.telemetry",
        "edgeserve.experiments",
        "starlette",
        "hypercorn",
    ],
    "edgeserve.experiments.stats": [
        "edgeserve.protocol",
        "edgeserve.web",
        "starlette",
        "edgeserve.registry",
        "scipy",
    ],
    "edgeserve.experiments.sequential": ["starlette", "scipy"],
    "edgeserve.experiments.distributions": ["scipy", "numpy"],
    "edgeserve.experiments.assignment": ["starlette", "edgeserve.registry"],
    "edgeserve.telemetry.store": [
        "edgeserve.protocol",
        "edgeserve.web",
        "starlette",
        "edgeserve.registry",
    ],
    "edgeserve.errors": ["starlette", "edgeserve"],
    "edgeserve.registry": ["edgeserve.protocol", "edgeserve.web", "starlette"],
    "edgeserve.batching": ["edgeserve.protocol", "edgeserve.web", "starlette"],
    "edgeserve.scheduling": ["edgeserve.protocol", "edgeserve.web", "starlette"],
    # the data plane is transport-free: adapters call it, it never calls them
    "edgeserve.serving": [
        "edgeserve.web",
        "edgeserve.streaming",
        "edgeserve.protocol.rest",
        "edgeserve.protocol.grpc_service",
        "edgeserve.protocol.grpc_stream",
        "edgeserve.protocol.grpc_codec",
        "starlette",
        "grpc",
        "tritonclient",
    ],
    # codecs are pure: no web framework, no registry, no data plane
    **{
        f"edgeserve.protocol.{codec}": [
            "starlette",
            "edgeserve.registry",
            "edgeserve.serving",
            "edgeserve.web",
        ]
        for codec in ("codec", "grpc_codec", "types", "limits", "integers")
    },
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


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
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
