"""Pods of the shipped Kubernetes manifests, run as real server processes on loopback
(helpers only, no tests here).

A `Cluster` holds one Secret (a folder of real keys, mode 0440 as the kubelet mounts
it) and the ConfigMap's edgeserve.toml with the manifest's absolute paths moved into
tmp_path. `Cluster.pod(n)` runs the init container's own script from the manifest
with its env pointed at the pod's folders, then `edgeserve serve` with the pod's env.
Nothing here is mocked: the same script, config and keys a cluster would use.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.serving import MODELS, RunningServer, run_server

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "packaging" / "kubernetes"
DEPLOYMENT = K8S / "deployment" / "deployment.yaml"
CONFIGMAP = K8S / "base" / "configmap.yaml"
PLACEHOLDER_KEY = "REPLACE-WITH-YOUR-BUNDLE-SIGNING-PUBLIC-KEY"
SECRET_DIR = "/run/secrets/edgeserve-keys"
STATE_DIR = "/var/lib/edgeserve"
RUN_KEYS = "/run/edgeserve/keys"


def manifest(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def pod_spec(path: Path = DEPLOYMENT) -> dict[str, Any]:
    return manifest(path)["spec"]["template"]["spec"]


def configmap_toml() -> str:
    return manifest(CONFIGMAP)["data"]["edgeserve.toml"]


def init_script() -> tuple[str, dict[str, str]]:
    """The init container's shell script and its env, as the manifest has them."""
    init = pod_spec()["initContainers"][0]
    assert init["command"] == ["/bin/sh", "-c"]
    return init["args"][0], {e["name"]: e["value"] for e in init["env"]}


def _run(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "edgeserve"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@dataclass
class Cluster:
    """One Secret and one ConfigMap shared by every pod started from it."""

    root: Path
    extra_config: str = ""  # appended to the ConfigMap's edgeserve.toml
    flags: str = "{}"  # the ConfigMap's [experiments] flags

    def __post_init__(self) -> None:
        self.operator = self.root / "operator"  # what stays off-cluster: signing keys
        self.operator.mkdir(parents=True)
        local = self.operator / "local.toml"
        local.write_text(f'[server]\nstate_dir = "{self.operator / "state"}"\n')
        _run("keys", "init", "--config", str(local), cwd=self.operator)
        made = _run("keys", "bundle-signing-key", str(self.operator / "signing.pem"), cwd=self.root)
        self.bundle_public_key = made.strip().splitlines()[-1]
        self.secret = self.root / "secret"
        self.secret.mkdir()
        _run("keys", "fleet-key", str(self.secret / "fleet.key"), cwd=self.root)
        jwks = self.operator / "state" / "keys" / "jwks.json"
        (self.secret / "jwks.json").write_bytes(jwks.read_bytes())
        key = base64.b64encode(secrets.token_bytes(32))
        (self.secret / "edgeserve-master-key").write_bytes(key)
        for name in ("subject.key", "audit.key", "payload.key"):
            (self.secret / name).write_bytes(secrets.token_bytes(32))
        for path in self.secret.iterdir():
            path.chmod(0o440)  # what the kubelet mounts (defaultMode 0440)

    def token(self, *scopes: str, subject: str = "operator") -> str:
        args = ["token", "create", "--config", str(self.operator / "local.toml")]
        for scope in scopes:
            args += ["--scope", scope]
        return _run(*args, "--subject", subject, cwd=self.operator).strip().splitlines()[-1]

    def config_text(self, pod: Path) -> str:
        """The ConfigMap's edgeserve.toml for a pod whose folders live under `pod`."""
        text = configmap_toml()
        for old, new in (
            (SECRET_DIR, str(self.secret)),
            (STATE_DIR, str(pod / "state")),
            (RUN_KEYS, str(pod / "run" / "keys")),
            ("/opt/edgeserve/models", str(MODELS)),
            (PLACEHOLDER_KEY, self.bundle_public_key),
            ('host = "0.0.0.0"', 'host = "127.0.0.1"'),
            ("port = 8080", "port = {port}"),
            ("[models]\n", '[models]\nload = ["digits"]\n'),
            ("flags = {}", f"flags = {self.flags}"),
        ):
            assert old in text, old
            text = text.replace(old, new)
        return text + self.extra_config

    def init_pod(self, pod: Path) -> None:
        """Run the manifest's init container script for this pod's folders."""
        script, env = init_script()
        assert env == {"SECRET_DIR": SECRET_DIR, "STATE_DIR": STATE_DIR, "RUN_KEYS": RUN_KEYS}
        moved = {
            "SECRET_DIR": str(self.secret),
            "STATE_DIR": str(pod / "state"),
            "RUN_KEYS": str(pod / "run" / "keys"),
        }
        subprocess.run(
            ["/bin/sh", "-c", script], env={**os.environ, **moved}, check=True, timeout=30
        )

    @contextmanager
    def pod(self, name: str, wait_ready: bool = True) -> Iterator[RunningServer]:
        folder = self.root / name
        folder.mkdir()
        self.init_pod(folder)
        env = {"CREDENTIALS_DIRECTORY": str(self.secret)}
        text = self.config_text(folder)
        with run_server(folder, config_text=text, env=env, wait_ready=wait_ready) as server:
            yield server
