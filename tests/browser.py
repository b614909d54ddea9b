"""Drive Debian's headless Chromium over the DevTools protocol, for dashboard tests."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect

from tests.serving import free_port
from tests.waiting import wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--window-size=1280,2000",
]


class Page:
    """One tab: send commands, collect console errors."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.console_errors: list[str] = []
        self.events: list[dict] = []

    def send(self, method: str, **params: Any) -> dict:
        message_id = next(self.ids)
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._event(message)

    def _event(self, message: dict) -> None:
        method = message.get("method", "")
        params = message.get("params", {})
        self.events.append(message)
        if method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.console_errors.append(json.dumps(params.get("args"))[:300])
        elif method == "Runtime.exceptionThrown":
            self.console_errors.append(json.dumps(params.get("exceptionDetails"))[:300])
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            self.console_errors.append(params["entry"].get("text", "")[:300])

    def navigate(self, url: str) -> None:
        """Load `url` and wait for *its* document: right after Page.navigate the old one
        may still answer "complete", and evaluating while it is replaced fails."""
        self._mark_document()
        self.send("Page.navigate", url=url)
        self._wait_new_document(30, "the page did not load")

    def submit(self, expression: str, timeout_s: float = 30) -> None:
        """Run `expression` (which submits a form) and wait for the next document."""
        self._mark_document()
        self.evaluate(expression)
        self._wait_new_document(timeout_s, "the form submission did not load a new page")

    def _mark_document(self) -> None:
        self.evaluate("window.__previousDocument = true")

    def _wait_new_document(self, timeout_s: float, failure: str) -> None:

        def loaded() -> bool:
            try:
                state = self.evaluate(
                    "window.__previousDocument === true ? 'previous' : document.readyState"
                )
            except RuntimeError as exc:  # evaluated while the document was being replaced
                if "navigated or closed" not in str(exc) and "context" not in str(exc):
                    raise
                return False
            return state == "complete"

        wait_until(loaded, timeout_s, failure)

    def evaluate(self, expression: str) -> Any:
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)[
            "result"
        ].get("value")

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(data["data"]))

    def drain(self, seconds: float = 0.5) -> None:
        """Collect events (late console errors) for a moment."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with suppress(TimeoutError):
                self._event(json.loads(self.ws.recv(timeout=0.1)))


@contextmanager
def chromium_page() -> Iterator[Page]:
    if CHROMIUM is None:
        raise RuntimeError("chromium is not installed (apt-get install chromium)")
    port = free_port()  # chromium takes its DevTools port on its command line
    profile = tempfile.mkdtemp(prefix="edgeserve-chromium-")
    process = subprocess.Popen(
        [
            CHROMIUM,
            *FLAGS,
            f"--remote-debugging-port={port}",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def open_pages() -> list[dict]:
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=1).json()
            except httpx.TransportError:
                return []
            return [t for t in targets if t.get("type") == "page"]

        pages = wait_until(open_pages, 30, "chromium's DevTools port", interval_s=0.1)
        with connect(pages[0]["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024) as ws:
            page = Page(ws)
            for domain in ("Page", "Runtime", "Log", "Network"):
                page.send(f"{domain}.enable")
            yield page
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(profile, ignore_errors=True)
