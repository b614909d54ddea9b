"""Shared fixtures: a real edgeserve server on a loopback port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.serving import RunningServer, run_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server per test module, on the bundled demo models, auth off (loopback)."""
    with run_server(tmp_path_factory.mktemp("server"), "[auth]\nenabled = false\n") as running:
        yield running
