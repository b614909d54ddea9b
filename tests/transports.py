"""One small client per inference transport, all behind `infer(...) -> Outcome`, so the
same behaviour test can run over REST JSON, REST binary, gRPC unary, the gRPC stream
and the WebSocket (issue 17). This module holds no tests.

Each adapter takes a V2 JSON request document (the body of `POST .../infer`) and
turns it into what its transport sends; the answer comes back as an `Outcome` with an
HTTP-style status: gRPC codes are mapped back to the statuses they stand for, WebSocket
error documents carry theirs (`"status"`), and a gRPC stream reply's `error_message`
is classified by its words (the stream has no status field; see `stream_status`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import grpc
import httpx
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.serving import MODELS

ROW = np.load(MODELS / "digits" / "heldout.npz")["X"][0].astype(np.float32)
TIMEOUT_S = 30.0

# gRPC codes back to the HTTP statuses they stand for (edgeserve/grpc/service.py).
GRPC_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# V2 datatypes this suite sends or reads, as little-endian numpy types.
NUMPY_TYPES = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
}

# The words of a stream reply's `error_message`, most specific first, and the status
# they stand for. The contract (briefs/contract.md) names the words for the kill switch
# ("switched off"); the rest follow the messages REST sends for the same refusals.
STREAM_WORDS = (
    ("switched off", 503),
    ("not ready", 503),
    ("unavailable", 503),
    ("deadline", 504),
    ("timed out", 504),
    ("timeout", 504),
    ("unknown model", 404),
    ("unknown version", 404),
    ("not found", 404),
    ("queue is full", 429),
    ("internal error", 500),
)


def stream_status(message: str) -> int:
    """The HTTP-style status a gRPC stream reply's error message stands for (400 if none)."""
    lowered = message.lower()
    return next((status for words, status in STREAM_WORDS if words in lowered), 400)


@dataclass
class Outcome:
    """One inference as the client saw it, whatever the transport."""

    status: int
    doc: dict[str, Any]  # the V2 response document (outputs as lists), or {"error": ...}
    headers: dict[str, str] = field(default_factory=dict)
    refused_handshake: bool = False  # WebSocket only: refused before accept

    @property
    def model_version(self) -> str | None:
        return self.doc.get("model_version")

    def __repr__(self) -> str:  # failures show what matters, not a megabyte of id
        return (
            f"Outcome(status={self.status}, error={self.error[:200]!r}, "
            f"model_version={self.model_version!r}, refused_handshake={self.refused_handshake})"
        )

    @property
    def error(self) -> str:
        return str(self.doc.get("error", ""))


def digits_request(rows: int = 1, **fields: Any) -> dict[str, Any]:
    """A V2 request for digits: `rows` copies of one held-out image."""
    data = np.repeat(ROW[None, :], rows, axis=0)
    tensor = {"name": "input", "datatype": "FP32", "shape": [rows, 64], "data": data.tolist()}
    return {"inputs": [tensor], **fields}


class Transport(Protocol):
    """What every adapter offers: one request in, one outcome out."""

    name: str

    def infer(
        self,
        model: str,
        version: str | None,
        doc: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
    ) -> Outcome: ...


def _infer_path(model: str, version: str | None) -> str:
    path = f"/v2/models/{quote(model, safe='')}"
    if version is not None:
        path += f"/versions/{quote(version, safe='')}"
    return path + "/infer"


