"""Triton's classification extension: an output's top-k classes instead of its tensor.

A requested output with `"parameters": {"classification": k}` comes back as BYTES
strings `"score:index"`, or `"score:index:label"` when model.toml's `labels` name the
output's classes: per row for a model with a batch dimension (shape [batch, k]), over
the whole tensor otherwise (shape [k]). Scores print as Triton's `std::to_string` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edgeserve.protocol.types import RequestedOutput


def classified(
    outputs: Mapping[str, np.ndarray],
    requested: Sequence[RequestedOutput] | None,
    labels: Sequence[str],
    batched: bool,
) -> dict[str, np.ndarray] | None:
    """The outputs with every output that asked for classification replaced by its top-k
    strings; None when no output asked (the common case costs one loop)."""
    counts = {o.name: o.classification for o in requested or () if o.classification}
    if not counts:
        return None
    return {
        name: top_classes(array, counts[name], labels, batched) if name in counts else array
        for name, array in outputs.items()
    }


def top_classes(array: np.ndarray, k: int, labels: Sequence[str], batched: bool) -> np.ndarray:
    """The `k` highest-scoring classes of each row (ties: the lower index first)."""
    rows = array.reshape(array.shape[0], -1) if batched and array.ndim else array.reshape(1, -1)
    classes = rows.shape[1]
    k = min(k, classes)
    named = len(labels) == classes  # labels describe this output's classes
    text = _float_text if rows.dtype.kind == "f" else _int_text
    out = np.empty((rows.shape[0], k), dtype=object)
    for r, row in enumerate(rows):
        order = np.argsort(-row.astype(np.float64), kind="stable")[:k]
        for j, index in enumerate(order.tolist()):
            item = f"{text(row[index])}:{index}"
            out[r, j] = (f"{item}:{labels[index]}" if named else item).encode()
    return out if batched and array.ndim else out.reshape(k)


def _float_text(value: np.generic) -> str:
    return f"{float(value):f}"


def _int_text(value: np.generic) -> str:
    return str(int(value))
