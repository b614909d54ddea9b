"""How `build.py --check` compares a rebuild with the committed models (issue 23).

Under the library versions of packaging/lock/dev.txt a rebuild is byte for byte the
committed files, so anything looser would hide a change. Another scikit-learn, numpy or
NNCF trains and quantizes the same recipe into other bytes; there the check compares what
matters to a client instead: both files' outputs on the held-out rows, through the runtime
that serves them, and the held-out accuracy to the digits models/README.md reports.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from runtimes import loaded_file, run

LOCK = Path(__file__).resolve().parent.parent / "packaging" / "lock" / "dev.txt"
# What the build imports, plus scipy (scikit-learn's solvers): the versions that reach the
# bytes. skl2onnx is not used (the graphs are written with onnx.helper), so it is not here.
BUILD_LIBRARIES = ("numpy", "scipy", "scikit-learn", "onnx", "onnxruntime", "nncf", "openvino")

# Chosen by measurement (models/README.md, "Rebuild check"): the same recipe rebuilt with
# other OpenBLAS kernels (AVX-512) or on one core moved a held-out row's probability by up
# to 0.12 (FP32 0.101, INT8 0.120) and no label; the MLP trained from another seed (a
# different model, same accuracy to 4 digits) moved probabilities by 0.44..0.57 and
# 0.7..1.1% of the labels. Float outputs may differ by PROBABILITY_ATOL on any row, and
# integer outputs (labels) must agree on LABEL_AGREEMENT of the rows (2 of digits' 450
# may differ; on text's 16 rows none).
PROBABILITY_ATOL = 0.2
LABEL_AGREEMENT = 0.995

README_ROW = re.compile(
    r"^\|\s*(\w+)\s*\|\s*(\d+)\s*\|\s*\w+\s*\|\s*(\w+)\s*\|\s*model\.\w+\s*\|\s*(\d+\.\d+)\s*\|$"
)
LOCK_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", re.MULTILINE)


def canonical(name: str) -> str:
    """PEP 503 names, so `scikit_learn` in one place matches `scikit-learn` in another."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lock_text: str) -> dict[str, str]:
    """`name==version` pins of a pip-compile lock (hash and comment lines ignored)."""
    return {canonical(name): pin for name, pin in LOCK_PIN.findall(lock_text)}


def installed_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def version_drift(
    lock_text: str, installed: Callable[[str], str | None] = installed_version
) -> list[str]:
    """Each build library whose installed version is not the locked one, as
    `scikit-learn 1.9.1 (lock 1.8.0)`; empty when every one equals the lock."""
    locked = locked_versions(lock_text)
    drift = []
    for name in BUILD_LIBRARIES:
        have, pin = installed(name), locked.get(canonical(name))
        if have != pin:
            drift.append(f"{name} {have or 'not installed'} (lock {pin or 'has none'})")
    return drift


@dataclass(frozen=True)
class Mode:
    """Which comparison the check runs, and why: the first line it prints."""

    byte_exact: bool
    why: str

    def line(self) -> str:
        if self.byte_exact:
            return f"byte-exact check ({self.why}): committed files equal a rebuild byte for byte"
        return (
            f"behaviour check ({self.why}): on the held-out rows, outputs within "
            f"{PROBABILITY_ATOL:g} of a rebuild's, labels equal on >= {LABEL_AGREEMENT:.1%}, "
            "accuracy equal to models/README.md's table to its digits"
        )


def check_mode(lock_text: str | None, *, force_behaviour: bool = False) -> Mode:
    """Byte-exact only when every build library is at its locked version."""
    if lock_text is None:
        return Mode(False, f"no lock at {LOCK}")
    drift = version_drift(lock_text)
    if drift:
        return Mode(False, f"versions differ from the lock: {', '.join(drift)}")
    if force_behaviour:
        return Mode(False, "forced by --behaviour; versions equal the lock")
    return Mode(True, "locked versions")


def read_lock(path: Path = LOCK) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


@dataclass
class Behaviour:
    """What the behaviour check found: problems (each naming a file) and the worst seen."""

    problems: list[str] = field(default_factory=list)
    worst_difference: tuple[float, str] = (0.0, "")
    worst_agreement: tuple[float, str] = (1.0, "")

    def summary(self) -> str:
        difference, at = self.worst_difference
        agreement, where = self.worst_agreement
        return (
            f"worst seen: probabilities differ by {difference:.3g} ({at or 'none'}), "
            f"labels equal on {agreement:.2%} of rows ({where or 'every file'})"
        )


def readme_figures(readme: Path) -> dict[tuple[str, int, str], str]:
    """(model, version, backend) -> the accuracy as models/README.md's table prints it."""
    figures = {}
    for line in readme.read_text().splitlines():
        match = README_ROW.match(line.strip())
        if match:
            model, number, backend, figure = match.groups()
            figures[(model, int(number), backend)] = figure
    return figures


