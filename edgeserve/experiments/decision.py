"""Automatic decisions: from per-variant metric summaries to continue, advance, promote
or roll back, with the reason and the evidence.

Pure logic: the caller turns telemetry into summaries (counts, sums, sums of squares)
and carries out the decision. The checks run in this order, so that harm is acted on
before anything else, as Flagger and Argo Rollouts do for canaries:

1. an absolute guardrail (error rate, p99 latency) crossed by a candidate -> rollback
2. a guardrail metric significantly worse -> rollback (no multiplicity correction here:
   stopping harm early matters more than a false alarm)
3. the primary metric significantly worse -> rollback
4. sample ratio mismatch in this stage's units (sequential test, valid at every look)
   -> continue (the data cannot be trusted; no promotion is taken on them)
5. the primary significantly better (Holm or Benjamini-Hochberg across candidates)
   after `min_samples` per variant, and every guardrail with a margin shown
   non-inferior -> advance if stages remain, else promote
6. a stage that has seen `min_samples_per_stage` candidate requests with nothing wrong
   -> advance (exposure grows while healthy; promotion still needs step 5)
7. otherwise continue

"Significantly" means the sequential test by default (mixture SPRT, valid however often
the decision runs); `Policy.test = "fixed"` uses the fixed-horizon tests instead, which
is only valid if the decision is taken once, at a planned sample size. The sequential
p-values are a running minimum across looks, carried in `Decision.running_p`: pass it
back in at the next look, across stages too (the arms are the same streams of data).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from edgeserve.experiments import sequential
from edgeserve.experiments.model import Experiment
from edgeserve.experiments.stats import (
    ComparisonResult,
    SampleRatioCheck,
    benjamini_hochberg,
    holm,
    json_safe,
    sample_ratio_mismatch,
    sequential_sample_ratio_mismatch,
    two_proportion_ztest,
    welch_ttest,
)
from edgeserve.experiments.units import Ratio, ratio_ztest

Action = Literal["continue", "advance", "promote", "rollback"]


@dataclass(frozen=True)
class Proportion:
    """A yes/no metric of one variant: accuracy (correct/labelled), conversion, errors."""

    successes: int
    trials: int

    @property
    def samples(self) -> int:
        return self.trials


@dataclass(frozen=True)
class Moments:
    """A continuous metric of one variant as running sums, so it can be kept in SQL or
    merged across shards without holding the values."""

    count: int
    total: float
    total_squares: float

    @classmethod
    def of(cls, values: Sequence[float] | np.ndarray) -> Moments:
        array = np.asarray(values, dtype=float)
        return cls(int(array.size), float(array.sum()), float(np.square(array).sum()))

    @property
    def samples(self) -> int:
        return self.count

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def variance(self) -> float:
        """Sample variance (ddof=1); clipped at 0 against rounding in the sums."""
        if self.count < 2:
            return 0.0
        return max((self.total_squares - self.total**2 / self.count) / (self.count - 1), 0.0)


Metric = Proportion | Moments | Ratio


@dataclass(frozen=True)
class VariantSummary:
    """What one variant has seen; `metrics` holds the primary and guardrail metrics by name
    (error_rate is derived from requests/errors when not given)."""

    name: str
    requests: int
    errors: int = 0
    p99_ms: float | None = None
    metrics: Mapping[str, Metric] = field(default_factory=dict)

    def metric(self, name: str) -> Metric | None:
        if name in self.metrics:
            return self.metrics[name]
        if name == "error_rate":
            return Proportion(self.errors, self.requests)
        return None


@dataclass(frozen=True)
class MetricSpec:
    name: str
    better: Literal["higher", "lower"] = "higher"


@dataclass(frozen=True)
class Policy:
    """How an experiment is judged."""

    primary: MetricSpec = MetricSpec("accuracy", "higher")
    guardrails: tuple[MetricSpec, ...] = (
        MetricSpec("error_rate", "lower"),
        MetricSpec("latency_ms", "lower"),
    )
    alpha: float = 0.05
    tau_relative: float = 0.1
    min_samples: int = 200  # per variant, on the primary metric, before a promotion
    max_error_rate: float | None = 0.05  # absolute guardrail; None = off
    max_p99_ms: float | None = None  # absolute guardrail; None = off
    min_requests_for_absolute: int = 20  # absolute guardrails act from this many requests
    test: Literal["sequential", "fixed"] = "sequential"
    srm_threshold: float = 0.001
    # SRM is checked at every look: the sequential test stays valid, chi-square does not
    srm_test: Literal["sequential", "chi-square"] = "sequential"
    correction: Literal["holm", "bh"] = "holm"  # across candidates on the primary metric
    # Non-inferiority margins of guardrails, in the metric's unit (latency_ms: ms,
    # error_rate: a rate): a promotion waits until each named guardrail's interval shows
    # the candidate at most this much worse (GrowthBook's safe rollouts).
    guardrail_margins: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricTest:
    """One candidate-vs-control comparison as the decision saw it."""

    variant: str
    metric: str
    role: Literal["primary", "guardrail"]
    better_when: Literal["higher", "lower"]
    p_value: float  # the one the decision used (always-valid, or fixed-horizon Holm)
    significant: bool
    verdict: Literal["better", "worse", "no difference"]
    sequential: sequential.SequentialResult
    fixed_horizon: ComparisonResult
    non_inferior: bool | None = None  # within the guardrail's margin; None: no margin set


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    variant: str | None = None  # the candidate the action is about
    tests: tuple[MetricTest, ...] = ()
    srm: SampleRatioCheck | None = None
    running_p: dict[str, float] = field(default_factory=dict)  # pass back at the next look

    def as_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


@dataclass(frozen=True)
class RolloutPlan:
    """Staged rollout: the candidates' share of traffic per stage (e.g. 5, 25, 50);
    promotion after the last stage makes the candidate 100%."""

    stages_percent: tuple[float, ...] = (5.0, 25.0, 50.0)
    min_samples_per_stage: int = 200  # candidate requests before a healthy stage advances

    def __post_init__(self) -> None:
        stages = [s for s in self.stages_percent if s < 100.0]  # 100 is the promotion
        if not stages or any(s <= 0 for s in stages) or stages != sorted(set(stages)):
            raise ValueError("stages must be increasing percentages in (0, 100)")
        object.__setattr__(self, "stages_percent", tuple(stages))

    def is_last(self, stage: int) -> bool:
        return stage >= len(self.stages_percent) - 1

    def weights(self, stage: int, variants: int = 2) -> list[float]:
        """Weights at `stage`: the control keeps the rest, candidates share equally.

        With one candidate its range only grows from stage to stage (it sits at the end
        of the line), so no unit ever leaves the candidate during a rollout."""
        percent = self.stages_percent[min(stage, len(self.stages_percent) - 1)]
        share = percent / (variants - 1)
        return [100.0 - percent] + [share] * (variants - 1)


def compare(
    control: Metric,
    candidate: Metric,
    alpha: float,
    tau_relative: float,
    previous_p: float = 1.0,
) -> tuple[sequential.SequentialResult, ComparisonResult] | None:
    """Sequential and fixed-horizon tests of one metric; None with too few samples."""
    if isinstance(control, Proportion) and isinstance(candidate, Proportion):
        if min(control.trials, candidate.trials) < 2:
            return None
        c, t = control, candidate
        return (
            sequential.msprt_proportions(
                c.successes, c.trials, t.successes, t.trials, alpha, tau_relative, previous_p
            ),
            two_proportion_ztest(c.successes, c.trials, t.successes, t.trials, alpha),
        )
    if isinstance(control, Moments) and isinstance(candidate, Moments):
        if min(control.count, candidate.count) < 2:
            return None
        mc, mt = control, candidate
        args = (mc.mean, mc.variance, mc.count, mt.mean, mt.variance, mt.count, alpha)
        return (
            sequential.msprt_means(*args, tau_relative, previous_p),
            welch_ttest(*args),
        )
    if isinstance(control, Ratio) and isinstance(candidate, Ratio):
        if min(control.units, candidate.units) < 2:
            return None
        return (
            sequential.msprt_ratios(control, candidate, alpha, tau_relative, previous_p),
            ratio_ztest(control, candidate, alpha),
        )
    raise TypeError("control and candidate must be the same kind of metric")


def _tests(
    control: VariantSummary,
    candidates: Sequence[VariantSummary],
    policy: Policy,
    running_p: Mapping[str, float],
) -> list[MetricTest]:
    raw = []
    for cand in candidates:
        roles = [("primary", policy.primary)] + [("guardrail", g) for g in policy.guardrails]
        for role, spec in roles:
            c, t = control.metric(spec.name), cand.metric(spec.name)
            if c is None or t is None:
                continue
            key = f"{cand.name}/{spec.name}"
            result = compare(c, t, policy.alpha, policy.tau_relative, running_p.get(key, 1.0))
            if result is not None:
                raw.append((cand.name, spec, role, *result))
    # Holm (or Benjamini-Hochberg) across candidates on the primary metric; guardrails
    # stay uncorrected (see above).
    correct = benjamini_hochberg if policy.correction == "bh" else holm
    primary = [i for i, r in enumerate(raw) if r[2] == "primary"]
    seq_p = [r[3].always_valid_p_value for r in raw]
    fixed_p = [r[4].p_value for r in raw]
    for index, p in zip(primary, correct([seq_p[i] for i in primary]), strict=True):
        seq_p[index] = p
    for index, p in zip(primary, correct([fixed_p[i] for i in primary]), strict=True):
        fixed_p[index] = p
    tests = []
    for (name, spec, role, seq, fixed), sp, fp in zip(raw, seq_p, fixed_p, strict=True):
        p = sp if policy.test == "sequential" else fp
        significant = p < policy.alpha
        up = seq.difference > 0
        verdict = "no difference"
        if significant:
            verdict = "better" if up == (spec.better == "higher") else "worse"
        margin = policy.guardrail_margins.get(spec.name) if role == "guardrail" else None
        non_inferior = None
        if margin is not None:
            cs = seq.confidence_sequence
            non_inferior = cs.high < margin if spec.better == "lower" else cs.low > -margin
        tests.append(
            MetricTest(
                name,
                spec.name,
                role,  # type: ignore[arg-type]
                spec.better,
                p,
                significant,
                verdict,  # type: ignore[arg-type]
                seq,
                fixed,
                non_inferior,
            )
        )
    return tests


def decide(
    variants: Sequence[VariantSummary],
    weights: Sequence[float] | None,
    policy: Policy | None = None,
    *,
    running_p: Mapping[str, float] | None = None,
    plan: RolloutPlan | None = None,
    stage: int = 0,
    stage_requests: Sequence[int] | None = None,
) -> Decision:
    """The decision at this look. `variants[0]` is the control; `weights` are the current
    ones (None in shadow mode: traffic is copied, not split, so there is no ratio to
    check); `stage_requests` are the requests per variant since the current stage began
    (for the SRM check and stage progress; default: all requests)."""
    policy = policy or Policy()
    control, candidates = variants[0], list(variants[1:])
    tests = _tests(control, candidates, policy, running_p or {})
    carried = {f"{t.variant}/{t.metric}": t.sequential.always_valid_p_value for t in tests}
    counts: list[int] = (
        list(stage_requests) if stage_requests is not None else [v.requests for v in variants]
    )
    srm = None
    if weights is not None and any(counts):
        check = (
            sequential_sample_ratio_mismatch
            if policy.srm_test == "sequential"
            else sample_ratio_mismatch
        )
        srm = check(counts, weights, policy.srm_threshold)

    def result(action: Action, reason: str, variant: str | None = None) -> Decision:
        return Decision(action, reason, variant, tuple(tests), srm, carried)

    for cand in candidates:  # 1. absolute guardrails
        if cand.requests < policy.min_requests_for_absolute:
            continue
        rate = cand.errors / cand.requests
        if policy.max_error_rate is not None and rate > policy.max_error_rate:
            return result(
                "rollback",
                f"{cand.name}: error rate {rate:.3f} over the limit {policy.max_error_rate}",
                cand.name,
            )
        p99, limit = cand.p99_ms, policy.max_p99_ms
        if limit is not None and p99 is not None and p99 > limit:
            return result(
                "rollback", f"{cand.name}: p99 {p99:.1f} ms over the limit {limit} ms", cand.name
            )
    for role in ("guardrail", "primary"):  # 2, 3. significantly worse
        for t in tests:
            if t.role == role and t.verdict == "worse":
                return result(
                    "rollback",
                    f"{t.variant}: {role} metric {t.metric} significantly worse "
                    f"(p={t.p_value:.3g})",
                    t.variant,
                )
    if srm is not None and srm.mismatch:  # 4.
        return result(
            "continue",
            f"sample ratio mismatch ({srm.test} test p={srm.p_value:.2g} "
            f"< {policy.srm_threshold}): "
            "assignment or logging is broken, no decision is taken",
        )
    have = min(
        (m.samples if (m := v.metric(policy.primary.name)) is not None else 0) for v in variants
    )
    better = [t for t in tests if t.role == "primary" and t.verdict == "better"]
    last = plan is None or plan.is_last(stage)
    if better and have >= policy.min_samples:  # 5.
        best = max(better, key=lambda t: abs(t.sequential.difference))
        pending = [
            t
            for t in tests
            if t.variant == best.variant and t.role == "guardrail" and t.non_inferior is False
        ]
        if pending:
            t = pending[0]
            return result(
                "continue",
                f"{best.variant}: {best.metric} significantly better, waiting for guardrail "
                f"{t.metric} to be shown within its margin {policy.guardrail_margins[t.metric]:g}",
                best.variant,
            )
        action: Action = "promote" if last else "advance"
        return result(
            action,
            f"{best.variant}: {best.metric} significantly better (p={best.p_value:.3g})",
            best.variant,
        )
    if plan is not None and not last:  # 6.
        in_stage = min(counts[1:]) if len(counts) > 1 else 0
        if in_stage >= plan.min_samples_per_stage:
            return result(
                "advance",
                f"stage {stage} ({plan.stages_percent[stage]:g}%) healthy after {in_stage} "
                "candidate requests",
            )
    if have < policy.min_samples:  # 7.
        return result(
            "continue", f"waiting for {policy.min_samples} samples per variant (have {have})"
        )
    return result("continue", "no significant difference yet")


def policy_for(exp: Experiment, alpha: float, tau_relative: float, min_samples: int) -> Policy:
    """The policy an experiment definition asks for (the server's wiring of `decide`)."""
    return Policy(
        primary=MetricSpec(exp.primary_metric, "higher"),
        alpha=alpha,
        tau_relative=tau_relative,
        min_samples=min_samples,
        max_error_rate=exp.max_error_rate,
        max_p99_ms=exp.max_p99_ms or None,
        correction="bh" if exp.correction == "bh" else "holm",
        guardrail_margins=dict(exp.guardrail_margins),
    )


def plan_for(exp: Experiment, min_samples_per_stage: int) -> RolloutPlan | None:
    """The staged rollout of a definition, or None when it has no stages below 100%."""
    stages = tuple(s for s in exp.stages if s < 100.0)
    return RolloutPlan(stages, min_samples_per_stage) if stages else None
