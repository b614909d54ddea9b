"""Online feature store: atomic loads, lookup before inference on the server and in batch."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from edgeserve.cli.group import run
from tests.serving import RunningServer, run_server
from tests.test_batch_support import digits_rows, model_repository, server_config, v2_request

FEATURES_TOML = """
[features]
table = "digit_images"
entity = "image_id"
inputs = ["input"]
map = { input = "pixel_*" }
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`digits` as shipped, and `digits_fs`: the same model reading its pixels by image id."""
    repo = model_repository(tmp_path_factory.mktemp("repo"))
    shutil.copytree(repo / "digits", repo / "digits_fs")
    with (repo / "digits_fs" / "model.toml").open("a") as f:
        f.write(FEATURES_TOML)
    return repo


def pixels_csv(path: Path, ids: range | list[int]) -> Path:
    x, _ = digits_rows()
    columns = {"image_id": [str(i) for i in ids]}
    columns.update({f"pixel_{j}": [float(x[i, j]) for i in ids] for j in range(64)})
    pacsv.write_csv(pa.table(columns), path)
    return path


def load(database: Path, source: Path, *extra: str) -> int:
    return run(
        [
            "features",
            "load",
            str(source),
            "--table",
            "digit_images",
            "--key",
            "image_id",
            "--database",
            str(database),
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, repo: Path) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("srv")
    assert load(root / "state" / "features.db", pixels_csv(root / "pixels.csv", range(1797))) == 0
    with run_server(root, config_text=server_config(repo)) as s:
        yield s


def infer(server: RunningServer, model: str, doc: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/{model}/infer", json=doc, timeout=10)


def outputs(reply: httpx.Response) -> dict:
    return {o["name"]: o["data"] for o in reply.json()["outputs"]}


@pytest.mark.parametrize(
    "entity",
    [
        {"name": "image_id", "datatype": "BYTES", "shape": [2], "data": ["5", "9"]},
        {"name": "image_id", "datatype": "INT64", "shape": [2], "data": [5, 9]},
    ],
)
def test_an_entity_id_input_gives_the_same_answer_as_sending_the_features(
    server: RunningServer, entity: dict
) -> None:
    x, _ = digits_rows()
    direct = outputs(infer(server, "digits", v2_request(x[[5, 9]])))
    by_id = infer(server, "digits_fs", {"inputs": [entity]})
    assert by_id.status_code == 200, by_id.text
    assert outputs(by_id)["label"] == direct["label"]
    np.testing.assert_allclose(outputs(by_id)["probabilities"], direct["probabilities"], rtol=1e-6)


@pytest.mark.parametrize(
    ("doc", "status", "message"),
    [
        (
            {
                "inputs": [
                    {"name": "image_id", "datatype": "BYTES", "shape": [1], "data": ["99999"]}
                ]
            },
            404,
            "no features for entity '99999'",
        ),
        (
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0] * 64}]},
            400,
            "comes from the feature store",
        ),
        (
            {"inputs": [{"name": "other", "datatype": "FP32", "shape": [1], "data": [0]}]},
            400,
            "send parameter or input 'image_id'",
        ),
        (  # a huge dimension beside a zero: no elements, yet numpy cannot shape it (a 500)
            {
                "inputs": [
                    {"name": "image_id", "datatype": "BYTES", "shape": [0, 2**62], "data": []}
                ]
            },
            413,
            "exceeds the limit",
        ),
    ],
)
def test_missing_or_misplaced_entities_are_refused_clearly(
    server: RunningServer, doc: dict, status: int, message: str
) -> None:
    reply = infer(server, "digits_fs", doc)
    assert reply.status_code == status
    assert message in reply.json()["error"]


def test_a_request_parameter_can_carry_the_entity_ids() -> None:
    from edgeserve.serving.features import request_entities
    from edgeserve.serving.repository import FeatureConfig

    config = FeatureConfig(table="t", entity="image_id", inputs=["input"])
    assert request_entities(config, {}, {"image_id": 3}) == ["3"]
    assert request_entities(config, {}, {"image_id": ["a", 4]}) == ["a", "4"]
    with pytest.raises(Exception, match="must be an id or a list of ids"):
        request_entities(config, {}, {"image_id": [True]})


def test_batch_scoring_looks_up_the_same_features(
    repo: Path, server: RunningServer, tmp_path: Path
) -> None:
    database = Path(str(server.config_path.parent)) / "state" / "features.db"
    source = tmp_path / "ids.jsonl"
    ids = [0, 1, 5000, 2, 17]
    source.write_text("".join(json.dumps({"image_id": i}) + "\n" for i in ids))
    output = tmp_path / "out.jsonl"
    assert (
        run(
            [
                "batch",
                "score",
                "--model",
                "digits_fs",
                str(source),
                "--output",
                str(output),
                "--repository",
                str(repo),
                "--features",
                str(database),
                "--keep",
                "image_id",
                "--no-progress",
            ]
        )
        == 0
    )
    scored = [json.loads(line) for line in output.read_text().splitlines()]
    errors = [
        json.loads(line) for line in (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines()
    ]
    assert [r["image_id"] for r in scored] == [0, 1, 2, 17]
    assert errors == [{"row": 2, "error": "no features for entity '5000'"}]
    x, _ = digits_rows()
    served = outputs(infer(server, "digits", v2_request(x[[0, 1, 2, 17]])))["label"]
    assert [r["label"] for r in scored] == served


def test_a_failed_load_leaves_the_previous_table_whole(tmp_path: Path) -> None:
    database = tmp_path / "f.db"
    assert load(database, pixels_csv(tmp_path / "a.csv", range(100))) == 0
    broken = tmp_path / "broken.csv"
    lines = pixels_csv(tmp_path / "b.csv", range(200)).read_text().splitlines()
    lines[150] = lines[150].replace(",", ",oops,", 1).rsplit(",", 1)[0]  # text in a number column
    broken.write_text("\n".join(lines) + "\n")
    from edgeserve.errors import InvalidInput
    from edgeserve.serving.features import load_features

    with pytest.raises(InvalidInput, match="not a number"):  # found in the second chunk
        load_features(database, broken, "digit_images", "image_id", chunk_rows=100)
    with sqlite3.connect(database) as conn:
        assert conn.execute("SELECT COUNT(*) FROM digit_images").fetchone()[0] == 100


def test_upsert_updates_rows_by_key_and_replace_swaps_the_table(tmp_path: Path) -> None:
    database = tmp_path / "f.db"
    assert load(database, pixels_csv(tmp_path / "a.csv", range(10))) == 0
    assert load(database, pixels_csv(tmp_path / "b.csv", [5, 10, 11]), "--upsert") == 0
    with sqlite3.connect(database) as conn:
        assert conn.execute("SELECT COUNT(*) FROM digit_images").fetchone()[0] == 12
    assert load(database, pixels_csv(tmp_path / "c.csv", [1, 2])) == 0
    with sqlite3.connect(database) as conn:
        ids = [r[0] for r in conn.execute("SELECT image_id FROM digit_images ORDER BY 1")]
    assert ids == ["1", "2"]


def test_streamed_requests_look_up_features_too(server: RunningServer) -> None:
    from websockets.sync.client import connect

    x, _ = digits_rows()
    direct = outputs(infer(server, "digits", v2_request(x[[5]])))
    url = server.url.replace("http://", "ws://") + "/api/stream/digits_fs"
    with connect(url) as ws:
        for entity in ("5", "99999"):
            ws.send(
                json.dumps(
                    {
                        "id": entity,
                        "inputs": [
                            {
                                "name": "image_id",
                                "datatype": "BYTES",
                                "shape": [1],
                                "data": [entity],
                            }
                        ],
                    }
                )
            )
        found, missing = json.loads(ws.recv(timeout=10)), json.loads(ws.recv(timeout=10))
    assert {o["name"]: o["data"] for o in found["outputs"]}["label"] == direct["label"]
    assert missing.pop("x-telemetry-seq")  # the record it left (issue 21)
    assert missing == {
        "error": "no features for entity '99999' in 'digit_images'",
        "status": 404,
        "id": "99999",
    }


def test_a_server_job_looks_up_features_by_entity_column(server: RunningServer) -> None:
    from tests.test_jobs_api import JSONL, wait_for

    ids = [3, 4, 777777, 5]
    body = "".join(json.dumps({"image_id": i}) + "\n" for i in ids)
    reply = httpx.post(
        f"{server.url}/api/jobs?model=digits_fs&keep=image_id", content=body, headers=JSONL
    )
    assert reply.status_code == 202, reply.text
    doc = wait_for(server.url, reply.json()["id"])
    assert (doc["status"], doc["scored"], doc["failed"]) == ("done", 3, 1)
    rows = [json.loads(line) for line in httpx.get(server.url + doc["result"]).text.splitlines()]
    x, _ = digits_rows()
    direct = outputs(infer(server, "digits", v2_request(x[[3, 4, 5]])))
    assert [r["image_id"] for r in rows] == [3, 4, 5]
    assert [r["label"] for r in rows] == direct["label"]


def test_a_job_without_the_entity_column_is_refused_at_once(server: RunningServer) -> None:
    from tests.test_jobs_api import JSONL

    reply = httpx.post(
        f"{server.url}/api/jobs?model=digits_fs", content=b'{"id": 3}\n', headers=JSONL
    )
    assert reply.status_code == 400
    assert "no column 'image_id'" in reply.json()["error"]
