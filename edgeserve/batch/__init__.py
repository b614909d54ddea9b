"""Batch scoring of files (CSV, JSON Lines, Parquet) with a repository model, no server.

Layers: `plan` (which columns feed which input, no pyarrow), `tables` (chunked
readers, crash-safe writers), `mapping` (chunk -> tensors), `scoring` (one chunk),
`run` (the exactly-once chunk loop), `job` + `cli` (the `edgeserve batch` command).
pyarrow is needed only from `tables` on: `pip install 'edgeserve[batch]'`.
"""