def heldout(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(folder / "heldout.npz", allow_pickle=False) as data:
        X, y = data["X"], data["y"]
    return (X.astype(object) if X.dtype.kind == "U" else X), y


def compare_behaviour(built: Path, committed: Path, models: list[str]) -> Behaviour:
    """The committed files of `models` against a rebuild, by what they answer."""
    found = Behaviour()
    figures = readme_figures(committed / "README.md")
    for model in models:
        compare_model(built / model, committed / model, model, figures, found)
    return found


def compare_model(
    built: Path,
    committed: Path,
    model: str,
    figures: dict[tuple[str, int, str], str],
    found: Behaviour,
) -> None:
    X, y = heldout(committed)
    rebuilt_X, rebuilt_y = heldout(built)
    if not (np.array_equal(X, rebuilt_X) and np.array_equal(y, rebuilt_y)):
        found.problems.append(f"{model}/heldout.npz: the held-out rows differ")
    if (built / "model.toml").read_bytes() != (committed / "model.toml").read_bytes():
        found.problems.append(f"{model}/model.toml: differs")
    for folder in sorted(p for p in committed.iterdir() if (built / p.name).is_dir()):
        name = f"{model}/{folder.name}"
        files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        rebuilt = {p.name: p.read_bytes() for p in (built / folder.name).iterdir() if p.is_file()}
        answers = Answers({"committed": files, "rebuilt": rebuilt}, X)
        if "model.onnx" in files:
            compare_outputs(answers, "onnxruntime", f"{name}/model.onnx", found)
        if "model.xml" in files:
            compare_outputs(answers, "openvino", f"{name}/model.xml + model.bin", found)
        for (row_model, number, backend), figure in figures.items():
            if row_model == model and str(number) == folder.name:
                compare_accuracy(answers, backend, y, figure, name, found)


class Answers:
    """Each side's outputs on the held-out rows, per backend, run once: the output and the
    accuracy comparisons read the same runs."""

    def __init__(self, sides: dict[str, dict[str, bytes]], X: np.ndarray) -> None:
        self.sides = sides  # "committed" and "rebuilt": a version folder's files each
        self._X = X
        self._runs: dict[tuple[str, str], dict[str, np.ndarray] | Exception] = {}

    def of(self, side: str, backend: str) -> dict[str, np.ndarray]:
        """The outputs of `side` on `backend`; raises what the runtime raised."""
        key = (side, backend)
        if key not in self._runs:
            try:
                self._runs[key] = run(self.sides[side], backend, self._X)
            except Exception as error:  # kept: both comparisons see the same failure
                self._runs[key] = error
        result = self._runs[key]
        if isinstance(result, Exception):
            raise result
        return result


def compare_outputs(answers: Answers, backend: str, label: str, found: Behaviour) -> None:
    """Probabilities within PROBABILITY_ATOL and labels equal on LABEL_AGREEMENT of rows."""
    try:
        ours, theirs = answers.of("committed", backend), answers.of("rebuilt", backend)
    except Exception as error:  # a file the runtime refuses is a difference, not a crash
        found.problems.append(f"{label}: does not run on {backend}: {str(error).splitlines()[0]}")
        return
    if ours.keys() != theirs.keys():
        found.problems.append(f"{label}: outputs {sorted(ours)}, rebuilt {sorted(theirs)}")
        return
    for output, value in ours.items():
        other = theirs[output]
        if value.shape != other.shape:
            found.problems.append(f"{label}: {output} shape {value.shape}, rebuilt {other.shape}")
        elif value.dtype.kind == "f":
            difference = float(np.max(np.abs(value - other), initial=0.0))
            if difference > found.worst_difference[0]:
                found.worst_difference = (difference, label)
            if not difference <= PROBABILITY_ATOL:  # NaN fails too
                found.problems.append(
                    f"{label}: output {output} differs by up to {difference:.3g} "
                    f"(tolerance {PROBABILITY_ATOL:g})"
                )
        else:
            agreement = float(np.mean(value == other)) if value.size else 1.0
            if agreement < found.worst_agreement[0]:
                found.worst_agreement = (agreement, label)
            if agreement < LABEL_AGREEMENT:
                found.problems.append(
                    f"{label}: output {output} equal on {agreement:.2%} of rows "
                    f"(at least {LABEL_AGREEMENT:.1%})"
                )


def compare_accuracy(
    answers: Answers, backend: str, y: np.ndarray, figure: str, name: str, found: Behaviour
) -> None:
    """Both files' held-out accuracy on `backend`, to the digits the README reports."""
    digits = len(figure.split(".")[1])
    for which, blobs in answers.sides.items():
        try:
            accuracy = float(np.mean(answers.of(which, backend)["label"] == y))
        except Exception:  # reported by compare_outputs
            continue
        if f"{accuracy:.{digits}f}" != figure:
            found.problems.append(
                f"{name}/{loaded_file(blobs, backend)}: {which} scores {accuracy:.{digits}f} "
                f"on {backend}, models/README.md says {figure}"
            )
