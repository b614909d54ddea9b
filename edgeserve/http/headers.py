"""An ASGI middleware for what every response and request share: security headers on the
way out, header count and size limits on the way in (431 before any routing)."""

from __future__ import annotations

from itertools import chain
from urllib.parse import quote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeserve.telemetry.records import RECORD_ID_NAME

SECURITY_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    # Not no-referrer: under it a browser sends `Origin: null` with a same-site form POST,
    # and the dashboard's login refuses what it cannot tell from a cross-site post.
    # same-origin sends nothing to other sites, and the page's own origin to this one.
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]
# "<boot>-<seq>" of the telemetry record an answer left (success or error alike).
TELEMETRY_SEQ = RECORD_ID_NAME.encode()
DASHBOARD_CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


# Visible ASCII but '%': what a client's text may keep in a header value as it is.
_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")


def header_text(value: str) -> str:
    """`value` as a header value: itself when it is visible ASCII, else percent-encoded
    (UTF-8), so that a client's id can never break or forge the response's headers."""
    if value.isascii() and value.isprintable() and " " not in value:
        return value
    return quote(value, safe=_HEADER_SAFE)


def headers_fit(headers: list[tuple[bytes, bytes]], max_headers: int, max_bytes: int) -> bool:
    """Whether a request's headers are within the count and byte limits (else 431).
    The bytes are summed in C (every name and value's length): this runs for each
    inference, and a generator over the pairs cost it ~70 bytecodes."""
    return len(headers) <= max_headers and sum(map(len, chain.from_iterable(headers))) <= max_bytes


class HeaderGuard:
    """Refuse requests with too many or too large headers; add security headers."""

    def __init__(self, app: ASGIApp, max_headers: int, max_header_bytes: int) -> None:
        self.app = app
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if not headers_fit(scope["headers"], self.max_headers, self.max_header_bytes):
            if scope["type"] == "http":
                await _refuse(send, 431, b'{"error": "request headers are too many or too large"}')
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        dashboard = scope.get("path", "").startswith("/dashboard")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = list(SECURITY_HEADERS)
                if dashboard:
                    extra.append((b"content-security-policy", DASHBOARD_CSP))
                present = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [
                    *message.get("headers", []),
                    *((k, v) for k, v in extra if k not in present),
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _refuse(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *SECURITY_HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
