"""The floor: the least any Python HTTP server costs on top of edgeserve's own batcher.

    python -m bench.floor CONFIG PORT MODEL

Loads the models exactly as `edgeserve serve --config CONFIG` would (the application's
lifespan: same registry, thread plan and batcher), then answers two things on loopback
with uvloop + httptools + orjson and nothing else: `GET /v2/health/ready` and a JSON
`POST /v2/models/MODEL/infer`. No auth, validation, telemetry, middleware, routing or
error handling; one request at a time per connection (no pipelining). It is not a
server to ship: it shows, in the same run, how close to the raw runtime any Python
front end can get on this box, so that edgeserve's gap to raw splits into what Python
costs and what edgeserve's own request path costs (bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httptools
import numpy as np
import orjson
import uvloop

from edgeserve.app import build_app
from edgeserve.config.loader import load_settings
from edgeserve.protocol.codec import encode_response
from edgeserve.protocol.types import InferOutput, InferResponse
from edgeserve.runtime.datatypes import V2_TO_NUMPY
from edgeserve.serving.registry import Registry

READY = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 14\r\n\r\n" + (
    b'{"ready":true}'
)


class FloorProtocol(asyncio.Protocol):
    """One connection: parse with httptools, infer through the registry, write once."""

    def __init__(self, registry: Registry, model: str) -> None:
        self._registry = registry
        self._model = model
        self._parser = httptools.HttpRequestParser(self)
        self._body: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        body, self._body = b"".join(self._body), []
        if self._parser.get_method() == b"GET":
            self._write(READY)
            return
        task = asyncio.get_running_loop().create_task(self._infer(body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _infer(self, body: bytes) -> None:
        doc = orjson.loads(body)
        model = self._registry.get(self._model, None)
        feed = {
            t["name"]: np.asarray(t["data"], dtype=V2_TO_NUMPY[t["datatype"]]).reshape(t["shape"])
            for t in doc["inputs"]
        }
        result = await model.infer(feed, None, deadline=None)
        out, _ = encode_response(
            InferResponse(
                model.name,
                str(model.version),
                None,
                [InferOutput(n, a, False) for n, a in result.outputs.items()],
            )
        )
        self._write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(out)).encode()
            + b"\r\n\r\n"
            + out
        )

    def _write(self, response: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(response)


async def serve(config: Path, port: int, model: str) -> None:
    app = build_app(load_settings(config))
    async with app.router.lifespan_context(app):
        await app.state.loading
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: FloorProtocol(app.state.registry, model), "127.0.0.1", port
        )
        async with server:
            await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
