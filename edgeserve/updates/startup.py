"""The update manager for a server start, or None when [updater] is off."""

from __future__ import annotations

from edgeserve.config.loader import Settings
from edgeserve.config.schema import ConfigError
from edgeserve.runtime import ThreadPlan
from edgeserve.updates.keyring import open_store
from edgeserve.updates.service import Audit, UpdateManager
from updater import MasterKeyError

__all__ = ["UpdateManager", "build_update_manager"]


def build_update_manager(
    settings: Settings, threads: ThreadPlan, audit: Audit | None = None
) -> UpdateManager | None:
    """The manager for a server start, or None when [updater] is off.

    Key problems (a master key file others can read, a bad bundle key file) are
    ConfigError: the server refuses to start and says why in one line.
    """
    if not settings.updater.enabled:
        return None
    try:
        store = open_store(settings, create_key=True)
    except MasterKeyError as exc:
        raise ConfigError("updater", exc.message) from None
    except OSError as exc:
        raise ConfigError("updater", f"cannot read or create a key: {exc}") from None
    except ValueError as exc:
        raise ConfigError("updater.bundle_key_files", str(exc)) from None
    return UpdateManager(settings, store, lambda: open_store(settings), threads, audit)
