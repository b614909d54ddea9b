"""Triton's explicit model control: load and unload one model on request (admin scope).

Both transports call these (REST `POST /v2/repository/models/{name}/load|unload`, gRPC
`RepositoryModelLoad|Unload`). A load reads the model's folder in the repository again
(model.toml, or a configuration derived from the model file) and serves what is there;
an unload stops every version of the model until it is loaded again, and the server
stays ready meanwhile; so does a load that fails (the model counts for readiness again
once its default version serves). With `[models] load` set, only the models it names
can be loaded. Versions served from an installed bundle belong to the updater
(`edgeserve update rollback`), so those models are refused with 409.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from edgeserve.config.schema import ConfigError
from edgeserve.errors import Conflict, InvalidInput, ModelNotFound, ModelNotReady
from edgeserve.protocol.output_parameters import flag
from edgeserve.serving.model_sync import sync_model
from edgeserve.serving.repository import MODEL_NAME, read_source

log = logging.getLogger(__name__)

MAX_PARAMETERS = 16


async def load_model(state: Any, name: str, parameters: Mapping[str, Any]) -> None:
    """Load (or reload from disk) model `name` from the repository; raise the reason when
    its default version does not serve afterwards."""
    _check_parameters(parameters, allowed=())
    registry = state.registry
    folder = state.settings.models.repository / name
    if not MODEL_NAME.match(name) or not folder.is_dir():
        raise ModelNotFound(f"no model '{name[:64]}' in the model repository")
    _refuse_unlisted(state, name)
    _refuse_installed(state, name)
    try:
        source = await asyncio.to_thread(read_source, folder)
    except ConfigError as exc:
        raise InvalidInput(f"model '{name}' cannot be loaded: {exc}") from None
    async with registry.changing:
        registry.reinstate(name)
        failed = await sync_model(registry, source, _pinned(state))
        # back in readiness only once its default version serves: a failed load must not
        # leave the whole server unready while its other models serve
        registry.settle(name)
    if failed:
        raise ModelNotReady(
            f"model '{name}' failed to load ({'; '.join(_why(registry, name, v) for v in failed)})"
        )
    log.info("model loaded on request model=%s versions=%s", name, list(source.versions))


async def unload_model(state: Any, name: str, parameters: Mapping[str, Any]) -> None:
    """Stop serving every version of `name` (in-flight requests finish first)."""
    _check_parameters(parameters, allowed=("unload_dependents",))
    flag(parameters, "unload_dependents", "unload")  # no ensembles here: nothing depends
    registry = state.registry
    if name not in registry.names():
        raise ModelNotFound(f"unknown model '{name[:64]}'")
    _refuse_installed(state, name)
    async with registry.changing:
        await registry.unload_model(name)
    log.info("model unloaded on request model=%s", name)


def _why(registry: Any, name: str, version: int) -> str:
    status = registry.statuses(name).get(version)
    if status is None or not status.reason:  # the version loaded before still serves
        return f"version {version}: see the server log; the version loaded before still serves"
    return f"version {version}: {status.reason[:200]}"


def _check_parameters(parameters: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    if len(parameters) > MAX_PARAMETERS:
        raise InvalidInput(f"more than {MAX_PARAMETERS} parameters")
    for key in parameters:
        if key in allowed:
            continue
        if key == "config" or key.startswith("file:"):
            raise InvalidInput(
                f"parameter '{key[:64]}' is not supported: put the model and its model.toml "
                "in the model repository, then load it by name"
            )
        raise InvalidInput(f"unknown parameter '{key[:64]}'")


def _pinned(state: Any) -> Any:
    updates = state.updates
    return updates.pinned if updates is not None else set


def _refuse_unlisted(state: Any, name: str) -> None:
    """With `[models] load` set, the server serves those models only: a load on request
    does not add another (edit the setting and reload or restart instead)."""
    listed = state.settings.models.load
    if listed and name not in listed:
        raise Conflict(
            f"model '{name}' is not in the config's models.load ({', '.join(listed)[:200]}); "
            "add it there to serve it"
        )


def _refuse_installed(state: Any, name: str) -> None:
    updates = state.updates
    if updates is not None and name in {n for n, _ in updates.pinned()}:
        raise Conflict(
            f"model '{name}' is served from an installed bundle; "
            "use edgeserve update rollback to change it"
        )
