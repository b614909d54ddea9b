"""Async jobs on a real server: submit, follow, download, cancel, and survive SIGKILL."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.serving import RunningServer, run_server, wait_until_ready
from tests.test_batch_support import digits_rows, model_repository, server_config
from tests.waiting import wait_until

JSONL = {"content-type": "application/x-ndjson"}
PARQUET = {"content-type": "application/vnd.apache.parquet"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, repo: Path, data_dir: Path
) -> Iterator[RunningServer]:
    extra = f'[jobs]\ninput_dirs = ["{data_dir}"]\nchunk_rows = 300\n'
    with run_server(tmp_path_factory.mktemp("srv"), config_text=server_config(repo, extra)) as s:
        yield s


def jsonl_body(x: np.ndarray) -> bytes:
    return "".join(json.dumps({"input": r.tolist()}) + "\n" for r in x).encode()


def parquet_body(rows: int) -> bytes:
    x, _ = digits_rows()
    idx = np.arange(rows) % len(x)
    flat = pa.array(x[idx].reshape(-1))
    sink = io.BytesIO()
    pq.write_table(
        pa.table({"input": pa.FixedSizeListArray.from_arrays(flat, 64)}),
        sink,
        row_group_size=20_000,
    )
    return sink.getvalue()


def wait_for(url: str, job_id: str, timeout_s: float = 60.0) -> dict:
    seen: list[dict] = [{}]

    def finished() -> dict | None:
        seen[0] = httpx.get(f"{url}/api/jobs/{job_id}", timeout=5).json()
        return None if seen[0]["status"] in ("queued", "running") else seen[0]

    return wait_until(finished, timeout_s, lambda: f"job {job_id} to end (still {seen[0]})")


def raw_labels(repo: Path, x: np.ndarray) -> np.ndarray:
    from edgeserve.offline.model import load_model

    return load_model(repo, "digits").runtime.run({"input": x}, ["label"])["label"]


def test_an_uploaded_job_runs_and_its_result_matches_the_model(
    server: RunningServer, repo: Path
) -> None:
    x, _ = digits_rows()
    reply = httpx.post(
        f"{server.url}/api/jobs?model=digits&output_format=csv",
        content=jsonl_body(x),
        headers=JSONL,
    )
    assert reply.status_code == 202
    assert reply.headers["location"] == f"/api/jobs/{reply.json()['id']}"
    doc = wait_for(server.url, reply.json()["id"])
    assert doc["status"] == "done" and doc["rows_done"] == len(x) and doc["progress"] == 1.0
    result = httpx.get(server.url + doc["result"])
    table = pacsv.read_csv(io.BytesIO(result.content))
    assert table.column("row").to_pylist() == list(range(len(x)))
    assert np.array_equal(table.column("label").to_numpy(), raw_labels(repo, x))


def test_row_errors_are_downloadable_beside_the_result(server: RunningServer) -> None:
    x, _ = digits_rows()
    lines = jsonl_body(x[:20]).decode().splitlines()
    lines[4] = '{"input": [1, 2]}'
    reply = httpx.post(
        f"{server.url}/api/jobs?model=digits", content="\n".join(lines), headers=JSONL
    )
    doc = wait_for(server.url, reply.json()["id"])
    assert (doc["scored"], doc["failed"]) == (19, 1)
    errors = httpx.get(server.url + doc["errors"]).text.splitlines()
    assert json.loads(errors[0])["row"] == 4


def test_a_job_reads_a_file_under_an_allowed_folder(server: RunningServer, data_dir: Path) -> None:
    path = data_dir / "digits.parquet"
    path.write_bytes(parquet_body(1000))
    reply = httpx.post(
        f"{server.url}/api/jobs",
        json={"model": "digits", "path": str(path), "output_format": "parquet"},
    )
    assert reply.status_code == 202, reply.text
    doc = wait_for(server.url, reply.json()["id"])
    table = pq.read_table(io.BytesIO(httpx.get(server.url + doc["result"]).content))
    assert table.column("row").to_pylist() == list(range(1000))


@pytest.mark.parametrize(
    ("query", "body", "headers", "status", "message"),
    [
        ("?model=nope", b'{"input": [1]}\n', JSONL, 404, "unknown model"),
        ("", b'{"input": [1]}\n', JSONL, 400, "'model' is required"),
        ("?model=digits", b"a,b\n1,2\n", {"content-type": "text/csv"}, 400, "no column"),
        (
            "?model=digits&map=input%3Dpixel_*",
            b"a\n1\n",
            {"content-type": "text/csv"},
            400,
            "no column 'pixel_0'",
        ),
        ("?model=digits", b"x", {"content-type": "image/png"}, 400, "format"),
        ("?model=digits", b"", JSONL, 400, "empty"),
    ],
)
def test_bad_job_submissions_are_refused_at_once(
    server: RunningServer, query: str, body: bytes, headers: dict, status: int, message: str
) -> None:
    reply = httpx.post(f"{server.url}/api/jobs{query}", content=body, headers=headers)
    assert reply.status_code == status
    assert message in reply.json()["error"]


def test_a_killed_model_takes_no_new_jobs(server: RunningServer) -> None:
    """The kill switch holds for batch jobs too: 503 at once, like an inference."""
    x, _ = digits_rows()
    flag = f"{server.url}/api/flags/model.digits"
    assert httpx.put(flag, json={"enabled": False}).status_code == 200
    try:
        reply = httpx.post(
            f"{server.url}/api/jobs?model=digits", content=jsonl_body(x[:2]), headers=JSONL
        )
    finally:
        assert httpx.put(flag, json={"enabled": True}).status_code == 200
    assert reply.status_code == 503, reply.text
    assert "switched off" in reply.json()["error"]


@pytest.mark.parametrize("path", ["/etc/passwd", "../../etc/passwd"])
def test_paths_outside_the_allowed_folders_are_forbidden(server: RunningServer, path: str) -> None:
    reply = httpx.post(f"{server.url}/api/jobs", json={"model": "digits", "path": path})
    assert reply.status_code == 403


def test_cancel_stops_a_job_and_unknown_jobs_are_404(server: RunningServer) -> None:
    reply = httpx.post(
        f"{server.url}/api/jobs?model=digits", content=parquet_body(300_000), headers=PARQUET
    )
    job_id = reply.json()["id"]
    cancelled = httpx.delete(f"{server.url}/api/jobs/{job_id}").json()
    assert cancelled["status"] == "cancelled"
    doc = wait_for(server.url, job_id)
    assert doc["status"] == "cancelled"
    assert httpx.get(f"{server.url}/api/jobs/{job_id}/result").status_code == 409
    assert httpx.delete(f"{server.url}/api/jobs/{job_id}").json()["status"] == "deleted"
    assert httpx.get(f"{server.url}/api/jobs/{job_id}").status_code == 404


def test_a_job_cancelled_as_it_starts_stays_cancelled(server: RunningServer) -> None:
    """A cancel that lands while the runner is still setting a job up (the row count not
    yet known) must stay a cancel: the runner's row count once set the job back to
    running, it was picked up again and, its files gone, ended `failed`. The cancel is
    sent as soon as the job is seen running; each attempt must end cancelled."""
    body = parquet_body(300_000)
    in_setup = 0
    for _ in range(8):
        job_id = httpx.post(
            f"{server.url}/api/jobs?model=digits", content=body, headers=PARQUET
        ).json()["id"]

        def running(job_id: str = job_id) -> dict | None:
            doc = httpx.get(f"{server.url}/api/jobs/{job_id}").json()
            return doc if doc["status"] != "queued" else None

        doc = wait_until(running, 60, "the job to start", interval_s=0.001)
        in_setup += doc["status"] == "running" and doc["rows_total"] is None
        httpx.delete(f"{server.url}/api/jobs/{job_id}")
        end = wait_for(server.url, job_id)
        assert end["status"] == "cancelled", end
        httpx.delete(f"{server.url}/api/jobs/{job_id}")  # forget it
    print(f"\n{in_setup} of 8 cancels landed before the row count was known")


@pytest.mark.slow
def test_a_job_survives_sigkill_and_finishes_after_restart_exactly_once(
    tmp_path: Path, repo: Path
) -> None:
    rows = 200_000
    config = server_config(repo, "[jobs]\nchunk_rows = 256\ncheckpoint_interval_s = 0.1\n")
    with run_server(tmp_path, config_text=config) as first:
        reply = httpx.post(
            f"{first.url}/api/jobs?model=digits&output_format=csv",
            content=parquet_body(rows),
            headers=PARQUET,
        )
        job_id = reply.json()["id"]

        def rows_done() -> int:
            done = httpx.get(f"{first.url}/api/jobs/{job_id}").json()["rows_done"]
            return done if done >= 20_000 else 0

        done = wait_until(rows_done, 60, "20,000 rows done", interval_s=0.01)
        first.process.kill()  # SIGKILL: no shutdown code runs
        first.process.wait()
    assert 0 < done < rows, "the job must be killed midway"
    with run_server(tmp_path, config_text=config) as second:
        wait_until_ready(second)
        doc = wait_for(second.url, job_id, timeout_s=120)
        assert doc["status"] == "done", doc
        assert doc["rows_done"] == rows and doc["scored"] == rows
        result = httpx.get(second.url + doc["result"], timeout=60)
    numbers = pacsv.read_csv(io.BytesIO(result.content)).column("row").to_numpy()
    assert np.array_equal(numbers, np.arange(rows)), "a row was lost or written twice"


def test_a_malformed_file_fails_the_job_with_a_reason_not_a_trace(server: RunningServer) -> None:
    x, _ = digits_rows()
    header = ",".join(f"input_{i}" for i in range(64))
    lines = [header] + [",".join(str(v) for v in r) for r in x[:1000]]
    lines[700] = "1,2,3"
    reply = httpx.post(
        f"{server.url}/api/jobs?model=digits",
        content="\n".join(lines),
        headers={"content-type": "text/csv"},
    )
    assert reply.status_code == 202
    doc = wait_for(server.url, reply.json()["id"])
    assert doc["status"] == "failed"
    assert doc["error"].startswith("the input is not valid csv")
    assert "Traceback" not in doc["error"] and "/" not in doc["error"].split(":")[0]


def test_finished_jobs_are_forgotten_and_too_many_active_jobs_are_refused(
    tmp_path: Path, repo: Path
) -> None:
    # tiny chunks keep the first job running while the second is submitted
    extra = "[jobs]\nmax_active_jobs = 1\nkeep_finished_s = 0.5\nchunk_rows = 16\n"
    config = server_config(repo, extra)
    with run_server(tmp_path, config_text=config) as srv:
        big = httpx.post(
            f"{srv.url}/api/jobs?model=digits", content=parquet_body(10_000), headers=PARQUET
        )
        second = httpx.post(
            f"{srv.url}/api/jobs?model=digits", content=parquet_body(10), headers=PARQUET
        )
        assert second.status_code == 429 and second.headers["retry-after"]
        job_id = big.json()["id"]
        assert wait_for(srv.url, job_id)["status"] == "done"
        folder = tmp_path / "state" / "jobs" / job_id
        wait_until(
            lambda: httpx.get(f"{srv.url}/api/jobs/{job_id}").status_code != 200,
            10,
            "the job to be forgotten",
            interval_s=0.1,
        )
        assert httpx.get(f"{srv.url}/api/jobs/{job_id}").status_code == 404
        assert not folder.exists()


@pytest.mark.parametrize(
    ("hostname", "prefix"),
    [("edgeserve-1", "edgeserve-1."), ("Not_A_Label", ""), ("x" * 64, "")],
)
def test_a_job_id_names_the_pod_that_owns_it(
    tmp_path: Path, repo: Path, hostname: str, prefix: str
) -> None:
    """On the StatefulSet (HOSTNAME is the pod's name), a client that submitted through
    the Service learns from the id which pod to ask (`<pod>.edgeserve-peers`); a
    HOSTNAME that is not a DNS label is left out rather than put in a URL."""
    x, _ = digits_rows()
    with run_server(
        tmp_path, config_text=server_config(repo, ""), env={"HOSTNAME": hostname}
    ) as server:
        reply = httpx.post(
            f"{server.url}/api/jobs?model=digits", content=jsonl_body(x[:5]), headers=JSONL
        )
        assert reply.status_code == 202, reply.text
        job_id = reply.json()["id"]
        assert job_id.startswith(prefix) and len(job_id) == len(prefix) + 32
        assert reply.headers["location"] == f"/api/jobs/{job_id}"
        assert wait_for(server.url, job_id)["status"] == "done"
        assert httpx.get(f"{server.url}/api/jobs/{job_id}/result").status_code == 200
