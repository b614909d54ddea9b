"""OpenVINO's own INT8: NNCF post-training quantization of an FP32 ONNX model into IR.

OpenVINO runs an ONNX-Runtime-quantized (QDQ) graph but picks its INT8 kernels by its
own rules; NNCF quantizes the OpenVINO model itself (FakeQuantize layers placed where
the CPU plugin fuses them into u8/i8 kernels). The result is written as `model.xml` +
`model.bin`, which the OpenVINO backend prefers over `model.onnx` in the same folder,
while ONNX Runtime keeps reading `model.onnx`.

Byte for byte reproducible with a given nncf/OpenVINO pair (both named in the XML's
rt_info): calibration is a fixed list of rows, statistics are collected in f32 (NNCF
forces the precision hint), and MinMax + fast bias correction draw no random numbers.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

# NNCF and OpenVINO's converter report usage through openvino_telemetry when it imports;
# blocked, both fall back to their no-op stubs (as edgeserve/runtime/openvino.py does).
sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]

# Quantization settings chosen by measurement on digits (models/README.md): PERFORMANCE
# (symmetric) and MIXED (asymmetric activations) give the same kernels and the same
# outputs here, since every quantized activation is non-negative; fast bias correction
# halves the largest probability error against FP32 (0.034 -> 0.026).
PRESET = "performance"
FAST_BIAS_CORRECTION = True


def quantize_ir(
    onnx_fp32: bytes, calibration: dict[str, np.ndarray], model_type: str | None = None
) -> dict[str, bytes]:
    """INT8 IR files (`model.xml`, `model.bin`) for an FP32 ONNX model.

    `calibration` maps input names to arrays whose first axis is rows; each row is one
    calibration item, so `subset_size` counts rows and every row is used.
    """
    import nncf
    import openvino as ov

    nncf.set_log_level(logging.ERROR)
    core = ov.Core()
    model = core.read_model(onnx_fp32, ov.Tensor(np.empty(0, np.uint8)))
    rows = len(next(iter(calibration.values())))
    items = [{name: array[i : i + 1] for name, array in calibration.items()} for i in range(rows)]
    # NNCF draws progress bars on stdout, which build.py keeps for the accuracy table.
    with contextlib.redirect_stdout(io.StringIO()):
        quantized = nncf.quantize(
            model,
            nncf.Dataset(items),
            preset=nncf.QuantizationPreset(PRESET),
            model_type=nncf.ModelType(model_type) if model_type else None,
            subset_size=rows,
            fast_bias_correction=FAST_BIAS_CORRECTION,
        )
    return save_ir(quantized)


def save_ir(model: object) -> dict[str, bytes]:
    """The model as IR bytes; weights stay as they are (no FP16 compression)."""
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "model.xml"
        ov.save_model(model, xml, compress_to_fp16=False)
        return {"model.xml": xml.read_bytes(), "model.bin": xml.with_suffix(".bin").read_bytes()}
