"""What one telemetry record costs: on the request path (`InferenceRecord.ended` and
`record_ended`) and in all (the writer thread, SQLite, metrics), in CPU µs.

    python -m bench.telemetry_cost [--records 50000] [--repeat 5]
    python -m bench.telemetry_cost --ids server --rows-before 200000   # as a served box writes
    python -m bench.telemetry_cost --no-variant      # records of a model with no experiment

By default the records carry short sequential ids ("r1", "r2", ...) and go into an empty
buffer. A server's own request ids are random (`serving.request_ids`), so each row's
entry in the request_id index lands on a different page of it, and every such page is
written to the WAL at the next commit and again at the checkpoint: `--ids server` uses
those ids and a token subject's owner hash, `--rows-before N` first fills the buffer
with N such rows (a box that has served a while). The records carry an experiment's
variant ("a"); `--no-variant` leaves it out, as a model served without an experiment
does (and the writer then inserts them with its usual statement, `store._USUAL`).
Prints the median of the repeats; a benchmark, not a test (it asserts nothing).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from edgeserve.serving.request_ids import new_request_id
from edgeserve.telemetry.records import InferenceRecord
from edgeserve.telemetry.service import Telemetry, build_telemetry
from edgeserve.telemetry.settings import TelemetrySettings


class _Run:
    queue_s, compute_s, batch_size = 0.001, 0.0015, 4


_RUN = _Run()


def _ids(count: int, ids: str) -> list[str]:
    """Made before the clock starts: a server makes the id whether telemetry is on or not."""
    return [new_request_id() if ids == "server" else f"r{i}" for i in range(count)]


def _record(
    telemetry: Telemetry, request_id: str, owner: str | None, variant: str | None = "a"
) -> None:
    started = time.perf_counter()
    telemetry.record_ended(
        InferenceRecord.ended(
            request_id, "digits", "2", 200, started, _RUN, variant=variant, owner_hash=owner
        )
    )


def once(
    records: int,
    folder: Path,
    ids: str = "sequential",
    rows_before: int = 0,
    variant: str | None = "a",
) -> tuple[float, float]:
    """(request-path µs per record, all-in CPU µs per record) for one burst."""
    telemetry = build_telemetry(
        TelemetrySettings(queue_records=max(records, rows_before) * 2), folder
    )
    telemetry.store.start()
    owner = telemetry.subject_hash("bench") if ids == "server" else None
    for request_id in _ids(rows_before, ids):
        _record(telemetry, request_id, owner, variant)
    telemetry.store.flush(600)
    measured = _ids(records, ids)
    cpu0, path0 = time.process_time(), time.thread_time()
    for request_id in measured:
        _record(telemetry, request_id, owner, variant)
    path_s = time.thread_time() - path0
    telemetry.store.flush(120)
    cpu_s = time.process_time() - cpu0
    telemetry.store.stop()
    return path_s / records * 1e6, cpu_s / records * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--ids",
        choices=("sequential", "server"),
        default="sequential",
        help="request ids: short sequential ones, or random ones as a server makes",
    )
    parser.add_argument(
        "--rows-before", type=int, default=0, help="rows written before the measured ones"
    )
    parser.add_argument(
        "--no-variant", action="store_true", help="records without an experiment's variant"
    )
    args = parser.parse_args()
    variant = None if args.no_variant else "a"
    paths, totals = [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as folder:
            path_us, total_us = once(
                args.records, Path(folder), args.ids, args.rows_before, variant
            )
        paths.append(path_us)
        totals.append(total_us)
    print(
        f"record_ended: {statistics.median(paths):.2f} us of CPU on the request path, "
        f"{statistics.median(totals):.2f} us in all (writer, SQLite, metrics); "
        f"median of {args.repeat} x {args.records} records ({args.ids} ids, "
        f"{args.rows_before} rows before, variant {variant})"
    )


if __name__ == "__main__":
    main()
