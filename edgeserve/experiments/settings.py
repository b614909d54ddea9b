"""The [experiments] section of edgeserve.toml."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExperimentSettings:
    """A/B experiments between model versions. Filled in by the experiments work (issue 7)."""

    enabled: bool = True
