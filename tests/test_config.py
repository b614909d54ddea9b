"""Configuration: defaults, the documented file, and clear errors for broken configs."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgeserve.cli.group import run
from edgeserve.config.loader import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTED = ROOT / "edgeserve.toml"


def test_embedded_defaults_bind_loopback_on_8080(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGESERVE_CONFIG", raising=False)
    monkeypatch.chdir(ROOT)
    settings = load_settings()
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8080)
    assert settings.server.state_dir == ROOT / ".edgeserve"
    assert settings.models.repository == ROOT / "models"


def test_documented_config_equals_embedded_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    from_file = load_settings(DOCUMENTED)
    embedded = load_settings(None)
    assert dataclasses.replace(from_file, source=None) == embedded


def _sections(text: str) -> dict[str, str]:
    """The text of each [table] in a TOML file, comments included."""
    parts: dict[str, str] = {}
    current = ""
    for line in text.splitlines():
        header = re.match(r"^\s*#?\s*\[\[?([A-Za-z0-9_.]+)\]\]?\s*$", line)
        if header:
            current = header.group(1)
            parts.setdefault(current, "")
            continue
        parts[current] = parts.get(current, "") + line + "\n"
    return parts


def _documented_keys(cls: type, prefix: str) -> list[tuple[str, str]]:
    keys = []
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(value):
            keys += _documented_keys(type(value), f"{prefix}.{f.name}" if prefix else f.name)
        else:
            keys.append((prefix, f.name))
    return keys


def test_every_config_key_is_documented_in_edgeserve_toml() -> None:
    sections = _sections(DOCUMENTED.read_text())
    missing = [
        f"{section}.{key}"
        for section, key in _documented_keys(Settings, "")
        if not re.search(rf"^\s*#?\s*{re.escape(key)}\s*=", sections.get(section, ""), re.M)
    ]
    assert not missing, f"keys not documented in edgeserve.toml: {missing}"


BROKEN = [
    ("[server]\nprot = 8080\n", "server.prot: unknown key"),
    ('[server]\nport = "8080"\n', "server.port: must be an integer"),
    ("[server]\nport = 70000\n", "server.port: must be <= 65535"),
    ("[server]\nport = -1\n", "server.port: must be >= 0"),
    ('[server]\ngrpc_port = "x"\n', "server.grpc_port: must be an integer or \"auto\", got 'x'"),
    ("[server]\ngrpc_port = -5\n", "server.grpc_port: must be >= 0, got -5"),
    ("[server]\ngrpc_port = 70000\n", "server.grpc_port: must be <= 65535, got 70000"),
    (
        "[server]\ngrpc_port = true\n",
        'server.grpc_port: must be an integer or "auto", got a boolean',
    ),
    ('[server]\nengine = "gunicorn"\n', "server.engine: must be one of"),
    ('[server]\nevent_loop = "twisted"\n', "server.event_loop: must be one of"),
    ("[server]\nkeep_alive_timeout_s = true\n", "server.keep_alive_timeout_s: must be a number"),
    ("[server]\nrequest_head_timeout_s = 0\n", "server.request_head_timeout_s: must be >= 0.1"),
    ("[server]\ntls_handshake_timeout_s = 0\n", "server.tls_handshake_timeout_s: must be >= 0.1"),
    ("[server]\nmax_connections = 0\n", "server.max_connections: must be >= 1"),
    (
        "[server]\nmax_connections_per_client = 0\n",
        "server.max_connections_per_client: must be >= 1",
    ),
    ("[limits]\nbody_timeout_s = 0\n", "limits.body_timeout_s: must be >= 1"),
    ("[limits]\nbody_rate_grace_s = -1\n", "limits.body_rate_grace_s: must be >= 0"),
    (
        '[limits]\nmin_body_bytes_per_s = "slow"\n',
        "limits.min_body_bytes_per_s: must be an integer",
    ),
    ("[server]\nloop_lag_target_ms = -1\n", "server.loop_lag_target_ms: must be >= 0"),
    ('[server]\nloop_lag_target_ms = "fast"\n', "server.loop_lag_target_ms: must be a number"),
    ('[models]\nbackend = "tensorflow"\n', "models.backend: must be one of"),
    ('[models]\nload = "digits"\n', "models.load: must be a list"),
    ("[models]\nrepository = 3\n", "models.repository: must be a non-empty path"),
    ("[limits]\nmax_body_bytes = 0\n", "limits.max_body_bytes: must be >= 1024"),
    ("[limits]\nmax_tensor_rank = 1000\n", "limits.max_tensor_rank: must be <= 32"),
    ("[jobs]\nmax_subject_bytes = 0\n", "jobs.max_subject_bytes: must be >= 1024"),
    ('[jobs]\nmax_total_bytes = "8G"\n', "jobs.max_total_bytes: must be an integer"),
    ("[jobs]\nmin_free_bytes = -1\n", "jobs.min_free_bytes: must be >= 0"),
    ("[audit]\nmax_db_bytes = 1000\n", "audit.max_db_bytes: must be >= 65536"),
    ("[jobs]\nstream_idle_timeout_s = 0\n", "jobs.stream_idle_timeout_s: must be >= 0.1"),
    ('[server]\npublic_url = "ftp://box"\n', "public_url: must be an http:// or https://"),
    ('[server]\npublic_url = "https://box/x"\n', "public_url: must be an origin only"),
    ("[updater]\nmin_subjects = 0\n", "updater.min_subjects: must be >= 1"),
    ("[updater]\nmax_slowdown = 0.5\n", "updater.max_slowdown: must be >= 1.0"),
    ("server = 1\n", "server: must be a table"),
    ("[nonsense]\n", "nonsense: unknown key"),
    ("[server\nport = 1\n", "is not valid TOML"),
    ('[server]\ntls_cert = "c.pem"\n', "tls_cert and tls_key must be set together"),
]


@pytest.mark.parametrize(("text", "message"), BROKEN, ids=[m for _, m in BROKEN])
def test_broken_config_is_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "edgeserve.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert message in str(caught.value)


@pytest.mark.parametrize(("value", "expected"), [("0", 0), ("8001", 8001), ('"auto"', "auto")])
def test_grpc_port_is_off_a_number_or_auto(tmp_path: Path, value: str, expected: object) -> None:
    path = tmp_path / "edgeserve.toml"
    path.write_text(f"[server]\ngrpc_port = {value}\n")
    assert load_settings(path).server.grpc_port == expected


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "absent.toml")


def test_serve_with_bad_config_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "edgeserve.toml"
    path.write_text('[server]\nport = "x"\n')
    assert run(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["edgeserve: config error: server.port: must be an integer, got a string"]


def test_serve_process_with_unknown_model_repository_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "edgeserve.toml"
    path.write_text(f'[models]\nrepository = "{tmp_path / "nowhere"}"\n[server]\nport = 0\n')
    done = subprocess.run(
        [sys.executable, "-m", "edgeserve", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "models.repository" in done.stderr
    assert "Traceback" not in done.stderr


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "edgeserve.toml"
    path.write_text("[server]\nport = 9999\n")
    monkeypatch.setenv("EDGESERVE_CONFIG", str(path))
    assert load_settings().server.port == 9999


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "edgeserve.toml"
    path.write_text('[server]\nstate_dir = "state"\n')
    assert load_settings(path).server.state_dir == tmp_path / "state"


def test_event_loop_choice_picks_the_runner() -> None:
    import asyncio

    import uvloop

    from edgeserve.server import event_loop_runner

    assert event_loop_runner("asyncio") is asyncio.run
    assert event_loop_runner("uvloop") is uvloop.run
    assert event_loop_runner("auto") is uvloop.run  # installed with edgeserve on Linux
