"""CUPED: variance reduction for a continuous KPI with each unit's pre-exposure value.

Deng, Xu, Kohavi & Walker, "Improving the Sensitivity of Online Controlled Experiments
by Utilizing Pre-Experiment Data" (WSDM 2013). With Y a unit's KPI after exposure and
X the same KPI before it, Y' = Y - theta (X - mean X), theta = cov(X, Y) / var(X),
keeps the difference of means unbiased (X cannot depend on the variant: it happened
before exposure) and shrinks its variance by the factor 1 - rho^2. theta and mean X
are pooled over all arms, so every arm is adjusted the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CupedResult:
    """The adjustment applied and what it achieved."""

    theta: float
    correlation: float  # between pre-period and KPI, pooled over arms
    variance_reduction: float  # 1 - var(adjusted) / var(raw), pooled within arms
    adjusted: tuple[np.ndarray, ...]  # per arm, the adjusted KPI of each unit

    def as_dict(self) -> dict[str, float]:
        return {
            "theta": self.theta,
            "correlation": self.correlation,
            "variance_reduction": self.variance_reduction,
        }


def cuped(post: Sequence[np.ndarray], pre: Sequence[np.ndarray]) -> CupedResult | None:
    """Adjust each arm's per-unit KPI (`post[i]`) with its pre-period (`pre[i]`, same
    units, same order); None when there is nothing to adjust with (no spread before)."""
    ys = [np.asarray(p, dtype=float) for p in post]
    xs = [np.asarray(p, dtype=float) for p in pre]
    y, x = np.concatenate(ys), np.concatenate(xs)
    if y.size < 4 or x.size != y.size:
        return None
    # Within-arm (centred per arm) moments, so a true effect does not leak into theta.
    yc = np.concatenate([a - a.mean() for a in ys if a.size])
    xc = np.concatenate([a - a.mean() for a in xs if a.size])
    var_x = float(xc @ xc)
    var_y = float(yc @ yc)
    if var_x <= 0 or var_y <= 0:
        return None
    cov = float(xc @ yc)
    theta = cov / var_x
    mean_x = float(x.mean())
    adjusted = tuple(a - theta * (b - mean_x) for a, b in zip(ys, xs, strict=True))
    residual = yc - theta * xc
    return CupedResult(
        theta,
        cov / float(np.sqrt(var_x * var_y)),
        1.0 - float(residual @ residual) / var_y,
        adjusted,
    )
