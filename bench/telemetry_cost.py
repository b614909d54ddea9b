"""What one telemetry record costs: on the request path (`InferenceRecord.ended` and
`record_inference`) and in all (the writer thread, SQLite, metrics), in CPU µs.

    python -m bench.telemetry_cost [--records 50000] [--repeat 5]

Prints the median of the repeats; a benchmark, not a test (it asserts nothing).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from edgeserve.telemetry.records import InferenceRecord
from edgeserve.telemetry.service import build_telemetry
from edgeserve.telemetry.settings import TelemetrySettings


class _Run:
    queue_s, compute_s, batch_size = 0.001, 0.0015, 4


def once(records: int, folder: Path) -> tuple[float, float]:
    """(request-path µs per record, all-in CPU µs per record) for one burst."""
    telemetry = build_telemetry(TelemetrySettings(queue_records=records * 2), folder)
    telemetry.store.start()
    run = _Run()
    cpu0, path0 = time.process_time(), time.thread_time()
    for i in range(records):
        started = time.perf_counter()
        telemetry.record_inference(
            InferenceRecord.ended(f"r{i}", "digits", "2", 200, started, run, variant="a")
        )
    path_s = time.thread_time() - path0
    telemetry.store.flush(120)
    cpu_s = time.process_time() - cpu0
    telemetry.store.stop()
    return path_s / records * 1e6, cpu_s / records * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    paths, totals = [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as folder:
            path_us, total_us = once(args.records, Path(folder))
        paths.append(path_us)
        totals.append(total_us)
    print(
        f"record_inference: {statistics.median(paths):.2f} us of CPU on the request path, "
        f"{statistics.median(totals):.2f} us in all (writer, SQLite, metrics); "
        f"median of {args.repeat} x {args.records} records"
    )


if __name__ == "__main__":
    main()
