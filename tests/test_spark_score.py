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
    # the server below pins onnxruntime ([models] backend): so does the job, to match it
    scored = score_dataframe(
        df, str(repo / "digits"), input_map={"input": "pixels"}, backend="onnxruntime"
    )
    assert scored.schema["label"].metadata["edgeserve"]["backend"] == "onnxruntime"
    assert set(scored.columns) == {"id", "label", "probabilities", "error"}
    result = {r["id"]: r for r in scored.collect()}
    assert len(result) == len(x) + 1
    assert result[len(x)]["label"] is None and "64 values" in result[len(x)]["error"]
    # the Spark JVM keeps the box busy: no loop-lag shedding, this compares answers only
    config = server_config(repo, server="loop_lag_target_ms = 0\n")
    with run_server(tmp_path, config_text=config) as server:
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


def _digits_df(spark, rows: int, extra: dict | None = None):
    from pyspark.sql import types as T

    x, y = digits_rows()
    fields = [T.StructField("input", T.ArrayType(T.FloatType()))]
    names = list(extra or {})
    fields += [T.StructField(n, T.LongType()) for n in names]
    data = [([float(v) for v in x[i]], *[int(y[i]) for _ in names]) for i in range(rows)]
    return spark.createDataFrame(data, T.StructType(fields))


def test_a_wrong_key_after_a_good_load_is_refused(spark, tmp_path: Path) -> None:
    """The cache must not let a later call skip the signature and key checks."""
    import tomllib

    from edgeserve.offline.spark import SignedBundleOpener, score_dataframe
    from tests.test_batch_installed import install_digits_bundle, run

    config = install_digits_bundle(tmp_path)
    trusted = tomllib.loads(config.read_text())["updater"]["trusted_keys"]
    bundle = str(tmp_path / "digits-7.bundle")
    key = (tmp_path / "fleet.key").read_bytes()
    df = _digits_df(spark, 50)
    good = score_dataframe(df, bundle, key=key, bundle_opener=SignedBundleOpener(trusted))
    assert good.count() == 50
    other = run("keys", "bundle-signing-key", str(tmp_path / "other.pem"))
    stranger = other.output.strip().splitlines()[-1]
    with pytest.raises(Exception, match="bad_signature"):
        score_dataframe(df, bundle, key=key, bundle_opener=SignedBundleOpener([stranger]))
    with pytest.raises(Exception, match="the job's key"):
        score_dataframe(df, bundle, key=None, bundle_opener=SignedBundleOpener(trusted))
    assert run("keys", "fleet-key", str(tmp_path / "other.key")).exit_code == 0
    wrong = (tmp_path / "other.key").read_bytes()
    with pytest.raises(Exception, match=r"not_for_this_device|unwrap_failed"):
        score_dataframe(df, bundle, key=wrong, bundle_opener=SignedBundleOpener(trusted))


def test_a_bundle_replaced_at_the_same_path_is_read_again(spark, tmp_path: Path) -> None:
    import tomllib

    from edgeserve.offline.spark import SignedBundleOpener, score_dataframe
    from tests.test_batch_installed import install_digits_bundle, run
    from tests.test_updates_kit import DIGITS

    config = install_digits_bundle(tmp_path)
    trusted = tomllib.loads(config.read_text())["updater"]["trusted_keys"]
    bundle = tmp_path / "digits-7.bundle"
    key = (tmp_path / "fleet.key").read_bytes()
    opener = SignedBundleOpener(trusted)
    df = _digits_df(spark, 20)
    first = score_dataframe(df, str(bundle), key=key, bundle_opener=opener)
    assert first.schema["label"].metadata["edgeserve"]["version"] == 7
    newer = tmp_path / "digits-8.bundle"
    made = run(
        "bundle", "create", str(DIGITS), "--version", "8", "--source-version", "1",
        "--signing-key", str(tmp_path / "signing.pem"), "--recipient", str(tmp_path / "fleet.key"),
        "--out", str(newer),
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    os.replace(newer, bundle)
    second = score_dataframe(df, str(bundle), key=key, bundle_opener=opener)
    assert second.schema["label"].metadata["edgeserve"]["version"] == 8
    assert second.count() == 20


@pytest.mark.parametrize("column", ["label", "probabilities", "error"])
def test_a_column_named_like_an_output_is_refused_naming_it(
    spark, tmp_path: Path, column: str
) -> None:
    from edgeserve.errors import InvalidInput
    from edgeserve.offline.spark import score_dataframe

    repo = model_repository(tmp_path)
    df = _digits_df(spark, 30, {column: True})
    with pytest.raises(InvalidInput, match=f"column '{column}'.*output_prefix"):
        score_dataframe(df, str(repo / "digits"))
    scored = score_dataframe(df, str(repo / "digits"), output_prefix="pred_")
    assert set(scored.columns) == {column, "pred_label", "pred_probabilities", "pred_error"}
    rows = scored.collect()
    assert len(rows) == 30 and all(r["pred_error"] is None for r in rows)


def test_spark_errors_speak_spark_and_name_a_nan(spark, tmp_path: Path) -> None:
    from pyspark.sql import types as T

    from edgeserve.errors import InvalidInput
    from edgeserve.offline.spark import score_dataframe

    repo = model_repository(tmp_path)
    x, _ = digits_rows()
    fields = [T.StructField(f"pixel_{i}", T.DoubleType()) for i in range(64)]
    data = [tuple(float(v) for v in x[i]) for i in range(10)]
    data[3] = (float("nan"), *data[3][1:])
    data[5] = (None, *data[5][1:])
    df = spark.createDataFrame(data, T.StructType(fields))
    with pytest.raises(InvalidInput, match=r"input_map=\{'input': ") as refused:
        score_dataframe(df, str(repo / "digits"))
    assert "--map" not in str(refused.value)
    scored = score_dataframe(df, str(repo / "digits"), input_map={"input": "pixel_*"}).collect()
    assert "NaN" in scored[3]["error"] and "pixel_0" in scored[3]["error"]
    assert scored[5]["error"] == "column 'pixel_0' is empty"
    assert [r["error"] for i, r in enumerate(scored) if i not in (3, 5)] == [None] * 8


def test_the_output_says_which_backend_scored(spark, tmp_path: Path) -> None:
    from edgeserve.offline.spark import cached_model, score_dataframe

    repo = model_repository(tmp_path)
    scored = score_dataframe(_digits_df(spark, 5), str(repo / "digits"))
    meta = scored.schema["probabilities"].metadata["edgeserve"]
    opened = cached_model(str(repo / "digits"), backend="auto")
    assert meta["backend"] == opened.runtime.backend
    assert meta["model"] == "digits" and meta["version"] >= 1
