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

# The defaults are digits' settings, chosen by measurement (models/README.md):
# PERFORMANCE (symmetric) and MIXED (asymmetric activations) give the same kernels and
# outputs there, since every quantized activation is non-negative. Fast bias correction
# (NNCF's default) halves digits' largest probability error against FP32 (0.034 ->
# 0.026); the full BiasCorrection dropped MiniLM's cosine agreement to 0.86.
PRESET = "performance"


def quantize_ir(
    onnx_fp32: bytes,
    calibration: dict[str, np.ndarray],
    *,
    preset: str = PRESET,
    model_type: str | None = None,
    smooth_quant_alpha: float | None = None,
) -> dict[str, bytes]:
    """INT8 IR files (`model.xml`, `model.bin`): weights and activations, calibrated.

    `calibration` maps input names to arrays whose first axis is rows; each row is one
    calibration item, so `subset_size` counts rows and every row is used.
    `smooth_quant_alpha` overrides NNCF's SmoothQuant strength for MatMuls (transformers).
    """
    import nncf

    nncf.set_log_level(logging.ERROR)
    rows = len(next(iter(calibration.values())))
    items = [{name: array[i : i + 1] for name, array in calibration.items()} for i in range(rows)]
    advanced = None
    if smooth_quant_alpha is not None:
        advanced = nncf.AdvancedQuantizationParameters(
            smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=smooth_quant_alpha)
        )
    # NNCF draws progress bars on stdout, which build.py keeps for the accuracy table.
    with contextlib.redirect_stdout(io.StringIO()):
        quantized = nncf.quantize(
            read_onnx(onnx_fp32),
            nncf.Dataset(items),
            preset=nncf.QuantizationPreset(preset),
            model_type=nncf.ModelType(model_type) if model_type else None,
            subset_size=rows,
            fast_bias_correction=True,
            advanced_parameters=advanced,
        )
    return save_ir(quantized)


def compress_weights_ir(onnx_fp32: bytes) -> dict[str, bytes]:
    """Weight-only INT8 IR (asymmetric, per channel): activations stay FP32, no data needed.

    Where the CPU has no fast INT8 dot products (no VNNI), this is the INT8 that pays.
    """
    import nncf

    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        compressed = nncf.compress_weights(
            read_onnx(onnx_fp32), mode=nncf.CompressWeightsMode.INT8_ASYM
        )
    return save_ir(compressed)


def read_onnx(blob: bytes) -> object:
    import openvino as ov

    return ov.Core().read_model(blob, ov.Tensor(np.empty(0, np.uint8)))


def save_ir(model: object) -> dict[str, bytes]:
    """The model as IR bytes; weights stay as they are (no FP16 compression)."""
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "model.xml"
        ov.save_model(model, xml, compress_to_fp16=False)
        return {"model.xml": xml.read_bytes(), "model.bin": xml.with_suffix(".bin").read_bytes()}
