"""`batch score --installed`: score with the version installed from a signed, encrypted
bundle (decrypted in memory), the same one the server serves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner, Result

from edgeserve.cli.group import main
from edgeserve.offline.model import load_model
from tests.test_batch_support import digits_rows
from tests.test_updates_kit import DIGITS


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def install_digits_bundle(tmp_path: Path, extra_config: str = "") -> Path:
    """A config whose state dir has digits version 7 (built from repository version 1)
    installed from a signed bundle encrypted for a fleet key; returns the config path."""
    config = tmp_path / "edgeserve.toml"
    config.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n{extra_config}')
    made = run("keys", "bundle-signing-key", str(tmp_path / "signing.pem"))
    public = made.output.strip().splitlines()[-1]
    assert run("keys", "fleet-key", str(tmp_path / "fleet.key")).exit_code == 0
    fleet = tmp_path / "fleet.key"
    updater = f'[updater]\ntrusted_keys = ["{public}"]\nbundle_key_files = ["{fleet}"]\n'
    config.write_text(config.read_text() + updater)
    assert run("keys", "master-init", "--config", str(config)).exit_code == 0
    bundle = tmp_path / "digits-7.bundle"
    created = run(
        "bundle",
        "create",
        str(DIGITS),
        "--version",
        "7",
        "--source-version",
        "1",
        "--signing-key",
        str(tmp_path / "signing.pem"),
        "--recipient",
        str(fleet),
        "--out",
        str(bundle),
    )
    assert created.exit_code == 0, created.output
    assert run("update", "apply", str(bundle), "--config", str(config)).exit_code == 0
    return config


def test_scoring_with_the_installed_bundle_matches_its_source_version(tmp_path: Path) -> None:
    config = install_digits_bundle(tmp_path)
    x, _ = digits_rows()
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"input": r.tolist()}) + "\n" for r in x[:300]))
    output = tmp_path / "out.jsonl"
    scored = run(
        "batch",
        "score",
        "--model",
        "digits",
        str(source),
        "--output",
        str(output),
        "--installed",
        "--config",
        str(config),
        "--no-progress",
        "--json",
    )
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["version"] == 7
    labels = [json.loads(line)["label"] for line in output.read_text().splitlines()]
    expected = load_model(DIGITS.parent, "digits:1").runtime.run({"input": x[:300]}, ["label"])
    assert labels == expected["label"].tolist()
    assert not any(p.suffix == ".onnx" for p in (tmp_path / "state").rglob("*"))

    wrong = run(
        "batch",
        "score",
        "--model",
        "digits:2",
        str(source),
        "--output",
        str(tmp_path / "o2.jsonl"),
        "--installed",
        "--config",
        str(config),
    )
    assert wrong.exit_code == 1 and "version 7 installed, not 2" in wrong.output
    assert np.asarray(labels).size == 300
