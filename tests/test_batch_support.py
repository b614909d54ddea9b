"""Shared helpers for the batch, jobs, streaming, features and Spark tests (no tests here).

`model_repository` gives a repository with a `digits` model: the bundled demo model when
it is committed, else a small ONNX model with the same signature built here (input
`input` FP32 [-1, 64] -> `probabilities` FP32 [-1, 10], `label` INT64 [-1]).
`digits_rows` are the real scikit-learn digits images (shipped with scikit-learn).
"""

from __future__ import annotations

import shutil
from functools import cache
from pathlib import Path

import numpy as np

from tests.serving import MODELS

DIGITS_TOML = """description = "digits-like test model"
backend = "onnxruntime"
max_batch_size = 0

[[inputs]]
name = "input"
datatype = "FP32"
shape = [-1, 64]
"""


def build_digits_onnx() -> bytes:
    """input [-1,64] -> softmax(x W + b) and argmax, weights fit to the digits data."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x, y = digits_rows()
    weights, bias = _least_squares(x, y)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
            helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
        ],
        "digits",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 64])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 10]),
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
        ],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _least_squares(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    target = np.eye(10, dtype=np.float64)[y] * 8.0
    design = np.hstack([x / 16.0, np.ones((len(x), 1))])
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    return (coef[:-1] / 16.0).astype(np.float32), coef[-1].astype(np.float32)


@cache
def digits_rows() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.data.astype(np.float32), data.target.astype(np.int64)


def model_repository(root: Path) -> Path:
    """A repository folder holding `digits` (the demo model if present, else built)."""
    repo = root / "models"
    if (MODELS / "digits" / "model.toml").is_file():
        shutil.copytree(MODELS / "digits", repo / "digits")
        return repo
    (repo / "digits" / "1").mkdir(parents=True)
    (repo / "digits" / "model.toml").write_text(DIGITS_TOML)
    (repo / "digits" / "1" / "model.onnx").write_bytes(build_digits_onnx())
    return repo


def server_config(repo: Path, extra: str = "", server: str = "") -> str:
    """Config text for tests.serving.run_server(config_text=...) on `repo`; `server` adds
    keys to [server], `extra` adds sections."""
    return (
        '[server]\nhost = "127.0.0.1"\nport = {port}\nstate_dir = "state"\n'
        + server
        + f'[models]\nrepository = "{repo}"\nbackend = "onnxruntime"\n'
        "[auth]\nenabled = false\n" + extra
    )


def v2_request(rows: np.ndarray, outputs: list[str] | None = None) -> dict:
    doc: dict = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(rows.shape),
                "data": rows.reshape(-1).tolist(),
            }
        ]
    }
    if outputs:
        doc["outputs"] = [{"name": n} for n in outputs]
    return doc


def served_outputs(url: str, rows: np.ndarray, model: str = "digits") -> dict[str, np.ndarray]:
    """The server's answers for `rows`, asked 64 rows at a time (digits' max_batch_size)."""
    import httpx

    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(rows), 64):
        piece = rows[start : start + 64]
        reply = httpx.post(f"{url}/v2/models/{model}/infer", json=v2_request(piece), timeout=30)
        reply.raise_for_status()
        for out in reply.json()["outputs"]:
            parts.setdefault(out["name"], []).append(np.asarray(out["data"]).reshape(out["shape"]))
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}
