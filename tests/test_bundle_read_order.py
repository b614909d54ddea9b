"""An upload nobody trusted signed is refused on its signature before its payload is
read into memory (issue 18: an unsigned 700 MiB upload took RSS to 921 MiB first)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from tests.serving import run_server
from tests.test_updates_kit import UpdateKit, upload

PAYLOAD_BYTES = 160 * 1024 * 1024
# The server's peak RSS may grow by this much while it refuses: the manifest, the
# signature and the request machinery, never the payload.
ALLOWED_GROWTH_BYTES = 48 * 1024 * 1024


def peak_rss_bytes(pid: int) -> int:
    """The process's high-water mark of resident memory (VmHWM), which a freed buffer
    does not lower: what an upload made it hold at its worst."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def unsigned_bundle(kit: UpdateKit, path: Path) -> Path:
    """A real bundle's manifest with a signature no trusted key made, and a large payload."""
    with tarfile.open(kit.bundle(7), "r:") as real:
        manifest = real.extractfile("manifest.json").read()  # type: ignore[union-attr]
        payloads = [m.name for m in real.getmembers() if m.name.startswith("payload/")]
    with tarfile.open(path, "w:") as tar:
        for name, data in (("manifest.json", manifest), ("manifest.sig", b"\0" * 64)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo(payloads[0])
        info.size = PAYLOAD_BYTES
        tar.addfile(info, io.BytesIO(bytes(PAYLOAD_BYTES)))
    return path


def test_an_unsigned_upload_is_refused_without_reading_its_payload(tmp_path: Path) -> None:
    kit = UpdateKit(tmp_path)
    bundle = unsigned_bundle(kit, tmp_path / "unsigned.bundle")
    with run_server(tmp_path, kit.config()) as server:
        before = peak_rss_bytes(server.process.pid)
        reply = upload(server.url, bundle)
        grown = peak_rss_bytes(server.process.pid) - before
    assert reply.status_code == 400, reply.text
    assert "signature" in reply.json()["error"]
    print(f"\npeak RSS grew {grown / 2**20:.1f} MiB for a {PAYLOAD_BYTES / 2**20:.0f} MiB payload")
    assert grown < ALLOWED_GROWTH_BYTES
