"""Batch scoring of files (CSV, JSON Lines, Parquet) and Spark DataFrames with a
repository model, no server.

Layers: `plan` (which columns feed which input, no pyarrow), `tables` (chunked
readers, crash-safe writers), `mapping` (chunk -> tensors), `scoring` (one chunk),
`run` (the exactly-once chunk loop), `model` (repository folder or installed slot),
`job` + `cli` (the `edgeserve batch` and `edgeserve features` commands). Server jobs
(`edgeserve.jobs`) and Spark (`edgeserve.offline.spark`) reuse plan, mapping, scoring and run.
pyarrow is needed from `tables` on: `pip install 'edgeserve[batch]'`.
"""
