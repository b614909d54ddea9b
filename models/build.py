"""Rebuild the bundled demo models from data that ships with the code, byte for byte.

    python models/build.py            # rewrite the committed models
    python models/build.py --check    # rebuild into a temp folder and compare: byte for byte
                                      # under the locked versions, else by behaviour
    python models/build.py --minilm   # export all-MiniLM-L6-v2 (not committed, not in CI)

`digits` is trained on scikit-learn's bundled digits; `text` (see text.py) on sentences
written into text.py. Only standard `ai.onnx` operators are used, so OpenVINO compiles
digits too (it rejects scikit-learn's `ai.onnx.ml` operators). Weights are rounded before
export so that last-bit differences between BLAS builds do not change the committed bytes,
and training uses OpenBLAS's AVX2 (Haswell) kernels on every x86-64 CPU that has AVX2: left
to choose, OpenBLAS picks its AVX-512 kernels where it can, and 400 iterations of training
on them drift past the rounding (the committed files are the AVX2 kernels' result).
The INT8 version carries each backend's own INT8 form: `model.onnx` quantized by ONNX
Runtime, `model.xml` + `model.bin` quantized by NNCF for OpenVINO (see openvino_int8.py).
"""

from __future__ import annotations

import argparse
import filecmp
import io
import os
import platform
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


