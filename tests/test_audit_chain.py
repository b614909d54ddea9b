"""The audit log on a real SQLite file: the chain verifies, hand edits are caught by
`edgeserve audit verify` naming the row, pruning keeps the chain verifiable, floods of
refusals are aggregated, and details never carry secrets."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from edgeserve.audit import chain
from edgeserve.audit.log import AuditLog, read_entries, record_now
from edgeserve.audit.settings import AuditSettings
from edgeserve.cli.group import run


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def config(tmp_path: Path, state_dir: Path) -> Path:
    path = tmp_path / "edgeserve.toml"
    path.write_text(f'[server]\nstate_dir = "{state_dir}"\n')
    return path


@pytest.fixture
def audit_log(state_dir: Path) -> Iterator[AuditLog]:
    log = AuditLog(AuditSettings(), state_dir)
    log.start()
    yield log
    log.stop()


def write_rows(log: AuditLog, n: int = 6) -> None:
    for i in range(n):
        log.record(
            "update.install",
            f"model-{i}",
            "ok",
            subject="ops",
            client="10.0.0.5",
            detail={"version": i},
        )
    assert log.flush()


def verify_cli(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = run(["audit", "verify", "--config", str(config)])
    out = capsys.readouterr()
    return code, out.out + out.err


def sql(state_dir: Path, *statements: str) -> None:
    conn = sqlite3.connect(chain.db_path(state_dir), isolation_level=None)
    for statement in statements:
        conn.execute(statement)
    conn.close()


def test_recorded_entries_form_a_chain_that_verifies(
    audit_log: AuditLog, state_dir: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_rows(audit_log)
    rows = read_entries(chain.db_path(state_dir))
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[2] | {"time_ms": 0, "hash": ""} == {
        "seq": 3,
        "time_ms": 0,
        "subject": "ops",
        "action": "update.install",
        "target": "model-2",
        "outcome": "ok",
        "client": "10.0.0.5",
        "detail": {"version": 2},
        "hash": "",
    }
    code, out = verify_cli(config, capsys)
    assert code == 0, out
    assert "audit chain intact: 6 rows, seq 1..6" in out


def test_database_is_wal_and_private(audit_log: AuditLog, state_dir: Path) -> None:
    write_rows(audit_log, 1)
    conn = sqlite3.connect(chain.db_path(state_dir))
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert chain.db_path(state_dir).stat().st_mode & 0o077 == 0
    assert chain.key_path(state_dir).stat().st_mode & 0o077 == 0


TAMPERING: list[tuple[str, list[str], str]] = [
    ("edit an outcome", ["UPDATE entries SET outcome = 'failed' WHERE seq = 3"], "row 3"),
    ("edit a subject", ["UPDATE entries SET subject = 'nobody' WHERE seq = 4"], "row 4"),
    ("delete a row", ["DELETE FROM entries WHERE seq = 3"], "row 4"),
    (
        "swap two rows",
        [
            "UPDATE entries SET seq = 100 WHERE seq = 2",
            "UPDATE entries SET seq = 2 WHERE seq = 3",
            "UPDATE entries SET seq = 3 WHERE seq = 100",
        ],
        "row 2",
    ),
    ("delete the first row", ["DELETE FROM entries WHERE seq = 1"], "row 2"),
    ("delete the last rows", ["DELETE FROM entries WHERE seq >= 5"], "row 5"),
    ("empty the table", ["DELETE FROM entries"], "row 1"),
    (
        "rewrite the head checkpoint",
        ["UPDATE meta SET value = '4' WHERE name = 'head_seq'"],
        "row 4",
    ),
]


@pytest.mark.parametrize(("what", "statements", "named"), TAMPERING, ids=[t[0] for t in TAMPERING])
def test_hand_edits_are_detected_naming_the_row(
    audit_log: AuditLog,
    state_dir: Path,
    config: Path,
    capsys: pytest.CaptureFixture[str],
    what: str,
    statements: list[str],
    named: str,
) -> None:
    write_rows(audit_log)
    audit_log.stop()
    sql(state_dir, *statements)
    code, out = verify_cli(config, capsys)
    assert code == 1, out
    assert f"audit chain broken at {named}:" in out


def test_a_rehashed_chain_is_caught_by_the_signed_head(
    audit_log: AuditLog, state_dir: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Someone who recomputes every hash after an edit still cannot sign the new head."""
    write_rows(audit_log, 3)
    audit_log.stop()
    conn = chain.connect(chain.db_path(state_dir))
    conn.execute("DELETE FROM entries WHERE seq = 3")
    forged = chain.append(
        conn,
        b"not the box key" * 2,
        [
            {
                "time_ms": 1,
                "subject": "x",
                "action": "a",
                "target": "t",
                "outcome": "ok",
                "client": "",
                "detail": "{}",
            },
        ],
    )
    conn.close()
    assert forged[0]["seq"] == 3
    code, out = verify_cli(config, capsys)
    assert code == 1
    assert "head checkpoint signature does not match" in out


