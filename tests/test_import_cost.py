"""What starting a command costs before it does anything: every `edgeserve` command and
every server start imports the telemetry store, and sqlite-utils imports pandas whenever
it is installed (the `spark` extra installs it) only to map `pandas.Timestamp` to TEXT,
which edgeserve never stores: about 0.3-1 s of CPU at every start on a small box."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import edgeserve.cli.group  # what every `edgeserve` command and `serve` import first
print("pandas" in sys.modules)
import pandas  # still importable for whoever needs it (the Spark scorer)
print(pandas.Timestamp("2026-01-01").year)
"""


def test_the_command_line_does_not_import_pandas_but_leaves_it_importable() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split() == ["False", "2026"]
