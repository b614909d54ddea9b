"""V2 request decoding and response encoding: JSON tensors and the binary tensor extension.

`decode_request` reads the envelope and each tensor's declared header only; its
`data()` (`decode_input_data` per input) then turns JSON tensor data straight into
numpy, and reads the binary extension (`Inference-Header-Content-Length`) with
`np.frombuffer`, no copy. Between the two the caller checks the declared shapes.
"""

from __future__ import annotations

import array
from collections.abc import Iterable
from typing import Any

import numpy as np
import orjson

from edgeserve.errors import InvalidInput
from edgeserve.protocol.limits import DecodeLimits, checked_shape
from edgeserve.protocol.output_parameters import class_count, flag
from edgeserve.protocol.types import (
    InferInput,
    InferRequest,
    InferResponse,
    RequestedOutput,
)
from edgeserve.runtime.datatypes import NUMPY_TO_V2, V2_TO_NUMPY, v2_datatype_of

HEADER_LENGTH = "inference-header-content-length"
_NUMBER_KINDS = {"b": "bool", "i": "int", "u": "int", "f": "float"}
# Past this a body's two bracket scans (~0.6 ns a byte) cost more than walking a usual
# request (~3.5 us): 25-40 % of orjson.loads on a flat tensor.
_COUNTED_BYTES = 4096
# numpy reads a list holding one string among numbers as a string array as wide as that
# string for every element: elements x longest string x 4 bytes, which grows with the
# square of the body (2 MB: 512 MB, before the "must be numbers" refusal). A body up to
# this size holds at most 2 x 4096**2 = 32 MB of that, so only a larger one's numeric
# data is first checked for anything but numbers (in C, a few ns an element).
_UNCHECKED_BODY_BYTES = 4096


def decode_request(body: bytes, header_length: int | None, limits: DecodeLimits) -> InferRequest:
    """Parse a V2 infer request body (JSON, optionally followed by binary tensor data):
    the envelope and tensor headers, with each tensor's data left in wire form."""
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise InvalidInput("Inference-Header-Content-Length is larger than the body")
        head, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        head, binary = body, memoryview(b"")
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {_short(exc)}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object")
    # A document nests no deeper than the brackets it opens: a small one is counted (two C
    # scans, cheaper than the walk), and walked only if it opens more. A large one is mostly
    # tensor numbers, which the scans would read byte by byte and the walk skips.
    if len(head) > _COUNTED_BYTES or head.count(b"[") + head.count(b"{") > limits.max_json_depth:
        _check_depth(doc, limits.max_json_depth)
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("'inputs' must be a non-empty list")
    if len(raw_inputs) > limits.max_inputs:
        raise InvalidInput(f"{len(raw_inputs)} inputs exceed the limit of {limits.max_inputs}")
    offset = 0
    inputs = []
    for raw in raw_inputs:
        tensor, used = _decode_input(raw, binary[offset:], limits)
        offset += used
        inputs.append(tensor)
    if offset != len(binary):
        raise InvalidInput("binary data is longer than the inputs' binary_data_size")
    if len(inputs) > 1 and len({t.name for t in inputs}) != len(inputs):
        raise InvalidInput("input names must be unique")
    parameters = _parameters(doc.get("parameters"), "request")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    outputs = doc.get("outputs")
    return InferRequest(
        id=request_id,
        inputs=inputs,
        outputs=None if outputs is None else _decode_outputs(outputs),
        parameters=parameters,
        binary_output=bool(parameters) and bool(flag(parameters, "binary_data_output", "request")),
        decoder=decode_input_data if len(body) <= _UNCHECKED_BODY_BYTES else _decode_checked,
        limits=limits,
    )


