"""The dashboard in a real browser: sign in with a token, see the experiment and its
charts, no console errors; a screenshot is kept in test-artifacts/."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgeserve.auth.issuer import create_token, init_keys
from tests.browser import CHROMIUM, chromium_page
from tests.serving import MODELS, run_server

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
X = np.load(MODELS / "digits" / "heldout.npz")["X"]
Y = np.load(MODELS / "digits" / "heldout.npz")["y"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


@pytest.mark.slow
def test_dashboard_renders_experiment_with_charts_and_no_console_errors(tmp_path: Path) -> None:
    init_keys(tmp_path / "state")
    admin = create_token(
        tmp_path / "state", ["admin", "infer", "read"], 3600, "ops", "edgeserve-local", "edgeserve"
    )
    reader = create_token(
        tmp_path / "state", ["read"], 3600, "viewer", "edgeserve-local", "edgeserve"
    )
    infer_only = create_token(
        tmp_path / "state", ["infer"], 3600, "app", "edgeserve-local", "edgeserve"
    )
    with run_server(tmp_path, "[telemetry]\nwrite_interval_ms = 20.0\n") as server:
        headers = {"Authorization": f"Bearer {admin}"}
        with httpx.Client(timeout=10, headers=headers) as client:
            client.post(
                f"{server.url}/api/experiments",
                json={
                    "id": "int8-vs-fp32",
                    "model": "digits",
                    "unit": "header:x-user-id",
                    "variants": [
                        {"name": "fp32", "version": 1, "weight": 50},
                        {"name": "int8", "version": 2, "weight": 50},
                    ],
                },
            ).raise_for_status()
            client.put(
                f"{server.url}/api/flags/new-ui", json={"enabled": True, "rollout_percent": 25}
            )
            for i in range(300):
                row = i % len(X)
                reply = client.post(
                    f"{server.url}/v2/models/digits/infer",
                    headers={**headers, "x-user-id": f"u{i % 60}"},
                    json={
                        "inputs": [
                            {
                                "name": "input",
                                "datatype": "FP32",
                                "shape": [1, 64],
                                "data": X[row].tolist(),
                            }
                        ]
                    },
                )
                client.post(
                    f"{server.url}/api/feedback",
                    json={"request_id": reply.headers["x-request-id"], "label": str(int(Y[row]))},
                )
        assert httpx.get(f"{server.url}/dashboard").status_code == 200  # the sign-in form
        assert "Sign out" not in httpx.get(f"{server.url}/dashboard").text
        with chromium_page() as page:
            page.navigate(f"{server.url}/dashboard")
            assert page.evaluate("!!document.querySelector('input[name=token]')")
            page.submit(
                f"document.querySelector('input[name=token]').value = "
                f"{json.dumps(infer_only)}; document.forms[0].submit(); true"
            )
            assert "not accepted" in page.evaluate("document.body.innerText")
            page.navigate(f"{server.url}/dashboard")
            page.submit(
                f"document.querySelector('input[name=token]').value = "
                f"{json.dumps(reader)}; document.forms[0].submit(); true"
            )
            page.console_errors.clear()  # the refused token above was a 401, on purpose
            page.navigate(f"{server.url}/dashboard")
            text = page.evaluate("document.body.innerText")
            charts = page.evaluate("document.querySelectorAll('svg.chart').length")
            circles = page.evaluate("document.querySelectorAll('svg.chart circle').length")
            widths = page.evaluate(
                "Array.from(document.querySelectorAll('svg.chart line[stroke-width=\"3\"]'))"
                ".map(l => l.x2.baseVal.value - l.x1.baseVal.value)"
            )
            page.drain()
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(ARTIFACTS / "dashboard.png")
            cookie = page.send("Network.getCookies", urls=[server.url + "/dashboard"])
            errors = page.console_errors
    assert "Experiment int8-vs-fp32" in text
    assert "Sample ratio check" in text and "always-valid p" in text
    assert "new-ui" in text and "digits" in text
    assert charts >= 3 and circles >= 2
    assert widths and min(widths) > 20, widths  # every interval readable, none a dot
    assert errors == [], errors
    (session,) = [c for c in cookie["cookies"] if c["name"] == "edgeserve_dashboard"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def test_dashboard_headers_forbid_framing_scripts_and_caching(server) -> None:
    reply = httpx.get(f"{server.url}/dashboard")
    policy = reply.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert reply.headers["cache-control"] == "no-store"
    assert reply.headers["x-content-type-options"] == "nosniff"
