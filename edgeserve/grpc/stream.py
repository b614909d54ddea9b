"""`ModelStreamInfer`, Triton's bidirectional gRPC stream: requests are answered as they
complete, several at once (so a stream feeds the dynamic batcher like concurrent
calls do), at most `MAX_IN_FLIGHT` per stream so a fast sender cannot queue without
bound. A request holds its slot until the writer has taken its reply, so a client that
sends and never reads stops being read (HTTP/2 flow control then blocks its sends)
instead of piling replies up in memory, as the WebSocket path does. A failed request
answers with `error_message` and the stream goes on, as Triton does; only a refused caller ends it.
Each answer that left a telemetry record carries its id (`<boot>-<seq>`, HTTP's
`x-telemetry-seq`) as the response parameter of that name: a stream has one set of
trailing metadata, so the id travels with its message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from tritonclient.grpc import service_pb2 as pb

from edgeserve.errors import EdgeserveError
from edgeserve.telemetry.records import RECORD_ID_NAME, record_id_of

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 64  # requests of one stream being computed at once


def failed_response(request_id: str, seq_id: str) -> pb.ModelInferResponse:
    """A failed stream request's response: its id, and its record's id when it left one."""
    response = pb.ModelInferResponse(id=request_id)
    if seq_id:
        response.parameters[RECORD_ID_NAME].string_param = seq_id
    return response


InferOne = Callable[[Any, Any], Awaitable[pb.ModelInferResponse]]


async def stream_replies(
    infer_one: InferOne, requests: AsyncIterator[Any], context: Any
) -> AsyncIterator[pb.ModelStreamInferResponse]:
    """One ModelStreamInferResponse per request read from `requests`, in completion order
    (each carries its request's id)."""
    # Each queued reply still holds its slot, so the queue never holds more than
    # MAX_IN_FLIGHT replies plus the end marker: `put_nowait` cannot fail.
    replies: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue(MAX_IN_FLIGHT + 1)
    slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def answer(request: Any) -> None:
        try:
            reply = pb.ModelStreamInferResponse(infer_response=await infer_one(request, context))
        except EdgeserveError as exc:
            reply = pb.ModelStreamInferResponse(
                error_message=exc.message,
                infer_response=failed_response(request.id, record_id_of(exc)),
            )
        except Exception as exc:
            log.exception("grpc stream request failed id=%s", request.id[:128])
            reply = pb.ModelStreamInferResponse(
                error_message="internal error",
                infer_response=failed_response(request.id, record_id_of(exc)),
            )
        replies.put_nowait(reply)  # the slot is released when the writer takes it

    async def read() -> None:
        running: set[asyncio.Task] = set()
        try:
            async for request in requests:
                await slots.acquire()
                task = asyncio.ensure_future(answer(request))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.gather(*running)
        except asyncio.CancelledError:  # the stream ended early: drop what it still waits for
            for task in running:
                task.cancel()
            raise
        finally:
            replies.put_nowait(None)  # the client closed its side, or the stream broke

    reader = asyncio.ensure_future(read())
    try:
        while (reply := await replies.get()) is not None:
            slots.release()
            yield reply
    finally:
        reader.cancel()
