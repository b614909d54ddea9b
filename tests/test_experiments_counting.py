"""What an experiment counts (issue 20), driven from outside through the HTTP API of a
real server: units not requests, only units inside the flag's rollout, a fresh window
after a rollback, one label per request, KPI events only after exposure, shadow credit
only where the shadow agreed, one name for latency, flags that keep their rollout, and
concluded reports computed once."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from onnx import load_model_from_string, numpy_helper

from tests.serving import MODELS, RunningServer, run_server
from tests.waiting import wait_until

HELDOUT = np.load(MODELS / "digits" / "heldout.npz")
X, Y = HELDOUT["X"], HELDOUT["y"]

CONFIG = (
    "[auth]\nenabled = false\n[telemetry]\nwrite_interval_ms = 20.0\n"
    "[experiments]\ndecision_interval_s = 0.2\nmin_samples = 60\n"
)


def _noisy(model: bytes) -> bytes:
    """The digits classifier with noise on its weight matrices: it disagrees with the
    original on some inputs (the candidate a shadow run should catch)."""
    proto = load_model_from_string(model)
    rng = np.random.default_rng(7)
    for init in proto.graph.initializer:
        weights = numpy_helper.to_array(init)
        if weights.ndim == 2 and weights.dtype == np.float32:
            noisy = weights + rng.normal(0, 0.6, weights.shape).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    return proto.SerializeToString()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """digits 1: the shipped classifier; 2: a noisy copy of it (same cost, other answers)."""
    root = tmp_path_factory.mktemp("repo")
    folder = root / "digits"
    good = (MODELS / "digits" / "1" / "model.onnx").read_bytes()
    for version, blob in ((1, good), (2, _noisy(good))):
        (folder / str(version)).mkdir(parents=True)
        (folder / str(version) / "model.onnx").write_bytes(blob)
    toml = (MODELS / "digits" / "model.toml").read_text()
    (folder / "model.toml").write_text(toml.replace("default_version = 2", "default_version = 1"))
    shutil.copy(MODELS / "digits" / "heldout.npz", folder / "heldout.npz")
    with run_server(tmp_path_factory.mktemp("server"), CONFIG, repository=root) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    """A client; every experiment a test leaves active is stopped after it (one model)."""
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c
        for exp in c.get("/api/experiments").json():
            if exp["status"] == "active":
                c.post(f"/api/experiments/{exp['id']}/stop")


def _body(row: int) -> dict:
    return {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": X[row].tolist()}
        ],
        "outputs": [{"name": "label"}],
    }


def _infer(client: httpx.Client, row: int, user: str, path: str = "") -> httpx.Response:
    reply = client.post(
        f"/v2/models/digits{path}/infer", json=_body(row), headers={"x-user-id": user}
    )
    assert reply.status_code == 200, reply.text
    return reply


def _label_of(reply: httpx.Response) -> int:
    (output,) = [o for o in reply.json()["outputs"] if o["name"] == "label"]
    return int(output["data"][0])


def _create(client: httpx.Client, exp_id: str, **fields: object) -> dict:
    doc = {
        "id": exp_id,
        "model": "digits",
        "unit": "header:x-user-id",
        "variants": [
            {"name": "control", "version": 1, "weight": 50},
            {"name": "candidate", "version": 2, "weight": 50},
        ],
        **fields,
    }
    reply = client.post("/api/experiments", json=doc)
    assert reply.status_code == 201, reply.text
    return reply.json()


def _report(client: httpx.Client, exp_id: str) -> dict:
    reply = client.get(f"/api/experiments/{exp_id}/report")
    assert reply.status_code == 200, reply.text
    return reply.json()


def _durable(client: httpx.Client, seq: int) -> None:
    """Wait until the telemetry writer has committed record `seq` (and all before it)."""
    wait_until(
        lambda: client.get("/api/telemetry/status").json()["durable_seq"] >= seq,
        60,
        f"telemetry record {seq} to be committed",
    )


def _last_seq(client: httpx.Client) -> int:
    """A marker event: once it is durable, every record accepted before it is too."""
    reply = client.post("/api/events", json={"name": "marker", "value": 0})
    assert reply.status_code == 202, reply.text
    return reply.json()["seq"]


def test_srm_counts_distinct_units_not_requests(client: httpx.Client) -> None:
    """400 users make one request each, then one of them makes 150 more: the split by
    unit is fine, and the report must not call it a mismatch (it blocked every decision)."""
    _create(client, "srm-units")
    for u in range(400):
        _infer(client, u % len(X), f"srm-{u}")
    for i in range(150):
        _infer(client, i % len(X), "srm-0")
    _durable(client, _last_seq(client))
    report = _report(client, "srm-units")
    srm = report["sample_ratio_mismatch"]
    assert sum(v["requests"] for v in report["variants"]) == 550
    assert sum(srm["observed"]) == 400, srm
    assert not srm["mismatch"], srm
    assert sum(v["units"] for v in report["variants"]) == 400
    assert "sample ratio mismatch" not in report["decision"]["reason"]


def test_units_held_back_by_the_flag_are_outside_the_experiment(client: httpx.Client) -> None:
    """An experiment gated by a flag at 50 %: the users the flag holds back are served
    the control but are not the experiment's control."""
    assert client.put("/api/flags/gate20", json={"rollout_percent": 50}).status_code == 200
    _create(client, "gated", flag="gate20")
    in_experiment = 0
    for u in range(600):
        reply = _infer(client, u % len(X), f"gate-{u}")
        in_experiment += "x-edgeserve-variant" in reply.headers
    _durable(client, _last_seq(client))
    report = _report(client, "gated")
    srm = report["sample_ratio_mismatch"]
    assert 200 < in_experiment < 400  # about half the users are in the rollout
    assert sum(srm["observed"]) == in_experiment, srm
    assert not srm["mismatch"], srm


