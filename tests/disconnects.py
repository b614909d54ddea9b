"""Clients that walk away mid-request, one per transport (issue 17: a disconnect is not an
error). Each sends requests whose ids start with `prefix`, leaves, and returns how many
requests the server may have seen. This module holds no tests.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator

import grpc
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from tests.transport_server import TransportServer
from tests.transports import RestBinary, RestJson, digits_request, grpc_request

ROWS = 64  # digits' max_batch_size: the biggest request, the longest time in flight
IN_FLIGHT = 32  # requests of a gRPC or WebSocket client when it leaves


def half_a_body(server: TransportServer, prefix: str, binary: bool) -> int:
    """REST: the headers and half the body on a raw socket, then close it."""
    encode = RestBinary.encode if binary else RestJson.encode
    path, headers, body = encode("digits", None, digits_request(ROWS))
    headers = {**headers, "x-request-id": f"{prefix}0", "content-length": str(len(body))}
    head = f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()
    )
    with socket.create_connection(("127.0.0.1", server.http.port), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n" + body[: len(body) // 2])
    return 1


def _requests(prefix: str) -> list:
    return [
        grpc_request("digits", None, digits_request(ROWS, id=f"{prefix}{i}"))
        for i in range(IN_FLIGHT)
    ]


def cancelled_calls(server: TransportServer, prefix: str) -> int:
    """gRPC unary: many calls at once, all cancelled when the first one is answered."""
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        calls = [stub.ModelInfer.future(r, timeout=30) for r in _requests(prefix)]
        done = threading.Event()
        for call in calls:
            call.add_done_callback(lambda _: done.set())
        done.wait(30)
        for call in calls:
            call.cancel()
    return IN_FLIGHT


def cancelled_stream(server: TransportServer, prefix: str) -> int:
    """gRPC stream: many requests, the stream cancelled at its first reply."""
    held = threading.Event()

    def requests() -> Iterator:
        yield from _requests(prefix)
        held.wait(30)  # keep our side open: the cancel, not the end of input, ends it

    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        replies = stub.ModelStreamInfer(requests(), timeout=30)
        next(replies)
        replies.cancel()
        held.set()
    return IN_FLIGHT


def dropped_socket(server: TransportServer, prefix: str) -> int:
    """WebSocket: many messages, then the TCP socket closed without a close frame."""
    sock = socket.create_connection(("127.0.0.1", server.http.port), timeout=10)
    ws = WSConnection(ConnectionType.CLIENT)
    sock.sendall(ws.send(Request(host="127.0.0.1", target="/api/stream/digits")))
    accepted = False
    while not accepted:
        ws.receive_data(sock.recv(65536))
        accepted = any(isinstance(e, AcceptConnection) for e in ws.events())
    frames = [
        ws.send(TextMessage(data=json.dumps(digits_request(ROWS, id=f"{prefix}{i}"))))
        for i in range(IN_FLIGHT)
    ]
    sock.sendall(b"".join(frames))
    sock.close()
    return IN_FLIGHT


DISCONNECTS: dict[str, Callable[[TransportServer, str], int]] = {
    "rest-json": lambda server, prefix: half_a_body(server, prefix, binary=False),
    "rest-binary": lambda server, prefix: half_a_body(server, prefix, binary=True),
    "grpc": cancelled_calls,
    "grpc-stream": cancelled_stream,
    "websocket": dropped_socket,
}
