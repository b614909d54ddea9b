"""Optional parts of edgeserve and the extra that installs each: a command that needs one
that is missing says so in one line, instead of a ModuleNotFoundError traceback."""

from __future__ import annotations

import importlib.util

from edgeserve.cli.options import fail

# module -> the extra of `pip install 'edgeserve[EXTRA]'` that brings it
EXTRA_OF = {"pyarrow": "batch", "grpc": "grpc", "tritonclient": "grpc", "pyspark": "spark"}


def missing_extra(module: str) -> str | None:
    """The one-line message for `module` when it is not installed, else None."""
    if importlib.util.find_spec(module) is not None:
        return None
    extra = EXTRA_OF[module]
    return (
        f"{module} is not installed; install the '{extra}' extra: pip install 'edgeserve[{extra}]'"
    )


def require(module: str, what: str) -> None:
    """Exit 1 with one line naming the extra when `what` needs `module` and it is missing."""
    message = missing_extra(module)
    if message is not None:
        fail(f"{what} needs {message}")
