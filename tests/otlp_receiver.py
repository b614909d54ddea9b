"""A small real OTLP/HTTP logs receiver for tests, run as its own process.

    python tests/otlp_receiver.py PORT STATEFILE

It parses every payload with the official protobuf definitions (opentelemetry-proto)
and appends each log record's `edgeserve.record_id` to STATEFILE (one per line). Its
behaviour is switched with POST /control {"mode": ...}: "up" (200), "error" (500),
"throttle" (429 + Retry-After: 1), "slow" (answers 200 after 3 s), "redirect" (307 to
the URL in {"location": ...}).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

STATE = {"mode": "up", "location": "", "requests": 0}
LOCK = threading.Lock()


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
        self._reply(200, json.dumps(STATE).encode())

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/control":
            STATE.update(json.loads(body))
            self._reply(200)
            return
        with LOCK:
            STATE["requests"] += 1
        mode = STATE["mode"]
        if mode == "error":
            self._reply(500)
            return
        if mode == "throttle":
            self._reply(429, headers={"Retry-After": "1"})
            return
        if mode == "redirect":
            self._reply(307, headers={"Location": STATE["location"]})
            return
        request = ExportLogsServiceRequest()
        if self.headers.get("Content-Type", "").startswith("application/x-protobuf"):
            request.ParseFromString(body)
        else:
            json_format.Parse(body, request)
        ids = []
        for resource in request.resource_logs:
            for scope in resource.scope_logs:
                for record in scope.log_records:
                    attrs = {a.key: a.value.string_value for a in record.attributes}
                    ids.append(attrs["edgeserve.record_id"])
        if mode == "slow":
            time.sleep(3)
        with LOCK, Path(sys.argv[2]).open("a") as out:
            out.writelines(f"{i}\n" for i in ids)
        self._reply(200, b'{"partialSuccess": {}}', {"Content-Type": "application/json"})


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.serve_forever()