def test_a_rolled_back_experiment_shows_its_outcome_not_a_mismatch(
    client: httpx.Client,
) -> None:
    """After an automatic rollback the candidate's weight is 0: the report must neither
    compare the old window's traffic with the new weights nor recompute a decision."""
    _create(client, "rollback20", auto=True, max_p99_ms=0.001)  # every candidate is too slow
    for u in range(400):
        _infer(client, u % len(X), f"rb-{u}")
        if client.get("/api/experiments/rollback20").json()["status"] == "concluded":
            break
    exp = wait_until(
        lambda: (
            (e := client.get("/api/experiments/rollback20").json())["status"] == "concluded" and e
        ),
        60,
        "the decision loop to roll the candidate back",
    )
    assert exp["decision"] == "rolled_back"
    report = _report(client, "rollback20")
    srm = report["sample_ratio_mismatch"]
    assert srm is None or not srm["mismatch"], srm
    assert report["decision"]["action"] == "rolled_back", report["decision"]
    assert report["decision"]["reason"] == exp["reason"]


def test_feedback_counts_one_label_per_request_and_refuses_unknown_ids(
    client: httpx.Client,
) -> None:
    """Posting twice for one request id counts once (the second is refused), and a label
    for a request id the server never saw is a 404, not an accepted 202."""
    _create(client, "dedup")
    ids = []
    for u in range(40):
        reply = _infer(client, u % len(X), f"dd-{u}")
        ids.append((reply.headers["x-request-id"], str(int(Y[u % len(X)]))))
    for request_id, label in ids:
        first = client.post("/api/feedback", json={"request_id": request_id, "label": label})
        assert first.status_code == 202, first.text
        again = client.post("/api/feedback", json={"request_id": request_id, "label": label})
        assert again.status_code == 409, again.text
    unknown = client.post("/api/feedback", json={"request_id": "never-made", "label": "1"})
    assert unknown.status_code == 404, unknown.text
    assert "never-made" in unknown.json()["error"]
    _durable(client, _last_seq(client))
    report = _report(client, "dedup")
    assert sum(v["labelled"] for v in report["variants"]) == 40


def test_kpi_counts_only_events_after_the_units_exposure(client: httpx.Client) -> None:
    """40 of 80 users buy for 10 before they are exposed; then everyone buys for 1.
    Only the purchase after exposure is the experiment's effect: the means are 1.0."""
    _create(client, "kpi20", primary_metric="event:buy20")
    for u in range(40):
        client.post("/api/events", json={"name": "buy20", "value": 10, "unit": f"kpi-{u}"})
    _durable(client, _last_seq(client))  # the early purchases are stored before exposure
    for u in range(80):
        _infer(client, u % len(X), f"kpi-{u}")
    _durable(client, _last_seq(client))
    for u in range(80):
        client.post("/api/events", json={"name": "buy20", "value": 1, "unit": f"kpi-{u}"})
    _durable(client, _last_seq(client))
    report = _report(client, "kpi20")
    assert sum(v["units"] for v in report["variants"]) == 80
    assert [v["kpi_mean"] for v in report["variants"]] == [1.0, 1.0], report["variants"]


