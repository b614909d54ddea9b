"""One caller cannot force a signed update to roll back (issue 18): with a single `infer`
token, 49 small requests and one huge one no longer push the health watch over its p99;
speed is judged per row, without batch-size outliers, and only across several callers.
A version the watch did roll back can be installed again by an admin on purpose."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from edgeserve.auth import issuer
from tests.serving import run_server
from tests.test_updates_kit import UpdateKit, digits_rows, upload
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

UNBOUNDED = 'backend = "onnxruntime"\nmax_batch_size = 0\n'


def test_one_infer_client_cannot_roll_back_a_signed_update(tmp_path: Path) -> None:
    kit = UpdateKit(tmp_path)
    issuer.init_keys(kit.state_dir)

    def token(subject: str, *scopes: str) -> dict[str, str]:
        value = issuer.create_token(
            kit.state_dir, scopes, 600, subject, "edgeserve-local", "edgeserve"
        )
        return {"authorization": f"Bearer {value}"}

    admin = token("ops", "admin", "read")
    mallory = token("mallory", "infer")
    # every small request is far under 1 ms of compute per row; the watch judges at 50
    config = kit.config(auth=True, watch_window_s=20.0, min_requests=50, max_p99_ms=1.0)
    with run_server(tmp_path, config) as server:
        url = f"{server.url}/v2/models/digits/infer"
        bundle3 = kit.bundle(3, model_toml=UNBOUNDED)
        assert upload(server.url, bundle3, admin["authorization"][7:]).status_code == 201
        bundle4 = kit.bundle(4, model_toml=UNBOUNDED)
        assert upload(server.url, bundle4, admin["authorization"][7:]).status_code == 201
        with httpx.Client(timeout=120, headers=mallory) as client:

            def infer(body: dict) -> httpx.Response:
                """Answered; a 429 of a loop running late (a loaded box) is retried."""

                def answered() -> httpx.Response | None:
                    reply = client.post(url, json=body)
                    assert reply.status_code in (200, 429), reply.text
                    return reply if reply.status_code == 200 else None

                return wait_until(answered, 60, "an answer past the overload 429s")

            for i in range(49):
                infer(digits_rows(1, seed=i))
            big = infer(digits_rows(20_000, seed=99))  # the outlier
            assert big.json()["model_version"] == "4"

        def verdict() -> str | None:
            doc = httpx.get(f"{server.url}/api/models/digits/update", headers=admin).json()
            return None if doc["verdict"] in ("none", "probation") else doc["verdict"]

        # the window ends and the version is confirmed: one caller cannot judge its speed
        assert wait_until(verdict, 120, "the health watch's verdict") == "confirmed"
        doc = httpx.get(f"{server.url}/api/models/digits/update", headers=admin).json()
        assert doc["active_version"] == 4
        assert all(h["event"] != "rollback" for h in doc["history"]), doc["history"]


def test_a_version_the_watch_rolled_back_can_be_reinstalled_by_an_admin(tmp_path: Path) -> None:
    kit = UpdateKit(tmp_path)
    config = kit.config(watch_window_s=120.0, min_requests=20, max_error_rate=0.2)
    with run_server(tmp_path, config) as server:
        assert upload(server.url, kit.bundle(3)).status_code == 201
        assert upload(server.url, kit.failing_bundle(4)).status_code == 201
        flipped = time.monotonic()
        with httpx.Client(timeout=30) as client:

            def rolled_back() -> bool:
                doc = client.get(f"{server.url}/api/models/digits/update").json()
                if doc["active_version"] == 3:
                    return True
                client.post(f"{server.url}/v2/models/digits/infer", json=digits_rows())
                return False

            wait_until(rolled_back, 120, "the rollback to version 3", interval_s=0)
        assert time.monotonic() - flipped < 120
        again = kit.failing_bundle(4)

        def settled(**params: str) -> httpx.Response | None:
            """The upload's answer once the rollback's swap has finished (one at a time)."""
            reply = upload(server.url, again, **params)
            return None if "already in progress" in reply.text else reply

        refused = wait_until(settled, 60, "the rollback's swap to finish")
        assert refused.status_code == 409 and "downgrade" in refused.text  # never by accident
        reply = settled(allow_downgrade="true")  # an admin, on purpose
        assert reply is not None and reply.status_code == 201, reply and reply.text
        doc = httpx.get(f"{server.url}/api/models/digits/update").json()
        assert doc["active_version"] == 4
