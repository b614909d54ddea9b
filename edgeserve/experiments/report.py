"""An experiment report: per-variant estimates, tests with labelled numbers, SRM, power,
and the decision the engine would take now.

Decisions use the sequential test (valid under continuous peeking); the fixed-horizon
tests are shown next to it, Holm-adjusted across all comparisons of the report. The
comparisons are the decision's own tests, so the report and the loop cannot disagree.
"""

from __future__ import annotations

import time
from typing import Any

from edgeserve.experiments.cuped import CupedResult, cuped
from edgeserve.experiments.decision import (
    Metric,
    Moments,
    Proportion,
    VariantSummary,
    decide,
    plan_for,
    policy_for,
)
from edgeserve.experiments.model import Experiment
from edgeserve.experiments.observations import Observations, window_weights
from edgeserve.experiments.quantile import QuantileTest, quantile_test
from edgeserve.experiments.stats import (
    benjamini_hochberg,
    holm,
    sample_ratio_mismatch,
    sample_size_proportions,
)
from edgeserve.experiments.units import Ratio


def _variant_doc(exp: Experiment, o: Observations) -> dict[str, Any]:
    weight = next(v.weight for v in exp.variants if v.name == o.variant)
    return {
        "name": o.variant,
        "version": o.version,
        "weight": weight,
        "requests": o.requests,
        "units": o.units,
        "errors": o.errors,
        "error_rate": o.errors / o.requests if o.requests else None,
        "latency_ms": {"p50": o.latency_ms(50), "p95": o.latency_ms(95), "p99": o.latency_ms(99)},
        "mean_confidence": float(o.confidence.mean()) if o.confidence.size else None,
        "labelled": o.labelled,
        "accuracy": o.correct / o.labelled if o.labelled else None,
        "kpi_mean": float(o.kpi_values.mean()) if o.kpi_values.size else None,
    }


def _as_dict(test: QuantileTest | None) -> dict[str, Any] | None:
    return None if test is None else test.as_dict()


def build_report(
    exp: Experiment,
    observations: list[Observations],
    alpha: float,
    tau_relative: float,
    min_samples: int,
) -> dict[str, Any]:
    """The report; its comparisons are the very tests the decision loop acts on (same
    names, units and running minima), with fixed-horizon Holm across all of them."""
    split = exp.mode == "split"
    # Traffic to a shadow candidate is a copy, not a split: SRM compares split counts only,
    # in distinct units, and only those since the weights last changed.
    stage_counts = [o.stage_units for o in observations]
    weights = window_weights(exp)
    kpi_cuped = kpi_adjustment(exp, observations)
    verdict = decide(
        variant_summaries(exp, observations),
        weights if split else None,
        policy_for(exp, alpha, tau_relative, min_samples),
        running_p=exp.running_p,
        plan=plan_for(exp, min_samples),
        stage=exp.stage,
        stage_requests=stage_counts if split else None,
    )
    comparisons: list[dict[str, Any]] = [
        {
            "metric": t.metric,
            "kind": t.role,
            "better_when": t.better_when,
            "variant": t.variant,
            "fixed_horizon": t.fixed_horizon.as_dict(),
            "sequential": t.sequential.as_dict(),
            "non_inferior": t.non_inferior,
        }
        for t in verdict.tests
    ]
    raw_p = [c["fixed_horizon"]["p_value"] for c in comparisons]
    for c, p, q in zip(comparisons, holm(raw_p), benjamini_hochberg(raw_p), strict=True):
        c["fixed_horizon"]["holm_adjusted_p_value"] = p
        c["fixed_horizon"]["bh_adjusted_p_value"] = q
    srm = verdict.srm.as_dict() if verdict.srm is not None else None
    control_s = observations[0].latencies_s
    if exp.status == "concluded":  # the outcome that was recorded, not a new decision
        last: dict[str, Any] = next(
            (h for h in reversed(exp.history) if h.get("event") == "conclude"), {}
        )
        decision = {
            "action": exp.decision or "concluded",
            "reason": exp.reason or str(last.get("reason", "")),
            "variant": None,
            "recorded": True,
        }
    else:
        decision = {
            "action": verdict.action,
            "reason": verdict.reason,
            "variant": verdict.variant,
            "recorded": False,
        }
    return {
        "experiment": exp.to_json(),
        "computed_at": time.time(),
        "analysis_unit": exp.unit,
        "variants": [_variant_doc(exp, o) for o in observations],
        "sample_ratio_mismatch": srm,
        # the same counts by Pearson's chi-square: valid at one look only, for reference
        "sample_ratio_mismatch_chi_square": (
            sample_ratio_mismatch(stage_counts, weights).as_dict() if srm is not None else None
        ),
        "comparisons": comparisons,
        # Mood's quantile test of each candidate's p99 latency against the control's
        "p99_latency_tests": [
            {"variant": o.variant, "test": _as_dict(quantile_test(control_s, o.latencies_s, alpha))}
            for o in observations[1:]
        ],
        "power": _power(exp, observations[0]),
        "cuped": None if kpi_cuped is None else kpi_cuped.as_dict(),
        "notes": {
            "difference": "candidate minus control",
            "analysis_unit": "each unit is one sample; per-request metrics are ratios of "
            "per-unit sums with delta-method variances",
            "sample_ratio_mismatch": "distinct units since the weights last changed, "
            "sequential test (valid at every look)",
            "non_inferior": "guardrail interval within its margin; None without a margin",
            "p99_latency_tests": "Mood's quantile test: candidate requests above the pooled "
            "p99 against the control's; fixed-horizon, shown only (not acted on)",
            "sequential": "mixture SPRT (Johari et al.): p-values valid at any look",
            "fixed_horizon": "valid only if looked at once, at the planned sample size",
            "holm_adjusted_p_value": "fixed-horizon p corrected for all comparisons shown",
            "bh_adjusted_p_value": "the same with Benjamini-Hochberg (false discovery rate)",
            "cuped": "an event KPI adjusted with each unit's events before exposure "
            "(Deng et al. 2013); variance_reduction is 1 - var(adjusted)/var(raw)",
        },
        "decision": decision,
        "running_p": verdict.running_p,  # the always-valid p-values to carry forward
    }