def _check_depth(doc: Any, limit: int) -> None:
    """Refuse JSON nested deeper than `limit`; flat lists of scalars (tensor data) are
    skipped after their first element, so this stays cheap on large tensors."""
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise InvalidInput(f"request JSON is nested deeper than {limit} levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, (dict, list)))
        elif node and isinstance(node[0], (dict, list)):
            stack.extend((v, depth + 1) for v in node if isinstance(v, (dict, list)))


def _decode_input(raw: Any, binary: memoryview, limits: DecodeLimits) -> tuple[InferInput, int]:
    """One input's header (its data stays a JSON list or a slice of the binary part)."""
    if not isinstance(raw, dict):
        raise InvalidInput("each input must be a JSON object")
    name = raw.get("name")
    if not isinstance(name, str) or not name or len(name) > 256:
        raise InvalidInput("each input needs a 'name' string")
    datatype = raw.get("datatype")
    if not isinstance(datatype, str) or (dtype := V2_TO_NUMPY.get(datatype)) is None:
        raise InvalidInput(f"input '{name}': unknown datatype {str(datatype)[:32]!r}")
    shape, count = checked_shape(raw.get("shape"), name, limits)
    params = raw.get("parameters")
    size = None
    if params is not None:
        size = _parameters(params, f"input '{name}'").get("binary_data_size")
    if size is not None:
        if type(size) is not int or size < 0 or size > len(binary):
            raise InvalidInput(f"input '{name}': binary_data_size is outside the body")
        if "data" in raw:
            raise InvalidInput(f"input '{name}': has both 'data' and binary_data_size")
        if datatype != "BYTES" and size != count * dtype.itemsize:
            raise InvalidInput(
                f"input '{name}': {size} bytes do not hold shape {list(shape)} of {datatype}"
            )
        return InferInput(name, datatype, shape, count, binary[:size]), size
    data = raw.get("data")
    if not isinstance(data, list):
        raise InvalidInput(f"input '{name}': 'data' must be a list")
    return InferInput(name, datatype, shape, count, data), 0


def _decode_checked(tensor: InferInput, limits: DecodeLimits) -> np.ndarray:
    """decode_input_data for a large body: numbers checked before numpy reads them."""
    return decode_input_data(tensor, limits, check_numbers=True)


def decode_input_data(
    tensor: InferInput, limits: DecodeLimits, *, check_numbers: bool = False
) -> np.ndarray:
    """The input's data as an array of its declared shape (JSON list or binary slice);
    `check_numbers` refuses non-numbers in numeric JSON data before numpy reads it (see
    _UNCHECKED_BODY_BYTES)."""
    dtype = V2_TO_NUMPY[tensor.datatype]
    raw = tensor.raw
    if isinstance(raw, memoryview):
        if tensor.datatype == "BYTES":
            array = _bytes_from_binary(raw, tensor.count, tensor.name, limits)
        else:
            array = np.frombuffer(raw, dtype=dtype.newbyteorder("<"))
        return array.reshape(tensor.shape)
    array = _array_from_json(raw, tensor.datatype, dtype, tensor.name, limits, check_numbers)
    if array.size != tensor.count:
        raise InvalidInput(
            f"input '{tensor.name}': {array.size} elements do not match shape "
            f"{list(tensor.shape)} ({tensor.count} elements)"
        )
    return array.reshape(tensor.shape)


def _array_from_json(
    data: list,
    datatype: str,
    dtype: np.dtype,
    name: str,
    limits: DecodeLimits,
    check_numbers: bool = False,
) -> np.ndarray:
    if datatype == "BYTES":
        flat = _flatten(data, name, limits)
        out = np.empty(len(flat), dtype=object)
        for i, item in enumerate(flat):
            if not isinstance(item, str):
                raise InvalidInput(f"input '{name}': BYTES data must be strings")
            encoded = item.encode("utf-8")
            if len(encoded) > limits.max_bytes_element:
                raise InvalidInput(
                    f"input '{name}': an element exceeds {limits.max_bytes_element} bytes"
                )
            out[i] = encoded
        return out
    nested = bool(data) and isinstance(data[0], list)
    parsed = _regular_array(data, limits, check_numbers) if nested else None
    if parsed is None:
        if nested:
            data = _flatten(data, name, limits)
        if len(data) > limits.max_tensor_elements:
            raise InvalidInput(f"input '{name}': more elements than the limit")
        if check_numbers and not _all_numbers(data):
            if any(isinstance(item, list) for item in data):
                raise InvalidInput(f"input '{name}': data must be a flat or nested list of numbers")
            raise InvalidInput(f"input '{name}': data for {datatype} must be numbers")
        try:
            parsed = np.asarray(data)
        except (ValueError, OverflowError):
            raise InvalidInput(
                f"input '{name}': data must be a flat or nested list of numbers"
            ) from None
    if parsed.dtype == dtype:  # e.g. INT64 token ids: nothing to check or convert
        return parsed
    kind = _NUMBER_KINDS.get(parsed.dtype.kind)
    if kind is None and parsed.size:
        raise InvalidInput(f"input '{name}': data for {datatype} must be numbers")
    if datatype == "BOOL":
        if parsed.size and kind != "bool":
            raise InvalidInput(f"input '{name}': BOOL data must be true or false")
        return parsed.astype(np.bool_, copy=False)
    if dtype.kind in "iu":
        if kind == "float":
            raise InvalidInput(f"input '{name}': {datatype} data must be integers")
        if parsed.size and not np.can_cast(parsed.dtype, dtype):  # e.g. int64 data for INT8
            info = np.iinfo(dtype)
            if parsed.min() < info.min or parsed.max() > info.max:
                raise InvalidInput(f"input '{name}': a value is out of range for {datatype}")
    return parsed.astype(dtype, copy=False)


def _regular_array(data: list, limits: DecodeLimits, check_numbers: bool) -> np.ndarray | None:
    """Nested lists of numbers as one flat array, read by numpy in C (flattening them in
    Python costs ~0.1 us an element); None for anything else (ragged rows, nesting past
    the rank limit, too many elements, objects, non-numbers when `check_numbers`), which
    `_flatten` then reads or refuses."""
    if check_numbers:
        try:
            cells = np.asarray(data, dtype=object)  # references: no string is copied
        except ValueError:
            return None
        if cells.size > limits.max_tensor_elements or not _all_numbers(cells.ravel().tolist()):
            return None
    try:
        parsed = np.asarray(data)
    except (ValueError, OverflowError):
        return None
    if (
        parsed.dtype.kind == "O"
        or parsed.ndim > limits.max_tensor_rank
        or parsed.size > limits.max_tensor_elements
    ):
        return None
    return parsed.reshape(-1)


def _all_numbers(values: Iterable[Any]) -> bool:
    """Whether every value is an int, float or bool that fits a double (array.array reads
    them in C and refuses a str, None, list or dict without copying it)."""
    try:
        array.array("d", values)
    except (TypeError, OverflowError):
        return False
    return True


def _flatten(data: list, name: str, limits: DecodeLimits) -> list:
    """Flatten nested row-major lists without recursion, refusing nesting past the rank limit."""
    flat: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) >= limits.max_tensor_rank:
                    raise InvalidInput(f"input '{name}': data is nested deeper than the rank limit")
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
        if len(flat) > limits.max_tensor_elements:
            raise InvalidInput(f"input '{name}': more elements than the limit")
    return flat


