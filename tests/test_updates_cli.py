"""`edgeserve keys ...` (update keys), `bundle create|inspect` and `update apply|status|
rollback` with the server stopped: real keys, real digits bundles, a real store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from edgeserve.cli.group import main
from tests.test_updates_kit import DIGITS
from updater import file_key_id


@pytest.fixture
def box(tmp_path: Path) -> Path:
    """A config with auth off and our state dir; keys are made by the tests."""
    config = tmp_path / "edgeserve.toml"
    config.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n')
    return config


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def trust(config: Path, public_key: str, *extra: str) -> None:
    lines = [f'trusted_keys = ["{public_key}"]', *extra]
    config.write_text(config.read_text() + "[updater]\n" + "\n".join(lines) + "\n")


def test_keys_bundle_create_inspect_apply_status_rollback(tmp_path: Path, box: Path) -> None:
    made = run("keys", "bundle-signing-key", str(tmp_path / "author" / "signing.pem"))
    assert made.exit_code == 0, made.output
    public = made.output.strip().splitlines()[-1]
    assert run("keys", "fleet-key", str(tmp_path / "author" / "fleet.key")).exit_code == 0
    device = run("keys", "device-key", "--config", str(box))
    assert device.exit_code == 0, device.output
    device_public = device.output.strip().rsplit(" ", 1)[-1]
    trust(box, public, f'bundle_key_files = ["{tmp_path / "author" / "fleet.key"}"]')
    assert run("keys", "master-init", "--config", str(box)).exit_code == 0
    bundles = {}
    for version, source, recipient in ((3, 1, "fleet"), (4, 2, "device")):
        out = tmp_path / f"digits-{version}.bundle"
        created = run(
            "bundle",
            "create",
            str(DIGITS),
            "--version",
            str(version),
            "--source-version",
            str(source),
            "--signing-key",
            str(tmp_path / "author" / "signing.pem"),
            "--recipient",
            str(tmp_path / "author" / "fleet.key") if recipient == "fleet" else device_public,
            "--out",
            str(out),
        )
        assert created.exit_code == 0, created.output
        assert "samples=4" in created.output
        bundles[version] = out
    shown = run("bundle", "inspect", str(bundles[4]), "--config", str(box))
    assert shown.exit_code == 0, shown.output
    manifest = json.loads(shown.stdout)
    assert manifest["version"] == 4 and manifest["samples"] == 4
    assert manifest["data_key"]["scheme"].startswith("x25519")
    for version in (3, 4):
        applied = run("update", "apply", str(bundles[version]), "--config", str(box))
        assert applied.exit_code == 0, applied.output
    again = run("update", "apply", str(bundles[3]), "--config", str(box))
    assert again.exit_code == 1 and "not_newer" in again.output
    status = run("update", "status", "--config", str(box))
    assert "digits: active=b verdict=probation versions_seen=4" in status.output
    back = run("update", "rollback", "digits", "--config", str(box), "--reason", "by hand")
    assert back.exit_code == 0 and "active_version=3" in back.output
    doc = json.loads(run("update", "status", "digits", "--json", "--config", str(box)).output)
    assert doc["verdict"] == "rolled_back" and doc["history"][-1]["reason"] == "by hand"
    master = tmp_path / "state" / "keys" / "master.key"
    before = {p: file_key_id(p) for p in (tmp_path / "state").rglob("*.enc")}
    rotated = run("keys", "rotate", "--config", str(box))
    assert rotated.exit_code == 0, rotated.output
    after = {p: file_key_id(p) for p in before}
    assert all(before[p] != after[p] for p in before) and len(set(after.values())) == 1
    assert master.stat().st_mode & 0o777 == 0o600
    # Every change made without the server is in the audit chain, by the OS user, "cli".
    shown = run("audit", "show", "--json", "--config", str(box))
    entries = [json.loads(line) for line in shown.output.splitlines()]
    done = [(e["action"], e["target"], e["outcome"]) for e in entries]
    assert done == [
        ("update.install", "digits", "ok"),
        ("update.install", "digits", "ok"),
        ("update.install", "digits-3.bundle", "rejected"),
        ("update.rollback", "digits", "ok"),
        ("keys.rotate_master", after[next(iter(after))], "ok"),
    ]
    assert entries[2]["detail"] == {"reason": "not_newer"}
    assert all(e["client"] == "cli" and e["subject"].startswith("os:") for e in entries)
    assert run("audit", "verify", "--config", str(box)).exit_code == 0


def test_inspect_refuses_a_bundle_signed_by_an_untrusted_key(tmp_path: Path, box: Path) -> None:
    run("keys", "bundle-signing-key", str(tmp_path / "a.pem"))
    other = run("keys", "bundle-signing-key", str(tmp_path / "b.pem")).output.split()[-1]
    run("keys", "fleet-key", str(tmp_path / "fleet.key"))
    trust(box, other)
    out = tmp_path / "x.bundle"
    samples = tmp_path / "samples.json"
    samples.write_text("[]")
    created = run(
        "bundle",
        "create",
        str(DIGITS),
        "--version",
        "2",
        "--signing-key",
        str(tmp_path / "a.pem"),
        "--recipient",
        str(tmp_path / "fleet.key"),
        "--out",
        str(out),
        "--samples",
        str(samples),
    )
    assert created.exit_code == 0 and "samples=0" in created.output
    shown = run("bundle", "inspect", str(out), "--config", str(box))
    assert shown.exit_code == 1 and "bad_signature" in shown.output


def test_rotate_needs_a_key_file(tmp_path: Path, box: Path) -> None:
    result = run("keys", "rotate", "--config", str(box))
    assert result.exit_code == 1 and "no master key file" in result.output


def test_keys_never_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "fleet.key"
    assert run("keys", "fleet-key", str(path)).exit_code == 0
    again = run("keys", "fleet-key", str(path))
    assert again.exit_code == 1 and "refusing to overwrite" in again.output


def test_every_update_command_has_an_example_in_its_help() -> None:
    import click

    from edgeserve.updates.cli import bundle, update
    from edgeserve.updates.keys_cli import KEY_COMMANDS

    commands = [bundle.get_command(click.Context(bundle), n) for n in bundle.list_commands(None)]
    commands += [update.get_command(click.Context(update), n) for n in update.list_commands(None)]
    for command in [*commands, *KEY_COMMANDS]:
        assert command is not None and "Example: edgeserve" in (command.help or ""), command
