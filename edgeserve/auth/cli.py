"""`edgeserve keys ...` and `edgeserve token ...`: the local issuer and TLS for a box
without an identity provider or a PKI. Registered in edgeserve/cli/group.py.

Exit codes: 0 success, 1 failure, 2 usage or configuration error.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import click

from edgeserve.audit.offline import audit_command
from edgeserve.auth import issuer, tls
from edgeserve.auth.authenticator import jwks_path
from edgeserve.auth.principal import ALL_SCOPES
from edgeserve.cli.options import CONFIG_OPTION, fail, load_or_exit
from edgeserve.config.loader import Settings
from edgeserve.errors import EdgeserveError

TTL_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(ctx: click.Context | None, param: click.Parameter | None, value: str) -> int:
    """'90s', '30m', '1h', '7d' or plain seconds."""
    match = re.fullmatch(r"\s*(\d{1,9})\s*([smhd]?)\s*", value)
    if not match:
        raise click.BadParameter("use a number with s, m, h or d, e.g. 1h or 30m")
    seconds = int(match.group(1)) * TTL_UNITS_S[match.group(2) or "s"]
    if not 1 <= seconds <= issuer.MAX_TTL_S:
        raise click.BadParameter(f"must be between 1s and {issuer.MAX_TTL_S // 86400}d")
    return seconds


def _warn_if_not_trusted(settings: Settings) -> None:
    auth = settings.auth
    local = issuer.keys_dir(settings.server.state_dir) / issuer.JWKS_NAME
    if auth.jwks_url or jwks_path(auth, settings.server.state_dir) != local:
        click.echo(
            "edgeserve: warning: [auth] trusts other keys (jwks_url or jwks_file), "
            "so the server will not accept tokens from this local issuer",
            err=True,
        )


@click.group("keys")
def keys() -> None:
    """Token signing keys and TLS certificates under <state_dir>/keys/.

    \b
    Example: edgeserve keys init --config /etc/edgeserve/edgeserve.toml
    """


@keys.command("init")
@CONFIG_OPTION
@click.option(
    "--force", is_flag=True, help="Replace an existing key (tokens issued so far stop working)."
)
def keys_init(config_path: Path | None, force: bool) -> None:
    """Create the Ed25519 token signing key (0600) and the JWKS the server trusts.

    \b
    Example: edgeserve keys init
    """
    settings = load_or_exit(config_path)
    try:
        path = issuer.init_keys(settings.server.state_dir, force=force)
    except EdgeserveError as exc:
        fail(f"{exc.message} (use --force to replace it)")
    except OSError as exc:
        fail(f"cannot write keys: {exc.strerror}")
    click.echo(f"signing key: {path.parent / issuer.SIGNING_KEY_NAME}")
    click.echo(f"public keys: {path}")
    _warn_if_not_trusted(settings)


@keys.command("rotate-signing-key")
@CONFIG_OPTION
@click.option(
    "--keep-previous",
    type=click.IntRange(0, 8),
    default=1,
    show_default=True,
    help="Older public keys kept trusted, so tokens already issued keep working.",
)
def keys_rotate_signing(config_path: Path | None, keep_previous: int) -> None:
    """Sign new tokens with a new key; the server picks it up without a restart.

    \b
    Example: edgeserve keys rotate-signing-key --keep-previous 1
    """
    settings = load_or_exit(config_path)
    try:
        kid = issuer.rotate_signing_key(settings.server.state_dir, keep_previous=keep_previous)
    except EdgeserveError as exc:
        fail(exc.message)
    except OSError as exc:
        fail(f"cannot write keys: {exc.strerror}")
    audit_command(settings, "keys.rotate_signing", kid, "ok", {"keep_previous": keep_previous})
    click.echo(f"new signing key id: {kid}")


@keys.command("tls-self-signed")
@CONFIG_OPTION
@click.option(
    "--hostname",
    "hostnames",
    multiple=True,
    help="A name or address clients use to reach the box (repeatable). "
    "localhost, 127.0.0.1, ::1 and this machine's name are always included.",
)
@click.option("--days", type=click.IntRange(1, 3650), default=825, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing certificate and key.")
def keys_tls_self_signed(
    config_path: Path | None, hostnames: tuple[str, ...], days: int, force: bool
) -> None:
    """Create a self-signed TLS certificate and its key (0600) in <state_dir>/keys/tls/.

    \b
    Example: edgeserve keys tls-self-signed --hostname box.shop.lan --hostname 192.168.1.20
    """
    settings = load_or_exit(config_path)
    try:
        files = tls.create_self_signed(settings.server.state_dir, hostnames, days=days, force=force)
    except EdgeserveError as exc:
        fail(f"{exc.message} (use --force to replace it)")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--hostname") from None
    except OSError as exc:
        fail(f"cannot write the certificate: {exc.strerror}")
    click.echo(f"certificate: {files.cert}")
    click.echo(f"private key: {files.key}")
    click.echo("add to [server] in the config:")
    click.echo(f'tls_cert = "{files.cert}"')
    click.echo(f'tls_key = "{files.key}"')


@click.group("token")
def token() -> None:
    """Access tokens from the local issuer (see `edgeserve keys init`).

    \b
    Example: edgeserve token create --scope infer --ttl 1h --subject pos-terminal-3
    """


@token.command("create")
@CONFIG_OPTION
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    type=click.Choice(sorted(ALL_SCOPES)),
    help="A scope the token grants (repeatable): infer, read, admin, metrics, feedback.",
)
@click.option(
    "--ttl",
    default="1h",
    show_default=True,
    callback=parse_ttl,
    help="Lifetime: 90s, 30m, 1h, 7d (at most 366d).",
)
@click.option(
    "--subject",
    default="edgeserve-cli",
    show_default=True,
    help="Who the token is for; it appears in logs and the audit trail.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of the token.")
def token_create(
    config_path: Path | None, scopes: tuple[str, ...], ttl: int, subject: str, as_json: bool
) -> None:
    """Print a signed access token (RFC 9068) for the configured issuer and audience.

    \b
    Example: edgeserve token create --scope infer --scope read --ttl 30d --subject kiosk-1
    """
    settings = load_or_exit(config_path)
    if not subject.strip() or len(subject) > 256:
        raise click.BadParameter("must be 1 to 256 characters", param_hint="--subject")
    now = int(time.time())
    try:
        value = issuer.create_token(
            settings.server.state_dir,
            scopes,
            ttl,
            subject,
            settings.auth.issuer,
            settings.auth.audience,
            now=now,
        )
    except EdgeserveError as exc:
        fail(exc.message)
    except (OSError, ValueError) as exc:
        fail(f"cannot create a token: {exc}")
    # Who got which rights until when; never the token itself.
    audit_command(
        settings,
        "token.create",
        subject,
        "ok",
        {"scopes": sorted(set(scopes)), "expires_at": now + ttl},
    )
    _warn_if_not_trusted(settings)
    if as_json:
        doc = {
            "token": value,
            "subject": subject,
            "scopes": sorted(set(scopes)),
            "expires_at": now + ttl,
        }
        click.echo(json.dumps(doc))
    else:
        click.echo(value)
