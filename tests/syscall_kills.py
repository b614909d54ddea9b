"""Kill a real command at an exact system call, with strace's fault injector.

`kill_points` runs the command once under `strace -f -y` and lists every call of a
file-system syscall that touches the state folder, as (syscall, n): the n-th call of
that syscall in its thread. `run_killed` then runs the command again with
`-e inject=SYSCALL:signal=KILL:when=n`: strace delivers SIGKILL at the entry of that
call (so it never happens), which is what a kill -9 or an OOM kill at that instant does.

Runs of data calls on one file (open and the writes of one payload; the pages of one
SQLite transaction) are cut to their first and last call: the states in between
differ only in how much of that one file was written, which the ends of the run
already cover. Every call that changes a name (rename, link, symlink, unlink, mkdir)
stays a kill point of its own: those are the commit points.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

MUTATING = (
    "openat",
    "write",
    "pwrite64",
    "rename",
    "renameat",
    "renameat2",
    "link",
    "linkat",
    "symlink",
    "symlinkat",
    "unlink",
    "unlinkat",
    "mkdir",
    "mkdirat",
    "rmdir",
    "ftruncate",
)
"""Calls that change what another process sees. fsync and fdatasync are not kill points:
a SIGKILL at their entry leaves exactly what a SIGKILL at the next call leaves (they
matter for a power cut, which `updater/README.md` argues on paper)."""

NAMESPACE = {c for c in MUTATING if c.startswith(("rename", "link", "symlink", "unlink", "mkdir"))}
"""Calls that change what a name points to: each one is its own kill point, always."""

STRACE = ["strace", "-f", "-qq"]  # not --seccomp-bpf: strace 6.1 then injects nothing

OURS = ("/keys", "/models", "/incoming")
"""The state folder's parts the updater and its keys own (relative to the state dir)."""

_LINE = re.compile(r"^(?P<tid>\d+)\s+(?P<call>[a-z0-9_]+)\((?P<args>.*)$")
_SQLITE_SIDE_FILE = re.compile(r"-(journal|wal|shm)$")
_FAILED = re.compile(r"\) = -1 E[A-Z]+ \(.*\)$")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"|<([^<>]+)>')


@dataclass(frozen=True)
class KillPoint:
    syscall: str
    n: int  # the n-th call of `syscall` in its thread (strace counts per tracee)
    target: str  # the path it touches, for messages

    def __str__(self) -> str:
        return f"{self.syscall}#{self.n} ({self.target})"


def strace_path() -> str | None:
    return shutil.which("strace")


def kill_points(cmd: list[str], under: Path, cwd: Path, env: dict[str, str]) -> list[KillPoint]:
    """Every mutating syscall of `cmd` that touches `under`, runs cut to their ends."""
    trace = cwd / "strace.txt"
    args = [*STRACE, "-y", "-s", "0", "-o", str(trace)]
    args += ["-e", "trace=" + ",".join(MUTATING), *cmd]
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, timeout=240)
    if done.returncode != 0:
        raise AssertionError(f"uninterrupted run failed: {done.stderr.decode()[-2000:]}")
    return parse_trace(trace, under)


def parse_trace(trace: Path, under: Path) -> list[KillPoint]:
    """The kill points in an `strace -f -y` output file (see `kill_points`)."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    points: list[KillPoint] = []
    last_key: str | None = None
    run_end: KillPoint | None = None
    for line in trace.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if m is None:  # "<... resumed>", exits, signals
            continue
        call = m["call"]
        counts[(m["tid"], call)] += 1
        if call == "openat" and not re.search(r"O_WRONLY|O_RDWR|O_CREAT", m["args"]):
            continue
        if _FAILED.search(m["args"]):  # changed nothing: same as a kill at the next call
            continue
        touched = [a or b for a, b in _QUOTED.findall(m["args"])]
        target = next((t for t in touched if t.startswith(str(under))), None)
        if target is None:
            continue
        point = KillPoint(call, counts[(m["tid"], call)], target[len(str(under)) :])
        family = _SQLITE_SIDE_FILE.sub("", target)
        # SQLite makes its own transactions atomic: one kill point at each end of its
        # run of calls is enough to cover our code around it; its journal is SQLite's
        # to test, not ours.
        sqlite = family.endswith(".db")
        key = family if sqlite else target
        if key == last_key and (sqlite or call not in NAMESPACE):
            run_end = point
            continue
        if run_end is not None:
            points.append(run_end)
        points.append(point)
        last_key, run_end = key, None
    if run_end is not None:
        points.append(run_end)
    return points


def run_killed(
    cmd: list[str], point: KillPoint, cwd: Path, env: dict[str, str], timeout_s: float = 120
) -> subprocess.CompletedProcess[bytes]:
    """Run `cmd` and SIGKILL it at the entry of `point` (or let it finish if never reached)."""
    inject = f"inject={point.syscall}:signal=KILL:when={point.n}"
    args = [*STRACE, "-o", "/dev/null", "-e", f"trace={point.syscall}"]
    args += ["-e", inject, *cmd]
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, timeout=timeout_s)
