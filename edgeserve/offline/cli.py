"""`edgeserve batch score` and `edgeserve features load`: offline data commands, no server."""

from __future__ import annotations

import sqlite3
import sys
import time
from pathlib import Path

import click
import orjson

from edgeserve.cli.extras import require
from edgeserve.cli.options import CONFIG_OPTION
from edgeserve.config.schema import ConfigError
from edgeserve.errors import EdgeserveError
from edgeserve.runtime import RuntimeLoadError, ThreadPlan

PATH = click.Path(path_type=Path)


def _message(exc: BaseException) -> str:
    """One line for the terminal: the domain message, else the exception's first line."""
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return text.strip().splitlines()[0][:300]


@click.group("batch")
def batch_group() -> None:
    """Score files offline with a model from the repository (no server needed)."""


@batch_group.command("score")
@click.option("--model", "model_ref", required=True, help="NAME or NAME:VERSION.")
@click.argument("input_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--output", "output", type=PATH, required=True, help="Output file.")
@click.option("--repository", type=PATH, default=Path("models"), show_default=True)
@click.option(
    "--installed",
    is_flag=True,
    help="Use the version installed from a bundle (decrypted in memory) instead "
    "of --repository; keys come from --config.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    envvar="EDGESERVE_CONFIG",
    help="Server config, for --installed.",
)
@click.option("--map", "maps", multiple=True, help="INPUT=COLUMN or INPUT=PREFIX* (repeatable).")
@click.option("--keep", multiple=True, help="Input column copied to the output (repeatable).")
@click.option("--outputs", "output_names", multiple=True, help="Model outputs to write.")
@click.option(
    "--output-prefix",
    default="",
    help="Put in front of every output column's name (when --keep holds one of them).",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint.")
@click.option(
    "--errors",
    "errors_path",
    type=PATH,
    default=None,
    help="Row errors (JSON Lines); default OUTPUT.errors.jsonl.",
)
@click.option("--chunk-rows", type=click.IntRange(1, 10_000_000), default=65536, show_default=True)
@click.option("--input-format", type=click.Choice(["csv", "jsonl", "parquet"]), default=None)
@click.option("--output-format", type=click.Choice(["csv", "jsonl", "parquet"]), default=None)
@click.option(
    "--features",
    "features_db",
    type=PATH,
    default=None,
    help="Feature store (SQLite) for models that declare [features].",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "onnxruntime", "openvino"]),
    default="onnxruntime",
    show_default=True,
)
@click.option("--threads", type=click.IntRange(0, 256), default=0, help="0 = all cores.")
@click.option("--progress/--no-progress", default=True, help="Progress bar on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def score_command(
    model_ref: str,
    input_path: Path,
    output: Path,
    repository: Path,
    installed: bool,
    config_path: Path | None,
    maps: tuple[str, ...],
    keep: tuple[str, ...],
    output_names: tuple[str, ...],
    output_prefix: str,
    resume: bool,
    errors_path: Path | None,
    chunk_rows: int,
    input_format: str | None,
    output_format: str | None,
    features_db: Path | None,
    backend: str,
    threads: int,
    progress: bool,
    as_json: bool,
) -> None:
    """Score INPUT (CSV, JSON Lines or Parquet) into --output, chunk by chunk.

    Columns feed inputs by name (INPUT, or INPUT_0..INPUT_{n-1}) unless --map says
    otherwise; rows that cannot be scored go to the errors file, not the output.
    Each output row carries `row`, the input row number from 0. The summary names
    the backend that scored (`auto` picks as the server does without samples).

    Example: edgeserve batch score --model digits data.parquet --output scores.csv
    --map 'input=pixel_*'
    """
    require("pyarrow", "batch score")
    import pyarrow as pa

    from edgeserve.offline.job import BatchJob
    from edgeserve.offline.model import installed_slot_loader
    from updater.errors import UpdaterError

    started = time.perf_counter()
    try:
        slot_loader = installed_slot_loader(config_path) if installed else None
        job = BatchJob.prepare(
            model_ref=model_ref,
            input_path=input_path,
            output=output,
            repository=repository,
            maps=maps,
            keep=keep,
            output_names=output_names,
            output_prefix=output_prefix,
            errors_path=errors_path,
            chunk_rows=chunk_rows,
            input_format=input_format,
            output_format=output_format,
            features_db=features_db,
            backend=backend,
            threads=ThreadPlan(intra_op=threads) if threads else None,
            slot_loader=slot_loader,
        )
        state = job.run(resume=resume, progress=progress)
    except (
        EdgeserveError,
        RuntimeLoadError,
        ConfigError,
        OSError,
        pa.ArrowException,
        UpdaterError,
    ) as exc:
        click.echo(f"edgeserve: {_message(exc)}", err=True)
        raise SystemExit(1) from None
    elapsed = time.perf_counter() - started
    summary = {
        "model": job.model.name,
        "version": job.model.version,
        "backend": job.model.runtime.backend,
        "rows": state.rows_done,
        "scored": state.scored,
        "failed": state.failed,
        "seconds": round(elapsed, 3),
        "rows_per_s": round(state.rows_done / elapsed, 1) if elapsed else None,
        "output": str(output),
        "errors": str(job.errors_path) if state.failed else None,
    }
    if as_json:
        click.echo(orjson.dumps(summary).decode())
    else:
        click.echo(" ".join(f"{k}={v}" for k, v in summary.items() if v is not None))


@click.group("features")
def features_group() -> None:
    """The online feature store read by models that declare [features]."""


@features_group.command("load")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--table", required=True, help="Table to fill (letters, digits, '_').")
@click.option("--key", required=True, help="Column holding the entity id.")
@click.option(
    "--database",
    type=PATH,
    default=None,
    help="SQLite file (default: [features] database from the config).",
)
@CONFIG_OPTION
@click.option("--upsert", is_flag=True, help="Update rows by key instead of replacing the table.")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl", "parquet"]), default=None)
def load_command(
    source: Path,
    table: str,
    key: str,
    database: Path | None,
    config_path: Path | None,
    upsert: bool,
    fmt: str | None,
) -> None:
    """Fill a feature table from SOURCE in one transaction (readers never see half a load).

    Example: edgeserve features load customers.parquet --table customers --key customer_id
    """
    require("pyarrow", "features load")
    from edgeserve.serving.features import load_features

    if database is None:
        from edgeserve.cli.options import load_or_exit

        settings = load_or_exit(config_path)
        database = settings.features.resolve(settings.server.state_dir)
    import pyarrow as pa

    try:
        rows = load_features(database, source, table, key, fmt=fmt, upsert=upsert)
    except (EdgeserveError, OSError, sqlite3.Error, pa.ArrowException) as exc:
        click.echo(f"edgeserve: {_message(exc)}", err=True)
        raise SystemExit(1) from None
    click.echo(f"table={table} rows={rows} database={database}", file=sys.stdout)