def _pin_blas_kernels() -> None:
    """OpenBLAS's Haswell kernels for the training (see the module doc), before numpy
    loads OpenBLAS; a CPU without AVX2 keeps its own (and may not match the files)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return
    if " avx2" in flags:
        os.environ["OPENBLAS_CORETYPE"] = "Haswell"


_pin_blas_kernels()

import numpy as np  # noqa: E402  (after the kernels are chosen)

HERE = Path(__file__).resolve().parent
SEED = 0
OPSET = 17
IR_VERSION = 8
WEIGHT_DECIMALS = 5


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits, 75/25 stratified split, raw pixel values 0..16."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    X = data.data.astype(np.float32)
    y = data.target.astype(np.int64)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.25, stratify=y, random_state=SEED
    )
    return X_train, X_test, y_train, y_test


def train_digits(X: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """A 64-64-10 MLP on pixels scaled to 0..1; returns rounded float32 weights."""
    from sklearn.neural_network import MLPClassifier

    mlp = MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=SEED, alpha=1e-3)
    mlp.fit(X / 16.0, y)
    weights = [mlp.coefs_[0], mlp.intercepts_[0], mlp.coefs_[1], mlp.intercepts_[1]]
    return [np.round(w, WEIGHT_DECIMALS).astype(np.float32) for w in weights]


def digits_onnx(weights: list[np.ndarray]) -> bytes:
    """input FP32 [N,64] (0..16) -> probabilities FP32 [N,10], label INT64 [N]."""
    from onnx import TensorProto, helper, numpy_helper

    w1, b1, w2, b2 = weights
    initializers = [
        numpy_helper.from_array(np.array(1.0 / 16.0, dtype=np.float32), "scale"),
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(b2, "b2"),
    ]
    nodes = [
        helper.make_node("Mul", ["input", "scale"], ["scaled"]),
        helper.make_node("MatMul", ["scaled", "w1"], ["h1"]),
        helper.make_node("Add", ["h1", "b1"], ["h1b"]),
        helper.make_node("Relu", ["h1b"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "w2"], ["h2"]),
        helper.make_node("Add", ["h2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=-1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "digits",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
        ],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeserve-build"
    )
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def quantize_int8(fp32: bytes, calibration: np.ndarray) -> bytes:
    """Static INT8 in QDQ form (runs on both backends); MinMax calibration is deterministic."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Rows(CalibrationDataReader):
        def __init__(self) -> None:
            self._rows = iter(
                [{"input": calibration[i : i + 16]} for i in range(0, len(calibration), 16)]
            )

        def get_next(self) -> dict | None:
            return next(self._rows, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        quantize_static(
            str(src),
            str(dst),
            Rows(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
        )
        return dst.read_bytes()


DIGITS_TOML = """\
description = "Handwritten digit classifier (8x8 pixels, 0..16), scikit-learn's digits"
backend = "auto"
max_batch_size = 64
default_version = 2
labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]

[[inputs]]
name = "input"
datatype = "FP32"
shape = [-1, 64]

[[outputs]]
name = "probabilities"
datatype = "FP32"
shape = [-1, 10]

[[outputs]]
name = "label"
datatype = "INT64"
shape = [-1]

[batching]
max_queue_delay_ms = 1.0
max_queue_size = 256

[warmup]
batch_sizes = [1, 8]
"""


def deterministic_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """np.savez stamps the current time into the zip; this writes a fixed one."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())
    return out.getvalue()


@dataclass(frozen=True)
class Score:
    """One row of the accuracy table in models/README.md."""

    model: str
    version: int
    precision: str
    backend: str
    file: str
    heldout_accuracy: float

    def row(self) -> str:
        return (
            f"| {self.model} | {self.version} | {self.precision} | {self.backend} "
            f"| {self.file} | {self.heldout_accuracy:.4f} |"
        )


def write_model(
    root: Path,
    name: str,
    toml: str,
    versions: dict[int, dict[str, bytes]],
    heldout: dict[str, np.ndarray],
) -> None:
    folder = root / name
    for version, files in versions.items():
        (folder / str(version)).mkdir(parents=True, exist_ok=True)
        for file_name, blob in files.items():
            (folder / str(version) / file_name).write_bytes(blob)
    (folder / "model.toml").write_text(toml)
    (folder / "heldout.npz").write_bytes(deterministic_npz(heldout))


def build_digits(root: Path) -> list[Score]:
    """Write root/digits (v1 FP32, v2 INT8) and score both versions on both runtimes.

    Both INT8 forms calibrate on the same 512 training rows; each backend is scored on
    the file it loads (OpenVINO prefers model.xml where there is one).
    """
    from openvino_int8 import quantize_ir
    from runtimes import loaded_file

    X_train, X_test, y_train, y_test = digits_split()
    fp32 = digits_onnx(train_digits(X_train, y_train))
    calibration = X_train[:512]
    versions = {
        1: {"model.onnx": fp32},
        2: {
            "model.onnx": quantize_int8(fp32, calibration),
            **quantize_ir(fp32, {"input": calibration}),
        },
    }
    write_model(root, "digits", DIGITS_TOML, versions, {"X": X_test, "y": y_test})
    return [
        Score(
            "digits",
            version,
            "FP32" if version == 1 else "INT8",
            backend,
            loaded_file(files, backend),
            heldout_accuracy(files, backend, X_test, y_test),
        )
        for version, files in versions.items()
        for backend in ("onnxruntime", "openvino")
    ]


def build_text(root: Path) -> list[Score]:
    """Write root/text (strings in, intent out); ONNX Runtime only."""
    from text import build_text as text_model
    from text import text_toml

    model, X_test, y_test = text_model()
    files = {"model.onnx": model}
    write_model(root, "text", text_toml(), {1: files}, {"X": X_test, "y": y_test})
    accuracy = heldout_accuracy(files, "onnxruntime", X_test.astype(object), y_test)
    return [Score("text", 1, "FP32", "onnxruntime", "model.onnx", accuracy)]


def build_all(root: Path) -> list[Score]:
    return build_digits(root) + build_text(root)


def heldout_accuracy(files: dict[str, bytes], backend: str, X: np.ndarray, y: np.ndarray) -> float:
    """The share of rows whose `label` output is right, computed in FP32 on both runtimes."""
    from runtimes import run

    return float(np.mean(run(files, backend, X)["label"] == y))


def differences(
    built: Path, committed: Path, models: list[str], *, byte_exact: bool = True
) -> list[str]:
    """Files that differ between a rebuild and the committed models, either way round.

    A stray file in a committed model folder (say a leftover version) counts in both
    modes: the server would load it, and no rebuild can vouch for it. Without
    `byte_exact` only presence counts (rebuild_check.py compares the contents).
    """

    def files(root: Path) -> set[str]:
        return {
            str(path.relative_to(root))
            for model in models
            for path in (root / model).rglob("*")
            if path.is_file()
        }

    rebuilt, present = files(built), files(committed)
    return sorted(
        name
        for name in rebuilt | present
        if name not in rebuilt
        or name not in present
        or (byte_exact and not filecmp.cmp(built / name, committed / name, shallow=False))
    )


def check(*, force_behaviour: bool, against: Path | None) -> int:
    """Rebuild into a temp folder (or take `against`) and compare with the committed files:
    byte for byte under the locked versions, by behaviour otherwise (rebuild_check.py)."""
    from rebuild_check import check_mode, compare_behaviour, read_lock

    mode = check_mode(read_lock(), force_behaviour=force_behaviour)
    print(mode.line())
    with tempfile.TemporaryDirectory() as tmp:
        built = against or Path(tmp)
        scores = [] if against else build_all(built)
        models = sorted(p.parent.name for p in built.glob("*/model.toml"))
        different = differences(built, HERE, models, byte_exact=mode.byte_exact)
        if not mode.byte_exact:
            found = compare_behaviour(built, HERE, models)
            print(found.summary())
            different += found.problems
    if different:
        print("differs from a rebuild:", *different, sep="\n  ", file=sys.stderr)
        return 1
    print(f"committed models {'equal' if mode.byte_exact else 'behave as'} a fresh rebuild")
    print_table(scores)
    return 0


def print_table(scores: list[Score]) -> None:
    if scores:
        print("| model | version | precision | backend | file | heldout_accuracy |")
        print("|---|---|---|---|---|---|")
    for score in scores:
        print(score.row())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare a rebuild with the files: byte for byte under the locked versions, "
        "by outputs and accuracy on the held-out rows otherwise",
    )
    parser.add_argument(
        "--behaviour",
        action="store_true",
        help="with --check: compare by behaviour even under the locked versions",
    )
    parser.add_argument(
        "--against",
        type=Path,
        metavar="DIR",
        help="with --check: compare with the models in DIR (rebuilt before) instead of rebuilding",
    )
    parser.add_argument(
        "--minilm",
        action="store_true",
        help="export all-MiniLM-L6-v2 only (needs torch; see minilm.py)",
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args.minilm:
        from minilm import build_minilm

        build_minilm(HERE / "minilm")
        return 0
    if args.check:
        return check(force_behaviour=args.behaviour, against=args.against)
    print_table(build_all(HERE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
