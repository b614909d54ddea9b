"""Experiments as the server runs them: definitions, persistence, routing, decisions.

State lives in `<state_dir>/experiments.json`, rewritten atomically on every change
(write temp, fsync, rename, fsync the folder), so a restart resumes every experiment
with the same salts, weights and stage. The decision loop runs the report for each
`auto` experiment every `decision_interval_s` and acts on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from edgeserve.errors import Conflict, InvalidInput, NotFound
from edgeserve.experiments import drift
from edgeserve.experiments.agreement import observe_agreement, summarise
from edgeserve.experiments.drift import DriftCheck
from edgeserve.experiments.drift_watch import DriftWatch
from edgeserve.experiments.flags import Flag, FlagStore, flag_from_json
from edgeserve.experiments.model import Experiment, check_new, experiment_from_json
from edgeserve.experiments.observations import observe
from edgeserve.experiments.report import build_report
from edgeserve.experiments.router import ExperimentRouter
from edgeserve.experiments.settings import ExperimentSettings
from updater.fsync import write_atomic

log = logging.getLogger(__name__)

ACTIONS = {"pause": "paused", "resume": "active", "stop": "stopped", "conclude": "concluded"}


class ExperimentService:
    def __init__(
        self,
        settings: ExperimentSettings,
        state_dir: Path,
        known_models: Callable[[], dict[str, list[int]]],
        promote: Callable[[str, int], None],  # synchronous: start-up restores through it too
        audit: Callable[[str, str, str, str, dict], None] | None = None,
        installed: Callable[[str], bool] = lambda model: False,
        alert: Callable[[str, str, float, str], Awaitable[None]] | None = None,
        serving: Callable[[], dict[str, list[int]]] | None = None,
    ) -> None:
        self.settings = settings
        self.path = state_dir / "experiments.json"
        self.telemetry_db = state_dir / "telemetry.db"
        self._known_models = known_models
        self._serving = serving or known_models  # loaded versions: the ones drift checks
        self._promote = promote
        self._installed = installed  # the updater's installed slot sets that model's default
        self._audit = audit or (lambda action, target, outcome, subject, detail: None)
        self.flags = FlagStore([flag_from_json(n, d) for n, d in settings.flags.items()])
        self.router = ExperimentRouter(self.flags)
        self.experiments: dict[str, Experiment] = {}
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self.shadow_in_flight = 0
        self.shadow_skipped = 0
        self.shadow_tasks: set[asyncio.Task] = set()
        # Reports of concluded experiments: nothing reaches them any more, so each is
        # computed once (the dashboard reads every report on every load).
        self._concluded_reports: dict[str, dict[str, Any]] = {}
        self._alert = alert  # (rule, "firing" | "resolved", value, message): telemetry's path
        self.drift: list[DriftCheck] = []  # the latest check of every version
        self._drifting: set[tuple[str, str]] = set()
        self._drift_task: asyncio.Task | None = None
        self._drift_watch = DriftWatch(self.telemetry_db, state_dir / "drift-baselines.db")

    # -- state --------------------------------------------------------------------
    def load(self) -> None:
        """Saved state first; config definitions are added when not saved yet.

        With runtime_changes = false the config is the whole truth on every start (a
        replica keeping its volume must agree with a fresh one after a ConfigMap change):
        see `_declared`."""
        saved: dict[str, Any] = {}
        if self.path.exists():
            saved = json.loads(self.path.read_text())
        known = self._known_models()
        for doc in saved.get("experiments", []):
            try:
                exp = experiment_from_json(doc, known_models=known)
            except InvalidInput as exc:
                log.error("saved experiment skipped id=%s reason=%r", doc.get("id"), str(exc))
                continue
            self.experiments[exp.id] = exp
        if self.settings.runtime_changes:  # else the config's flags stand as declared
            for name, doc in saved.get("flags", {}).items():
                self.flags.put(flag_from_json(name, doc))
            for doc in self.settings.define:
                if doc.get("id") not in self.experiments:
                    exp = experiment_from_json(doc, known_models=known)
                    exp.note("created", "from the config")
                    self.experiments[exp.id] = exp
        else:
            self.experiments = self._declared(self.experiments, known)
        self._check_one_active_per_model()
        self._publish()
        self._restore_promotions()

    def _declared(
        self, saved: dict[str, Experiment], known: dict[str, list[int]]
    ) -> dict[str, Experiment]:
        """Experiments rebuilt from `define`, with the runtime state of saved ones.

        Only the decision engine changes a declared experiment at run time, so what is
        carried over is what it writes (stage, decision, history, running p-values; a
        concluded experiment stays concluded with its final weights). A redefinition
        with other variants starts afresh: the old state is about other versions. A saved
        experiment no longer declared is kept for its report and history but stopped."""
        out: dict[str, Experiment] = {}
        for doc in self.settings.define:
            exp = experiment_from_json(doc, known_models=known)
            old = saved.pop(exp.id, None)
            same = old is not None and [(v.name, v.version) for v in old.variants] == [
                (v.name, v.version) for v in exp.variants
            ]
            if old is None or not same:
                exp.note("created", "from the config" if old is None else "redefined in the config")
            else:
                exp.created, exp.history, exp.running_p = old.created, old.history, old.running_p
                exp.decision, exp.reason = old.decision, old.reason
                exp.promoted_version = old.promoted_version
                if exp.stages:
                    exp.stage = min(old.stage, len(exp.stages) - 1)
                    exp.set_candidate_share(exp.stages[exp.stage])
                if old.status == "concluded":
                    exp.status, exp.variants = "concluded", old.variants
            out[exp.id] = exp
        for exp in saved.values():
            if exp.status in ("active", "paused"):
                exp.status = "stopped"
                exp.note("stop", "removed from the config")
            out[exp.id] = exp
        return out

    def _restore_promotions(self) -> None:
        """Serve each model's latest promoted version again after a restart.

        A promotion sets the registry's default version, which lives in memory; without
        this a restart went back to model.toml's default_version (often the control).
        Models installed by the updater are left alone: their installed slot decides.
        """
        latest: dict[str, tuple[float, int]] = {}
        for exp in self.experiments.values():
            if exp.decision != "promoted" or exp.promoted_version is None:
                continue
            when = max((h["time"] for h in exp.history if h.get("event") == "promoted"), default=0)
            if exp.model not in latest or when >= latest[exp.model][0]:
                latest[exp.model] = (when, exp.promoted_version)
        for model, (_, version) in sorted(latest.items()):
            if self._installed(model):
                log.info("promotion not restored model=%s reason=installed by the updater", model)
                continue
            self._promote(model, version)
            log.info("promotion restored model=%s version=%s", model, version)

    def _check_one_active_per_model(self) -> None:
        models = [e.model for e in self.experiments.values() if e.status == "active"]
        dupes = {m for m in models if models.count(m) > 1}
        if dupes:
            raise InvalidInput(f"model {sorted(dupes)[0]!r} has more than one active experiment")

    def _publish(self) -> None:
        self.router.publish(list(self.experiments.values()))
        self._save()

    def _save(self) -> None:
        doc = {
            "experiments": [e.to_json() for e in self.experiments.values()],
            "flags": {
                f.name: {"enabled": f.enabled, "rollout_percent": f.rollout_percent}
                for f in self.flags.all()
            },
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(doc, indent=1).encode())

    # -- API ----------------------------------------------------------------------
    def get(self, exp_id: str) -> Experiment:
        exp = self.experiments.get(exp_id)
        if exp is None:
            raise NotFound(f"unknown experiment '{exp_id[:64]}'")
        return exp

    def _refuse_if_declared(self, what: str) -> None:
        if not self.settings.runtime_changes:
            raise Conflict(
                f"{what} are declared in the configuration on this server "
                "([experiments] runtime_changes = false), so that every replica agrees: "
                "change [experiments] flags or define there (the ConfigMap) and roll out"
            )

    def create(self, doc: Any, subject: str) -> Experiment:
        self._refuse_if_declared("experiments")
        exp = experiment_from_json(doc, known_models=self._known_models())
        check_new(exp)
        if exp.id in self.experiments:
            raise Conflict(f"experiment '{exp.id}' exists")
        if exp.status == "active" and any(
            e.model == exp.model and e.status == "active" for e in self.experiments.values()
        ):
            raise Conflict(f"model '{exp.model}' already has an active experiment")
        exp.note("created", f"by {subject or 'anonymous'}")
        self.experiments[exp.id] = exp
        self._publish()
        self._audit("experiment.create", exp.id, "ok", subject, {"model": exp.model})
        return exp

    def act(self, exp_id: str, action: str, subject: str) -> Experiment:
        exp = self.get(exp_id)
        self._refuse_if_declared("experiments")
        if action not in ACTIONS:
            raise NotFound(f"unknown action '{action[:32]}'")
        if exp.status == "concluded":
            raise Conflict(f"experiment '{exp_id}' is concluded")
        target = ACTIONS[action]
        if target == "active" and any(
            e.model == exp.model and e.status == "active" and e.id != exp.id
            for e in self.experiments.values()
        ):
            raise Conflict(f"model '{exp.model}' already has an active experiment")
        exp.status = target
        exp.note(action, f"by {subject or 'anonymous'}")
        self._publish()
        self._audit(f"experiment.{action}", exp.id, "ok", subject, {})
        return exp

    def set_weights(self, exp_id: str, weights: Any, subject: str) -> Experiment:
        exp = self.get(exp_id)
        self._refuse_if_declared("experiments")
        if (
            not isinstance(weights, list)
            or len(weights) != len(exp.variants)
            or any(isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in weights)
            or sum(weights) <= 0
        ):
            raise InvalidInput(f"'weights' must be {len(exp.variants)} numbers >= 0, not all 0")
        for variant, weight in zip(exp.variants, weights, strict=True):
            variant.weight = float(weight)
        exp.note("weights", f"{weights} by {subject or 'anonymous'}")
        self._publish()
        self._audit("experiment.weights", exp.id, "ok", subject, {"weights": weights})
        return exp

    def put_flag(self, name: str, doc: Any, subject: str) -> Flag:
        """Set a flag; a field left out keeps its current value (disabling a flag keeps
        its rollout, so enabling it again does not widen it)."""
        self._refuse_if_declared("flags and kill switches")
        flag = flag_from_json(name, doc, self.flags.get(name))
        self.flags.put(flag)
        self._save()
        self._audit(
            "flag.set",
            name,
            "ok",
            subject,
            {"enabled": flag.enabled, "rollout_percent": flag.rollout_percent},
        )
        return flag

    async def report(self, exp_id: str) -> dict[str, Any]:
        exp = self.get(exp_id)
        cached = self._concluded_reports.get(exp_id)
        if cached is not None and exp.status == "concluded":
            return cached
        observations = await asyncio.to_thread(observe, self.telemetry_db, exp)
        pairs = await asyncio.to_thread(observe_agreement, self.telemetry_db, exp)
        s = self.settings
        report = build_report(exp, observations, s.alpha, s.tau_relative, s.min_samples)
        report["shadow_agreement"] = summarise(pairs, s.alpha)
        if exp.status == "concluded":
            self._concluded_reports[exp_id] = report
        return report

    # -- automatic decisions --------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._decide_forever())
        if self.settings.drift_enabled:
            self._drift_task = asyncio.create_task(self._watch_drift_forever())

    async def stop(self) -> None:
        for task in (self._task, self._drift_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # -- prediction drift -----------------------------------------------------------
    async def check_drift(self) -> list[DriftCheck]:
        """Check every loaded version now; raise the alert on a version that starts
        drifting and resolve it when the version is back, or when it is no longer checked
        (unloaded, or its rows gone): an alert nothing re-examines must not fire forever.
        One alert rule per model version."""
        s = self.settings
        checks = await asyncio.to_thread(
            self._drift_watch.check,
            s.drift_baseline_requests,
            s.drift_window_requests,
            s.drift_psi_threshold,
            min(s.drift_window_requests, 50),
        )
        loaded = {(m, str(v)) for m, versions in self._serving().items() for v in versions}
        checks = [c for c in checks if (c.model, c.version) in loaded]
        self.drift = checks
        for check in checks:
            key = (check.model, check.version)
            if check.drifted != (key in self._drifting):
                value = max(check.psi_classes, check.psi_top_score or 0.0)
                await self._drift_alert(key, check.drifted, value, drift.describe(check))
        checked = {(c.model, c.version) for c in checks}
        for key in sorted(self._drifting - checked):
            message = f"model {key[0]} version {key[1]}: no longer checked (unloaded or no rows)"
            await self._drift_alert(key, False, 0.0, message)
        return checks

    async def _drift_alert(
        self, key: tuple[str, str], firing: bool, value: float, message: str
    ) -> None:
        state = "firing" if firing else "resolved"
        (self._drifting.add if firing else self._drifting.discard)(key)
        log.warning("prediction drift model=%s version=%s state=%s", *key, state)
        if self._alert is not None:
            await self._alert(f"prediction_drift:{key[0]}/{key[1]}", state, value, message)

    async def _watch_drift_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.drift_interval_s)
            try:
                await self.check_drift()
            except Exception as exc:  # drift watching must never stop serving
                log.error("drift check failed error=%r", str(exc))

    async def _decide_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.decision_interval_s)
            for exp in list(self.experiments.values()):
                if exp.auto and exp.status == "active":
                    try:
                        await self.decide(exp)
                    except Exception as exc:  # one broken experiment must not stop the rest
                        log.error("experiment decision failed id=%s error=%r", exp.id, str(exc))

    async def decide(self, exp: Experiment) -> str:
        """Run the report and act on its decision; the action taken."""
        async with self._lock:
            report = await self.report(exp.id)
            exp.running_p = dict(report["running_p"])  # running minima stay valid across stages
            decision = report["decision"]
            action, reason = decision["action"], decision["reason"]
            if action == "rollback":
                before = exp.weights  # the window the decision was taken in (its SRM)
                for v in exp.variants[1:]:
                    v.weight = 0.0
                exp.status, exp.decision, exp.reason = "concluded", "rolled_back", reason
                exp.note("rolled_back", reason)
                exp.history[-1]["weights"] = before
            elif action == "advance":
                exp.stage += 1
                exp.set_candidate_share(exp.stages[exp.stage])
                exp.note("advanced", f"stage {exp.stage}: {exp.stages[exp.stage]}%; {reason}")
            elif action == "promote":
                winner = next(v for v in exp.variants if v.name == decision["variant"])
                self._promote(exp.model, winner.version)
                exp.status, exp.decision, exp.reason = "concluded", "promoted", reason
                exp.promoted_version = winner.version
                exp.note("promoted", f"version {winner.version}: {reason}")
            if action != "continue":
                log.warning("experiment decision id=%s action=%s reason=%r", exp.id, action, reason)
                self._audit(
                    f"experiment.{action}", exp.id, "ok", "decision-engine", {"reason": reason}
                )
            self._publish()
            return action
