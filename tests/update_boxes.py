"""A box driven only from outside: its config, its state folder, the real `edgeserve` CLI
in a subprocess, and the checks that say whether it still works without a hand on it.

Shared by the interruption regression tests and the crash-point test (issue 22).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.serving import MODELS
from tests.test_updater_kit import validate_with_onnxruntime
from tests.test_updates_kit import UpdateKit
from updater import MasterKey, file_key_id
from updater.fsync import TEMP_NAME
from updater.masterkey import parse_key_material

MODEL = "digits"
STRAY = re.compile(r"^(\.tmp-[ab]|\.current\.tmp|\.state\.json\.tmp|upload-.*|.*\.rotating)$")


@dataclass(frozen=True)
class Author:
    """Keys and two real signed digits bundles (v3 from models/digits/1, v4 from /2)."""

    kit: UpdateKit
    v3: Path
    v4: Path

    @classmethod
    def make(cls, root: Path) -> Author:
        kit = UpdateKit(root)
        shutil.rmtree(kit.state_dir)  # boxes start without any key: a first start
        return cls(kit, kit.bundle(3, 1), kit.bundle(4, 2))

    def config(self, state_dir: Path, extra: str = "") -> str:
        models = f'[models]\nrepository = "{MODELS}"\nload = ["digits"]\n'
        server = f'[server]\nstate_dir = "{state_dir}"\nhost = "127.0.0.1"\nport = 1\n'
        return f"{server}{extra}\n{models}" + self.kit.config()


@dataclass(frozen=True)
class Box:
    """One box: `root/edgeserve.toml` and `root/state`."""

    root: Path
    author: Author

    @classmethod
    def fresh(cls, root: Path, author: Author, extra: str = "") -> Box:
        root.mkdir(parents=True, exist_ok=True)
        (root / "edgeserve.toml").write_text(author.config(root / "state", extra))
        return cls(root, author)

    def copy(self, root: Path) -> Box:
        """The same box in another folder (state copied, config re-pointed)."""
        if (self.state).exists():
            shutil.copytree(self.state, root / "state", symlinks=True)
        text = (self.root / "edgeserve.toml").read_text().replace(str(self.root), str(root))
        root.mkdir(parents=True, exist_ok=True)
        (root / "edgeserve.toml").write_text(text)
        return Box(root, self.author)

    def set_port(self, port: int | str) -> None:
        """Point the config's [server] port at `port` (the CLI ignores it)."""
        text = self.config.read_text()
        self.config.write_text(re.sub(r"(?m)^port = .*$", f"port = {port}", text, count=1))

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def config(self) -> Path:
        return self.root / "edgeserve.toml"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGESERVE_", "UPDATER_"))}
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # the same syscalls on every run
        return env

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "edgeserve", *args, "--config", str(self.config)]

    def cli(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*args),
            cwd=self.root,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def ok(self, *args: str) -> str:
        done = self.cli(*args)
        assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stderr}"
        return done.stdout

    def status(self) -> list[dict]:
        """`update status --json` (all models), which must work whatever happened before."""
        return json.loads(self.ok("update", "status", "--json"))

    def active_version(self) -> int | None:
        docs = [d for d in self.status() if d["model"] == MODEL]
        if not docs or docs[0]["active"] is None:
            return None
        doc = docs[0]
        return doc["slots"][doc["active"]]["version"]


def journal_version(state: Path) -> int | None:
    """The active version the journal records (read directly: no process to start)."""
    path = state / "models" / MODEL / "state.json"
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    return doc["slots"][doc["active"]]["version"] if doc["active"] else None


def strays(state: Path) -> list[str]:
    """Leftovers no entry point should leave: temp names, pending journals, empty keys."""
    found = []
    for path in sorted(state.rglob("*")):
        if TEMP_NAME.match(path.name) or STRAY.match(path.name):
            found.append(f"temp name {path}")
    keys = state / "keys"
    for path in sorted(keys.glob("*")) if keys.is_dir() else []:
        if path.is_file() and not path.read_bytes().strip():
            found.append(f"empty key file {path}")
    for journal in sorted(state.glob("models/*/state.json")):
        if json.loads(journal.read_text())["pending"] is not None:
            found.append(f"pending operation in {journal}")
    return found


def serving_path_version(box: Box) -> int | None:
    """What a server start would serve, read the way it reads it (record the boot, decrypt
    the current slot, digest-check every file) and run on its own validation samples."""
    from edgeserve.config.loader import load_settings
    from edgeserve.runtime import ThreadPlan
    from edgeserve.updates.startup import build_update_manager

    manager = build_update_manager(load_settings(box.config), ThreadPlan())
    assert manager is not None
    installed = manager.boot()
    found = [item for item in installed if item.name == MODEL]
    if not found:
        assert not (box.state / "models" / MODEL / "current").exists(), "installed, not loaded"
        return None
    validate_with_onnxruntime(found[0].files, found[0].manifest)
    return found[0].manifest.version


def master_key_ids(state: Path) -> set[str]:
    """Ids of the master key files present (master.key, master.key.next)."""
    ids = set()
    for path in (state / "keys").glob("master.key*"):
        ids.add(MasterKey(parse_key_material(path.read_bytes(), str(path))).key_id)
    return ids


def payload_key_ids(state: Path) -> set[str]:
    return {file_key_id(p) for p in state.glob("models/*/slots/[ab]/payload/*.enc")}
