"""The audit log in a real `edgeserve serve` process: refused tokens end up audited
(aggregated), `/api/audit` needs scope admin, admin actions and 403s are recorded, and
the chain the server wrote verifies with `edgeserve audit verify`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from edgeserve.auth import issuer
from tests.serving import RunningServer, run_server
from tests.test_auth_server import wait_until_live
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    tmp = tmp_path_factory.mktemp("audit-server")
    state_dir = tmp / "state"
    issuer.init_keys(state_dir)
    empty = tmp / "models"
    empty.mkdir()
    with run_server(
        tmp, "[auth]\nfailed_auth_burst = 0\n", repository=empty, wait_ready=False
    ) as s:
        wait_until_live(s)
        yield s, state_dir


def token(state_dir: Path, *scopes: str, subject: str = "it") -> str:
    return issuer.create_token(state_dir, scopes, 300, subject, "edgeserve-local", "edgeserve")


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def audit_entries(server: RunningServer, admin: str, since: int = 0) -> list[dict]:
    response = httpx.get(
        f"{server.url}/api/audit",
        params={"since": since, "limit": 1000},
        headers=bearer(admin),
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response.json()["entries"]


def wait_for(
    server: RunningServer, admin: str, found: Callable[[list[dict]], bool], timeout_s: float = 20
) -> list[dict]:
    def found_entries() -> list[dict] | None:
        entries = audit_entries(server, admin)
        return entries if found(entries) else None

    return wait_until(found_entries, timeout_s, "the audit entries", interval_s=0.1)


def test_refused_tokens_are_audited_and_aggregated(live: tuple[RunningServer, Path]) -> None:
    server, state_dir = live
    with httpx.Client(timeout=10) as client:
        for _ in range(40):
            assert client.get(server.url + "/v2", headers=bearer("garbage")).status_code == 401
        for _ in range(5):
            assert client.get(server.url + "/v2").status_code == 401
    admin = token(state_dir, "admin")

    def refused(entries: list[dict], reason_part: str) -> list[dict]:
        return [
            e
            for e in entries
            if e["action"] == "auth.refused" and reason_part in e["detail"]["reason"]
        ]

    def counted(entries: list[dict]) -> bool:
        missing = refused(entries, "missing token")
        garbage = [e for e in refused(entries, "") if e not in missing]
        return (
            sum(e["detail"]["count"] for e in garbage) >= 40
            and sum(e["detail"]["count"] for e in missing) >= 5
        )

    entries = wait_for(server, admin, counted)
    assert counted(entries), entries
    garbage = [e for e in refused(entries, "") if "missing token" not in e["detail"]["reason"]]
    assert len(garbage) < 40, "a flood of identical refusals is aggregated, not one row each"
    assert {e["client"] for e in garbage} == {"127.0.0.1"}
    assert all(e["outcome"] == "denied" and e["subject"] == "" for e in garbage)
    assert all("garbage" not in str(e["detail"]) for e in garbage), "never the token itself"


def test_audit_endpoint_needs_admin(live: tuple[RunningServer, Path]) -> None:
    server, state_dir = live
    url = server.url + "/api/audit"
    assert httpx.get(url, timeout=10).status_code == 401
    reader = token(state_dir, "read", "infer", subject="reader")
    forbidden = httpx.get(url, headers=bearer(reader), timeout=10)
    assert forbidden.status_code == 403
    assert "insufficient_scope" in forbidden.headers["www-authenticate"]
    admin = token(state_dir, "admin")
    entries = wait_for(
        server,
        admin,
        lambda es: any(e["action"] == "auth.forbidden" and e["subject"] == "reader" for e in es),
    )
    denied = [e for e in entries if e["action"] == "auth.forbidden" and e["subject"] == "reader"]
    assert denied and denied[0]["target"] == "/api/audit"
    assert denied[0]["detail"]["scope"] == "admin"


def test_admin_actions_are_recorded_with_subject_and_client(
    live: tuple[RunningServer, Path],
) -> None:
    server, state_dir = live
    admin = token(state_dir, "admin", subject="operator")
    response = httpx.put(
        server.url + "/api/flags/audit-test",
        json={"enabled": False},
        headers=bearer(admin),
        timeout=10,
    )
    assert response.status_code < 500, response.text
    entries = wait_for(server, admin, lambda es: any(e["action"] == "admin.request" for e in es))
    done = [e for e in entries if e["action"] == "admin.request"]
    assert done[0]["target"] == "/api/flags/audit-test"
    assert (done[0]["subject"], done[0]["client"]) == ("operator", "127.0.0.1")
    assert done[0]["detail"]["method"] == "PUT"


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("since=abc", 400),
        ("since=²", 400),  # str.isdigit() says yes; int() then raised: a 500
        ("limit=²", 400),
        ("limit=" + "9" * 19, 400),
        ("limit=0", 400),
        ("limit=5000", 400),
        ("since=2020-01-01T00:00:00Z&limit=5", 200),
        ("since=3", 200),
    ],
)
def test_audit_query_parameters(live: tuple[RunningServer, Path], query: str, status: int) -> None:
    server, state_dir = live
    response = httpx.get(
        f"{server.url}/api/audit?{query}", headers=bearer(token(state_dir, "admin")), timeout=10
    )
    assert response.status_code == status, response.text
    if status == 200:
        body = response.json()
        seqs = [e["seq"] for e in body["entries"]]
        assert seqs == sorted(seqs)
        assert body["next"] == (
            seqs[-1] if seqs else int(query.split("=")[1]) if query == "since=3" else 0
        )


def test_the_servers_chain_verifies_from_the_cli(live: tuple[RunningServer, Path]) -> None:
    server, _ = live
    done = subprocess.run(
        [sys.executable, "-m", "edgeserve", "audit", "verify", "--config", str(server.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "audit chain intact" in done.stdout


def test_a_rejected_bundle_is_audited(live: tuple[RunningServer, Path]) -> None:
    server, state_dir = live
    admin = token(state_dir, "admin", subject="uploader")
    response = httpx.post(
        server.url + "/api/models/digits/bundles",
        content=b"not a bundle at all",
        headers=bearer(admin),
        timeout=30,
    )
    assert 400 <= response.status_code < 500, response.text
    entries = wait_for(
        server,
        admin,
        lambda es: (
            any(e["action"] == "update.install" for e in es)
            and any(e["target"] == "/api/models/digits/bundles" for e in es)
        ),
    )
    rejected = [e for e in entries if e["action"] == "update.install"]
    assert rejected[0]["outcome"] == "rejected"
    assert rejected[0]["subject"] == "uploader"
    request = [e for e in entries if e["target"] == "/api/models/digits/bundles"]
    assert request[0]["outcome"] == "failed"
    assert request[0]["detail"]["status"] == response.status_code
