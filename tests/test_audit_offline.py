"""Commands that change the box without the server leave audit entries in the same hash
chain: `token create` (who got which rights until when, never the token) and
`keys rotate-signing-key`; an unwritable log warns and the command still succeeds.
(`update apply|rollback` and `keys rotate` are checked in tests/test_updates_cli.py.)"""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner, Result

from edgeserve.audit import chain
from edgeserve.cli.group import main


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def config_in(tmp_path: Path) -> Path:
    path = tmp_path / "edgeserve.toml"
    path.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n')
    return path


def test_token_create_and_key_rotation_are_audited_without_the_token(tmp_path: Path) -> None:
    config = config_in(tmp_path)
    assert run("keys", "init", "--config", str(config)).exit_code == 0
    made = run(
        "token", "create", "--config", str(config), "--scope", "infer", "--subject", "kiosk-1"
    )
    assert made.exit_code == 0, made.output
    token = made.stdout.strip()
    rotated = run("keys", "rotate-signing-key", "--config", str(config))
    assert rotated.exit_code == 0, rotated.output
    kid = rotated.stdout.strip().rsplit(" ", 1)[-1]

    shown = run("audit", "show", "--json", "--config", str(config))
    entries = [json.loads(line) for line in shown.output.splitlines()]
    assert [(e["action"], e["target"]) for e in entries] == [
        ("token.create", "kiosk-1"),
        ("keys.rotate_signing", kid),
    ]
    assert entries[0]["detail"]["scopes"] == ["infer"]
    assert entries[0]["client"] == "cli" and entries[0]["subject"].startswith("os:")
    database = chain.db_path(tmp_path / "state")
    assert token.encode() not in database.read_bytes()
    assert token.split(".")[2].encode() not in database.read_bytes()  # not even the signature
    assert run("audit", "verify", "--config", str(config)).exit_code == 0


def test_an_unwritable_audit_log_warns_and_the_command_succeeds(tmp_path: Path) -> None:
    config = config_in(tmp_path)
    assert run("keys", "init", "--config", str(config)).exit_code == 0
    chain.db_path(tmp_path / "state").mkdir(parents=True)  # a directory where the file goes
    made = CliRunner().invoke(main, ["token", "create", "--config", str(config), "--scope", "read"])
    assert made.exit_code == 0, made.output
    assert made.stdout.count(".") == 2  # the token was printed
    assert "warning: not recorded in the audit log" in made.stderr
