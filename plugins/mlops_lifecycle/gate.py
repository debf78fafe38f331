"""Gate rules: absolute thresholds and regression limits against production. Plain functions.

Fail closed: a metric that is missing, NaN or infinite fails its rule, and so does a production
baseline that is missing while a production model exists. Only when there is no production model
at all does a regression rule pass, and it says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeGuard

from mlops_lifecycle.config import MetricRule


@dataclass(frozen=True)
class RuleResult:
    metric: str
    rule: str  # "threshold" or "regression"
    value: float | None
    limit: float | None
    passed: bool
    reason: str
    baseline: float | None = None  # the production model's value on the same holdout (regression rules)
    applicable: bool = True  # False for a regression rule while there is no production model


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    results: tuple[RuleResult, ...]
    production_version: str | None

    @property
    def failures(self) -> list[RuleResult]:
        return [r for r in self.results if not r.passed]

    def summary(self) -> str:
        """One line: the verdict and, if rejected, every failed rule's reason."""
        if self.passed:
            met = sum(r.applicable for r in self.results)
            skipped = len(self.results) - met
            extra = f", {skipped} not applicable (no production model yet)" if skipped else ""
            return f"PASSED: {met} rule(s) met{extra}"
        return "REJECTED: " + "; ".join(r.reason for r in self.failures)

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "production_version": self.production_version,
            "results": [asdict(r) for r in self.results],
        }


def _usable(value: float | None) -> TypeGuard[float]:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def _describe(value: float | None) -> str:
    if value is None:
        return "missing"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, float) and math.isinf(value):
        return "infinite"
    return f"{value:.6g}"


def evaluate_gate(
    rules: Mapping[str, MetricRule],
    metrics: Mapping[str, float],
    baseline: Mapping[str, float],
    production_version: str | None,
) -> GateVerdict:
    """Evaluate every rule; ``baseline`` holds the production model's metrics on the same holdout."""
    results: list[RuleResult] = []
    for name, rule in rules.items():
        value = metrics.get(name)
        minimize = rule.direction == "minimize"
        if rule.threshold is not None:
            threshold = rule.threshold
            if not _usable(value):
                ok, reason = False, f"{name} is {_describe(value)} (fail closed)"
            else:
                ok = value <= threshold if minimize else value >= threshold
                op = "<=" if minimize else ">="
                reason = f"{name} {_describe(value)} {'meets' if ok else 'violates'} {op} {threshold:.6g}"
            results.append(RuleResult(name, "threshold", value, threshold, ok, reason))
        if rule.max_regression is not None:
            base = baseline.get(name)
            limit: float | None = None
            applicable = production_version is not None
            if not applicable:
                ok, reason = True, f"{name}: no production model yet, regression check not applicable"
            elif not _usable(value):
                ok, reason = False, f"{name} is {_describe(value)} (fail closed)"
            elif not _usable(base):
                ok = False
                reason = f"production v{production_version} {name} is {_describe(base)} (fail closed)"
            else:
                tolerance = abs(base) * rule.max_regression
                bound = base + tolerance if minimize else base - tolerance
                ok = value <= bound if minimize else value >= bound
                reason = (
                    f"{name} {_describe(value)} vs production v{production_version} {_describe(base)}: "
                    f"{'within' if ok else 'exceeds'} {rule.max_regression:.1%} regression limit "
                    f"({'<=' if minimize else '>='} {bound:.6g})"
                )
                limit = bound
            results.append(RuleResult(name, "regression", value, limit, ok, reason, base, applicable))
    return GateVerdict(
        passed=all(r.passed for r in results), results=tuple(results), production_version=production_version
    )
