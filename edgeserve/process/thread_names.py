"""Kernel names for the process's long-lived threads.

Python 3.11 names none of its threads for the kernel: every one shows as `python` in
`top -H`, `ps -L` and /proc/<pid>/task/*/comm, so the telemetry writer's CPU cannot be
told from the runtime's (bench/threadcpu.py reads it by name). Linux only; elsewhere,
or if libc will not do it, the thread keeps its name.
"""

from __future__ import annotations

import ctypes
import sys

PR_SET_NAME = 15  # <linux/prctl.h>
MAX_NAME_BYTES = 15  # the kernel keeps 16 bytes with the terminating NUL


def name_this_thread(name: str) -> None:
    """Set the calling thread's kernel name (cut to 15 bytes)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, name.encode()[:MAX_NAME_BYTES], 0, 0, 0)
    except (OSError, AttributeError):
        return
