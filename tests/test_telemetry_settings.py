"""The [telemetry.upstream] keys added for issue 21 refuse broken values, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeserve.config.loader import ConfigError, load_settings

BROKEN = [
    ("catch_up_records_per_s = 0", "catch_up_records_per_s: must be >= 1"),
    ("catch_up_records_per_s = -5.0", "catch_up_records_per_s: must be >= 1"),
    ('catch_up_records_per_s = "fast"', "catch_up_records_per_s: must be a number"),
    ("catch_up_records_per_s = nan", "catch_up_records_per_s: must be"),
    ("catch_up_bytes_per_s = 10", "catch_up_bytes_per_s: must be >= 1024"),
    ("catch_up_bytes_per_s = inf", "catch_up_bytes_per_s: must be"),
    ("catch_up_bytes_per_s = true", "catch_up_bytes_per_s: must be a number"),
    ("retry_after_max_s = 0", "retry_after_max_s: must be >= 1"),
    ("retry_after_max_s = 1e9", "retry_after_max_s: must be <= 86400"),
    ("dead_letter_max_records = 0", "dead_letter_max_records: must be >= 1"),
    ("dead_letter_max_records = 1.5", "dead_letter_max_records: must be an integer"),
    ("dead_letter_max_records = 2000000", "dead_letter_max_records: must be <= 1000000"),
]


@pytest.mark.parametrize(("line", "message"), BROKEN, ids=[line for line, _ in BROKEN])
def test_a_broken_upstream_value_is_refused_naming_the_key(
    tmp_path: Path, line: str, message: str
) -> None:
    path = tmp_path / "edgeserve.toml"
    path.write_text(f"[telemetry.upstream]\n{line}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert f"telemetry.upstream.{message}" in str(caught.value)


def test_the_new_upstream_keys_take_good_values(tmp_path: Path) -> None:
    path = tmp_path / "edgeserve.toml"
    path.write_text(
        "[telemetry.upstream]\ncatch_up_records_per_s = 50.0\ncatch_up_bytes_per_s = 65536.0\n"
        "retry_after_max_s = 7200.0\ndead_letter_max_records = 100\n"
    )
    upstream = load_settings(path).telemetry.upstream
    assert (upstream.catch_up_records_per_s, upstream.catch_up_bytes_per_s) == (50.0, 65536.0)
    assert (upstream.retry_after_max_s, upstream.dead_letter_max_records) == (7200.0, 100)


def test_the_subject_header_is_read_in_any_case_and_kept_lower_cased(tmp_path: Path) -> None:
    path = tmp_path / "edgeserve.toml"
    path.write_text('[telemetry]\nsubject_header = "X-Tenant-User"\n')
    assert load_settings(path).telemetry.subject_header == "x-tenant-user"
