"""Kubernetes manifests: valid against the Kubernetes schemas (kubernetes-validate ships
them offline, strict mode rejects unknown fields), and consistent with each other, with
the image and with the server's config."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

from edgeserve.config.loader import Settings, load_settings

yaml = pytest.importorskip("yaml", reason="PyYAML not installed (dev extra)")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate not installed (dev extra)"
)

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "packaging" / "kubernetes"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((K8S / name).read_text())


def pod_spec() -> dict[str, Any]:
    return load("deployment.yaml")["spec"]["template"]["spec"]


def container() -> dict[str, Any]:
    return pod_spec()["containers"][0]


def configmap_settings(folder: Path) -> Settings:
    config = folder / "edgeserve.toml"
    config.write_text(load("configmap.yaml")["data"]["edgeserve.toml"])
    return load_settings(config)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_strictly_against_the_kubernetes_schema(manifest: Path) -> None:
    for document in yaml.safe_load_all(manifest.read_text()):
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def test_the_validator_rejects_a_misspelt_field() -> None:
    broken = copy.deepcopy(load("deployment.yaml"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_kustomization_lists_every_manifest() -> None:
    listed = set(load("kustomization.yaml")["resources"])
    assert listed == {p.name for p in MANIFESTS}


def test_probes_use_the_v2_health_endpoints() -> None:
    c = container()
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_pod_is_non_root_with_a_read_only_root_filesystem() -> None:
    spec = pod_spec()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    security = container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # The image's USER is the same numeric UID.
    containerfile = (ROOT / "packaging" / "Containerfile").read_text()
    user = re.search(r"^USER (\d+):(\d+)$", containerfile, re.MULTILINE)
    assert user is not None
    assert int(user.group(1)) == spec["securityContext"]["runAsUser"]


def test_every_writable_path_is_a_volume() -> None:
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    for path in ("/var/lib/edgeserve", "/tmp"):
        assert path in mounts and not mounts[path].get("readOnly", False)


def test_resources_are_requested_for_the_autoscaler() -> None:
    resources = container()["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]
    hpa = load("hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == load("deployment.yaml")["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


@pytest.mark.parametrize("manifest", ["service.yaml", "pdb.yaml", "networkpolicy.yaml"])
def test_selectors_match_the_pod_labels(manifest: str) -> None:
    labels = load("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    spec = load(manifest)["spec"]
    selector = spec.get("podSelector") or spec["selector"]
    selector = selector.get("matchLabels", selector)
    assert selector.items() <= labels.items()


def test_configmap_config_loads_and_drains_within_the_grace_period(tmp_path: Path) -> None:
    settings = configmap_settings(tmp_path)
    assert settings.server.host == "0.0.0.0"
    assert settings.server.port == container()["ports"][0]["containerPort"]
    pre_stop_s = container()["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert (
        settings.server.graceful_timeout_s + pre_stop_s
        < pod_spec()["terminationGracePeriodSeconds"]
    )


def test_secret_files_land_where_the_config_looks(tmp_path: Path) -> None:
    config = configmap_settings(tmp_path)
    mounts = {m["name"]: m["mountPath"] for m in container()["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    jwks_item = volumes["jwks"]["secret"]["items"][0]
    assert Path(mounts["jwks"]) / jwks_item["path"] == Path(config.auth.jwks_file)
    credentials = {e["name"]: e["value"] for e in container()["env"]}["CREDENTIALS_DIRECTORY"]
    key_item = volumes["master-key"]["secret"]["items"][0]
    assert mounts["master-key"] == credentials
    assert key_item["path"] == config.updater.master_key_credential
    assert set(load("secret.yaml")["stringData"]) == {jwks_item["key"], key_item["key"]}
