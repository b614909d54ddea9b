"""Kubernetes manifests: every variant renders (`kubectl kustomize`) into objects valid
against the Kubernetes schemas (kubernetes-validate ships them offline; strict mode
rejects unknown fields), consistent with each other, with the image and with the
server's config; and the shipped config installs a signed update on a real server."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeserve.config.loader import Settings, load_settings
from edgeserve.config.schema import ConfigError
from tests.k8s_pods import (
    DEPLOYMENT,
    K8S,
    PLACEHOLDER_KEY,
    RUN_KEYS,
    SECRET_DIR,
    Cluster,
    configmap_toml,
    init_script,
    manifest,
    pod_spec,
)

yaml = pytest.importorskip("yaml", reason="PyYAML not installed (dev extra)")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate not installed (dev extra)"
)

ROOT = Path(__file__).resolve().parent.parent
STATEFULSET = K8S / "statefulset" / "statefulset.yaml"
VARIANTS = ["", "deployment", "statefulset", "monitoring"]  # folders with a kustomization
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
NOT_IN_THE_SCHEMAS = {"ServiceMonitor"}  # a CRD (Prometheus Operator), checked by hand
needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl not installed (it renders kustomizations)"
)


def container(path: Path = DEPLOYMENT) -> dict[str, Any]:
    return pod_spec(path)["containers"][0]


def validate(document: dict[str, Any]) -> None:
    if document["kind"] in NOT_IN_THE_SCHEMAS:
        return
    kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def render(variant: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        ["kubectl", "kustomize", str(K8S / variant)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def shipped_settings(folder: Path, key: str) -> Settings:
    config = folder / "edgeserve.toml"
    config.write_text(configmap_toml().replace(PLACEHOLDER_KEY, key))
    return load_settings(config)


@pytest.mark.parametrize("manifest_path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates_strictly_against_the_kubernetes_schema(manifest_path: Path) -> None:
    for document in yaml.safe_load_all(manifest_path.read_text()):
        validate(document)


@needs_kubectl
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v or "default")
def test_every_variant_renders_into_valid_objects_without_a_secret(variant: str) -> None:
    """Applying a variant never overwrites the real Secret with placeholders."""
    documents = render(variant)
    assert documents
    for document in documents:
        validate(document)
        assert document["kind"] != "Secret"
        for pod in _pod_templates(document):
            for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
                assert re.search(r"@sha256:[0-9a-f]{64}$", c["image"]), c["image"]


def _pod_templates(document: dict[str, Any]) -> list[dict[str, Any]]:
    return (
        [document["spec"]["template"]] if document["kind"] in {"Deployment", "StatefulSet"} else []
    )


def test_the_validator_rejects_a_misspelt_field() -> None:
    broken = copy.deepcopy(manifest(DEPLOYMENT))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


def test_every_manifest_is_in_exactly_one_kustomization_and_the_secret_in_none() -> None:
    listed: list[Path] = []
    for kustomization in K8S.rglob("kustomization.yaml"):
        doc = manifest(kustomization)
        for entry in doc.get("resources", []) + doc.get("bases", []):
            target = (kustomization.parent / entry).resolve()
            if target.is_file():
                listed.append(target)
    assert sorted(listed) == sorted(
        p.resolve() for p in MANIFESTS if p.name != "secret.example.yaml"
    )


def test_the_statefulset_runs_the_deployments_pod_with_a_volume_per_pod() -> None:
    deployment, statefulset = manifest(DEPLOYMENT), manifest(STATEFULSET)
    ours, theirs = pod_spec(DEPLOYMENT), pod_spec(STATEFULSET)
    volumes = [v for v in ours["volumes"] if v["name"] != "state"]
    assert {**ours, "volumes": volumes} == theirs
    claim = statefulset["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "state"
    assert statefulset["spec"]["serviceName"] == "edgeserve-peers"
    assert "replicas" not in deployment["spec"], "the HPA owns the Deployment's replica count"
    hpa = manifest(K8S / "deployment" / "hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }


def test_probes_use_the_v2_health_endpoints_and_startup_waits_for_ready() -> None:
    c = container()
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"


def test_pod_is_non_root_with_a_read_only_root_filesystem() -> None:
    spec = pod_spec()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    for c in spec["initContainers"] + spec["containers"]:
        security = c["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
    containerfile = (ROOT / "packaging" / "Containerfile").read_text()
    user = re.search(r"^USER (\d+):(\d+)$", containerfile, re.MULTILINE)
    assert user is not None
    assert int(user.group(1)) == spec["securityContext"]["runAsUser"]


def test_every_writable_path_is_a_volume() -> None:
    for c in pod_spec()["initContainers"] + pod_spec()["containers"]:
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        writable = [p for p, m in mounts.items() if not m.get("readOnly", False)]
        assert writable, c["name"]
    mounts = {m["mountPath"] for m in container()["volumeMounts"]}
    assert {"/var/lib/edgeserve", "/tmp"} <= mounts


def test_the_state_volume_holds_what_the_config_lets_the_server_write(tmp_path: Path) -> None:
    """Active jobs' inputs and outputs, the telemetry cap, two model slots and an upload."""
    s = shipped_settings(tmp_path, _any_public_key(tmp_path))
    needed = (
        s.jobs.max_active_jobs * s.jobs.max_upload_bytes * 2
        + s.telemetry.max_db_bytes
        + 3 * s.updater.max_bundle_bytes
    )
    state = next(v for v in pod_spec()["volumes"] if v["name"] == "state")
    claim = manifest(STATEFULSET)["spec"]["volumeClaimTemplates"][0]
    for size in (state["emptyDir"]["sizeLimit"], claim["spec"]["resources"]["requests"]["storage"]):
        assert needed <= _bytes(size), (needed, size)


