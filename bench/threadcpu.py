"""CPU seconds per thread of a server process, from `/proc/<pid>/task/<tid>/stat`.

The method of bench/RESULTS.md: read every thread's utime + stime just before and just
after a load run; the event loop's CPU per request is its thread's difference over the
requests answered. The event loop is the process's main thread (tid = pid) for both
`edgeserve serve` and bench/floor.py; the runtime and telemetry threads are the others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ThreadCpu:
    tid: int
    name: str
    cpu_s: float  # user + system


def parse_stat(text: str, ticks_per_s: float = TICKS_PER_S) -> tuple[str, float]:
    """A thread's name and user + system CPU seconds from one `stat` line.

    The name (field 2) is in parentheses and may hold spaces or parentheses itself, so
    the fields are counted from the last `)`: utime and stime are fields 14 and 15."""
    head, _, rest = text.rpartition(")")
    name = head.partition("(")[2]
    fields = rest.split()
    # fields[0] is field 3 (state): utime = field 14 -> fields[11], stime -> fields[12].
    return name, (int(fields[11]) + int(fields[12])) / ticks_per_s


def sample(pid: int, proc: Path = Path("/proc")) -> dict[int, ThreadCpu]:
    """Every live thread of `pid` now; threads that end while being read are skipped."""
    out: dict[int, ThreadCpu] = {}
    try:
        tids = [int(p.name) for p in (proc / str(pid) / "task").iterdir() if p.name.isdecimal()]
    except OSError:
        return out
    for tid in tids:
        try:
            name, cpu_s = parse_stat((proc / str(pid) / "task" / str(tid) / "stat").read_text())
        except (OSError, IndexError, ValueError):
            continue
        out[tid] = ThreadCpu(tid, name, cpu_s)
    return out


def per_request_us(
    pid: int, before: dict[int, ThreadCpu], after: dict[int, ThreadCpu], requests: int
) -> dict[str, float | None]:
    """Microseconds of CPU per request between two samples: the event loop (the main
    thread) and the whole process (threads started in between count from zero)."""
    if requests <= 0 or pid not in after:
        return {"loop_us_per_request": None, "process_us_per_request": None}
    loop_s = after[pid].cpu_s - (before[pid].cpu_s if pid in before else 0.0)
    total_s = sum(
        t.cpu_s - (before[t.tid].cpu_s if t.tid in before else 0.0) for t in after.values()
    )
    return {
        "loop_us_per_request": loop_s / requests * 1e6,
        "process_us_per_request": total_s / requests * 1e6,
    }


def named_us_per_request(
    before: dict[int, ThreadCpu], after: dict[int, ThreadCpu], requests: int, name: str
) -> float | None:
    """Microseconds of CPU per request of the threads named `name` (the kernel's name:
    the telemetry writer sets its own, `edgeserve.process.thread_names`); None when no
    thread has that name (telemetry off, or a server from before it was named)."""
    threads = [t for t in after.values() if t.name == name]
    if requests <= 0 or not threads:
        return None
    spent = sum(t.cpu_s - (before[t.tid].cpu_s if t.tid in before else 0.0) for t in threads)
    return spent / requests * 1e6
