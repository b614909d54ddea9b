"""The updater's error types: few, typed, and safe to show (no keys, no stack traces)."""

from __future__ import annotations


class UpdaterError(Exception):
    """Base of every error the updater raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


REJECT_REASONS: dict[str, str] = {
    "unreadable": "the bundle file cannot be read",
    "too_large": "the bundle, or a file in it, is over the configured size cap",
    "malformed_archive": "not a readable uncompressed tar (truncated, corrupt, too many entries)",
    "unsafe_path": "an archive entry with an absolute path, '..', or an unsafe file name",
    "unsafe_member": "an archive entry that is a link, device, folder or sparse file",
    "duplicate_member": "an archive entry that appears twice",
    "unexpected_member": "an archive entry or payload file the manifest does not list",
    "missing_member": "manifest, signature or a listed payload file is missing",
    "bad_signature": "the manifest signature does not verify with any trusted key",
    "bad_manifest": "the manifest is not well-formed (unknown, missing or mistyped field)",
    "unsupported_format": "the bundle format version is not one this box reads",
    "wrong_model": "the bundle is for another model than the one named",
    "expired": "the bundle's expiry time has passed",
    "not_newer": "the version is not newer than every version installed before",
    "not_for_this_device": "the data key is wrapped for a key this box does not hold",
    "unwrap_failed": "the data key could not be unwrapped (altered or moved manifest)",
    "decrypt_failed": "a payload file fails authenticated decryption (tampered)",
    "digest_mismatch": "a decrypted payload file does not match its SHA-256 and size",
    "validation_failed": "the model failed to load or its validation samples did not pass",
    "changed": "the bundle file was replaced between its signature check and its reading",
}
"""Every `BundleRejected.reason`, with what it means (for docs, audit and API clients)."""


class BundleRejected(UpdaterError):
    """A bundle failed verification or validation; nothing was written.

    `reason` is a stable code (e.g. `bad_signature`, `not_newer`) for audit logs and
    API clients; `message` says what was wrong in words an operator can act on.
    """

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"undocumented rejection reason {reason!r}")  # a bug, not input
        super().__init__(message)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class DecryptionFailed(UpdaterError):
    """An encrypted file could not be opened; `reason` is wrong_key, moved, tampered, ..."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class MasterKeyError(UpdaterError):
    """The at-rest master key is missing, malformed or stored insecurely."""


class StoreError(UpdaterError):
    """The slot store cannot do what was asked (no previous slot, no such model, ...)."""
