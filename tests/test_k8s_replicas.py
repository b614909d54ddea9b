"""Two replicas from the shipped manifests: two real server processes sharing one config
(the ConfigMap) and one Secret, each with its own state folder (its pod's volume).

What the README ("Running several replicas") says is shared must agree on both: flags
and kill switches, experiments and their assignments, subject hashes. What it says is
per pod must behave exactly as written: a forget, a job and feedback reach one pod.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.k8s_pods import Cluster, RunningServer
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DECLARED = """
[[experiments.define]]
id = "digits-v2"
model = "digits"
variants = [{name = "v1", version = 1, weight = 50}, {name = "v2", version = 2, weight = 50}]
unit = "claim:sub"
flag = "digits-v2-rollout"
"""
FLAGS = '{"digits-v2-rollout" = {enabled = true, rollout_percent = 100}}'
ROW = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [3.0] * 64}]}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, list]]:
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), extra_config=DECLARED, flags=FLAGS)
    with cluster.pod("pod-0") as first, cluster.pod("pod-1") as second:
        yield cluster, [first, second]


def _auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _infer(pod: RunningServer, token: str, user: str | None = None) -> httpx.Response:
    headers = {**_auth(token), **({"x-user-id": user} if user else {})}
    reply = httpx.post(f"{pod.url}/v2/models/digits/infer", json=ROW, headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply


def test_declared_flags_and_experiments_are_the_same_on_every_replica(replicas) -> None:
    cluster, pods = replicas
    read = _auth(cluster.token("read"))
    flags = [httpx.get(f"{p.url}/api/flags", headers=read, timeout=10).json() for p in pods]
    assert flags[0] == flags[1] and "digits-v2-rollout" in str(flags[0])
    docs = [
        httpx.get(f"{p.url}/api/experiments/digits-v2", headers=read, timeout=10).json()
        for p in pods
    ]
    assert [d["variants"] for d in docs] == [docs[0]["variants"]] * 2


def test_a_subject_gets_the_same_variant_on_every_replica(replicas) -> None:
    cluster, pods = replicas
    answers = {}
    for n in range(6):
        token = cluster.token("infer", subject=f"user-{n}")
        versions = [_infer(p, token).json()["model_version"] for p in pods]
        assert versions[0] == versions[1], f"user-{n}: {versions}"
        answers[n] = versions[0]
    assert set(answers.values()) == {"1", "2"}  # both variants are in use


def test_a_kill_switch_or_flag_change_on_one_replica_is_refused(replicas) -> None:
    """Declared in the config, a flag cannot be flipped on one pod only (the other would
    keep serving); the refusal says where to change it."""
    cluster, pods = replicas
    admin = _auth(cluster.token("admin"))
    for pod in pods:
        reply = httpx.put(
            f"{pod.url}/api/flags/model.digits", json={"enabled": False}, headers=admin, timeout=10
        )
        assert reply.status_code == 409
        assert "runtime_changes = false" in reply.json()["error"]
        paused = httpx.post(f"{pod.url}/api/experiments/digits-v2/pause", headers=admin, timeout=10)
        assert paused.status_code == 409
    token = cluster.token("infer", subject="after-the-refusal")
    assert all(_infer(p, token).status_code == 200 for p in pods)


def _subject_hashes(pod: RunningServer) -> set[str]:
    db = pod.config_path.parent / "state" / "telemetry.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT subject_hash FROM inferences WHERE subject_hash != ''")
        return {r[0] for r in rows}


def test_a_subject_hashes_alike_and_forget_is_per_pod_as_documented(replicas) -> None:
    cluster, pods = replicas
    token = cluster.token("infer", subject="shop-app")
    for pod in pods:
        _infer(pod, token, user="alice")  # [telemetry] subject_header
    hashes = [wait_until(lambda p=p: _subject_hashes(p), 30, "rows on disk") for p in pods]
    assert hashes[0] & hashes[1], "the Secret's subject.key hashes alice alike on both pods"
    admin = _auth(cluster.token("admin"))
    forget = [
        httpx.post(
            f"{p.url}/api/telemetry/forget", json={"subject": "alice"}, headers=admin, timeout=30
        ).json()["removed_rows"]
        for p in pods
    ]
    assert forget == [1, 1], "each pod forgets only its own rows: ask every pod"
    readme = (ROOT / "README.md").read_text()
    assert "every pod" in readme.split("## Running several replicas")[1].split("\n## ")[0]


def test_a_job_and_feedback_belong_to_the_pod_that_took_them(replicas) -> None:
    cluster, pods = replicas
    token = cluster.token("infer", subject="bob")
    lines = "\n".join('{"input": %s}' % ([1.0] * 64) for _ in range(3))
    created = httpx.post(
        f"{pods[0].url}/api/jobs?model=digits",
        content=lines,
        headers={**_auth(token), "content-type": "application/x-ndjson"},
        timeout=30,
    )
    assert created.status_code == 202, created.text
    location = created.headers["location"]
    assert (
        httpx.get(f"{pods[0].url}{location}", headers=_auth(token), timeout=10).status_code == 200
    )
    assert (
        httpx.get(f"{pods[1].url}{location}", headers=_auth(token), timeout=10).status_code == 404
    )
    request_id = _infer(pods[0], token).headers.get("x-request-id") or ""
    assert request_id
    label = {"request_id": request_id, "label": "3"}
    elsewhere = httpx.post(
        f"{pods[1].url}/api/feedback", json=label, headers=_auth(token), timeout=30
    )
    assert elsewhere.status_code == 404
    here = httpx.post(f"{pods[0].url}/api/feedback", json=label, headers=_auth(token), timeout=30)
    assert here.status_code == 202, here.text
