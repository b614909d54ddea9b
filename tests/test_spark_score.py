"""edgeserve.offline.spark on local-mode PySpark: scores a DataFrame and matches the server."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.serving import run_server
from tests.test_batch_support import digits_rows, model_repository, served_outputs, server_config

pytest.importorskip("pyspark", reason="pip install 'edgeserve[spark]' for the Spark scorer")
if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("Spark needs a Java runtime (17+); none is installed", allow_module_level=True)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def spark() -> Iterator:
    from pyspark.sql import SparkSession

    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    session = (
        SparkSession.builder.master("local[2]")
        .appName("edgeserve-test")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "500")
        .getOrCreate()
    )
    yield session
    session.stop()


def test_a_dataframe_scored_on_spark_matches_the_server(spark, tmp_path: Path) -> None:
    from pyspark.sql import types as T

    from edgeserve.offline.spark import score_dataframe

    repo = model_repository(tmp_path)
    x, _ = digits_rows()
    rows = [(i, [float(v) for v in x[i]]) for i in range(len(x))]
    rows.append((len(x), [1.0, 2.0]))  # a bad row: 2 values instead of 64
    schema = T.StructType(
        [
            T.StructField("id", T.LongType()),
            T.StructField("pixels", T.ArrayType(T.FloatType())),
        ]
    )
    df = spark.createDataFrame(rows, schema).repartition(3)
    scored = score_dataframe(df, str(repo / "digits"), input_map={"input": "pixels"})
    assert set(scored.columns) == {"id", "label", "probabilities", "error"}
    result = {r["id"]: r for r in scored.collect()}
    assert len(result) == len(x) + 1
    assert result[len(x)]["label"] is None and "64 values" in result[len(x)]["error"]
    with run_server(tmp_path, config_text=server_config(repo)) as server:
        served = served_outputs(server.url, x)
    labels = np.array([result[i]["label"] for i in range(len(x))])
    probs = np.array([result[i]["probabilities"] for i in range(len(x))], dtype=np.float32)
    assert np.array_equal(labels, served["label"])
    np.testing.assert_allclose(probs, served["probabilities"], rtol=1e-5, atol=1e-6)
    assert all(result[i]["error"] is None for i in range(len(x)))


def test_the_model_loads_once_per_process(tmp_path: Path) -> None:
    from edgeserve.offline.spark import cached_model

    repo = model_repository(tmp_path)
    first = cached_model(str(repo / "digits"))
    assert cached_model(str(repo / "digits")) is first


def test_an_encrypted_model_is_opened_on_the_executors_with_the_jobs_key(
    spark, tmp_path: Path
) -> None:
    """The seam for bundles: the job passes a key and an opener; plaintext stays in memory."""
    from pyspark.sql import types as T

    from edgeserve.offline.spark import score_dataframe

    repo = model_repository(tmp_path)
    folder = repo / "digits"
    version = max(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    plain = (folder / str(version) / "model.onnx").read_bytes()
    key = bytes(range(1, 33))
    sealed = tmp_path / "digits.bundle"
    sealed.write_bytes(bytes(b ^ key[i % 32] for i, b in enumerate(plain)))
    toml_text = (folder / "model.toml").read_text()

    def opener(path: str, job_key: bytes | None) -> tuple[str, dict[str, bytes]]:
        blob = Path(path).read_bytes()
        assert job_key is not None
        return toml_text, {"model.onnx": bytes(b ^ job_key[i % 32] for i, b in enumerate(blob))}

    x, _ = digits_rows()
    schema = T.StructType([T.StructField("input", T.ArrayType(T.FloatType()))])
    df = spark.createDataFrame([([float(v) for v in r],) for r in x[:200]], schema)
    scored = score_dataframe(df, str(sealed), key=key, bundle_opener=opener)
    labels = [r["label"] for r in scored.collect()]
    from edgeserve.offline.model import load_model

    expected = load_model(repo, f"digits:{version}").runtime.run({"input": x[:200]}, ["label"])
    assert labels == expected["label"].tolist()


def test_a_signed_bundle_is_verified_and_decrypted_on_the_executors(spark, tmp_path: Path) -> None:
    import tomllib
    from pyspark.sql import types as T

    from edgeserve.offline.model import load_model
    from edgeserve.offline.spark import SignedBundleOpener, score_dataframe
    from tests.test_batch_installed import install_digits_bundle

    config = install_digits_bundle(tmp_path)  # also leaves the bundle and its fleet key
    trusted = tomllib.loads(config.read_text())["updater"]["trusted_keys"]
    key = (tmp_path / "fleet.key").read_bytes()  # passed by the job, e.g. from a secret
    x, _ = digits_rows()
    schema = T.StructType([T.StructField("input", T.ArrayType(T.FloatType()))])
    df = spark.createDataFrame([([float(v) for v in r],) for r in x[:300]], schema)
    scored = score_dataframe(
        df, str(tmp_path / "digits-7.bundle"), key=key, bundle_opener=SignedBundleOpener(trusted)
    )
    labels = [r["label"] for r in scored.collect()]
    repo = model_repository(tmp_path / "repo")
    expected = load_model(repo, "digits:1").runtime.run({"input": x[:300]}, ["label"])["label"]
    assert labels == expected.tolist()
    with pytest.raises(Exception, match=r"signature|trusted|signing"):
        SignedBundleOpener([])(str(tmp_path / "digits-7.bundle"), key)