def _bytes_from_binary(
    chunk: memoryview, count: int, name: str, limits: DecodeLimits
) -> np.ndarray:
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(chunk):
            raise InvalidInput(f"input '{name}': BYTES binary data is truncated")
        length = int.from_bytes(chunk[pos : pos + 4], "little")
        pos += 4
        if length > limits.max_bytes_element or pos + length > len(chunk):
            raise InvalidInput(f"input '{name}': a BYTES element is too long or truncated")
        out[i] = bytes(chunk[pos : pos + length])
        pos += length
    if pos != len(chunk):
        raise InvalidInput(f"input '{name}': BYTES binary data has trailing bytes")
    return out


def _decode_outputs(raw: Any) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InvalidInput("'outputs' must be a list")
    outputs = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput("each requested output needs a 'name' string")
        name = item["name"]
        where = f"output '{name[:64]}'"
        params = _parameters(item.get("parameters"), where)
        outputs.append(
            RequestedOutput(
                name,
                flag(params, "binary_data", where),
                class_count(params, name),
            )
        )
    return outputs


def _parameters(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidInput(f"{where}: 'parameters' must be an object")
    return raw


def encode_response(response: InferResponse) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length."""
    outputs = []
    blobs: list[bytes] = []
    for out in response.outputs:
        array = out.data
        datatype = NUMPY_TO_V2.get(array.dtype) or v2_datatype_of(array)  # the call names a miss
        entry: dict[str, Any] = {"name": out.name, "datatype": datatype, "shape": list(array.shape)}
        if out.binary:
            blob = _binary_of(array, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [_text(v) for v in array.reshape(-1)]
        else:
            entry["data"] = np.ascontiguousarray(array).reshape(-1)
        outputs.append(entry)
    doc: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    }
    if response.id is not None:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def _binary_of(array: np.ndarray, datatype: str) -> bytes:
    if datatype != "BYTES":
        return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    parts = []
    for value in array.reshape(-1):
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
        parts.append(len(raw).to_bytes(4, "little"))
        parts.append(raw)
    return b"".join(parts)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:120]
