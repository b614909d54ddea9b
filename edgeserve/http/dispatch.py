"""POST .../infer straight to its endpoint, past Starlette's middleware stack and router.

Inference is nearly all the traffic, and on two cores the event loop's time per request
is time the model does not get: for MiniLM the loop's share decides whether the server
keeps up with the runtime. The stack costs each request a call and a `send` wrapper per
middleware (audit, headers, shed, exception handling, server errors), the router's
scan, and Starlette's endpoint wrapper. `EdgeserveApp` answers an infer request with the
same parts in one place: the header limits (requests over them take the ordinary way,
which answers 431), the shed test, the `@requires("infer")` endpoint itself (auth,
validation, experiments, telemetry), the same exception handlers, the security headers,
and the audit row for a 403. With CORS configured every request takes the ordinary way,
so that CORSMiddleware sees it.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers, State
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from edgeserve.audit.routes import audit_response
from edgeserve.errors import EdgeserveError
from edgeserve.http.errors import on_edgeserve_error, on_unexpected
from edgeserve.http.headers import SECURITY_HEADERS, headers_fit
from edgeserve.http.routes import infer
from edgeserve.http.shedding import INFER_PATH, SHED_TESTED, leave, send_shed, shed


class EdgeserveApp(Starlette):
    """Starlette, with inference requests dispatched directly (see the module doc)."""

    def __init__(
        self, *args: Any, max_headers: int, max_header_bytes: int, direct_infer: bool, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.state = _AttributeState()
        self._max_headers = max_headers
        self._max_header_bytes = max_header_bytes
        self._direct_infer = direct_infer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if self._direct_infer and scope["type"] == "http" and scope["method"] == "POST":
                match = INFER_PATH.fullmatch(scope["path"])
                if match is not None and headers_fit(
                    scope["headers"], self._max_headers, self._max_header_bytes
                ):
                    scope["app"] = self
                    await _infer(scope, receive, send, match.group(1), match.group(2))
                    return
            await super().__call__(scope, receive, send)
        finally:
            leave(scope)  # admitted by the HTTP parser's gate, answered whichever way


async def _infer(
    scope: Scope, receive: Receive, send: Send, model: str, version: str | None
) -> None:
    if not scope.get(SHED_TESTED):
        refusal = shed(scope["path"], scope["app"], scope)
        if refusal is not None:
            await send_shed(send, refusal)
            return
    scope["endpoint"] = infer
    params = {"model": model} if version is None else {"model": model, "version": version}
    scope["path_params"] = params
    request = _InferRequest(scope, receive)
    response: Response
    try:
        response = await infer(request)
    except EdgeserveError as exc:
        response = await on_edgeserve_error(request, exc)
    except Exception as exc:  # answered 500 with an incident id; on_unexpected logs it
        response = await on_unexpected(request, exc)
    response.raw_headers.extend(SECURITY_HEADERS)
    await response(scope, receive, send)
    audit_response(scope, response.status_code)


class _AttributeState(State):
    """Starlette's State with each entry set also a plain attribute: State answers each
    read through a failed lookup and a Python `__getattr__` (~0.8 µs), and an inference
    read about eleven of the app's (`state.registry`, `.pipeline`, `.recorder`...) and
    its own principal."""

    def __setattr__(self, key: Any, value: Any) -> None:
        super().__setattr__(key, value)
        object.__setattr__(self, key, value)

    def __delattr__(self, key: Any) -> None:
        super().__delattr__(key)
        object.__delattr__(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        self.__setattr__(key, value)

    def __delitem__(self, key: str) -> None:
        self.__delattr__(key)


class _IndexedHeaders(Headers):
    """Request headers looked up in a dict built once. An inference asks for about eight
    headers, and Starlette's Headers scans the whole list, lower-casing, for each."""

    def __init__(self, scope: Scope) -> None:
        super().__init__(scope=scope)
        index: dict[str, str] = {}
        repeated = False
        for name, value in self._list:  # ASGI header names are lower case
            key = name.decode("latin-1")
            if key in index:
                repeated = True  # first wins here; getlist sees them all
            else:
                index[key] = value.decode("latin-1")
        self._index = index
        self._repeated = repeated

    def __getitem__(self, key: str) -> str:
        return self._index[key.lower()]

    def __contains__(self, key: Any) -> bool:
        return isinstance(key, str) and key.lower() in self._index

    def get(self, key: str, default: Any = None) -> Any:
        return self._index.get(key.lower(), default)

    def getlist(self, key: str) -> list[str]:
        """Every value of `key` (the authenticator refuses two Authorization headers)."""
        if self._repeated:
            return super().getlist(key)
        value = self._index.get(key.lower())
        return [] if value is None else [value]


class _InferRequest(Request):
    """A Request whose headers are `_IndexedHeaders` and whose state (where the guard
    leaves the principal) reads as plain attributes, both made up front: Starlette makes
    them on first use, after a failed `hasattr` each."""

    def __init__(self, scope: Scope, receive: Receive) -> None:
        super().__init__(scope, receive)
        self._headers = _IndexedHeaders(scope)
        self._state = _AttributeState(scope.setdefault("state", {}))
