"""The [updater] settings section: defaults, documented keys, refused values."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeserve.config.loader import ConfigError, load_settings
from updater import TrustedKeys, public_key_text


def _load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "edgeserve.toml"
    path.write_text(text)
    return load_settings(path).updater


def test_defaults_are_safe(tmp_path: Path) -> None:
    updater = _load(tmp_path, "")
    assert updater.trusted_keys == [] and updater.poll_url == ""
    assert updater.max_unconfirmed_boots == 3 and updater.master_key_file is None


def test_trusted_keys_in_base64_and_pem_form_a_trust_set(tmp_path: Path) -> None:
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pem = (
        b.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    updater = _load(tmp_path, f'[updater]\ntrusted_keys = ["{public_key_text(a)}", """{pem}"""]\n')
    assert len(TrustedKeys.from_texts(updater.trusted_keys)) == 2


BROKEN = [
    ('trusted_keys = ["not a key"]', "updater: trusted_keys[0]: trusted key"),
    ("trusted_keys = [1]", "updater.trusted_keys[0]: must be a string"),
    ('poll_url = "http://example.com/index.json"', "poll_url: must be an https:// URL"),
    ("max_error_rate = 1.5", "updater.max_error_rate: must be <= 1.0"),
    ("max_unconfirmed_boots = -1", "updater.max_unconfirmed_boots: must be >= 0"),
    ("max_bundle_bytes = 10", "updater.max_bundle_bytes: must be >= 1024"),
    ('master_key_file = ""', "updater.master_key_file: must be a non-empty path"),
    ("watch_window = 10", "updater.watch_window: unknown key"),
]


@pytest.mark.parametrize(("line", "message"), BROKEN, ids=[m for _, m in BROKEN])
def test_broken_updater_settings_name_the_key(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _load(tmp_path, f"[updater]\n{line}\n")