def _json_or_error(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError:
        return {"error": body[:200].decode(errors="replace")}
    return doc if isinstance(doc, dict) else {"error": repr(doc)[:200]}


class RestJson:
    """`POST /v2/models/{m}[/versions/{v}]/infer` with a JSON body."""

    name = "rest-json"

    def __init__(self, url: str, client: httpx.Client) -> None:
        self._url = url
        self._client = client

    @staticmethod
    def encode(
        model: str, version: str | None, doc: Mapping[str, Any]
    ) -> tuple[str, dict[str, str], bytes]:
        """(path, headers, body) of the request."""
        body = json.dumps(doc).encode()
        return _infer_path(model, version), {"content-type": "application/json"}, body

    def infer(
        self,
        model: str,
        version: str | None,
        doc: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
    ) -> Outcome:
        path, sent_headers, body = self.encode(model, version, doc)
        reply = self._client.post(
            self._url + path, content=body, headers={**sent_headers, **(headers or {})}
        )
        return Outcome(reply.status_code, _json_or_error(reply.content), dict(reply.headers))


class RestBinary:
    """The same URL with the binary tensor extension, as tritonclient.http sends it:
    a JSON header of `Inference-Header-Content-Length` bytes, then raw tensors; the
    outputs are asked for as binary too."""

    name = "rest-binary"

    def __init__(self, url: str, client: httpx.Client) -> None:
        self._url = url
        self._client = client

    @staticmethod
    def encode(
        model: str, version: str | None, doc: Mapping[str, Any]
    ) -> tuple[str, dict[str, str], bytes]:
        """(path, headers, body) of the request."""
        header = {k: v for k, v in doc.items() if k not in ("inputs", "outputs")}
        header["parameters"] = {**doc.get("parameters", {}), "binary_data_output": True}
        header["inputs"], blobs = [], []
        for tensor in doc["inputs"]:
            blob = np.asarray(tensor["data"], NUMPY_TYPES[tensor["datatype"]]).tobytes()
            meta = {k: v for k, v in tensor.items() if k != "data"}
            header["inputs"].append({**meta, "parameters": {"binary_data_size": len(blob)}})
            blobs.append(blob)
        if "outputs" in doc:
            header["outputs"] = [{**o, "parameters": {"binary_data": True}} for o in doc["outputs"]]
        head = json.dumps(header).encode()
        headers = {
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(len(head)),
        }
        return _infer_path(model, version), headers, head + b"".join(blobs)

    def infer(
        self,
        model: str,
        version: str | None,
        doc: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
    ) -> Outcome:
        path, sent_headers, body = self.encode(model, version, doc)
        reply = self._client.post(
            self._url + path, content=body, headers={**sent_headers, **(headers or {})}
        )
        return Outcome(reply.status_code, _binary_response(reply), dict(reply.headers))


def _binary_response(reply: httpx.Response) -> dict[str, Any]:
    length = reply.headers.get("inference-header-content-length")
    if length is None:
        return _json_or_error(reply.content)
    doc = json.loads(reply.content[: int(length)])
    pos = int(length)
    for output in doc.get("outputs", []):
        size = output.get("parameters", {}).get("binary_data_size")
        if size is not None:
            blob = reply.content[pos : pos + size]
            output["data"] = np.frombuffer(blob, NUMPY_TYPES[output["datatype"]]).tolist()
            pos += size
    return doc


def grpc_request(model: str, version: str | None, doc: Mapping[str, Any]) -> Any:
    """A ModelInferRequest with the same content as the V2 JSON document `doc`."""
    request = pb.ModelInferRequest(
        model_name=model, model_version=version or "", id=str(doc.get("id", ""))
    )
    for tensor in doc["inputs"]:
        request.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        array = np.asarray(tensor["data"], NUMPY_TYPES[tensor["datatype"]])
        request.raw_input_contents.append(array.tobytes())
    for output in doc.get("outputs", []):
        request.outputs.add(name=output["name"])
    for key, value in doc.get("parameters", {}).items():
        param = request.parameters[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = str(value)
    return request


def _grpc_doc(response: Any) -> dict[str, Any]:
    outputs = []
    for i, tensor in enumerate(response.outputs):
        array = np.frombuffer(response.raw_output_contents[i], NUMPY_TYPES[tensor.datatype])
        outputs.append(
            {
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": list(tensor.shape),
                "data": array.tolist(),
            }
        )
    return {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "id": response.id,
        "outputs": outputs,
    }


def _metadata(headers: Mapping[str, str] | None) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in (headers or {}).items()]


def _rpc_error(error: grpc.RpcError) -> Outcome:
    status = GRPC_STATUS.get(error.code(), 500)  # type: ignore[attr-defined]
    return Outcome(status, {"error": error.details() or ""})  # type: ignore[attr-defined]


class GrpcUnary:
    """`ModelInfer` over the generated stubs; the call itself has no deadline."""

    name = "grpc"

    def __init__(self, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
        self._stub = stub

    def infer(
        self,
        model: str,
        version: str | None,
        doc: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
    ) -> Outcome:
        try:
            reply = self._stub.ModelInfer(
                grpc_request(model, version, doc), metadata=_metadata(headers), timeout=TIMEOUT_S
            )
        except grpc.RpcError as error:
            return _rpc_error(error)
        return Outcome(200, _grpc_doc(reply))


class GrpcStream:
    """`ModelStreamInfer`: one stream per request (sent, then the client's side closed)."""

    name = "grpc-stream"

    def __init__(self, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
        self._stub = stub

    def infer(
        self,
        model: str,
        version: str | None,
        doc: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
    ) -> Outcome:
        request = grpc_request(model, version, doc)
        try:
            replies = self._stub.ModelStreamInfer(
                iter([request]), metadata=_metadata(headers), timeout=TIMEOUT_S
            )
            reply = next(replies)
        except grpc.RpcError as error:
            return _rpc_error(error)
        except StopIteration:
            return Outcome(0, {"error": "the stream ended without a reply"})
        if reply.error_message:
            error_doc = {"error": reply.error_message, "id": reply.infer_response.id}
            return Outcome(stream_status(reply.error_message), error_doc)
        return Outcome(200, _grpc_doc(reply.infer_response))


class WebSocketStream:
    """`/api/stream/{model}?version=N`: one connection per request here. A refused
    handshake gives its HTTP status; an error document its `"status"` (0 when missing)."""

    name = "websocket"

    def __init__(self, url: str) -> None:
        self._url = url

    def url(self, model: str, version: str | None) -> str:
        query = "?" + urlencode({"version": version}) if version is not None else ""
        base = self._url.replace("http://", "ws://")
        return f"{base}/api/stream/{quote(model, safe='')}{query}"

    def infer(
        self,
        model: str,
        version: str | None,
        doc: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
    ) -> Outcome:
        try:
            with connect(
                self.url(model, version),
                additional_headers=dict(headers or {}),
                max_size=2**23,
                open_timeout=TIMEOUT_S,
            ) as ws:
                ws.send(json.dumps(doc))
                reply = json.loads(ws.recv(timeout=TIMEOUT_S))
        except InvalidStatus as refused:
            status = refused.response.status_code
            return Outcome(status, {"error": "handshake refused"}, refused_handshake=True)
        except ConnectionClosed as closed:
            return Outcome(0, {"error": f"closed: {closed}"})
        if "error" in reply:
            return Outcome(int(reply.get("status", 0)), reply)
        return Outcome(200, reply)


TRANSPORTS = ("rest-json", "rest-binary", "grpc", "grpc-stream", "websocket")


def retrying(send: Callable[[], Outcome]) -> Outcome:
    """What a client does with a 429: try again (for up to TIMEOUT_S). The server sheds
    load when its loop runs late, which a shared, loaded test machine can cause; no
    behaviour under test here expects a 429."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        outcome = send()
        if outcome.status != 429 or time.monotonic() > deadline:
            return outcome
        time.sleep(0.05)  # a client's backoff, not a wait for the server's state


def post(client: httpx.Client, url: str, **kwargs: Any) -> httpx.Response:
    """`client.post`, tried again on a 429 as `retrying` does."""
    reply: list[httpx.Response] = []

    def send() -> Outcome:
        reply[:] = [client.post(url, **kwargs)]
        return Outcome(reply[0].status_code, {})

    retrying(send)
    return reply[0]


@dataclass
class Retrying:
    """An adapter whose requests are tried again on 429."""

    adapter: Transport

    @property
    def name(self) -> str:
        return self.adapter.name

    def infer(
        self,
        model: str,
        version: str | None,
        doc: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
    ) -> Outcome:
        return retrying(lambda: self.adapter.infer(model, version, doc, headers))


@contextmanager
def clients(url: str, grpc_target: str) -> Iterator[dict[str, Transport]]:
    """All five adapters for the server at `url` (HTTP) and `grpc_target`, sharing one
    HTTP client and one gRPC channel; each tries a 429 again."""
    options = [("grpc.max_receive_message_length", 64 * 2**20)]
    with (
        httpx.Client(timeout=TIMEOUT_S) as http,
        grpc.insecure_channel(grpc_target, options=options) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        adapters: list[Transport] = [
            RestJson(url, http),
            RestBinary(url, http),
            GrpcUnary(stub),
            GrpcStream(stub),
            WebSocketStream(url),
        ]
        yield {a.name: Retrying(a) for a in adapters}
