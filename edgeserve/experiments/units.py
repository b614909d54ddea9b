"""Per-request metrics analysed at the randomisation unit.

When the unit is a user, a user's requests are not independent (one heavy user's slow
requests all share a cause), so treating requests as samples understates the variance
and peeking finds "differences" that are not there. Each unit is one sample instead:
the metric is the ratio of per-unit sums, Σy/Σx (errors/requests, correct/labelled,
milliseconds/requests), and its variance comes from the delta method, as GrowthBook
and Eppo analyse ratio metrics (Deng, Knoblich & Lu, "Applying the Delta Method in
Metric Analytics", KDD 2018):

    Var(Σy/Σx) ~ (s_yy - 2 R s_xy + R^2 s_xx) / (n x̄^2),   R = Σy/Σx

With one request per unit this is the usual variance of a mean or proportion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgeserve.experiments.distributions import normal_quantile, normal_two_sided_p
from edgeserve.experiments.stats import ComparisonResult, Interval, relative_lift


@dataclass(frozen=True)
class Ratio:
    """Σy/Σx over `units` units, kept as sums so it merges and serialises cheaply.

    `binary` says each y is a 0/1 outcome (an error, a correct label): its variance
    then never drops to 0 (see `variance`)."""

    units: int
    x: float
    y: float
    xx: float
    yy: float
    xy: float
    binary: bool = False

    @classmethod
    def of(
        cls,
        numerators: Sequence[float] | np.ndarray,
        denominators: Sequence[float] | np.ndarray,
        binary: bool = False,
    ) -> Ratio:
        """From per-unit sums; units with nothing in the denominator are left out."""
        y = np.asarray(numerators, dtype=float)
        x = np.asarray(denominators, dtype=float)
        keep = x > 0
        y, x = y[keep], x[keep]
        return cls(
            int(x.size),
            float(x.sum()),
            float(y.sum()),
            float((x * x).sum()),
            float((y * y).sum()),
            float((x * y).sum()),
            binary,
        )

    @property
    def samples(self) -> int:
        return self.units

    @property
    def value(self) -> float:
        return self.y / self.x if self.x else 0.0

    @property
    def variance(self) -> float:
        """Delta-method variance of the ratio. A 0/1 metric that happens to show no
        spread (no errors yet) gets the variance of a Laplace-smoothed rate instead of
        0, which would make its interval (-inf, inf)."""
        n = self.units
        if n < 2 or self.x <= 0:
            return 0.0
        mx, my = self.x / n, self.y / n
        sxx = (self.xx - n * mx * mx) / (n - 1)
        syy = (self.yy - n * my * my) / (n - 1)
        sxy = (self.xy - n * mx * my) / (n - 1)
        r = self.value
        variance = max((syy - 2 * r * sxy + r * r * sxx) / (n * mx * mx), 0.0)
        if self.binary and variance <= 0:
            s = (self.y + 1) / (self.x + 2)
            variance = s * (1 - s) / self.x
        return variance

    @property
    def element_variance(self) -> float:
        """Variance of one request's y, for the scale of the mixture (tau): the ratio's
        variance times the requests it averages (a 0/1 metric: its smoothed rate's)."""
        if self.binary:
            s = (self.y + 1) / (self.x + 2)
            return s * (1 - s)
        return self.variance * self.x


def ratio_ztest(control: Ratio, candidate: Ratio, alpha: float = 0.05) -> ComparisonResult:
    """Fixed-horizon z-test of the difference of two ratios with delta-method variances."""
    var_c, var_t = control.variance, candidate.variance
    se = math.sqrt(var_c + var_t)
    diff = candidate.value - control.value
    z = diff / se if se > 0 else 0.0
    crit = normal_quantile(1 - alpha / 2)
    rel, rel_ci = relative_lift(control.value, var_c, candidate.value, var_t, crit)
    return ComparisonResult(
        "delta-method z-test (per unit)",
        control.value,
        candidate.value,
        diff,
        Interval(diff - crit * se, diff + crit * se),
        rel,
        rel_ci,
        z,
        None,
        normal_two_sided_p(z),
        1 - alpha,
    )
