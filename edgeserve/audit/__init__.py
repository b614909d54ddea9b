"""The audit log: who did what to the box, tamper-evident, in `<state_dir>/audit.db`.

Other modules record through the running log on the app:

    request.app.state.audit.record(
        "update.install",          # action: <area>.<verb>
        "digits",                  # target: what it was done to
        "ok",                      # outcome: ok | rejected | denied | failed | error
        subject=request.state.principal.subject,
        client=request.client.host if request.client else "",
        detail={"version": 3},     # small JSON; never tokens, keys or payloads
    )

`record` never blocks the event loop and never raises; one writer thread chains and
commits (WAL, synchronous=FULL). Secret-looking keys in `detail` are redacted and long
strings cut. Auth failures arrive through the authenticator's `on_refused` hook and
403s and admin requests through `AuditMiddleware`; floods of identical refusals are
aggregated per client per second. Commands that run without the server append with
`record_now(state_dir, action, target, outcome, subject=..., detail=...)`, which is safe
beside a running server. `edgeserve audit verify` checks the chain.

Modules: `chain` (SQLite, hashing, pruning, verification), `log` (the writer),
`routes` (`GET /api/audit`, the middleware), `cli`, `settings` ([audit]).
"""

from __future__ import annotations

from edgeserve.audit.chain import ChainReport, verify
from edgeserve.audit.log import AuditLog, record_now
from edgeserve.audit.settings import AuditSettings

__all__ = ["AuditLog", "AuditSettings", "ChainReport", "record_now", "verify"]
