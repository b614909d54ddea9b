"""README.md works verbatim: every `sh` block runs, in order, in a fresh folder laid out
like a checkout, against a real `edgeserve serve` started there on free ports (the way
Datasette and sqlite-utils test their documentation).

The folder holds a copy of the demo models, the documented `edgeserve.toml` with the
ports changed, and `.venv` pointing at the running environment; HOME is inside it.
The only edits to a block are its address: 8080 and 8001 become free ports, and
localhost 127.0.0.1, where the server listens.
`curl` fails on an HTTP error (`--fail-with-body`), and every block runs under
`set -euo pipefail`, so a block passes only if each of its commands does. Variables a
block sets (TOKEN, ADMIN_TOKEN, ...) carry over to the next, as in one terminal.

Markers (tests/readme_blocks.py) skip a block that needs what a test box lacks, with the
reason; `restart` restarts the server after a block that changed its configuration; the
set-up block is checked (install.sh takes its flags; the server here is started with the
same `.venv/bin/edgeserve serve`) rather than run, which would reinstall the environment
and rerun this suite from inside it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.readme_blocks import Block, sh_blocks
from tests.serving import free_port
from tests.waiting import wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (shutil.which("bash") and shutil.which("curl")), reason="the README uses bash and curl"
    ),
]

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCKS = sh_blocks(README)
SERVE = [".venv/bin/edgeserve", "serve"]  # what the README's first line runs
BLOCK_TIMEOUT_S = 120

PRELUDE = """set -euo pipefail
set -a  # every assignment is exported, so the next block sees it
. ./.readme-env
curl() { command curl --silent --show-error --fail-with-body "$@"; }
"""
EPILOGUE = "\nexport -p > ./.readme-env\n"


@dataclass
class Box:
    """The folder, the server running in it, and what each block did."""

    root: Path
    port: int
    grpc_port: int
    env: dict[str, str]
    process: subprocess.Popen | None = None
    results: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (state, output)
    starts: int = 0

    @property
    def log_path(self) -> Path:
        return self.root / f"server-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                SERVE, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        url = f"http://127.0.0.1:{self.port}/v2/health/ready"

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"edgeserve serve exited:\n{self.log_path.read_text()}")
            try:
                return httpx.get(url, timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 90, lambda: f"the server to be ready:\n{self.log_path.read_text()}")
        # Once its models have loaded the server freezes its heap (gc_pauses.py), a stall of
        # up to half a second on a loaded box, after which the batcher refuses even a lone
        # request until the loop's next on-time tick (batcher.py, _too_slow). A user who
        # waits a second never sees it; the blocks start after the line that reports it.
        wait_until(
            lambda: "msg=heap settled" in self.log_path.read_text(),
            90,
            lambda: f"the heap to settle:\n{self.log_path.read_text()}",
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def run(self, block: Block) -> tuple[str, str]:
        if block.action == "skip":
            return "skip", block.reason
        if block.action == "install":
            return "install", ""
        # 127.0.0.1, not localhost: localhost tries ::1 first, where another process on this
        # shared box may listen on the same port number.
        code = re.sub(r"\blocalhost\b", "127.0.0.1", block.code)
        code = re.sub(r"\b8080\b", str(self.port), code)
        code = re.sub(r"\b8001\b", str(self.grpc_port), code)
        script = self.root / f".block-{block.line}.sh"
        script.write_text(PRELUDE + code + EPILOGUE)
        try:
            done = subprocess.run(
                ["bash", str(script)],
                cwd=self.root,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as exc:
            return "fail", f"timed out after {BLOCK_TIMEOUT_S} s\n{exc.stdout}\n{exc.stderr}"
        output = f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        if done.returncode != 0:
            return "fail", output + f"\n--- server log\n{self.log_path.read_text()[-4000:]}"
        if block.action == "restart":
            self.stop()
            self.start()
        return "pass", output


def lay_out(root: Path, port: int, grpc_port: int) -> None:
    """A checkout as a user has it after the set-up line, without the source tree."""
    (root / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    shutil.copytree(
        ROOT / "models",
        root / "models",
        ignore=shutil.ignore_patterns("minilm", "__pycache__", "*.py", "*.md"),
    )
    config = (ROOT / "edgeserve.toml").read_text()
    config, ports = re.subn(r"(?m)^port = 8080$", f"port = {port}", config)
    assert ports == 1, "edgeserve.toml no longer has the default port line"
    (root / "edgeserve.toml").write_text(config)
    (root / "home").mkdir()
    (root / ".readme-env").write_text("")


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    """Every block run once, in README order, against one server (restarted where the
    README says so); each test below then reports one block."""
    root = tmp_path_factory.mktemp("readme")
    # known before the box starts: the README's blocks name 8080 and 8001, rewritten to these
    port, grpc_port = free_port(), free_port()
    lay_out(root, port, grpc_port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESERVE_")}
    env.update(
        HOME=str(root / "home"),
        EDGESERVE_URL=f"http://127.0.0.1:{port}",  # the experiment commands' --url
        PYTHONDONTWRITEBYTECODE="1",
    )
    box = Box(root, port, grpc_port, env)
    started = time.monotonic()
    box.start()
    try:
        for block in BLOCKS:
            box.results[block.name] = box.run(block)
        yield box
    finally:
        box.stop()
        print(f"README blocks: {len(BLOCKS)} in {time.monotonic() - started:.1f} s")


def test_readme_has_the_blocks_this_test_expects() -> None:
    sections = {b.section for b in BLOCKS if b.action != "skip"}
    for section in ("First calls", "Model updates", "Streams, jobs, features and gRPC"):
        assert section in sections
    assert BLOCKS[0].action == "install"
    assert all(b.reason for b in BLOCKS if b.action == "skip")


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_readme_block(box: Box, block: Block) -> None:
    state, output = box.results[block.name]
    if state == "skip":
        pytest.skip(f"README line {block.line}: {output}")
    if state == "install":
        check_install_block(block)
        return
    assert state == "pass", f"README line {block.line} ({block.section}) failed:\n{output}"


def check_install_block(block: Block) -> None:
    """The set-up lines are not run (they would reinstall .venv and rerun this suite):
    install.sh must take each flag they pass, and `.venv/bin/edgeserve serve`, which the
    fixture above starts, must be the command they end with."""
    help_text = subprocess.run(
        ["sh", str(ROOT / "install.sh"), "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    commands = [line.split("#", 1)[0].strip() for line in block.code.splitlines()]
    commands = [c for c in commands if c]
    assert commands, block.code
    for command in commands:
        install, _, rest = command.partition("&&")
        words = install.split()
        assert words[0] == "./install.sh", command
        for flag in words[1:]:
            assert re.search(rf"^\s+{re.escape(flag)}\b", help_text, re.M), (flag, help_text)
        assert rest.split()[0].startswith(".venv/bin/"), command
    assert any(c.endswith(" ".join(SERVE)) for c in commands)
