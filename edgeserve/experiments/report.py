"""An experiment report: per-variant estimates, tests with labelled numbers, SRM, power,
and the decision the engine would take now.

Decisions use the sequential test (valid under continuous peeking); the fixed-horizon
tests are shown next to it, Holm-adjusted across all comparisons of the report.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeserve.experiments import sequential
from edgeserve.experiments.decision import (
    Moments,
    Proportion,
    VariantSummary,
    decide,
    plan_for,
    policy_for,
)
from edgeserve.experiments.model import Experiment
from edgeserve.experiments.observations import Observations
from edgeserve.experiments.stats import (
    holm,
    sample_ratio_mismatch,
    sample_size_proportions,
    two_proportion_ztest,
    welch_ttest,
)


def _proportion(
    metric: str,
    kind: str,
    better: str,
    c: tuple[int, int],
    t: tuple[int, int],
    alpha: float,
    tau: float,
    prev: float,
) -> dict[str, Any] | None:
    (xc, nc), (xt, nt) = c, t
    if min(nc, nt) < 2:
        return None
    return {
        "metric": metric,
        "kind": kind,
        "better_when": better,
        "fixed_horizon": two_proportion_ztest(xc, nc, xt, nt, alpha).as_dict(),
        "sequential": sequential.msprt_proportions(xc, nc, xt, nt, alpha, tau, prev).as_dict(),
    }


def _means(
    metric: str,
    kind: str,
    better: str,
    c: np.ndarray,
    t: np.ndarray,
    alpha: float,
    tau: float,
    prev: float,
) -> dict[str, Any] | None:
    if min(c.size, t.size) < 2:
        return None
    mc, vc, mt, vt = float(c.mean()), float(c.var(ddof=1)), float(t.mean()), float(t.var(ddof=1))
    return {
        "metric": metric,
        "kind": kind,
        "better_when": better,
        "fixed_horizon": welch_ttest(mc, vc, c.size, mt, vt, t.size, alpha).as_dict(),
        "sequential": sequential.msprt_means(
            mc, vc, c.size, mt, vt, t.size, alpha, tau, prev
        ).as_dict(),
    }


def _variant_doc(exp: Experiment, o: Observations) -> dict[str, Any]:
    weight = next(v.weight for v in exp.variants if v.name == o.variant)
    return {
        "name": o.variant,
        "version": o.version,
        "weight": weight,
        "requests": o.requests,
        "errors": o.errors,
        "error_rate": o.errors / o.requests if o.requests else None,
        "latency_ms": {"p50": o.latency_ms(50), "p95": o.latency_ms(95), "p99": o.latency_ms(99)},
        "mean_confidence": float(o.confidence.mean()) if o.confidence.size else None,
        "labelled": o.labelled,
        "accuracy": o.correct / o.labelled if o.labelled else None,
        "units": o.units,
        "kpi_mean": float(o.kpi_values.mean()) if o.kpi_values.size else None,
    }


def build_report(
    exp: Experiment,
    observations: list[Observations],
    alpha: float,
    tau_relative: float,
    min_samples: int,
) -> dict[str, Any]:
    control = observations[0]
    comparisons: list[dict[str, Any]] = []
    for cand in observations[1:]:
        prev = exp.running_p
        for doc in (
            _primary(exp, control, cand, alpha, tau_relative, prev),
            _proportion(
                "error_rate",
                "guardrail",
                "lower",
                (control.errors, control.requests),
                (cand.errors, cand.requests),
                alpha,
                tau_relative,
                prev.get(f"{cand.variant}/error_rate", 1.0),
            ),
            _means(
                "latency_s",
                "guardrail",
                "lower",
                control.latencies_s,
                cand.latencies_s,
                alpha,
                tau_relative,
                prev.get(f"{cand.variant}/latency_s", 1.0),
            ),
        ):
            if doc is not None:
                doc["variant"] = cand.variant
                comparisons.append(doc)
    adjusted = holm([c["fixed_horizon"]["p_value"] for c in comparisons])
    for c, p in zip(comparisons, adjusted, strict=True):
        c["fixed_horizon"]["holm_adjusted_p_value"] = p
    # Traffic to a shadow candidate is a copy, not a split: SRM compares split counts only,
    # and only those since the weights last changed (a stage advance changes the ratio).
    stage_counts = [o.stage_requests for o in observations]
    srm = (
        sample_ratio_mismatch(stage_counts, exp.weights).as_dict()
        if exp.mode == "split" and sum(stage_counts)
        else None
    )
    report = {
        "experiment": exp.to_json(),
        "variants": [_variant_doc(exp, o) for o in observations],
        "sample_ratio_mismatch": srm,
        "comparisons": comparisons,
        "power": _power(exp, control),
        "notes": {
            "difference": "candidate minus control",
            "sequential": "mixture SPRT (Johari et al.): p-values valid at any look",
            "fixed_horizon": "valid only if looked at once, at the planned sample size",
            "holm_adjusted_p_value": "fixed-horizon p corrected for all comparisons shown",
        },
    }
    split = exp.mode == "split"
    verdict = decide(
        variant_summaries(exp, observations),
        exp.weights if split else None,
        policy_for(exp, alpha, tau_relative, min_samples),
        running_p=exp.running_p,
        plan=plan_for(exp, min_samples),
        stage=exp.stage,
        stage_requests=stage_counts if split else None,
    )
    report["decision"] = {
        "action": verdict.action,
        "reason": verdict.reason,
        "variant": verdict.variant,
    }
    report["running_p"] = verdict.running_p  # the always-valid p-values to carry forward
    return report


def _primary(
    exp: Experiment,
    c: Observations,
    t: Observations,
    alpha: float,
    tau: float,
    prev: dict[str, float],
) -> dict[str, Any] | None:
    metric = exp.primary_metric
    key = f"{t.variant}/{metric}"
    if metric == "accuracy":
        return _proportion(
            metric,
            "primary",
            "higher",
            (c.correct, c.labelled),
            (t.correct, t.labelled),
            alpha,
            tau,
            prev.get(key, 1.0),
        )
    if metric == "confidence":
        return _means(
            metric, "primary", "higher", c.confidence, t.confidence, alpha, tau, prev.get(key, 1.0)
        )
    if metric.startswith("conversion:"):
        return _proportion(
            metric,
            "primary",
            "higher",
            (int(c.kpi_values.sum()), c.kpi_values.size),
            (int(t.kpi_values.sum()), t.kpi_values.size),
            alpha,
            tau,
            prev.get(key, 1.0),
        )
    return _means(
        metric, "primary", "higher", c.kpi_values, t.kpi_values, alpha, tau, prev.get(key, 1.0)
    )


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


def variant_summaries(exp: Experiment, observations: list[Observations]) -> list[VariantSummary]:
    """Observations as `decision.decide` takes them: the primary metric under its own
    name, latency_ms and confidence as moments, error_rate from requests and errors."""
    out = []
    for o in observations:
        metrics: dict[str, Proportion | Moments] = {
            "accuracy": Proportion(o.correct, o.labelled),
            "confidence": Moments.of(o.confidence),
            "latency_ms": Moments.of(o.latencies_s * 1000.0),
        }
        metric = exp.primary_metric
        if metric.startswith("conversion:"):
            metrics[metric] = Proportion(int(o.kpi_values.sum()), int(o.kpi_values.size))
        elif metric.startswith("event:"):
            metrics[metric] = Moments.of(o.kpi_values)
        out.append(VariantSummary(o.variant, o.requests, o.errors, o.latency_ms(99), metrics))
    return out
