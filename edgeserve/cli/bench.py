"""`edgeserve bench`: run the benchmark in `bench/` (a source checkout) and print its table.

The benchmark lives beside the package, not in it: it needs wrk, a peer server and the
demo models, none of which belong on an edge box. This command only finds and starts it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

CHECKOUT = Path(__file__).resolve().parents[2]


@click.command(
    "bench",
    context_settings={"ignore_unknown_options": True, "help_option_names": ["-h", "--help"]},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Benchmark edgeserve as shipped against the raw runtime and MLServer on loopback.

    edgeserve runs with auth on (a token from its own issuer on every request) and
    telemetry on; auth off and telemetry off are extra, named rows. Arguments are passed
    to bench/run.py (--models, --duration, --only, --overload-s, --overload-budget-ms,
    --engines, --model-dir, --build-minilm, --markdown, --json); `--only shipped` runs
    just issue 17's figures. Needs a source checkout and wrk.

    Example: edgeserve bench --only shipped --build-minilm --duration 10
    """
    if not (CHECKOUT / "bench" / "run.py").is_file():
        click.echo("edgeserve: bench/ not found; run from a source checkout", err=True)
        raise SystemExit(1)
    done = subprocess.run([sys.executable, "-m", "bench.run", *args], cwd=CHECKOUT)
    raise SystemExit(done.returncode)
