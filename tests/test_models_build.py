"""The bundled demo models: rebuilt byte for byte (or alike in behaviour when the libraries
are not the locked ones), loaded by both runtimes, scored as documented."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
import pytest

from edgeserve.runtime.datatypes import ONNX_TYPE_TO_V2
from edgeserve.serving.repository import parse_model_config

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
BUILD = MODELS / "build.py"
LOCK = ROOT / "packaging" / "lock" / "dev.txt"
# Every committed demo model ships its held-out split; minilm (local, not committed) has none.
DEMO_MODELS = sorted(p.parent.name for p in MODELS.glob("*/heldout.npz"))
VERSIONS = [
    (name, int(v.name))
    for name in DEMO_MODELS
    for v in sorted((MODELS / name).iterdir())
    if (v / "model.onnx").is_file()
]
TABLE_ROW = re.compile(
    r"^\|\s*(\w+)\s*\|\s*(\d+)\s*\|\s*(\w+)\s*\|\s*(\w+)\s*\|\s*(model\.\w+)\s*\|\s*([\d.]+)\s*\|$"
)


def config(name: str):
    return parse_model_config((MODELS / name / "model.toml").read_text(), f"{name}/model.toml")


def model_bytes(name: str, version: int) -> bytes:
    return (MODELS / name / str(version) / "model.onnx").read_bytes()


def heldout(name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(MODELS / name / "heldout.npz", allow_pickle=False) as data:
        X, y = data["X"], data["y"]
    return (X.astype(object) if X.dtype.kind == "U" else X), y


def run_onnxruntime(blob: bytes, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def compile_openvino(blob: bytes, weights: bytes = b"") -> ov.CompiledModel:
    core = ov.Core()
    # f32 as the server runs it; a bf16-capable CPU would otherwise round the weights.
    return core.compile_model(
        core.read_model(blob, ov.Tensor(np.frombuffer(weights, np.uint8))),
        "CPU",
        {"INFERENCE_PRECISION_HINT": "f32"},
    )


def run_openvino(
    blob: bytes, feed: dict[str, np.ndarray], weights: bytes = b""
) -> dict[str, np.ndarray]:
    compiled = compile_openvino(blob, weights)
    results = compiled(feed)
    return {o.get_any_name(): results[o] for o in compiled.outputs}


def openvino_file(name: str, version: int) -> str:
    """The file OpenVINO loads from a version folder: its own IR where there is one."""
    return "model.xml" if (MODELS / name / str(version) / "model.xml").is_file() else "model.onnx"


def run_loaded_file(
    name: str, version: int, backend: str, feed: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    folder = MODELS / name / str(version)
    if backend == "onnxruntime":
        return run_onnxruntime(model_bytes(name, version), feed)
    if openvino_file(name, version) == "model.xml":
        return run_openvino(
            (folder / "model.xml").read_bytes(), feed, (folder / "model.bin").read_bytes()
        )
    return run_openvino(model_bytes(name, version), feed)


def readme_table() -> list[tuple[str, int, str, str, str, float]]:
    rows = []
    for line in (MODELS / "README.md").read_text().splitlines():
        match = TABLE_ROW.match(line.strip())
        if match:
            model, version, precision, backend, file, accuracy = match.groups()
            rows.append((model, int(version), precision, backend, file, float(accuracy)))
    return rows


def test_the_committed_demo_models_are_digits_and_text():
    assert DEMO_MODELS == ["digits", "text"]
    assert VERSIONS == [("digits", 1), ("digits", 2), ("text", 1)]


def copy_models(root: Path) -> Path:
    """The models folder and the lock beside it, as the checkout has them: build.py picks
    its check's mode from ../packaging/lock/dev.txt."""
    copy = root / "models"
    shutil.copytree(MODELS, copy, ignore=shutil.ignore_patterns("minilm", "__pycache__"))
    (root / "packaging" / "lock").mkdir(parents=True)
    shutil.copy(LOCK, root / "packaging" / "lock" / "dev.txt")
    return copy


