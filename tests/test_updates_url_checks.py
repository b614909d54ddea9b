""" "Plain http only on loopback" is decided on the parsed host's address, not on a string
prefix (issue 18): `http://127.0.0.1.attacker.example/` and `http://127.0.0.1@attacker
.example/` name another host, in the config's poll_url and in an index's bundle URLs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeserve.updates.poller import IndexProblem, parse_index

OFF_BOX = [
    "http://127.0.0.1.attacker.example/index.json",
    "http://127.0.0.1@attacker.example/index.json",
    "http://127.0.0.1:8080@attacker.example/index.json",
    "http://localhost.attacker.example/index.json",
    "http://[::1].attacker.example/index.json",
    "http://127.0.0.1%2eattacker.example/index.json",
    "https:///index.json",
]
ON_BOX = [
    "http://127.0.0.1:8080/index.json",
    "http://127.8.9.10/index.json",
    "http://localhost/index.json",
    "http://[::1]:9000/index.json",
    "https://updates.example/index.json",
]


@pytest.mark.parametrize("url", OFF_BOX)
def test_the_cli_refuses_a_poll_url_that_only_looks_local(tmp_path: Path, url: str) -> None:
    config = tmp_path / "edgeserve.toml"
    config.write_text(f'[updater]\npoll_url = "{url}"\n')
    done = subprocess.run(
        [sys.executable, "-m", "edgeserve", "update", "status", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "poll_url: must be an https:// URL" in done.stderr


@pytest.mark.parametrize("url", OFF_BOX)
def test_an_index_entry_that_only_looks_local_is_refused(url: str) -> None:
    doc = {"bundles": [{"model": "m", "version": 1, "url": url, "size": 10}]}
    with pytest.raises(IndexProblem, match="must be https"):
        parse_index(doc, "http://127.0.0.1:8000/index.json", 10**9)


@pytest.mark.parametrize("url", ON_BOX)
def test_https_and_loopback_http_bundle_urls_are_accepted(url: str) -> None:
    doc = {"bundles": [{"model": "m", "version": 1, "url": url, "size": 10}]}
    assert [e.url for e in parse_index(doc, "https://updates.example/i.json", 10**9)] == [url]