def test_a_shadow_gets_credit_only_where_it_answered_as_the_served_version(
    client: httpx.Client,
) -> None:
    """Feedback says the served answer was correct: the shadow, which answered
    differently on some requests, was wrong on those, not right."""
    rows = [
        r for r in range(300) if _label_of(_infer(client, r, "probe", "/versions/1")) == int(Y[r])
    ][:50]
    shadow_answers = [_label_of(_infer(client, r, "probe", "/versions/2")) for r in rows]
    served_answers = [int(Y[r]) for r in rows]
    agree = sum(a == b for a, b in zip(shadow_answers, served_answers, strict=True))
    assert 0 < agree < len(rows)  # the noisy candidate disagrees on some
    _create(
        client,
        "shadow20",
        mode="shadow",
        variants=[
            {"name": "control", "version": 1, "weight": 100},
            {"name": "candidate", "version": 2, "weight": 0},
        ],
    )
    for i, r in enumerate(rows):
        reply = _infer(client, r, f"sh-{i}")
        request_id = reply.headers["x-request-id"]
        sent = client.post("/api/feedback", json={"request_id": request_id, "correct": True})
        assert sent.status_code == 202, sent.text

    def counted() -> dict | None:
        _durable(client, _last_seq(client))
        report = _report(client, "shadow20")
        return report if report["variants"][1]["requests"] == len(rows) else None

    report = wait_until(counted, 60, "every shadow copy to be recorded", interval_s=0.2)
    control, candidate = report["variants"]
    assert control["accuracy"] == 1.0
    assert candidate["labelled"] == len(rows)
    assert candidate["accuracy"] == pytest.approx(agree / len(rows)), candidate
    # the agreement report a shadow run exists for
    agreement = report["shadow_agreement"]
    assert agreement["pairs"] == len(rows) and agreement["units"] == len(rows)
    assert agreement["agreement_rate"] == pytest.approx(agree / len(rows))
    low, high = agreement["agreement_ci"]["low"], agreement["agreement_ci"]["high"]
    assert 0 <= low < agree / len(rows) < high <= 1
    # only the label was asked for: no top score to compare
    assert agreement["mean_abs_top_score_difference"] is None
    confusion = agreement["confusion"]
    assert sum(n for row in confusion.values() for n in row.values()) == len(rows)
    assert sum(row.get(c, 0) for c, row in confusion.items()) == agree


def test_the_report_and_the_decision_loop_share_latency_in_ms(client: httpx.Client) -> None:
    """The loop carries the running minimum of latency_ms; the report names the same
    comparison and shows a p-value no larger than that minimum."""
    _create(client, "latency20", auto=True)
    for u in range(120):
        _infer(client, u % len(X), f"lat-{u}")
    exp = wait_until(
        lambda: (
            "candidate/latency_ms"
            in (e := client.get("/api/experiments/latency20").json())["running_p"]
            and e
        ),
        60,
        "the decision loop to test latency",
    )
    report = _report(client, "latency20")
    metrics = {c["metric"] for c in report["comparisons"]}
    assert "latency_s" not in metrics and "latency_ms" in metrics, metrics
    (latency,) = [c for c in report["comparisons"] if c["metric"] == "latency_ms"]
    p = latency["sequential"]["always_valid_p_value"]
    assert p <= exp["running_p"]["candidate/latency_ms"] + 1e-12
    control_ms = report["variants"][0]["latency_ms"]["p50"]
    assert latency["fixed_horizon"]["control_estimate"] > control_ms / 100  # ms, not s


def test_disabling_a_flag_keeps_its_rollout(client: httpx.Client) -> None:
    client.put("/api/flags/keep20", json={"enabled": True, "rollout_percent": 50})
    off = client.put("/api/flags/keep20", json={"enabled": False})
    assert off.json() == {"name": "keep20", "enabled": False, "rollout_percent": 50.0}
    on = client.put("/api/flags/keep20", json={"enabled": True})
    assert on.json()["rollout_percent"] == 50.0  # turning it back on does not widen it
    (listed,) = [f for f in client.get("/api/flags").json() if f["name"] == "keep20"]
    assert listed["rollout_percent"] == 50.0


