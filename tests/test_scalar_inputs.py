"""A model whose input is a scalar (shape []) serves through the real server: the rows of
a 0-d input are 1, as the batcher counts them, not an IndexError after the model ran."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np

from tests.serving import run_server
from tests.test_batch_support import server_config

SCALAR_TOML = """description = "doubles a scalar"
backend = "onnxruntime"
max_batch_size = 0

[[inputs]]
name = "x"
datatype = "FP32"
shape = []
"""


def _scalar_model() -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "double",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_a_scalar_input_is_one_row(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    (repo / "double" / "1").mkdir(parents=True)
    (repo / "double" / "model.toml").write_text(SCALAR_TOML)
    (repo / "double" / "1" / "model.onnx").write_bytes(_scalar_model())
    with run_server(tmp_path, config_text=server_config(repo)) as server:
        request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [], "data": [3.5]}]}
        reply = httpx.post(f"{server.url}/v2/models/double/infer", json=request, timeout=30)
        assert reply.status_code == 200, reply.text
        assert reply.json()["outputs"][0]["data"] == [7.0]
        stats = httpx.get(f"{server.url}/v2/models/double/stats", timeout=30).json()
    assert stats["model_stats"][0]["inference_count"] == 1
