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

The same answer (`EdgeserveApp.answer_infer`: status, headers, body) is what uvicorn's
protocol writes without any ASGI when the request's body is all there
(edgeserve/http/request_cycle.py); here it is sent as a Starlette response.
"""

from __future__ import annotations

from collections.abc import Awaitable
from operator import methodcaller
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers, State
from starlette.requests import Request, empty_send
from starlette.types import Receive, Scope, Send

from edgeserve.audit.routes import audit_response, audits_every_status
from edgeserve.http.answers import RestAnswer, to_response
from edgeserve.http.headers import SECURITY_HEADERS, headers_fit
from edgeserve.http.routes import answer_infer, infer
from edgeserve.http.shedding import SHED_TESTED, headers_for, infer_path_target, leave, shed

FORBIDDEN = 403
# Whether an inference may leave an audit row whatever its status (no: only a 403 can)
_INFER_AUDITED_ALWAYS = audits_every_status(infer, "POST")


class EdgeserveApp(Starlette):
    """Starlette, with inference requests dispatched directly (see the module doc)."""

    def __init__(
        self, *args: Any, max_headers: int, max_header_bytes: int, direct_infer: bool, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.state = _AttributeState()
        self._max_headers = max_headers
        self._max_header_bytes = max_header_bytes
        # What uvicorn's protocol asks to answer an inference without ASGI at all
        # (edgeserve/http/request_cycle.py); None when every request takes the stack.
        self.infer_answerer: EdgeserveApp | None = self if direct_infer else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = None
        try:
            target = (
                self.infer_target(scope)
                if self.infer_answerer is not None and scope["type"] == "http"
                else None
            )
            if target is not None:
                answer = await self.answer_infer(scope, receive, *target)
                answer.headers += SECURITY_HEADERS  # as uvicorn's cycle writes them
                await to_response(answer)(scope, receive, send)
                status = answer.status
                return
            await super().__call__(scope, receive, send)
        finally:
            self.infer_answered(scope, status)

    def infer_target(self, scope: Scope) -> tuple[str, str | None] | None:
        """The model and version of an inference request this app answers past the stack:
        a POST .../infer within the header limits (else the stack's HeaderGuard answers
        431)."""
        # the parser's shed test matched the path already, else it is matched here
        target = scope.get(SHED_TESTED) or infer_path_target(scope)
        if target is None or not headers_fit(
            scope["headers"], self._max_headers, self._max_header_bytes
        ):
            return None
        return target

    def answer_infer(
        self, scope: Scope, receive: Receive, model: str, version: str | None
    ) -> Awaitable[RestAnswer]:
        """The answer to an `infer_target` request: the shed test (unless the HTTP parser
        made it), then the endpoint's rules (`routes.answer_infer`), whose coroutine is
        returned to be awaited (a coroutine of its own here cost every inference ~15
        bytecodes). The writer adds the security headers the stack's HeaderGuard would."""
        if SHED_TESTED not in scope:
            refusal = shed(model, version, self, scope)
            if refusal is not None:
                return _answered(RestAnswer(429, _shed_headers(refusal), refusal))
        scope["app"] = self
        scope["endpoint"] = infer
        params = {"model": model} if version is None else {"model": model, "version": version}
        scope["path_params"] = params
        return answer_infer(_InferRequest(scope, receive, self), model, version)

    def infer_answered(self, scope: Scope, status: int | None) -> None:
        """After the answer is written (`status`; None when none was): the audit row of a
        403, and the loop gate that admitted the request (edgeserve/http/shedding.py) is
        told it is answered."""
        try:
            if status is not None and (status == FORBIDDEN or _INFER_AUDITED_ALWAYS):
                audit_response(scope, status)
        finally:
            leave(scope)  # admitted by the HTTP parser's gate, answered whichever way


def _shed_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    """A shed 429's headers as an answer holds them: no length, no security headers."""
    return [h for h in headers_for(body) if h[0] != b"content-length" and h not in SECURITY_HEADERS]


async def _answered(answer: RestAnswer) -> RestAnswer:
    return answer


class _AttributeState(State):
    """Starlette's State with each entry set also a plain attribute: State answers each
    read through a failed lookup and a Python `__getattr__` (~0.8 µs), and an inference
    read about eleven of the app's (`state.registry`, `.pipeline`, `.recorder`...) and
    its own principal."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        object.__setattr__(self, "_state", {} if state is None else state)

    def __setattr__(self, key: Any, value: Any) -> None:
        self._state[key] = value  # State's own, written in: the principal, per request
        object.__setattr__(self, key, value)

    def __delattr__(self, key: Any) -> None:
        super().__delattr__(key)
        object.__delattr__(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        self.__setattr__(key, value)

    def __delitem__(self, key: str) -> None:
        self.__delattr__(key)


_LATIN1 = methodcaller("decode", "latin-1")


class _IndexedHeaders(Headers):
    """Request headers looked up in a dict built once, in C: an inference asks for about
    eight headers, and Starlette's Headers scans the whole list, lower-casing, for each.
    `get` is the dict's own, so a name is looked up as given: the readers of an
    inference ask in lower case, as ASGI names are (`[]` and `in` still lower-case)."""

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._list = raw  # what Headers' other methods (items, getlist) read
        names, values = zip(*reversed(raw), strict=True) if raw else ((), ())
        # reversed: the first of a repeated name wins
        index = dict(zip(map(_LATIN1, names), map(_LATIN1, values), strict=True))
        self._index = index
        self._repeated = len(index) != len(raw)  # getlist must then see them all
        self.get = index.get  # type: ignore[method-assign]

    def __getitem__(self, key: str) -> str:
        return self._index[key.lower()]

    def __contains__(self, key: Any) -> bool:
        return isinstance(key, str) and key.lower() in self._index

    def getlist(self, key: str) -> list[str]:
        """Every value of `key` (the authenticator refuses two Authorization headers)."""
        if self._repeated:
            return super().getlist(key)
        value = self._index.get(key.lower())
        return [] if value is None else [value]


class _InferRequest(Request):
    """A Request for `routes.answer_infer` whose parts are plain attributes made once:
    Starlette makes each through a property on every read, `headers` and `state` after
    a failed `hasattr`. Its readers (auth, the body reader, the data plane's meta, the
    error mapper) use `app`, `headers`, `state` and `receive`; the rest is Starlette's,
    read from the scope: `client` too, which only a refusal reads (auth's log line)."""

    app: Any = None
    headers: Headers = None  # type: ignore[assignment]
    state: State = None  # type: ignore[assignment]
    receive: Receive = None  # type: ignore[assignment]
    # Request's own, as Request.__init__ sets them: methods that change them set their own
    _send = staticmethod(empty_send)
    _stream_consumed = _is_disconnected = False
    _form = None

    def __init__(self, scope: Scope, receive: Receive, app: Any) -> None:
        self.scope = scope
        self._receive = self.receive = receive
        self.app = app
        self.headers = _IndexedHeaders(scope["headers"])
        # where the guard leaves the principal, for the audit row
        self.state = _AttributeState(scope.setdefault("state", {}))
