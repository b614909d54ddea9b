"""What every `edgeserve` subcommand shares: the --config and --json options, loading the
config with one-line errors (exit 2), and failing with one line (exit 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import click

from edgeserve.config.loader import ConfigError, Settings, find_config, load_settings

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Config file (default: $EDGESERVE_CONFIG, else ./edgeserve.toml, else "
    "/etc/edgeserve/edgeserve.toml, else built-in defaults).",
)
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def load_or_exit(path: Path | None, overrides: dict[str, Any] | None = None) -> Settings:
    """Settings from the config file in effect (`find_config`), or one line naming the
    bad key and exit code 2; then crash recovery."""
    try:
        settings = load_settings(find_config(path).path, overrides)
    except ConfigError as exc:
        click.echo(f"edgeserve: config error: {exc}", err=True)
        raise SystemExit(2) from None
    from edgeserve.updates.recovery import recover_box  # heavy imports, only when needed

    recover_box(settings)  # every command first finishes or undoes what a crash left
    return settings


def fail(message: str) -> NoReturn:
    """One line on stderr and exit code 1."""
    click.echo(f"edgeserve: {message}", err=True)
    raise SystemExit(1)