def _power(exp: Experiment, control: Observations) -> dict[str, Any] | None:
    if exp.primary_metric != "accuracy" or not control.labelled:
        return None
    base = min(max(control.correct / control.labelled, 0.01), 0.94)
    share = 1 - exp.variants[0].weight / sum(exp.weights) if sum(exp.weights) else 0.5
    share = min(max(share, 0.01), 0.99)
    return {
        "assumed_control_accuracy": base,
        "detectable_improvement": 0.05,
        "alpha": 0.05,
        "power": 0.8,
        "candidate_share": share,
        "labelled_units_needed": sample_size_proportions(base, base + 0.05, share_candidate=share),
    }


def kpi_adjustment(exp: Experiment, observations: list[Observations]) -> CupedResult | None:
    """CUPED on an `event:` KPI with the units' pre-exposure events, when asked for and
    there is a pre-period to use."""
    if not (exp.cuped and exp.primary_metric.startswith("event:")):
        return None
    return cuped([o.kpi_values for o in observations], [o.kpi_pre for o in observations])


def variant_summaries(exp: Experiment, observations: list[Observations]) -> list[VariantSummary]:
    """Observations as `decision.decide` takes them: per-request metrics (accuracy,
    confidence, latency_ms, error_rate) as per-unit ratios, the KPI per exposed unit
    (CUPED-adjusted when `kpi_adjustment` applies)."""
    adjusted = kpi_adjustment(exp, observations)
    out = []
    for i, o in enumerate(observations):
        u = o.unit_sums
        metrics: dict[str, Metric] = {
            "accuracy": Ratio.of(u("correct"), u("labelled"), binary=True),
            "confidence": Ratio.of(u("confidence"), u("scored")),
            "latency_ms": Ratio.of(u("latency_ms"), u("ok")),
            "error_rate": Ratio.of(u("errors"), u("requests"), binary=True),
        }
        metric = exp.primary_metric
        if metric.startswith("conversion:"):
            metrics[metric] = Proportion(int(o.kpi_values.sum()), int(o.kpi_values.size))
        elif metric.startswith("event:"):
            metrics[metric] = Moments.of(o.kpi_values if adjusted is None else adjusted.adjusted[i])
        out.append(VariantSummary(o.variant, o.requests, o.errors, o.latency_ms(99), metrics))
    return out
