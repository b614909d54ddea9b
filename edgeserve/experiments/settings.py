"""The [experiments] section of edgeserve.toml."""

from __future__ import annotations

from dataclasses import dataclass

from edgeserve.settings_schema import setting


@dataclass(frozen=True)
class ExperimentSettings:
    """A/B experiments between model versions, decided by the sequential test."""

    enabled: bool = True
    decision_interval_s: float = setting(10.0, min=0.05, max=86400.0)
    alpha: float = setting(0.05, min=0.0001, max=0.5)
    min_samples: int = setting(200, min=10)  # per variant before any automatic decision
    tau_relative: float = setting(0.1, min=0.001, max=10.0)  # mixture scale, in metric SDs
    shadow_max_in_flight: int = setting(4, min=1, max=1024)
    # Experiments defined in the config, as inline tables with the API's fields, e.g.
    # define = [{id = "digits-v2", model = "digits", variants = [...], unit = "header:x-user-id"}]
    define: list[dict] = setting([])
    # Flags defined in the config: {name = {enabled = true, rollout_percent = 100}}
    flags: dict[str, dict] = setting({})
