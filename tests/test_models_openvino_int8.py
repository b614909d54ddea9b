"""digits v2 carries two INT8 forms: each backend loads its own, from the repository and
from an installed (signed, encrypted) bundle alike."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import openvino as ov
import pytest

from edgeserve.runtime import ThreadPlan, create_runtime
from edgeserve.serving.repository import read_model
from edgeserve.updates.validation import make_validator, record_samples
from tests.serving import MODELS
from updater import (
    BundlePolicy,
    MasterKey,
    SlotStore,
    TrustedKeys,
    create_bundle,
    generate_signing_key,
    generate_unwrap_key_file,
    public_key_text,
)

DIGITS = read_model(MODELS / "digits")
FOLDER = MODELS / "digits" / "2"
HELDOUT = np.load(MODELS / "digits" / "heldout.npz")
README_ROW = re.compile(r"^\| digits \| 2 \| INT8 \| (\w+) \| (model\.\w+) \| ([\d.]+) \|$", re.M)


def readme_figure(backend: str) -> tuple[str, float]:
    rows = {b: (f, float(a)) for b, f, a in README_ROW.findall((MODELS / "README.md").read_text())}
    return rows[backend]


def direct_ir() -> dict[str, np.ndarray]:
    """The IR compiled straight from model.xml + model.bin, as the server compiles it."""
    core = ov.Core()
    weights = ov.Tensor(np.frombuffer((FOLDER / "model.bin").read_bytes(), np.uint8))
    compiled = core.compile_model(
        core.read_model((FOLDER / "model.xml").read_bytes(), weights),
        "CPU",
        {"INFERENCE_PRECISION_HINT": "f32"},
    )
    results = compiled({"input": HELDOUT["X"]})
    return {o.get_any_name(): results[o] for o in compiled.outputs}


def direct_onnx() -> dict[str, np.ndarray]:
    session = ort.InferenceSession(
        (FOLDER / "model.onnx").read_bytes(), providers=["CPUExecutionProvider"]
    )
    probabilities, label = session.run(["probabilities", "label"], {"input": HELDOUT["X"]})
    return {"probabilities": probabilities, "label": label}


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=1e-6)
    assert np.array_equal(got["label"], want["label"])


def test_version_2_carries_both_forms_and_the_ir_is_nncf_int8() -> None:
    files = DIGITS.read_files(2)
    assert set(files) == {"model.onnx", "model.xml", "model.bin"}
    xml = files["model.xml"].decode()
    assert 'type="FakeQuantize"' in xml
    assert re.search(r'<preset value="performance"\s*/>', xml)
    assert re.search(r'<subset_size value="512"\s*/>', xml)


@pytest.mark.parametrize("backend", ["openvino", "auto"])
def test_openvino_loads_the_ir_not_the_onnx_form(backend: str) -> None:
    files = dict(DIGITS.read_files(2))
    files["model.onnx"] = b"not read by openvino when model.xml is here"
    runtime = create_runtime(backend, files, ThreadPlan())
    assert runtime.backend == "openvino"
    got = runtime.run({"input": HELDOUT["X"]})
    assert_same(got, direct_ir())
    file, figure = readme_figure("openvino")
    assert file == "model.xml"
    assert round(float(np.mean(got["label"] == HELDOUT["y"])), 4) == figure


def test_onnxruntime_still_loads_model_onnx() -> None:
    files = dict(DIGITS.read_files(2))
    files["model.xml"] = files["model.bin"] = b"not read by onnxruntime"
    got = create_runtime("onnxruntime", files, ThreadPlan()).run({"input": HELDOUT["X"]})
    assert_same(got, direct_onnx())
    file, figure = readme_figure("onnxruntime")
    assert file == "model.onnx"
    assert round(float(np.mean(got["label"] == HELDOUT["y"])), 4) == figure


def test_the_two_forms_are_different_quantizations_that_agree_on_labels() -> None:
    ir, qdq = direct_ir(), direct_onnx()
    assert not np.allclose(ir["probabilities"], qdq["probabilities"], atol=1e-4)
    assert np.array_equal(ir["label"], qdq["label"])


def test_recorded_samples_hold_for_either_form() -> None:
    """`bundle create` records on ONNX Runtime; a box on `auto` validates on OpenVINO."""
    samples = record_samples(MODELS / "digits", 2)
    assert all(0.001 < s.tolerance < 0.1 for s in samples)
    assert record_samples(MODELS / "digits", 1)[0].tolerance == 0.001  # one form only


def test_an_installed_bundle_keeps_both_forms_encrypted_and_serves_the_ir(
    tmp_path: Path,
) -> None:
    signing = generate_signing_key(tmp_path / "author" / "signing.pem")
    fleet = generate_unwrap_key_file(tmp_path / "author" / "fleet.key", "fleet")
    out = tmp_path / "digits-2.bundle"
    manifest = create_bundle(
        MODELS / "digits", 2, signing, fleet, out, samples=record_samples(MODELS / "digits", 2)
    )
    assert {f.name for f in manifest.files} == {"model.onnx", "model.xml", "model.bin"}

    policy = BundlePolicy(TrustedKeys.from_texts([public_key_text(signing)]), unwrap_keys=[fleet])
    store = SlotStore(tmp_path / "state", MasterKey.generate(), policy)
    store.install(out, validate=make_validator("auto", ThreadPlan()))
    stored = b"".join(p.read_bytes() for p in (tmp_path / "state").rglob("*") if p.is_file())
    assert b"FakeQuantize" not in stored  # the IR is encrypted at rest like the ONNX file

    _, files = store.load_current("digits")
    assert dict(files) == DIGITS.read_files(2)
    assert_same(
        create_runtime("auto", files, ThreadPlan()).run({"input": HELDOUT["X"]}), direct_ir()
    )