def _entry(time_ms: int, i: int) -> dict:
    return {
        "time_ms": time_ms,
        "subject": "ops",
        "action": "flag.set",
        "target": f"f{i}",
        "outcome": "ok",
        "client": "",
        "detail": "{}",
    }


def test_pruning_keeps_the_chain_verifiable(
    state_dir: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = chain.load_key(chain.key_path(state_dir), create=True)
    assert key is not None
    conn = chain.connect(chain.db_path(state_dir))
    now_ms = int(time.time() * 1000)
    chain.append(conn, key, [_entry(now_ms - 400 * 86_400_000, i) for i in range(5)])
    chain.append(conn, key, [_entry(now_ms, i) for i in range(5, 8)])
    assert chain.prune(conn, key, now_ms - 365 * 86_400_000) == 5
    assert chain.read_checkpoint(conn, "anchor").seq == 5  # type: ignore[union-attr]
    chain.append(conn, key, [_entry(now_ms, 8)])
    conn.close()
    code, out = verify_cli(config, capsys)
    assert code == 0, out
    assert "4 rows, seq 6..9" in out
    # The anchor is signed: the oldest surviving row cannot quietly go too.
    sql(state_dir, "DELETE FROM entries WHERE seq = 6")
    code, out = verify_cli(config, capsys)
    assert (code, "broken at row 7" in out) == (1, True), out
    sql(
        state_dir,
        "UPDATE meta SET value = '6' WHERE name = 'anchor_seq'",
    )
    code, out = verify_cli(config, capsys)
    assert (code, "anchor checkpoint signature does not match" in out) == (1, True), out


def test_prune_removes_only_a_leading_run(state_dir: Path) -> None:
    """A clock that jumped back must not punch a hole in the middle of the chain."""
    key = chain.load_key(chain.key_path(state_dir), create=True)
    assert key is not None
    conn = chain.connect(chain.db_path(state_dir))
    now_ms = int(time.time() * 1000)
    old = now_ms - 10**9
    chain.append(conn, key, [_entry(old, 0), _entry(now_ms, 1), _entry(old, 2)])
    assert chain.prune(conn, key, now_ms - 1000) == 1
    assert [r[0] for r in conn.execute("SELECT seq FROM entries ORDER BY seq")] == [2, 3]
    assert chain.verify(conn, key).ok


def test_the_writer_prunes_by_retention_on_start(state_dir: Path) -> None:
    key = chain.load_key(chain.key_path(state_dir), create=True)
    conn = chain.connect(chain.db_path(state_dir))
    chain.append(conn, key, [_entry(1000, i) for i in range(3)])  # type: ignore[arg-type]
    conn.close()
    log = AuditLog(AuditSettings(retention_days=30), state_dir)
    log.start()
    log.record("audit.test", "x", "ok")
    assert log.flush()
    log.stop()
    conn = chain.connect(chain.db_path(state_dir))
    report = chain.verify(conn, key)
    assert report.ok and report.anchor_seq == 3 and report.rows == 1


def test_identical_refusals_are_aggregated_per_client(audit_log: AuditLog) -> None:
    for _ in range(500):
        audit_log.record_refused("10.0.0.9", "signature verification failed")
    for _ in range(3):
        audit_log.record_refused("10.0.0.7", "signature verification failed")
    audit_log.record_refused("10.0.0.9", "token expired")
    assert audit_log.flush()
    rows = audit_log.read()
    counts = {(r["client"], r["detail"]["reason"]): r["detail"]["count"] for r in rows}
    assert counts == {
        ("10.0.0.9", "signature verification failed"): 500,
        ("10.0.0.7", "signature verification failed"): 3,
        ("10.0.0.9", "token expired"): 1,
    }
    assert {r["action"] for r in rows} == {"auth.refused"}


def test_too_many_distinct_clients_share_one_overflow_row(state_dir: Path) -> None:
    log = AuditLog(AuditSettings(aggregate_max_keys=4), state_dir)
    log.start()
    for i in range(50):
        log.record_refused(f"10.0.1.{i}", "missing token")
    assert log.flush()
    log.stop()
    rows = log.read()
    assert len(rows) == 5
    overflow = [r for r in rows if r["client"] == "*"]
    assert overflow[0]["detail"]["count"] == 46


JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2ln"
SECRETS: list[tuple[dict, dict]] = [
    ({"token": "abc"}, {"token": "[redacted]"}),
    ({"Authorization": "Bearer x"}, {"Authorization": "[redacted]"}),
    ({"master_key": "00ff"}, {"master_key": "[redacted]"}),
    ({"reason": f"bad {JWT} here"}, {"reason": "bad [redacted] here"}),
    ({"reason": "x" * 500}, {"reason": "x" * 197 + "..."}),
    ({"nested": {"password": "p", "ok": 1}}, {"nested": {"password": "[redacted]", "ok": 1}}),
]


@pytest.mark.parametrize(("detail", "stored"), SECRETS)
def test_details_are_stored_without_secrets(
    audit_log: AuditLog, detail: dict, stored: dict
) -> None:
    audit_log.record("keys.rotate", "master", "ok", detail=detail)
    assert audit_log.flush()
    assert audit_log.read()[-1]["detail"] == stored


def test_a_full_queue_is_itself_on_the_record(state_dir: Path) -> None:
    log = AuditLog(AuditSettings(queue_entries=10), state_dir)  # writer not started yet
    for i in range(15):
        log.record("flag.set", f"f{i}", "ok")
    log.start()
    assert log.flush()
    log.stop()
    rows = log.read(limit=100)
    assert len(rows) == 11
    assert rows[-1]["action"] == "audit.dropped" and rows[-1]["detail"] == {"count": 5}


def test_forwarded_rows_carry_their_chain_hash(state_dir: Path) -> None:
    seen: list[dict] = []
    forward: Callable[[list[dict]], None] = seen.extend
    log = AuditLog(AuditSettings(), state_dir, forward)
    log.start()
    log.record("update.rollback", "digits", "ok", subject="ops")
    assert log.flush()
    log.stop()
    assert [(r["seq"], r["action"]) for r in seen] == [(1, "update.rollback")]
    assert seen[0]["hash"] == log.read()[0]["hash"]
    assert orjson.loads(seen[0]["detail"]) == {}


def test_verify_json_names_the_row_for_scripts(
    audit_log: AuditLog, state_dir: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_rows(audit_log, 3)
    audit_log.stop()
    sql(state_dir, "UPDATE entries SET detail = '{}' WHERE seq = 2")
    code = run(["audit", "verify", "--config", str(config), "--json"])
    report = orjson.loads(capsys.readouterr().out)
    assert code == 1
    assert (report["ok"], report["first_bad_seq"], report["signatures_checked"]) == (False, 2, True)


def test_show_prints_entries(
    audit_log: AuditLog, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_rows(audit_log, 3)
    assert run(["audit", "show", "--config", str(config), "--since", "1", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [orjson.loads(line)["seq"] for line in lines] == [2, 3]


def test_a_command_can_append_beside_the_running_writer(
    audit_log: AuditLog, state_dir: Path
) -> None:
    """`record_now` (for offline commands) and the server's writer share one chain."""
    write_rows(audit_log, 2)
    stored = record_now(state_dir, "keys.rotate", "master", "ok", subject="root")
    assert stored["seq"] == 3
    write_rows(audit_log, 2)
    conn = chain.connect(chain.db_path(state_dir))
    report = chain.verify(conn, chain.load_key(chain.key_path(state_dir), create=False))
    assert (report.ok, report.rows) == (True, 5)
    assert [r["action"] for r in audit_log.read()][2] == "keys.rotate"


def test_odd_details_are_kept_not_lost(audit_log: AuditLog) -> None:
    audit_log.record("flag.set", "f", "ok", detail=["a", "b"])  # type: ignore[arg-type]
    audit_log.record("auth.refused", "token", "denied", detail="x", aggregate=True)  # type: ignore[arg-type]
    audit_log.record("flag.set", "g", "ok", detail={"n": float("nan"), "b": b"raw"})
    assert audit_log.flush()
    details = [r["detail"] for r in audit_log.read()]
    assert {"value": ["a", "b"]} in details
    assert {"value": "x", "count": 1} in details
    assert {"n": "nan", "b": "b'raw'"} in details