def _bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * {"Mi": 1024**2, "Gi": 1024**3}[unit]


def _any_public_key(folder: Path) -> str:
    from updater.signing import generate_signing_key, public_key_text

    return public_key_text(generate_signing_key(folder / "signing.pem"))


def test_resources_are_requested_for_the_autoscaler() -> None:
    resources = container()["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]
    hpa = manifest(K8S / "deployment" / "hpa.yaml")
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


@pytest.mark.parametrize(
    "path",
    [
        "base/service.yaml",
        "base/pdb.yaml",
        "base/networkpolicy.yaml",
        "statefulset/service-peers.yaml",
    ],
)
def test_selectors_match_the_pod_labels(path: str) -> None:
    labels = manifest(DEPLOYMENT)["spec"]["template"]["metadata"]["labels"]
    spec = manifest(K8S / path)["spec"]
    selector = spec.get("podSelector") or spec["selector"]
    selector = selector.get("matchLabels", selector)
    assert selector.items() <= labels.items()


def test_the_service_monitor_scrapes_the_api_service_with_a_token() -> None:
    monitor = manifest(K8S / "monitoring" / "servicemonitor.yaml")
    service = manifest(K8S / "base" / "service.yaml")
    peers = manifest(K8S / "statefulset" / "service-peers.yaml")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    assert wanted.items() <= service["metadata"]["labels"].items()
    assert not wanted.items() <= peers["metadata"]["labels"].items(), "scraped twice"
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["type"] == "Bearer"
    assert endpoint["authorization"]["credentials"]["name"] == "edgeserve-metrics-token"
    # the job label is the Service's name: what alerts.yml selects by default
    assert service["metadata"]["name"] == "edgeserve" and "jobLabel" not in monitor["spec"]


def test_configmap_config_loads_and_drains_within_the_grace_period(tmp_path: Path) -> None:
    settings = shipped_settings(tmp_path, _any_public_key(tmp_path))
    assert settings.server.host == "0.0.0.0"
    assert settings.server.port == container()["ports"][0]["containerPort"]
    pre_stop_s = container()["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert (
        settings.server.graceful_timeout_s + pre_stop_s
        < pod_spec()["terminationGracePeriodSeconds"]
    )


def test_the_trusted_key_placeholder_stops_the_pod_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "edgeserve.toml"
    config.write_text(configmap_toml())
    with pytest.raises((ConfigError, ValueError), match="trusted_keys"):
        load_settings(config)


def test_secret_files_land_where_the_config_and_the_init_container_look(tmp_path: Path) -> None:
    config = shipped_settings(tmp_path, _any_public_key(tmp_path))
    mounts = {m["name"]: m["mountPath"] for m in container()["volumeMounts"]}
    assert mounts["keys"] == SECRET_DIR and mounts["run-keys"] == str(Path(RUN_KEYS).parent)
    assert Path(config.auth.jwks_file).parent == Path(SECRET_DIR)
    credentials = {e["name"]: e["value"] for e in container()["env"]}["CREDENTIALS_DIRECTORY"]
    assert credentials == SECRET_DIR
    assert [Path(p).parent for p in config.updater.bundle_key_files] == [Path(RUN_KEYS)]
    script, _ = init_script()
    secret = manifest(K8S / "secret.example.yaml")
    items = set(secret["stringData"]) | set(secret["data"])
    copied = {"fleet.key", "subject.key", "audit.key", "payload.key"}
    assert all(name in script for name in ("fleet.key", "subject.key"))
    assert items == copied | {
        Path(config.auth.jwks_file).name,
        config.updater.master_key_credential,
    }


def test_the_readme_says_which_variant_to_use_and_the_kubernetes_floor() -> None:
    text = (ROOT / "packaging" / "README.md").read_text()
    assert "statefulset" in text and "1.29" in text


@pytest.mark.slow
def test_the_shipped_config_installs_a_signed_update(tmp_path: Path) -> None:
    """A bundle signed by the operator's key and encrypted for the fleet key in the
    Secret installs through the API on a pod started from the manifests."""
    from tests.test_updates_kit import UpdateKit

    cluster = Cluster(tmp_path / "cluster")
    kit = UpdateKit(tmp_path / "kit")
    kit.signing_path = cluster.operator / "signing.pem"
    from updater.signing import load_signing_key
    from updater.wrapping import read_unwrap_key

    kit.signing = load_signing_key(kit.signing_path)
    fleet_copy = tmp_path / "fleet.key"
    fleet_copy.write_bytes((cluster.secret / "fleet.key").read_bytes())
    fleet_copy.chmod(0o600)
    kit.fleet = read_unwrap_key(fleet_copy)
    bundle = kit.bundle(9)
    with cluster.pod("pod-0") as pod:
        reply = httpx.post(
            f"{pod.url}/api/models/digits/bundles",
            content=bundle.read_bytes(),
            headers={"authorization": f"Bearer {cluster.token('admin')}"},
            timeout=120,
        )
        assert reply.status_code == 201, reply.text
        assert reply.json()["version"] == 9


@pytest.mark.slow
def test_a_pod_whose_jwks_holds_no_key_is_not_ready(tmp_path: Path) -> None:
    """It would refuse every token: the load balancer must not send it traffic."""
    from tests.waiting import wait_until

    cluster = Cluster(tmp_path)
    jwks = cluster.secret / "jwks.json"
    jwks.chmod(0o640)
    jwks.write_text('{"keys": []}')
    with cluster.pod("pod-0", wait_ready=False) as pod:

        def settled() -> httpx.Response | None:  # ready, or not ready for a stated reason
            try:
                reply = httpx.get(f"{pod.url}/v2/health/ready", timeout=2)
            except httpx.TransportError:
                return None
            return reply if reply.status_code == 200 or "error" in reply.json() else None

        ready = wait_until(settled, timeout_s=60, what="a readiness verdict")
        assert ready.status_code == 503
        assert "no token signing key" in ready.json()["error"]
