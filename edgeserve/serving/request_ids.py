"""Ids for requests that bring none: unique within the process, unpredictable, and cheap.

A request id is a capability of sorts: whoever knows it can try to label that request
(`POST /api/feedback`), so another caller must not be able to guess it. Each id is a
keyed BLAKE2b of a counter under a per-process random key: a pseudo-random function,
so ids never repeat in practice and cannot be predicted from earlier ones, at about a
microsecond (no system call per id, unlike `uuid.uuid4()`). 32 hex digits like a uuid4's hex.
"""

from __future__ import annotations

import hashlib
import itertools
import os

_KEY = os.urandom(32)
_COUNTER = itertools.count(1)


def new_request_id() -> str:
    """A 32-hex-digit id no other request of this process has and no client can guess."""
    return hashlib.blake2b(
        next(_COUNTER).to_bytes(8, "little"), key=_KEY, digest_size=16
    ).hexdigest()
