"""A small real OTLP/HTTP receiver for tests, run as its own process.

    python tests/otlp_receiver.py PORT STATEFILE

PORT 0 takes a free port from the kernel; the port bound is the first line on stdout.

It parses every payload with the official protobuf definitions (opentelemetry-proto),
JSON or protobuf by Content-Type, gzip by Content-Encoding, and appends each log
record's `edgeserve.record_id` to STATEFILE (one per line) when it accepts a batch.

POST /control {"mode": ...} switches how /v1/logs answers: "up" (200), "error" (500),
"throttle" (429 + Retry-After: `retry_after`, default "1"), "slow" (200 after `slow_s`,
default 3 s), "redirect" (307 to {"location": ...}), "reject" (400 to every batch). A
batch holding a record whose request id is {"refuse_request_id": ...} is answered 400
whatever the mode. POST /v1/metrics keeps
the totals of the latest ExportMetricsServiceRequest; POST /hook keeps alert webhook
bodies. GET / returns the state: requests per mode, the last Authorization,
Content-Type and Content-Encoding, resource attributes, records accepted, and the
uploads still being answered (`in_flight`).

Tests start it with `receiver(ids_file)`, which waits until it answers and yields its
URL; `port=` is only for a test that must point the box at it before it starts.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

STATE: dict = {
    "mode": "up",
    "location": "",
    "slow_s": 3.0,
    "requests": 0,
    "by_mode": {},
    "accepted_records": 0,
    "in_flight": 0,
    "refuse_request_id": None,
    "retry_after": "1",
    "posts": [],  # (records, bytes) of each accepted upload
    "uid_records": 0,  # records whose log.record.uid equals edgeserve.record_id
    "metrics_uploads": 0,
    "metrics": {},
    "authorization": None,
    "content_type": None,
    "content_encoding": None,
    "resource": {},
}
LOCK = threading.Lock()


def _scalar(value: object) -> object:
    kind = value.WhichOneof("value")  # type: ignore[attr-defined]
    return getattr(value, kind) if kind else None


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, status: int, body: bytes = b"{}", headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        with LOCK:
            self._reply(200, json.dumps(STATE).encode())

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        if len(body) < length:  # the client hung up mid-upload: a truncated protobuf
            return  # could still parse, so it must not count
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path == "/control":
            with LOCK:
                STATE.update(json.loads(body))
            self._reply(200)
            return
        if self.path == "/hook":  # an alert webhook: keep what was posted
            with LOCK:
                STATE.setdefault("hooks", []).append(json.loads(body))
            self._reply(200)
            return
        if self.path == "/v1/metrics":
            self._metrics(body)
            return
        with LOCK:
            mode = STATE["mode"]
            STATE["requests"] += 1
            STATE["by_mode"][mode] = STATE["by_mode"].get(mode, 0) + 1
            STATE["authorization"] = self.headers.get("Authorization")
            STATE["content_type"] = self.headers.get("Content-Type")
            STATE["content_encoding"] = self.headers.get("Content-Encoding")
        if mode == "error":
            self._reply(500)
            return
        if mode == "throttle":
            self._reply(429, headers={"Retry-After": STATE["retry_after"]})
            return
        if mode == "reject":
            self._reply(400, b'{"message": "rejected"}')
            return
        if mode == "redirect":
            self._reply(307, headers={"Location": STATE["location"]})
            return
        with LOCK:
            STATE["in_flight"] += 1
        try:
            self._accept(body, mode)
        finally:
            with LOCK:
                STATE["in_flight"] -= 1

    def _metrics(self, body: bytes) -> None:
        """Keep, per metric name, the total of its latest upload (sum points or counts)."""
        request = ExportMetricsServiceRequest()
        if self.headers.get("Content-Type", "").startswith("application/x-protobuf"):
            request.ParseFromString(body)
        else:
            json_format.Parse(body, request)
        totals: dict[str, float] = {}
        for resource in request.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.HasField("sum"):
                        points = [p.as_int or p.as_double for p in metric.sum.data_points]
                    else:
                        points = [p.count for p in metric.histogram.data_points]
                    totals[metric.name] = sum(points)
        with LOCK:
            STATE["metrics_uploads"] += 1
            STATE["metrics"] = totals
        self._reply(200, b"{}", {"Content-Type": "application/json"})

    def _accept(self, body: bytes, mode: str) -> None:
        request = ExportLogsServiceRequest()
        if self.headers.get("Content-Type", "").startswith("application/x-protobuf"):
            request.ParseFromString(body)
        else:
            json_format.Parse(body, request)  # strict: unknown fields are an error
        ids, request_ids, uids = [], set(), 0
        resource_attrs: dict = {}
        for resource in request.resource_logs:
            resource_attrs = {a.key: _scalar(a.value) for a in resource.resource.attributes}
            for scope in resource.scope_logs:
                for record in scope.log_records:
                    attrs = {a.key: _scalar(a.value) for a in record.attributes}
                    ids.append(attrs["edgeserve.record_id"])
                    uids += attrs.get("log.record.uid") == attrs["edgeserve.record_id"]
                    request_ids.add(attrs.get("edgeserve.request_id"))
        if STATE["refuse_request_id"] and STATE["refuse_request_id"] in request_ids:
            self._reply(400, b'{"message": "refused"}')
            return
        if mode == "slow":
            time.sleep(STATE["slow_s"])
        with LOCK, Path(sys.argv[2]).open("a") as out:
            out.writelines(f"{i}\n" for i in ids)
            STATE["accepted_records"] += len(ids)
            STATE["uid_records"] += uids
            STATE["posts"].append((len(ids), len(body)))
            STATE["resource"] = resource_attrs if ids else STATE["resource"]
        self._reply(200, b'{"partialSuccess": {}}', {"Content-Type": "application/json"})


@contextmanager
def receiver(ids_file: Path, port: int = 0) -> Iterator[str]:
    """This receiver in its own process; its base URL once it answers. It binds port 0
    unless told a port, so no other process can take the port first."""
    from tests.waiting import wait_until  # only the tests' side needs it

    command = [sys.executable, __file__, str(port), str(ids_file)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        bound = process.stdout.readline().strip()  # "" when it exited before binding
        if not bound:
            raise RuntimeError(f"the receiver exited with {process.wait()} before binding")
        url = f"http://127.0.0.1:{int(bound)}"

        def answers() -> bool:
            try:
                httpx.get(url + "/", timeout=1)
            except httpx.TransportError:
                return False
            return True

        wait_until(answers, 20, "the receiver to answer")
        yield url
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    print(server.server_address[1], flush=True)  # the port bound: the kernel's for PORT 0
    server.serve_forever()
