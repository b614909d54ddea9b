"""Rows per second of Spark scoring against the batch CLI and the raw runtime.

    .venv/bin/python -m bench.spark_scoring [ROWS]

Prints one JSON line: the raw runtime on the same rows (the limit), the per-batch
scoring function Spark runs on each executor (without Spark's own transfer), the
`edgeserve batch score` command on a Parquet file, and a whole `local[2]` Spark job.
Everything runs on ONNX Runtime with one intra-op thread per call, as an executor
does; the figures are indicative only on a shared box.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from edgeserve.runtime import ThreadPlan, create_runtime
from edgeserve.serving.repository import read_model

BATCH_ROWS = 10_000  # spark.sql.execution.arrow.maxRecordsPerBatch default
MODEL = Path(__file__).resolve().parent.parent / "models" / "digits"


def _rows(total: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)
    return x[np.arange(total) % len(x)]


def _rate(rows: int, seconds: float) -> float:
    return round(rows / seconds, 1)


def raw_runtime(x: np.ndarray) -> float:
    model = read_model(MODEL)
    files = model.read_files(model.config.default_version or max(model.versions))
    runtime = create_runtime("onnxruntime", files, ThreadPlan(intra_op=1, inter_op=1))
    began = time.perf_counter()
    for start in range(0, len(x), 4096):
        runtime.run({"input": x[start : start + 4096]})
    return _rate(len(x), time.perf_counter() - began)


def batch_function(x: np.ndarray) -> float:
    """The function each executor runs per Arrow batch (old: pandas, new: Arrow)."""
    from edgeserve.offline import spark

    column = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 64).cast(
        pa.list_(pa.float32())
    )
    batch = pa.RecordBatch.from_arrays([column], ["input"])
    source = str(MODEL)
    if hasattr(spark, "ScoringJob"):
        job = spark.ScoringJob.for_source(source, backend="onnxruntime")
        run = lambda b: job.score_batch(b)  # noqa: E731
    else:  # before the Arrow rewrite
        frame = batch.to_pandas()
        args = (source, None, "onnxruntime", None, None, {}, [], ["probabilities", "label"])
        run = lambda b: spark.score_pandas(frame, *args)  # noqa: E731
    run(batch.slice(0, 100))  # load the model
    began = time.perf_counter()
    done = 0
    for start in range(0, len(x), BATCH_ROWS):
        piece = batch.slice(start, BATCH_ROWS)
        if not hasattr(spark, "ScoringJob"):
            frame = piece.to_pandas()
        run(piece)
        done += piece.num_rows
    return _rate(done, time.perf_counter() - began)


def batch_cli(x: np.ndarray, folder: Path) -> float:
    from edgeserve.cli.group import run

    source = folder / "in.parquet"
    column = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 64)
    pq.write_table(pa.table({"input": column}), source)
    began = time.perf_counter()
    code = run(
        ["batch", "score", "--model", "digits", "--repository", str(MODEL.parent),
         "--backend", "onnxruntime", "--threads", "1", "--no-progress", str(source),
         "--output", str(folder / "out.parquet")]
    )  # fmt: skip
    assert code == 0
    return _rate(len(x), time.perf_counter() - began)


def spark_job(x: np.ndarray) -> float:
    from pyspark.sql import SparkSession

    from edgeserve.offline.spark import score_dataframe

    os.environ["PYSPARK_PYTHON"] = sys.executable
    session = (
        SparkSession.builder.master("local[2]")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.host", "127.0.0.1")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    frame = pa.table({"input": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 64)})
    with tempfile.TemporaryDirectory() as folder:
        pq.write_table(frame.cast(pa.schema([("input", pa.list_(pa.float32()))])), f"{folder}/x")
        df = session.read.parquet(f"{folder}/x").repartition(2).cache()
        df.count()
        scored = score_dataframe(df, str(MODEL), backend="onnxruntime")
        scored.write.format("noop").mode("overwrite").save()  # warm the workers
        began = time.perf_counter()
        scored.write.format("noop").mode("overwrite").save()
        seconds = time.perf_counter() - began
    session.stop()
    return _rate(len(x), seconds)


def main() -> None:
    total = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    x = _rows(total)
    with tempfile.TemporaryDirectory() as folder:
        result = {
            "rows": total,
            "raw_onnxruntime_rows_per_s": raw_runtime(x),
            "executor_batch_function_rows_per_s": batch_function(x),
            "batch_cli_rows_per_s": batch_cli(x, Path(folder)),
            "spark_local2_job_rows_per_s": spark_job(x),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
