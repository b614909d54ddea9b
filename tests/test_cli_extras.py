"""A plain `pip install edgeserve` has no extras: a command that needs one says which, in
one line, instead of dying with ModuleNotFoundError. Python's own way to make a module
absent (None in sys.modules, set by a sitecustomize) stands in for the smaller install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving import MODELS, write_config


def run_without(tmp_path: Path, modules: list[str], *args: str) -> subprocess.CompletedProcess:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    )
    env = {k: v for k, v in os.environ.items() if k != "EDGESERVE_CONFIG"}
    # kept after the shim: the code under test may come from PYTHONPATH (a worktree)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "edgeserve", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if "level=" not in line]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args",
    [
        [
            "batch",
            "score",
            "in.csv",
            "--model",
            "digits",
            "--output",
            "out.csv",
            "--repository",
            str(MODELS),
        ],
        ["features", "load", "in.csv", "--table", "t", "--key", "id", "--database", "f.db"],
    ],
    ids=["batch score", "features load"],
)
def test_missing_pyarrow_names_the_batch_extra(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "in.csv").write_text("id,input_0\n1,0\n")
    done = run_without(tmp_path, ["pyarrow"], *args)
    assert done.returncode == 1
    line = one_line(done)
    assert "pyarrow" in line
    assert "pip install 'edgeserve[batch]'" in line
    assert not (tmp_path / "out.csv").exists()


def test_grpc_port_without_grpcio_names_the_grpc_extra(tmp_path: Path) -> None:
    config = write_config(tmp_path / "edgeserve.toml", "", 0, tmp_path / "state")
    config.write_text(config.read_text().replace("[models]", 'grpc_port = "auto"\n[models]'))
    done = run_without(tmp_path, ["grpc"], "serve", "--config", str(config))
    assert done.returncode == 2
    line = one_line(done)
    assert "server.grpc_port" in line
    assert "pip install 'edgeserve[grpc]'" in line
    assert not (tmp_path / "state").exists()
