"""The `edgeserve` command: one click group, one subcommand per job.

Exit codes: 0 success, 1 failure, 2 usage or configuration error, 3 (`serve`) the HTTP
or gRPC port is in use.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from edgeserve.audit.cli import audit
from edgeserve.auth.cli import keys, token
from edgeserve.cli.bench import bench
from edgeserve.cli.options import CONFIG_OPTION, load_or_exit
from edgeserve.cli.preflight import EXIT_PORT_IN_USE, PortInUse, check_before_serving
from edgeserve.config.loader import ConfigError, Settings, find_config
from edgeserve.experiments.cli import experiment
from edgeserve.offline.cli import batch_group, features_group
from edgeserve.telemetry.cli import telemetry
from edgeserve.updates.cli import bundle, update
from edgeserve.updates.keys_cli import KEY_COMMANDS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeserve")
def main() -> None:
    """edgeserve: serve ONNX Runtime and OpenVINO models over the Open Inference Protocol.

    Example: edgeserve serve --config /etc/edgeserve/edgeserve.toml
    """


@main.command()
@CONFIG_OPTION
@click.option("--host", default=None, help="Address to bind (overrides [server] host).")
@click.option("--port", type=int, default=None, help="Port to bind (overrides [server] port).")
def serve(config_path: Path | None, host: str | None, port: int | None) -> None:
    """Serve the model repository over HTTP (and gRPC with [server] grpc_port).

    The config is --config, else $EDGESERVE_CONFIG, else ./edgeserve.toml, else
    /etc/edgeserve/edgeserve.toml. Exit codes: 1 failed, 2 usage or config error, 3 a
    port is in use.

    Example: edgeserve serve --port 8080
    """
    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    choice = find_config(config_path)
    settings = load_or_exit(choice.path, {"server": overrides} if overrides else None)
    configure_logging(settings.server.log_level)
    if choice.path is None:
        logging.getLogger(__name__).info("config file=none (built-in defaults)")
    else:
        logging.getLogger(__name__).info("config file=%s from=%s", choice.path, choice.reason)
    try:
        listener = check_before_serving(settings)  # before anything is written
    except ConfigError as exc:
        click.echo(f"edgeserve: config error: {exc}", err=True)
        raise SystemExit(2) from None
    except PortInUse as exc:
        click.echo(f"edgeserve: {exc}", err=True)
        raise SystemExit(EXIT_PORT_IN_USE) from None
    refuse_loose_key_files(settings)
    ensure_local_issuer(settings)
    from edgeserve.server import event_loop_runner, run_server

    try:
        event_loop_runner(settings.server.event_loop)(run_server(settings, listener))
    except ConfigError as exc:
        click.echo(f"edgeserve: config error: {exc}", err=True)
        raise SystemExit(2) from None
    except OSError as exc:
        click.echo(f"edgeserve: cannot serve: {exc.strerror or exc}", err=True)
        raise SystemExit(1) from None


def refuse_loose_key_files(settings: Settings) -> None:
    """Exit 2 before serving when the token signing key or audit.key can be read by group
    or others, as the server does for the master key (one check: updater.masterkey)."""
    from edgeserve.audit import chain
    from edgeserve.auth.issuer import check_signing_key_mode

    state_dir = settings.server.state_dir
    try:
        check_signing_key_mode(state_dir)
        chain.load_key(chain.key_path(state_dir), create=False)
    except (ValueError, ConfigError) as exc:
        click.echo(f"edgeserve: config error: {exc}", err=True)
        raise SystemExit(2) from None


def ensure_local_issuer(settings: Settings) -> None:
    """A box with no identity provider gets its own token signing key on first start, so
    `edgeserve token create` works right after the first `edgeserve serve`."""
    auth = settings.auth
    if not auth.enabled or auth.jwks_url or auth.jwks_file:
        return
    from edgeserve.auth.issuer import SIGNING_KEY_NAME, init_keys, keys_dir

    folder = keys_dir(settings.server.state_dir)
    if not (folder / SIGNING_KEY_NAME).exists():
        init_keys(settings.server.state_dir)
        logging.getLogger(__name__).info(
            "created local token signing key folder=%s; mint tokens with: edgeserve token create",
            folder,
        )


def configure_logging(level: str) -> None:
    """key=value lines on stderr, one per event."""
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="time=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s",
    )


def run(argv: list[str] | None = None) -> int:
    """Entry point that returns the exit code instead of exiting (for tests)."""
    try:
        main.main(args=argv, prog_name="edgeserve", standalone_mode=False)
    except click.exceptions.UsageError as exc:
        exc.show()
        return 2
    except click.exceptions.Abort:
        return 1
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


main.add_command(keys)
main.add_command(token)
main.add_command(batch_group)
main.add_command(experiment)
main.add_command(telemetry)
main.add_command(features_group)
main.add_command(bench)
main.add_command(bundle)
main.add_command(update)
main.add_command(audit)
for _command in KEY_COMMANDS:  # update keys join the auth `keys` group
    keys.add_command(_command)
