"""Load `edgeserve.toml` into typed, frozen settings; every error names the key.

Each subsystem owns its section class (auth, telemetry, updater, experiments, jobs live
in their own packages); this module composes them and reads the file once at start-up.
"""

from __future__ import annotations

import os
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgeserve.audit.settings import AuditSettings
from edgeserve.auth.settings import AuthSettings
from edgeserve.config.schema import ConfigError, parse_section, setting
from edgeserve.experiments.settings import ExperimentSettings
from edgeserve.jobs.settings import FeatureSettings, JobSettings
from edgeserve.telemetry.settings import TelemetrySettings
from edgeserve.updates.settings import UpdaterSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "ConfigChoice",
    "ConfigError",
    "LimitSettings",
    "ModelSettings",
    "ServerSettings",
    "Settings",
    "find_config",
    "load_settings",
]

CONFIG_ENV = "EDGESERVE_CONFIG"
LOCAL_CONFIG = Path("edgeserve.toml")  # in the working directory
SYSTEM_CONFIG = Path("/etc/edgeserve/edgeserve.toml")


@dataclass(frozen=True)
class ConfigChoice:
    """The config file a command reads and why: logged at start-up, so a user who edits
    one file while another is in effect is told which."""

    path: Path | None
    reason: str  # "--config", "EDGESERVE_CONFIG", "working directory", "system", "none"


def find_config(explicit: Path | str | None = None, system: Path = SYSTEM_CONFIG) -> ConfigChoice:
    """The config file in effect: `--config`, then $EDGESERVE_CONFIG, then
    `./edgeserve.toml`, then `/etc/edgeserve/edgeserve.toml`; none means built-in defaults.

    An explicit path or the variable is taken even when the file is missing, so a typo
    fails loudly instead of falling through to another file.
    """
    if explicit is not None and str(explicit):
        return ConfigChoice(Path(explicit), "--config")
    if os.environ.get(CONFIG_ENV):
        return ConfigChoice(Path(os.environ[CONFIG_ENV]), CONFIG_ENV)
    if LOCAL_CONFIG.is_file():
        return ConfigChoice(LOCAL_CONFIG.absolute(), "working directory")
    if system.is_file():
        return ConfigChoice(system, "system")
    return ConfigChoice(None, "none")