def check(models: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(models / "build.py"), "--check", *flags],
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One rebuild for the module's checks (`--check --against` it): build.py run in a copy."""
    copy = copy_models(tmp_path_factory.mktemp("rebuilt"))
    result = subprocess.run(
        [sys.executable, str(copy / "build.py")], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return copy


def test_rebuild_equals_the_committed_files():
    result = check(MODELS)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("byte-exact check (locked versions):")
    assert "committed models equal a fresh rebuild" in result.stdout


@pytest.mark.parametrize("file", ["model.onnx", "model.bin"])
def test_check_fails_and_names_the_file_when_a_committed_model_differs(tmp_path, rebuilt, file):
    copy = copy_models(tmp_path)
    tampered = copy / "digits" / "2" / file
    blob = bytearray(tampered.read_bytes())
    blob[-1] ^= 0x01
    tampered.write_bytes(bytes(blob))
    result = check(copy, "--against", str(rebuilt))
    assert result.returncode == 1
    assert result.stdout.startswith("byte-exact check")
    assert f"digits/2/{file}" in result.stderr
    assert "digits/1/model.onnx" not in result.stderr


@pytest.mark.parametrize("flags", [(), ("--behaviour",)], ids=["byte-exact", "behaviour"])
def test_check_fails_on_a_stray_version_no_rebuild_makes(tmp_path, rebuilt, flags):
    copy = copy_models(tmp_path)
    (copy / "text" / "2").mkdir()
    shutil.copy(copy / "text" / "1" / "model.onnx", copy / "text" / "2" / "model.onnx")
    result = check(copy, *flags, "--against", str(rebuilt))
    assert result.returncode == 1
    assert "text/2/model.onnx" in result.stderr


def test_behaviour_check_passes_on_the_committed_models_and_says_which_check_ran(rebuilt):
    result = check(MODELS, "--behaviour", "--against", str(rebuilt))
    assert result.returncode == 0, result.stderr[-2000:]
    mode, worst, verdict = result.stdout.splitlines()[:3]
    assert mode.startswith("behaviour check (forced by --behaviour; versions equal the lock):")
    assert "outputs within 0.2" in mode
    assert worst.startswith("worst seen: probabilities differ by ")
    assert verdict == "committed models behave as a fresh rebuild"


def test_behaviour_check_fails_naming_a_model_whose_weights_changed(tmp_path, rebuilt):
    copy = copy_models(tmp_path)
    path = copy / "digits" / "1" / "model.onnx"
    model = onnx.load_from_string(path.read_bytes())
    (w2,) = [t for t in model.graph.initializer if t.name == "w2"]
    weights = onnx.numpy_helper.to_array(w2)
    noise = np.random.default_rng(0).normal(0, 0.3, weights.shape).astype(np.float32)
    w2.CopyFrom(onnx.numpy_helper.from_array(weights + noise, "w2"))
    path.write_bytes(model.SerializeToString())
    result = check(copy, "--behaviour", "--against", str(rebuilt))
    assert result.returncode == 1
    assert result.stdout.startswith("behaviour check")
    assert "digits/1/model.onnx: output probabilities differs by up to" in result.stderr
    assert "digits/2" not in result.stderr and "text/" not in result.stderr


@pytest.fixture(scope="module")
def rebuild_check():
    sys.path.insert(0, str(MODELS))
    try:
        import rebuild_check  # models/rebuild_check.py
    finally:
        sys.path.remove(str(MODELS))
    return rebuild_check


def test_the_locked_versions_pick_the_byte_exact_check(rebuild_check):
    mode = rebuild_check.check_mode(LOCK.read_text())
    assert mode.byte_exact
    assert rebuild_check.check_mode(LOCK.read_text(), force_behaviour=True).byte_exact is False


def test_a_library_other_than_the_lock_picks_the_behaviour_check(rebuild_check):
    fake = re.sub(r"^scikit-learn==\S+", "scikit-learn==1.8.0", LOCK.read_text(), flags=re.M)
    mode = rebuild_check.check_mode(fake)
    assert not mode.byte_exact
    installed = importlib.metadata.version("scikit-learn")
    assert mode.line().startswith(
        f"behaviour check (versions differ from the lock: scikit-learn {installed} (lock 1.8.0)):"
    )
    assert not rebuild_check.check_mode(None).byte_exact  # no lock: nothing vouches for bytes


@pytest.mark.parametrize(("name", "version"), VERSIONS)
def test_model_files_use_only_standard_onnx_operators(name, version):
    model = onnx.load_from_string(model_bytes(name, version))
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    if name == "digits":  # loadable by older onnxruntime and openvino releases too
        assert model.ir_version == 8
        assert [o.version for o in model.opset_import] == [17]


@pytest.mark.parametrize(("name", "version"), VERSIONS)
def test_model_toml_declares_what_the_model_file_has(name, version):
    declared = config(name)
    session = ort.InferenceSession(model_bytes(name, version), providers=["CPUExecutionProvider"])

    def actual(args) -> list[tuple[str, str, list[int]]]:
        return [
            (a.name, ONNX_TYPE_TO_V2[a.type], [d if isinstance(d, int) else -1 for d in a.shape])
            for a in args
        ]

    assert actual(session.get_inputs()) == [(t.name, t.datatype, t.shape) for t in declared.inputs]
    assert actual(session.get_outputs()) == [
        (t.name, t.datatype, t.shape) for t in declared.outputs
    ]
    assert len(declared.labels) == declared.outputs[0].shape[-1]


@pytest.mark.parametrize(
    ("name", "version"), [(n, v) for n, v in VERSIONS if config(n).backend != "onnxruntime"]
)
def test_both_runtimes_answer_the_same_on_the_heldout_split(name, version):
    X, _ = heldout(name)
    blob = model_bytes(name, version)
    feed = {config(name).inputs[0].name: X}
    by_ort, by_ov = run_onnxruntime(blob, feed), run_openvino(blob, feed)
    # FP32 agrees to rounding; the INT8 kernels of the two runtimes round differently.
    tolerance = 1e-5 if version == 1 else 0.05
    np.testing.assert_allclose(by_ov["probabilities"], by_ort["probabilities"], atol=tolerance)
    assert np.array_equal(by_ov["label"], by_ort["label"])
    assert by_ov["label"].dtype == by_ort["label"].dtype == np.int64


def test_the_string_model_is_pinned_to_onnxruntime_because_openvino_refuses_it():
    assert config("text").backend == "onnxruntime"
    with pytest.raises(RuntimeError):
        compile_openvino(model_bytes("text", 1))


def test_readme_lists_every_version_on_every_runtime_it_can_run_on():
    listed = {(m, v, b, f) for m, v, _, b, f, _ in readme_table()}
    expected = {
        (
            name,
            version,
            backend,
            "model.onnx" if backend == "onnxruntime" else openvino_file(name, version),
        )
        for name, version in VERSIONS
        for backend in (
            ("onnxruntime",)
            if config(name).backend == "onnxruntime"
            else ("onnxruntime", "openvino")
        )
    }
    assert listed == expected


@pytest.mark.parametrize(
    ("name", "version", "precision", "backend", "file", "figure"),
    readme_table(),
    ids=[f"{m}-{v}-{b}" for m, v, _, b, _, _ in readme_table()],
)
def test_heldout_accuracy_equals_the_readme_figure(name, version, precision, backend, file, figure):
    X, y = heldout(name)
    labels = run_loaded_file(name, version, backend, {config(name).inputs[0].name: X})["label"]
    assert round(float(np.mean(labels == y)), 3) == round(figure, 3)
    if file == "model.xml":
        quantized = b"FakeQuantize" in (MODELS / name / str(version) / file).read_bytes()
    else:
        graph = onnx.load_from_string(model_bytes(name, version)).graph
        quantized = "QuantizeLinear" in {n.op_type for n in graph.node}
    assert precision == ("INT8" if quantized else "FP32")


def test_digits_is_accurate_and_int8_is_smaller():
    figures = {(v, b): f for m, v, _, b, _, f in readme_table() if m == "digits"}
    assert min(figures.values()) > 0.95
    assert len(model_bytes("digits", 2)) < len(model_bytes("digits", 1)) / 2
    assert (MODELS / "digits" / "2" / "model.bin").stat().st_size < len(
        model_bytes("digits", 1)
    ) / 2


@pytest.fixture(scope="module")
def text_recipe():
    sys.path.insert(0, str(MODELS))
    try:
        import text  # models/text.py
    finally:
        sys.path.remove(str(MODELS))
    return text


def test_text_graph_tokenizes_like_its_python_reference(text_recipe):
    """Lower-casing, whitespace and punctuation splitting in ONNX equal `tokens()` in Python."""
    X_train, _, y_train, _ = text_recipe.text_split()
    vocabulary, idf, w, b = text_recipe.train_text(X_train, y_train)
    texts = [
        "WHERE is my ORDER?!",
        "pay,card.cash!refund?open",
        "   ",
        "",
        "?!.,",
        "When  do\tyou\nopen",
        "ÜBER CAFÉ: Refund, PAYMENT",
        "something else entirely",
    ]
    index = {t: i for i, t in enumerate(vocabulary)}
    counts = np.zeros((len(texts), len(vocabulary)), np.float32)
    for row, text in enumerate(texts):
        for token in text_recipe.tokens(text):
            if token in index:
                counts[row, index[token]] += 1
    features = counts * idf
    features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    logits = features @ w + b
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)

    got = run_onnxruntime(model_bytes("text", 1), {"text": np.array(texts, dtype=object)})
    np.testing.assert_allclose(got["probabilities"], expected, atol=1e-5)
    assert got["label"].tolist() == logits.argmax(axis=1).tolist()
    assert text_recipe.LABELS[got["label"][0]] == "order"
