"""Triton's classification extension as a pure function: top-k strings per row."""

from __future__ import annotations

import numpy as np

from edgeserve.protocol.types import RequestedOutput
from edgeserve.serving.classification import classified, top_classes


def test_batched_rows_give_k_strings_each_with_labels() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], np.float32)
    out = top_classes(scores, 2, ["cat", "dog", "owl"], batched=True)
    assert out.shape == (2, 2)
    assert out.tolist() == [
        [b"0.700000:1:dog", b"0.200000:2:owl"],
        [b"0.500000:0:cat", b"0.250000:1:dog"],  # a tie: the lower index first
    ]


def test_unbatched_output_is_ranked_whole_and_labels_only_when_they_fit() -> None:
    out = top_classes(np.array([3, 9, 1], np.int64), 5, ["a", "b"], batched=False)
    assert out.tolist() == [b"9:1", b"3:0", b"1:2"]  # k clipped; 2 labels do not name 3


def test_only_outputs_that_ask_are_classified() -> None:
    outputs = {"scores": np.array([[0.2, 0.8]], np.float32), "label": np.array([1])}
    asked = [RequestedOutput("scores", classification=1), RequestedOutput("label")]
    result = classified(outputs, asked, [], batched=True)
    assert result is not None
    assert result["scores"].tolist() == [[b"0.800000:1"]]
    assert result["label"] is outputs["label"]
    assert classified(outputs, [RequestedOutput("scores")], [], batched=True) is None
    assert classified(outputs, None, [], batched=True) is None
