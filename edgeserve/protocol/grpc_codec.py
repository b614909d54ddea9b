"""V2 gRPC messages to and from the transport-neutral types (`protocol/types.py`).

Pure, like `codec.py`: `decode_request` reads the envelope and the declared tensor
headers; each tensor's data (`raw_input_contents` or the typed `contents`) becomes numpy
only in `decode_input_data`, after the caller has checked the headers against the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from edgeserve.errors import InvalidInput
from edgeserve.protocol.limits import DecodeLimits, checked_shape
from edgeserve.protocol.output_parameters import class_count
from edgeserve.protocol.types import InferInput, InferRequest, RequestedOutput
from edgeserve.runtime.datatypes import V2_TO_NUMPY, v2_datatype_of

# Typed `contents` fields per V2 datatype (FP16 has none: it travels only as raw bytes).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
MAX_PARAMETERS = 64  # request parameters read from one message


def decode_request(request: pb.ModelInferRequest, limits: DecodeLimits) -> InferRequest:
    """The request's envelope and tensor headers; data stays in the message until `data()`."""
    if not request.inputs:
        raise InvalidInput("'inputs' must be a non-empty list")
    if len(request.inputs) > limits.max_inputs:
        raise InvalidInput(f"{len(request.inputs)} inputs exceed the limit of {limits.max_inputs}")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput("raw_input_contents must hold one entry per input")
    inputs: list[InferInput] = []
    seen: set[str] = set()
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in seen:
            raise InvalidInput("input names must be unique")
        seen.add(name)
        dtype = V2_TO_NUMPY.get(tensor.datatype)
        if dtype is None:
            raise InvalidInput(f"input '{name[:64]}': unknown datatype {tensor.datatype[:32]!r}")
        shape, count = checked_shape(list(tensor.shape), name[:64], limits)
        if raw:
            blob = raw[i]
            if tensor.datatype != "BYTES" and len(blob) != count * dtype.itemsize:
                raise InvalidInput(
                    f"input '{name[:64]}': {len(blob)} raw bytes do not fit its shape"
                )
            inputs.append(InferInput(name, tensor.datatype, shape, count, blob))
        else:
            inputs.append(InferInput(name, tensor.datatype, shape, count, tensor))
    outputs = [
        RequestedOutput(o.name, None, class_count(_parameters(o.parameters), o.name))
        for o in request.outputs
    ] or None
    return InferRequest(
        request.id,
        inputs,
        outputs,
        _parameters(request.parameters),
        decoder=decode_input_data,
        limits=limits,
    )


def _parameters(params: Any) -> dict[str, Any]:
    """`InferParameter`s as plain values (Triton's `timeout` is an int64_param)."""
    if not params:
        return {}
    if len(params) > MAX_PARAMETERS:
        raise InvalidInput(f"more than {MAX_PARAMETERS} request parameters")
    out: dict[str, Any] = {}
    for key, param in params.items():
        choice = param.WhichOneof("parameter_choice")
        if choice is not None:
            out[key] = getattr(param, choice)
    return out


def decode_input_data(tensor: InferInput, limits: DecodeLimits) -> np.ndarray:
    """The tensor's data as an array of its declared shape."""
    dtype = V2_TO_NUMPY[tensor.datatype]
    name = tensor.name[:64]
    if isinstance(tensor.raw, bytes):
        array = _from_raw(tensor.raw, tensor.datatype, dtype, tensor.count, name, limits)
    else:
        array = _from_contents(tensor.raw, dtype, name)
    if array.size != tensor.count:
        raise InvalidInput(
            f"input '{name}': {array.size} elements do not match shape {list(tensor.shape)}"
        )
    return array.reshape(tensor.shape)


def _from_raw(
    blob: bytes, datatype: str, dtype: np.dtype, count: int, name: str, limits: DecodeLimits
) -> np.ndarray:
    if datatype != "BYTES":
        return np.frombuffer(blob, dtype=dtype.newbyteorder("<"))
    out = np.empty(count, dtype=object)
    view, pos = memoryview(blob), 0
    for i in range(count):
        length = int.from_bytes(view[pos : pos + 4], "little") if pos + 4 <= len(view) else -1
        pos += 4
        if length < 0 or length > limits.max_bytes_element or pos + length > len(view):
            raise InvalidInput(f"input '{name}': BYTES raw data is truncated or too long")
        out[i] = bytes(view[pos : pos + length])
        pos += length
    if pos != len(view):
        raise InvalidInput(f"input '{name}': BYTES raw data has trailing bytes")
    return out


def _from_contents(tensor: Any, dtype: np.dtype, name: str) -> np.ndarray:
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise InvalidInput(f"input '{name}': {tensor.datatype} must be sent as raw contents")
    values = getattr(tensor.contents, field)
    if tensor.datatype == "BYTES":
        out = np.empty(len(values), dtype=object)
        out[:] = list(values)
        return out
    array = np.asarray(values)
    if dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidInput(f"input '{name}': a value is out of range for {tensor.datatype}")
    return array.astype(dtype, copy=False)


def encode_response(
    model: str, version: str, request_id: str, outputs: dict[str, np.ndarray]
) -> pb.ModelInferResponse:
    """Outputs as `raw_output_contents` (what tritonclient reads), little-endian."""
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    for name, array in outputs.items():
        datatype = v2_datatype_of(array)
        response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if datatype == "BYTES":
            parts = []
            for value in array.reshape(-1):
                item = value if isinstance(value, bytes) else str(value).encode("utf-8")
                parts += [len(item).to_bytes(4, "little"), item]
            response.raw_output_contents.append(b"".join(parts))
        else:
            little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
            response.raw_output_contents.append(little.tobytes())
    return response
