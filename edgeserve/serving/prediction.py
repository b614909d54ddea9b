"""What a classifier predicted, for the telemetry record and experiment reports."""

from __future__ import annotations

import numpy as np


def prediction_of(outputs: dict[str, np.ndarray]) -> tuple[str | None, float | None]:
    """(predicted class of a one-row request, mean top score) from a classifier's outputs.

    The class is an integer output with one element, else the argmax of the first
    [rows, classes] float output; the score is that output's mean row maximum. A one-row
    answer, the common case, costs one argmax.
    """
    label: str | None = None
    score: float | None = None
    for array in outputs.values():
        if array.dtype.kind in "iu" and array.size == 1 and label is None:
            label = str(array.reshape(-1)[0])
        elif array.ndim == 2 and array.dtype.kind == "f" and array.size and score is None:
            if array.shape[0] == 1:
                top = int(array[0].argmax())
                score = float(array[0, top])
                label = label if label is not None else str(top)
            else:
                score = float(array.max(axis=1).mean())
    return label, score
