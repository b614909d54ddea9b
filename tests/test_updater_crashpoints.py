"""The crash-point test (issue 22): kill the real CLI, and the first server start, at every
file-system syscall that changes what the updater owns in the state folder (keys, model
stores, uploads; fsync excepted, see `tests/syscall_kills.py`), then use the box.

For each command, one uninterrupted run under strace lists its kill points (see
`tests/syscall_kills.py`); each kill point then gets its own copy of the box and a run
SIGKILLed at that call. After each kill:

- `edgeserve update status` works (and runs the recovery every entry point runs);
- no stray files remain (temp names, pending journals, empty keys);
- what a server start would serve is the old or the new version, whole and passing its
  validation samples (read through the server's own start-up path; a sample of kill
  points, and every kill of `serve`, start a real server and send it a request);
- rerunning the command succeeds, and leaves the new state with no strays.

A kill point where any of that fails is a box that needed a hand: there must be none.
The counts are printed (run with `-s` to see them) for the closing note of the issue.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.serving import LISTENING
from tests.syscall_kills import (
    MUTATING,
    OURS,
    STRACE,
    KillPoint,
    kill_points,
    parse_trace,
    run_killed,
    strace_path,
)
from tests.test_updates_kit import digits_rows, served_version
from tests.update_boxes import (
    MODEL,
    Author,
    Box,
    journal_version,
    master_key_ids,
    payload_key_ids,
    serving_path_version,
    strays,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(strace_path() is None, reason="needs strace (.ci/run installs it)"),
]

WORKERS = 2  # the CI box has two cores; each trial is mostly waiting on subprocesses
REAL_SERVER_SAMPLES = 2  # per CLI command, besides the in-process start-up path


@dataclass(frozen=True)
class Scenario:
    args: Callable[[Author], tuple[str, ...]]
    before: Callable[[Box], None]  # what the box holds before the command
    old: int | None  # the version serving before the command
    new: int | None  # ... and after it
    audit_points: bool = False  # the audit log's own kill points (once is enough)

    def check_done(self, box: Box) -> list[str]:
        """What must hold once the command has finished (first try or retry)."""
        problems = []
        if journal_version(box.state) != self.new:
            problems.append(f"after the retry version {journal_version(box.state)} is active")
        return problems


def _apply(*versions: int) -> Callable[[Box], None]:
    def before(box: Box) -> None:
        for v in versions:
            box.ok("update", "apply", str(box.author.v3 if v == 3 else box.author.v4))

    return before


class RotateScenario(Scenario):
    def check_done(self, box: Box) -> list[str]:
        problems = super().check_done(box)
        if (box.state / "keys" / "master.key.next").exists():
            problems.append("master.key.next left after the rotation finished")
        if master_key_ids(box.state) != payload_key_ids(box.state):
            problems.append("payloads not all under the one master key")
        return problems


class MasterInitScenario(Scenario):
    def check_done(self, box: Box) -> list[str]:
        return [] if len(master_key_ids(box.state)) == 1 else ["no valid master.key"]


SCENARIOS = {
    "update apply (first, fresh box)": Scenario(
        lambda a: ("update", "apply", str(a.v3)), _apply(), None, 3, audit_points=True
    ),
    "update apply (upgrade)": Scenario(lambda a: ("update", "apply", str(a.v4)), _apply(3), 3, 4),
    "update rollback": Scenario(lambda a: ("update", "rollback", MODEL), _apply(3, 4), 4, 3),
    "keys rotate": RotateScenario(lambda a: ("keys", "rotate"), _apply(3, 4), 4, 4),
    "keys master-init": MasterInitScenario(lambda a: ("keys", "master-init"), _apply(), None, None),
}


@dataclass
class Trial:
    point: KillPoint
    killed: bool = False
    real_server: bool = False
    problems: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def author(tmp_path_factory: pytest.TempPathFactory) -> Author:
    return Author.make(tmp_path_factory.mktemp("author"))


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_kill_point_of_a_command_leaves_a_working_box(
    name: str, author: Author, tmp_path: Path
) -> None:
    scenario = SCENARIOS[name]
    template = Box.fresh(tmp_path / "template", author)
    scenario.before(template)
    args = scenario.args(author)
    probe = template.copy(tmp_path / "probe")
    points = kill_points(probe.command(*args), probe.state, probe.root, probe.env())
    points = [p for p in points if _ours(p, audit=scenario.audit_points)]
    assert points, "the command touched nothing"
    sampled = {points[len(points) * (k + 1) // (REAL_SERVER_SAMPLES + 1)] for k in range(2)}

    def trial(index: int, point: KillPoint) -> Trial:
        box = template.copy(tmp_path / f"trial-{index}")
        result = Trial(point, real_server=point in sampled)
        done = run_killed(box.command(*args), point, box.root, box.env())
        result.killed = done.returncode == -signal.SIGKILL
        result.problems = _check_after_kill(box, args, scenario, result.real_server)
        return result

    with ThreadPoolExecutor(WORKERS) as pool:
        trials = list(pool.map(trial, range(len(points)), points))
    _report(name, trials)
    assert [f"{t.point}: {t.problems}" for t in trials if t.problems] == []
    assert all(t.killed for t in trials), "a kill point was never reached: counts drifted"


def test_every_kill_point_of_the_first_server_start_leaves_a_working_box(
    author: Author, tmp_path: Path
) -> None:
    template = Box.fresh(tmp_path / "template", author)
    probe = template.copy(tmp_path / "probe")
    points = [p for p in _serve_kill_points(probe) if _ours(p, audit=False)]
    assert points, "the first start touched nothing"

    def trial(index: int, point: KillPoint) -> Trial:
        box = template.copy(tmp_path / f"trial-{index}")
        result = Trial(point, real_server=True)
        result.killed = _serve_killed(box, point) == -signal.SIGKILL
        try:
            box.status()
        except AssertionError as exc:
            result.problems.append(f"status failed: {exc}")
            return result
        result.problems += strays(box.state)
        result.problems += _real_server_serves(box, None)  # the retry is a start
        return result

    with ThreadPoolExecutor(WORKERS) as pool:
        trials = list(pool.map(trial, range(len(points)), points))
    _report("serve (first start)", trials)
    assert [f"{t.point}: {t.problems}" for t in trials if t.problems] == []
    # Threads count their calls on their own, so a few kill points of `serve` may land
    # in another thread's call than the one listed, or after the stop: most must kill.
    assert sum(t.killed for t in trials) >= len(trials) // 2


def _ours(point: KillPoint, *, audit: bool) -> bool:
    """Kill points in what the updater owns: keys, model stores, uploads (and the state
    folder itself). The audit log's (SQLite's) are tried once, with the first apply; the
    experiment and job stores a first start also writes are their owners' to test."""
    if point.target == "" or point.target.startswith(OURS):
        return True
    return audit and point.target.startswith("/audit.db")


