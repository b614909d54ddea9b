"""Docs that cannot drift: every command is in the README, and has help with an example."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from edgeserve.cli.group import main

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _commands(group: click.Group, prefix: str = "edgeserve") -> list[tuple[str, click.Command]]:
    found = []
    for name, command in sorted(group.commands.items()):
        path = f"{prefix} {name}"
        found.append((path, command))
        if isinstance(command, click.Group):
            found += _commands(command, path)
    return found


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_top_level_command_is_in_the_readme(name: str) -> None:
    assert f"`edgeserve {name}" in README, f"README.md does not mention `edgeserve {name}`"


@pytest.mark.parametrize(("path", "command"), _commands(main), ids=[p for p, _ in _commands(main)])
def test_every_command_has_help(path: str, command: click.Command) -> None:
    assert (command.help or "").strip(), f"{path} has no help text"
