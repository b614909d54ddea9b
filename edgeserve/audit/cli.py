"""`edgeserve audit verify|show`: check the audit log's chain, print its entries."""

from __future__ import annotations

import datetime
import sys
import unicodedata
from pathlib import Path

import click
import orjson

from edgeserve.audit import chain
from edgeserve.audit.log import read_entries
from edgeserve.auth.secret_files import KeyFileError
from edgeserve.cli.options import CONFIG_OPTION, load_or_exit
from edgeserve.config.schema import ConfigError


@click.group("audit")
def audit() -> None:
    """The audit log in <state_dir>/audit.db: verify its hash chain, show entries.

    Example: edgeserve audit verify --config /etc/edgeserve/edgeserve.toml
    """


@audit.command("verify")
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify_command(config_path: Path | None, as_json: bool) -> None:
    """Walk the hash chain from its signed anchor; exit 1 naming the first bad row.

    Example: edgeserve audit verify
    """
    settings = load_or_exit(config_path)
    state_dir = settings.server.state_dir
    try:
        conn = chain.connect(chain.db_path(state_dir), create=False)
    except FileNotFoundError:
        click.echo(f"edgeserve: no audit log at {chain.db_path(state_dir)}", err=True)
        sys.exit(1)
    try:
        key = chain.load_key(chain.key_path(state_dir), create=False)
        report = chain.verify(conn, key)
    except ConfigError as exc:
        click.echo(f"edgeserve: {exc}", err=True)
        sys.exit(1)
    except KeyFileError as exc:
        click.echo(f"edgeserve: audit key refused: {exc}", err=True)
        sys.exit(1)
    finally:
        conn.close()
    if as_json:
        click.echo(orjson.dumps(report.__dict__).decode())
    elif report.ok:
        first, last = report.anchor_seq + 1, report.head_seq
        click.echo(f"audit chain intact: {report.rows} rows, seq {first}..{last}")
    else:
        click.echo(f"audit chain broken at row {report.first_bad_seq}: {report.problem}", err=True)
    if not report.signatures_checked and not as_json:
        click.echo("warning: audit key not readable; checkpoint signatures not checked", err=True)
    sys.exit(0 if report.ok else 1)


@audit.command("show")
@CONFIG_OPTION
@click.option("--since", "since_seq", type=int, default=0, help="Only rows after this seq.")
@click.option("--limit", type=click.IntRange(1, 100000), default=50, help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def show_command(config_path: Path | None, since_seq: int, limit: int, as_json: bool) -> None:
    """Print audit entries, oldest first.

    Example: edgeserve audit show --since 120 --limit 20
    """
    settings = load_or_exit(config_path)
    path = chain.db_path(settings.server.state_dir)
    try:
        rows = read_entries(path, since_seq, 0, limit)
    except FileNotFoundError:
        click.echo(f"edgeserve: no audit log at {path}", err=True)
        sys.exit(1)
    for row in rows:
        if as_json:
            click.echo(terminal_safe(orjson.dumps(row).decode()))
            continue
        when = datetime.datetime.fromtimestamp(row["time_ms"] / 1000, datetime.timezone.utc)
        click.echo(
            terminal_safe(
                f"{row['seq']} {when:%Y-%m-%dT%H:%M:%SZ} {row['action']} "
                f"target={row['target']} outcome={row['outcome']} "
                f"subject={row['subject'] or '-'} client={row['client'] or '-'} "
                f"detail={orjson.dumps(row['detail']).decode()}"
            )
        )


def terminal_safe(text: str) -> str:
    """`text` with every control or format character written as a `\\uXXXX` escape:
    a path or reason a client chose reaches the operator's terminal as text, never as an
    escape sequence (ESC, CSI, OSC, BEL) or a bidi override. Valid inside JSON too."""
    return "".join(
        f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cc", "Cf") else c for c in text
    )
