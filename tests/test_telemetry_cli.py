"""`edgeserve telemetry status | forget` on a real buffer file."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeserve.config.loader import load_settings
from edgeserve.telemetry.cli import telemetry as telemetry_cli
from edgeserve.telemetry.records import EventRecord, FeedbackRecord, InferenceRecord
from edgeserve.telemetry.service import build_telemetry


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config whose buffer holds rows of alice and bob, and two audit entries."""
    path = tmp_path / "edgeserve.toml"
    path.write_text('[server]\nstate_dir = "state"\n[telemetry]\ndata_region = "ae"\n')
    settings = load_settings(path)

    async def fill() -> None:
        telemetry = build_telemetry(settings.telemetry, settings.server.state_dir)
        await telemetry.start()
        for who in ("alice", "bob"):
            digest = telemetry.subject_hash(who)
            for i in range(3):
                telemetry.record_inference(
                    InferenceRecord(
                        f"{who}-{i}", "m", "1", 200, 0.01, 0, 0, 1, time.time(), subject_hash=digest
                    )
                )
            telemetry.record_feedback(FeedbackRecord(f"{who}-0", "7", True, time.time()))
            telemetry.record_event(EventRecord("purchase", 3.0, digest, time.time()))
        telemetry.record_audit("model.update", "m", "ok", subject="ops", detail={"to": 2})
        telemetry.record_audit("telemetry.forget", "subject", "ok", subject="ops")
        await telemetry.stop()

    asyncio.run(fill())
    return path


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(telemetry_cli, list(args))
    return result.exit_code, result.output


def test_forget_removes_only_that_subject_and_queues_the_request(config: Path) -> None:
    code, out = _run("forget", "alice", "--config", str(config), "--json")
    assert code == 0, out
    assert json.loads(out)["removed_rows"] == 3 + 1 + 1  # inferences, feedback, event
    with sqlite3.connect(config.parent / "state" / "telemetry.db") as db:
        left = {r[0] for r in db.execute("SELECT request_id FROM inferences")}
        forgets = db.execute("SELECT subject_hash, synced, data_region FROM forget_requests")
        (digest, synced, region), *more = forgets.fetchall()
    assert left == {"bob-0", "bob-1", "bob-2"}
    assert not more and synced == 0 and region == "ae"
    assert digest == json.loads(out)["subject_hash"] and "alice" not in digest
    assert b"alice" not in (config.parent / "state" / "telemetry.db").read_bytes()


def test_status_reports_rows_unsynced_and_size(config: Path) -> None:
    code, out = _run("status", "--config", str(config), "--json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["tables"]["inferences"] == {"rows": 6, "unsynced": 6}
    assert doc["tables"]["audit"] == {"rows": 2, "unsynced": 2}
    assert 0 < doc["db_bytes"] <= doc["max_db_bytes"]
    code, text = _run("status", "--config", str(config))
    assert code == 0 and "inferences" in text


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["status", "--config", "{missing}"], 2, "cannot read config file"),
        (["status", "--config", "{empty}"], 1, "no telemetry buffer"),
        (["forget"], 2, "Missing argument 'SUBJECT'"),
    ],
)
def test_bad_invocations_exit_with_usage_or_failure_codes(
    tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text(f'[server]\nstate_dir = "{tmp_path / "nothing"}"\n')
    filled = [a.format(missing=tmp_path / "nope.toml", empty=empty) for a in args]
    result = CliRunner().invoke(telemetry_cli, filled)
    assert result.exit_code == code
    assert message in result.output