def test_a_concluded_report_is_computed_once(client: httpx.Client) -> None:
    """A concluded experiment cannot change: its report is computed once and served from
    memory (the dashboard reads every experiment's report on every load)."""
    _create(client, "cached20")
    for u in range(30):
        _infer(client, u % len(X), f"c-{u}")
    _durable(client, _last_seq(client))
    assert client.post("/api/experiments/cached20/conclude").status_code == 200
    first = _report(client, "cached20")
    second = _report(client, "cached20")
    assert first["computed_at"] == second["computed_at"]
    assert first["decision"]["action"] == "concluded"


def test_an_error_free_metric_gets_a_finite_interval(client: httpx.Client) -> None:
    """No errors on either side: the error-rate difference's interval is finite and
    inside [-1, 1] (it was ±3e4 and collapsed every other interval on the dashboard)."""
    _create(client, "noerrors20")
    for u in range(60):
        _infer(client, u % len(X), f"ne-{u}")
    _durable(client, _last_seq(client))
    report = _report(client, "noerrors20")
    (errors,) = [c for c in report["comparisons"] if c["metric"] == "error_rate"]
    interval = errors["sequential"]["confidence_sequence"]
    assert interval["low"] is not None and interval["high"] is not None
    assert -1.0 <= interval["low"] <= 0.0 <= interval["high"] <= 1.0, interval


def test_every_interval_on_the_dashboard_is_readable(client: httpx.Client) -> None:
    """An error-free metric next to latency: each row has its own scale, so no interval
    collapses to a dot (a ±3e4 error-rate interval used to set one shared axis)."""
    _create(client, "readable20")
    for u in range(80):
        _infer(client, u % len(X), f"rd-{u}")
    _durable(client, _last_seq(client))
    page = client.get("/dashboard", headers={"Authorization": "Bearer any"})
    assert page.status_code == 200 and "Experiment readable20" in page.text
    section = page.text.split("Experiment readable20", 1)[1].split("<h2>", 1)[0]
    assert "candidate latency_ms" in section and "candidate error_rate" in section
    widths = [
        float(x2) - float(x1)
        for x1, x2 in re.findall(
            r'<line x1="([\d.]+)" y1="\d+" x2="([\d.]+)" y2="\d+" '
            r'stroke="#[0-9a-f]+" stroke-width="3"/>',
            section,
        )
    ]
    assert len(widths) >= 2 and min(widths) > 20, widths


def test_the_report_adjusts_an_event_kpi_with_the_pre_period(client: httpx.Client) -> None:
    """Each user's spend before exposure predicts their spend after it: the report's
    CUPED block says how much variance the adjustment removed."""
    _create(client, "cuped20", primary_metric="event:spend20")
    rng = np.random.default_rng(20)
    habit = rng.gamma(2.0, 5.0, 60)
    for u in range(60):
        client.post("/api/events", json={"name": "spend20", "value": habit[u], "unit": f"cu-{u}"})
    _durable(client, _last_seq(client))
    for u in range(60):
        _infer(client, u % len(X), f"cu-{u}")
    _durable(client, _last_seq(client))
    for u in range(60):
        value = habit[u] + rng.normal(0, 1.0)
        client.post("/api/events", json={"name": "spend20", "value": value, "unit": f"cu-{u}"})
    _durable(client, _last_seq(client))
    report = _report(client, "cuped20")
    assert report["cuped"] is not None, report["variants"]
    assert report["cuped"]["variance_reduction"] > 0.8
    assert report["cuped"]["correlation"] > 0.9


def test_a_kpi_metric_on_request_level_randomisation_is_refused_naming_the_field(
    client: httpx.Client,
) -> None:
    """unit = "request_id" randomises each request: a user's later event cannot be given
    to one variant (the same user saw several), so the KPI would always be empty."""
    for metric in ("event:buy20", "conversion:signup"):
        doc = {
            "id": "kpi-per-request",
            "model": "digits",
            "primary_metric": metric,
            "variants": [
                {"name": "control", "version": 1, "weight": 50},
                {"name": "candidate", "version": 2, "weight": 50},
            ],
        }
        reply = client.post("/api/experiments", json=doc)
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert "'unit'" in error and "request_id" in error and metric in error, error
    assert client.get("/api/experiments/kpi-per-request").status_code == 404
