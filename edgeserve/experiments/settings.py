"""The [experiments] section of edgeserve.toml.

Experiment definitions and flags are checked here, when the config is read, so a typo
stops start-up with the key at fault instead of surfacing once the models are loaded.
Whether each variant's model version exists is checked later, against the registry.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeserve.config.schema import ConfigError, setting
from edgeserve.errors import InvalidInput
from edgeserve.experiments.flags import flag_from_json
from edgeserve.experiments.model import check_new, parse_definition


@dataclass(frozen=True)
class ExperimentSettings:
    """A/B experiments between model versions, decided by the sequential test."""

    enabled: bool = True
    decision_interval_s: float = setting(10.0, min=0.05, max=86400.0)
    alpha: float = setting(0.05, min=0.0001, max=0.5)
    min_samples: int = setting(200, min=10)  # per variant before any automatic decision
    tau_relative: float = setting(0.1, min=0.001, max=10.0)  # mixture scale, in metric SDs
    shadow_max_in_flight: int = setting(4, min=1, max=1024)
    # Prediction drift per model version (edgeserve/experiments/drift.py): its first
    # requests are the baseline, its latest ones the live window; PSI over the threshold
    # (and a chi-square test agreeing) raises the alert prediction_drift.
    drift_enabled: bool = True
    drift_interval_s: float = setting(60.0, min=0.05, max=86400.0)
    drift_baseline_requests: int = setting(500, min=50, max=100_000)
    drift_window_requests: int = setting(500, min=50, max=100_000)
    drift_psi_threshold: float = setting(0.2, min=0.01, max=10.0)
    # Experiments defined in the config: [[experiments.define]] tables (or inline tables)
    # with the API's fields; see edgeserve.toml for every key.
    define: list[dict] = setting([])
    # Flags defined in the config: {name = {enabled = true, rollout_percent = 100}}
    flags: dict[str, dict] = setting({})
    # false: flags and experiments come from this file only (the config's flags win over
    # saved ones) and the API refuses to change them, so every replica sharing the file
    # agrees. true (one box): the API changes them on this server.
    runtime_changes: bool = True

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for i, doc in enumerate(self.define):
            try:
                exp = parse_definition(doc)
                check_new(exp)
            except InvalidInput as exc:
                raise ConfigError(f"experiments.define[{i}]", exc.message) from None
            if exp.id in seen:
                raise ConfigError(f"experiments.define[{i}].id", f"'{exp.id}' is defined twice")
            seen.add(exp.id)
        for name, doc in self.flags.items():
            try:
                flag_from_json(name, doc)
            except InvalidInput as exc:
                raise ConfigError(f"experiments.flags.{name}", exc.message) from None