def _check_after_kill(
    box: Box, args: tuple[str, ...], scenario: Scenario, real_server: bool
) -> list[str]:
    problems = []
    allowed = {scenario.old, scenario.new}
    try:
        version = box.active_version()  # `update status`, with its recovery
    except AssertionError as exc:
        return [f"status failed: {exc}"]
    if version not in allowed:
        problems.append(f"version {version} active after the kill, expected one of {allowed}")
    problems += strays(box.state)
    try:
        served = serving_path_version(box)
    except Exception as exc:  # any failure here is a box that does not serve
        problems.append(f"start-up path failed: {type(exc).__name__}: {exc}")
    else:
        if served != version:
            problems.append(f"a start would serve {served}, status says {version}")
    if real_server:
        problems += _real_server_serves(box, version)
    retry = box.cli(*args)
    if retry.returncode != 0:
        problems.append(f"retry failed: {retry.stderr.strip()[-300:]}")
    problems += scenario.check_done(box)
    problems += strays(box.state)
    return problems


# -- the server ------------------------------------------------------------------------


_starts = itertools.count(1)  # names each server start's log


def _server_process(box: Box, strace: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
    """The server and its log: it binds port 0, and its `listening` line names the port."""
    box.set_port(0)
    log_path = box.root / f"server-{next(_starts)}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*strace, *box.command("serve")], cwd=box.root, env=box.env(), stdout=log, stderr=log
        )
    return process, log_path


def _wait_ready_or_exit(
    process: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 90
) -> str | None:
    """The server's URL once it answers ready; None if it exited first (killed)."""
    deadline = time.monotonic() + timeout_s
    url = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None
        if url is None:
            found = LISTENING.search(log_path.read_bytes())
            url = f"http://127.0.0.1:{int(found.group(1))}" if found else None
        if url is not None:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
        time.sleep(0.05)
    raise TimeoutError(f"server {log_path.name} neither ready nor dead after {timeout_s}s")


def _stop_traced(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM the server under strace (strace itself would only detach), then wait."""
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    for pid in children.read_text().split() if children.exists() else []:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGTERM)
    try:
        return process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def _serve_kill_points(box: Box) -> list[KillPoint]:
    """Kill points of a first start, up to ready and through a clean stop."""
    trace_file = box.root / "strace.txt"
    strace = [*STRACE, "-y", "-s", "0", "-o", str(trace_file)]
    strace += ["-e", "trace=" + ",".join(MUTATING)]
    process, log_path = _server_process(box, strace)
    assert _wait_ready_or_exit(process, log_path), "the first start failed uninterrupted"
    _stop_traced(process)
    return parse_trace(trace_file, box.state)


def _serve_killed(box: Box, point: KillPoint) -> int:
    inject = f"inject={point.syscall}:signal=KILL:when={point.n}"
    strace = [*STRACE, "-o", "/dev/null", "-e", f"trace={point.syscall}"]
    process, log_path = _server_process(box, [*strace, "-e", inject])
    if _wait_ready_or_exit(process, log_path):
        return _stop_traced(process)
    return process.returncode


def _real_server_serves(box: Box, version: int | None) -> list[str]:
    """Start a real server on the box; it must serve digits (the installed version if any)."""
    process, log_path = _server_process(box, [])
    try:
        url = _wait_ready_or_exit(process, log_path)
        if url is None:
            return [f"a real server did not start (exit {process.returncode})"]
        if version is None:
            r = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=digits_rows(), timeout=30)
            return [] if r.status_code == 200 else [f"infer answered {r.status_code}"]
        served = served_version(url)
        return [] if served == str(version) else [f"a real server served {served}"]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _report(name: str, trials: list[Trial]) -> None:
    hands = sum(1 for t in trials if t.problems)
    killed = sum(t.killed for t in trials)
    servers = sum(t.real_server for t in trials)
    print(
        f"\ncrash points: {name}: {len(trials)} kill points tried, {killed} killed, "
        f"{servers} checked with a real server, {hands} needed a hand"
    )
