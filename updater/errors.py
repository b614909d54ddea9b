"""The updater's error types: few, typed, and safe to show (no keys, no stack traces)."""

from __future__ import annotations


class UpdaterError(Exception):
    """Base of every error the updater raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BundleRejected(UpdaterError):
    """A bundle failed verification or validation; nothing was written.

    `reason` is a stable code (e.g. `bad_signature`, `not_newer`) for audit logs and
    API clients; `message` says what was wrong in words an operator can act on.
    """

    def __init__(self, reason: str, message: str) -> None:
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
