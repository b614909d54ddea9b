"""Polling a bundle index: a small real HTTP server on loopback hosts the index and the
bundles; the first download is cut half-way and must resume with a Range request."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from edgeserve.updates.poller import IndexProblem, parse_index
from tests.serving import run_server
from tests.test_updates_kit import UpdateKit, served_version, wait_for


class BundleHost(ThreadingHTTPServer):
    """Static files with Range support; a path in `cut_once` is cut half-way once."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.cut_once: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: BundleHost

    def do_GET(self) -> None:
        host = self.server
        wanted = self.headers.get("Range")
        host.requests.append((self.path, wanted))
        data = host.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = int(wanted.removeprefix("bytes=").split("-")[0]) if wanted else 0
        body = data[start:]
        self.send_response(206 if wanted else 200)
        if wanted:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in host.cut_once:
            host.cut_once.discard(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def host() -> Iterator[BundleHost]:
    server = BundleHost()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _entry(model: str, version: int, path: str, data: bytes) -> dict:
    return {
        "model": model,
        "version": version,
        "url": path.lstrip("/"),
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def test_the_server_installs_the_newest_indexed_bundle_resuming_a_cut_download(
    tmp_path: Path, host: BundleHost
) -> None:
    kit = UpdateKit(tmp_path)
    v3, v4 = kit.bundle(3, source=1).read_bytes(), kit.bundle(4, source=2).read_bytes()
    host.files = {"/b/digits-3.bundle": v3, "/b/digits-4.bundle": v4}
    index = {
        "bundles": [
            _entry("digits", 3, "/b/digits-3.bundle", v3),
            _entry("digits", 4, "/b/digits-4.bundle", v4),
            _entry("not-served-here", 9, "/b/other.bundle", b"x" * 10),
        ]
    }
    host.files["/index.json"] = json.dumps(index).encode()
    host.cut_once.add("/b/digits-4.bundle")
    config = kit.config(watch_window_s=600.0, poll_url=f"{host.url}/index.json")
    with run_server(tmp_path, config) as server:
        wait_for(lambda: served_version(server.url) == "4", 60, "the polled version")
        doc = httpx.get(f"{server.url}/api/models/digits/update").json()
    fetched = [(p, r) for p, r in host.requests if p.startswith("/b/")]
    assert fetched[0] == ("/b/digits-4.bundle", None)
    assert fetched[1][0] == "/b/digits-4.bundle" and fetched[1][1] == f"bytes={len(v4) // 2}-"
    assert all(p != "/b/digits-3.bundle" and p != "/b/other.bundle" for p, _ in fetched)
    assert doc["history"][-1]["reason"] == f"polled from {host.url}/index.json"
    assert not list((kit.state_dir / "incoming").glob("*"))


BAD_INDEXES = {
    "not an object": [],
    "no bundles": {"files": []},
    "bad name": {"bundles": [{"model": "../x", "version": 1, "url": "a", "size": 1}]},
    "version zero": {"bundles": [{"model": "m", "version": 0, "url": "a", "size": 1}]},
    "size missing": {"bundles": [{"model": "m", "version": 1, "url": "a"}]},
    "plain http elsewhere": {
        "bundles": [{"model": "m", "version": 1, "url": "http://example.com/a", "size": 1}]
    },
    "short sha": {"bundles": [{"model": "m", "version": 1, "url": "a", "size": 1, "sha256": "a"}]},
}


@pytest.mark.parametrize("case", list(BAD_INDEXES))
def test_a_malformed_index_is_refused_as_a_whole(case: str) -> None:
    with pytest.raises(IndexProblem):
        parse_index(BAD_INDEXES[case], "https://updates.example/index.json", 10**9)


def test_index_urls_resolve_against_the_index_and_oversized_entries_are_skipped() -> None:
    doc = {
        "bundles": [
            {"model": "m", "version": 1, "url": "b/m-1.bundle", "size": 10},
            {"model": "m", "version": 2, "url": "m-2.bundle", "size": 10**6},
        ]
    }
    entries = parse_index(doc, "https://updates.example/fleet/index.json", 1000)
    assert [e.url for e in entries] == ["https://updates.example/fleet/b/m-1.bundle"]


def test_a_cut_download_the_index_no_longer_offers_is_removed_not_kept_forever(
    tmp_path: Path, host: BundleHost
) -> None:
    """A download cut short is kept to resume; once the index offers a newer version (or
    the model is no longer served here) nothing will resume it, and each such leftover
    would hold up to max_bundle_bytes of disk for good."""
    kit = UpdateKit(tmp_path)
    v4 = kit.bundle(4, source=2).read_bytes()
    host.files = {"/b/digits-4.bundle": v4}
    index = {"bundles": [_entry("digits", 4, "/b/digits-4.bundle", v4)]}
    host.files["/index.json"] = json.dumps(index).encode()
    incoming = kit.state_dir / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    superseded = incoming / "poll-digits-3.part"  # v3 was offered once and cut short
    unserved = incoming / "poll-retired-7.part"  # a model this box no longer serves
    superseded.write_bytes(b"x" * 1000)
    unserved.write_bytes(b"y" * 1000)
    config = kit.config(watch_window_s=600.0, poll_url=f"{host.url}/index.json")
    with run_server(tmp_path, config) as server:
        wait_for(lambda: served_version(server.url) == "4", 60, "the polled version")
    assert sorted(p.name for p in incoming.iterdir()) == []