@dataclass(frozen=True)
class ServerSettings:
    """Where and how the HTTP (and gRPC) endpoints listen."""

    host: str = "127.0.0.1"
    port: int = setting(8080, min=0, max=65535)
    engine: str = setting("uvicorn", choices=("uvicorn", "hypercorn"))  # see bench/RESULTS.md
    event_loop: str = setting("auto", choices=("auto", "uvloop", "asyncio"))
    # 0 = gRPC off; "auto" = a free port the kernel picks, named in `grpc listening`
    grpc_port: int | Literal["auto"] = setting(0, min=0, max=65535)
    state_dir: Path = Path(".edgeserve")
    executor_threads: int = setting(0, min=0, max=256)  # 0 = from the cores
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    keep_alive_timeout_s: float = setting(5.0, min=0.1, max=3600)
    read_timeout_s: float = setting(10.0, min=0.1, max=3600)
    request_head_timeout_s: float = setting(30.0, min=0.1, max=3600)
    tls_handshake_timeout_s: float = setting(5.0, min=0.1, max=600)
    # Open HTTP connections (uvicorn engine): beyond either cap a new one gets 503 and is
    # closed. The total is also kept 64 below the process's open-file limit.
    max_connections: int = setting(1024, min=1, max=1_000_000)
    max_connections_per_client: int = setting(512, min=1, max=1_000_000)
    loop_lag_target_ms: float = setting(10.0, min=0, max=10_000)  # 0 = off
    graceful_timeout_s: float = setting(10.0, min=0, max=3600)
    log_level: str = setting("info", choices=("debug", "info", "warning", "error"))
    cors_origins: list[str] = setting([])
    # The URL browsers use to reach this server ("https://box.shop.lan:8443"), if any:
    # the dashboard then accepts a login only from that origin, and marks its cookie
    # Secure when it is https (a TLS-terminating proxy in front). Empty = the request's own.
    public_url: str = ""

    def __post_init__(self) -> None:
        if self.public_url:
            parts = urllib.parse.urlsplit(self.public_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError("public_url", "must be an http:// or https:// URL with a host")
            if parts.path not in ("", "/") or parts.query or parts.fragment:
                raise ConfigError("public_url", "must be an origin only (no path or query)")


@dataclass(frozen=True)
class ModelSettings:
    """The model repository and how models are run."""

    repository: Path = Path("models")
    backend: str = setting("auto", choices=("auto", "onnxruntime", "openvino"))
    intra_op_threads: int = setting(0, min=0, max=256)  # 0 = from the cores
    inter_op_threads: int = setting(1, min=1, max=64)
    openvino_precision: str = setting("f32", choices=("f32", "bf16", "f16"))
    load: list[str] = setting([])  # names to load; empty = every model in the repository
    warmup: bool = True


@dataclass(frozen=True)
class LimitSettings:
    """Bounds on what a request may ask of the box; all checked before allocation."""

    max_body_bytes: int = setting(16 * 1024 * 1024, min=1024)
    max_inputs: int = setting(32, min=1)
    max_tensor_elements: int = setting(4 * 1024 * 1024, min=1)
    max_tensor_rank: int = setting(8, min=1, max=32)
    max_json_depth: int = setting(16, min=2, max=256)
    max_bytes_element: int = setting(1024 * 1024, min=1)
    max_header_bytes: int = setting(16 * 1024, min=1024)
    max_headers: int = setting(64, min=8)
    # A request body must arrive at `min_body_bytes_per_s` on average once
    # `body_rate_grace_s` have passed, and whole within `body_timeout_s`; else 408 + close.
    body_timeout_s: float = setting(900.0, min=1, max=86_400)
    body_rate_grace_s: float = setting(10.0, min=0, max=3600)
    min_body_bytes_per_s: int = setting(16 * 1024, min=0, max=1024**3)  # 0 = no rate
    accept_compressed: bool = False


@dataclass(frozen=True)
class Settings:
    """Everything edgeserve reads from its config file, parsed once."""

    server: ServerSettings = field(default_factory=ServerSettings)
    models: ModelSettings = field(default_factory=ModelSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    updater: UpdaterSettings = field(default_factory=UpdaterSettings)
    experiments: ExperimentSettings = field(default_factory=ExperimentSettings)
    jobs: JobSettings = field(default_factory=JobSettings)
    features: FeatureSettings = field(default_factory=FeatureSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    source: Path | None = None  # the file these came from, if any


def load_settings(
    path: Path | str | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Read settings from `path` (or $EDGESERVE_CONFIG, or embedded defaults).

    Relative paths in the file are resolved against the file's folder, so a config
    works the same from any working directory. `overrides` is a nested mapping
    applied on top (the CLI's --host/--port).
    """
    if path is None and os.environ.get(CONFIG_ENV):
        path = os.environ[CONFIG_ENV]
    data: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError("", f"{path} is not valid TOML: {exc}") from None
        base = path.resolve().parent
    for section, values in (overrides or {}).items():
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(section, "must be a table")
        data[section].update(values)
    data.pop("source", None)
    settings = parse_section(Settings, data, "")
    return _resolve_paths(settings, base, Path(path) if path else None)


def _resolve_paths(settings: Settings, base: Path, source: Path | None) -> Settings:
    from dataclasses import replace

    def absolute(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base / p)

    server = replace(
        settings.server,
        state_dir=absolute(settings.server.state_dir),
        tls_cert=absolute(settings.server.tls_cert),
        tls_key=absolute(settings.server.tls_key),
        tls_client_ca=absolute(settings.server.tls_client_ca),
    )
    models = replace(settings.models, repository=absolute(settings.models.repository))
    updater = replace(
        settings.updater,
        master_key_file=absolute(settings.updater.master_key_file),
        bundle_key_files=[absolute(p) for p in settings.updater.bundle_key_files],
    )
    if (settings.server.tls_cert is None) != (settings.server.tls_key is None):
        raise ConfigError("server.tls_cert", "tls_cert and tls_key must be set together")
    return replace(settings, server=server, models=models, updater=updater, source=source)
