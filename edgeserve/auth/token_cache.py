"""Verified-token cache: a bearer token's signature is checked once, not on every request.

A client sends the same token with each call, and pyjwt's EdDSA verify costs more than the
rest of an inference. Modelled on Envoy's `jwt_authn` cache: a bounded LRU holding the
verified Principal until the earlier of `exp - leeway` and a change of the trusted key set.

- Keyed by a keyed BLAKE2b digest of the token (the key is random per cache), so the
  tokens themselves are never kept where a memory or dict dump would show them.
- Only tokens that passed verification are put in: a flood of bad tokens neither grows it
  nor evicts good ones.
- `not_before <= now < exp - leeway` is re-checked on every hit, against `clock`.
- A different key-set generation (rotation, revocation, a JWKS refresh that changed the
  keys) empties it, and a principal verified under an older generation is not put back.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from edgeserve.auth.principal import Principal

DIGEST_BYTES = 32

# principal, first and last+1 wall-clock second the cache may vouch for it
_Entry = tuple[Principal, float, float]


class VerifiedTokenCache:
    """A bounded LRU of verified principals by token digest; `max_entries == 0` is off."""

    def __init__(
        self, max_entries: int, leeway_s: float, *, clock: Callable[[], float] = time.time
    ) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.max_entries = max_entries
        self.leeway_s = leeway_s
        self.clock = clock  # wall clock: JWT times are seconds since the epoch
        self.hits = 0
        self.misses = 0
        self._salt = secrets.token_bytes(16)
        # The keyed state, made once: each token's digest starts from a copy of it, so the
        # key block is not hashed again per request (a fifth of the digest's time).
        self._keyed = hashlib.blake2b(digest_size=DIGEST_BYTES, key=self._salt)
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._generation = -1  # KeySet generations start at 0 and only grow
        # Starlette endpoints share one loop, but the sync `authenticate` may run in threads.
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        """Whether `key` is held at all (valid or not); counts nothing."""
        return key in self._entries

    def key(self, token: str) -> bytes:
        """The digest a token is stored under: keyed BLAKE2b of the token."""
        digest = self._keyed.copy()
        digest.update(token.encode())
        return digest.digest()

    def get(self, key: bytes, generation: int) -> Principal | None:
        """The cached principal, or None if absent, out of its time window or stale."""
        now = self.clock()
        with self._lock:
            if generation != self._generation:
                self._follow(generation)
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            principal, not_before, not_after = entry
            if not not_before <= now < not_after:
                del self._entries[key]
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return principal

    def put(self, key: bytes, principal: Principal, generation: int) -> None:
        """Remember a principal that was just verified with the key set of `generation`."""
        if not self.enabled:
            return
        claims = principal.claims
        # The verifier has checked these are integers; iat and nbf are both "not before".
        not_before = max(claims["iat"], claims.get("nbf", claims["iat"])) - self.leeway_s
        not_after = claims["exp"] - self.leeway_s
        if not not_before <= self.clock() < not_after:
            return
        with self._lock:
            self._follow(generation)
            if generation != self._generation:
                return  # verified with keys that have changed since
            self._entries[key] = (principal, not_before, not_after)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def _follow(self, generation: int) -> None:
        """Empty the cache when the trusted keys have changed (call with the lock held)."""
        if generation > self._generation:
            self._entries.clear()  # nothing here is vouched for by the new keys
            self._generation = generation

    def lookups(self) -> dict[tuple[str, ...], float]:
        """Hits and misses by label value, the shape a Prometheus read-counter takes."""
        return {("hit",): self.hits, ("miss",): self.misses}
