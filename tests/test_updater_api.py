"""The updater's public surface: `__all__` is exact, and `updater` never imports edgeserve."""

from __future__ import annotations

import ast
from pathlib import Path

import updater

PACKAGE = Path(updater.__file__).parent


def test_all_names_exist_and_every_public_name_is_listed() -> None:
    assert len(set(updater.__all__)) == len(updater.__all__)  # order: ruff RUF022
    for name in updater.__all__:
        assert hasattr(updater, name), name
    public = {n for n in vars(updater) if not n.startswith("_")}
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert public - modules - {"annotations"} == set(updater.__all__)


def test_updater_never_imports_edgeserve() -> None:
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith("edgeserve"), f"{path.name} imports {name}"
