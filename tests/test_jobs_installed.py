"""A job on a model served from an installed bundle scores with that version."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pyarrow.csv as pacsv
import pytest

from edgeserve.offline.model import load_model
from tests.serving import run_server
from tests.test_batch_installed import install_digits_bundle
from tests.test_batch_support import digits_rows, model_repository
from tests.test_jobs_api import JSONL, wait_for

pytestmark = pytest.mark.slow


def test_a_job_scores_with_the_installed_version_the_server_serves(tmp_path: Path) -> None:
    repo = model_repository(tmp_path)
    config = install_digits_bundle(tmp_path)
    text = config.read_text().replace("[server]\n", '[server]\nhost = "127.0.0.1"\nport = {port}\n')
    text += f'[models]\nrepository = "{repo}"\nbackend = "onnxruntime"\n[auth]\nenabled = false\n'
    x, _ = digits_rows()
    body = "".join(json.dumps({"input": r.tolist()}) + "\n" for r in x)
    with run_server(tmp_path, config_text=text) as server:
        reply = httpx.post(
            f"{server.url}/api/jobs?model=digits&output_format=csv", content=body, headers=JSONL
        )
        assert reply.status_code == 202, reply.text
        assert reply.json()["version"] == "7"
        doc = wait_for(server.url, reply.json()["id"])
        assert doc["status"] == "done", doc
        result = httpx.get(server.url + doc["result"]).content
    labels = pacsv.read_csv(io.BytesIO(result)).column("label").to_numpy()
    expected = load_model(repo, "digits:1").runtime.run({"input": x}, ["label"])["label"]
    assert np.array_equal(labels, expected)
