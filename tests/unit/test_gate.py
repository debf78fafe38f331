"""Gate logic: thresholds, regression limits against production, and fail-closed handling."""

from __future__ import annotations

import math

import pytest

from mlops_lifecycle.config import MetricRule
from mlops_lifecycle.gate import evaluate_gate

RULES = {
    "mape": MetricRule(direction="minimize", threshold=0.2, max_regression=0.1),
    "r2": MetricRule(direction="maximize", threshold=0.7),
}


def test_passes_when_every_rule_is_met():
    verdict = evaluate_gate(RULES, {"mape": 0.1, "r2": 0.8}, {"mape": 0.1}, "3")
    assert verdict.passed and verdict.failures == []
    assert verdict.summary() == "PASSED: 3 rule(s) met"


def test_threshold_violations_are_named():
    verdict = evaluate_gate(RULES, {"mape": 0.3, "r2": 0.5}, {}, None)
    assert not verdict.passed
    assert "mape 0.3 violates <= 0.2" in verdict.summary()
    assert "r2 0.5 violates >= 0.7" in verdict.summary()


def test_regression_beyond_limit_rejects_even_under_the_threshold():
    verdict = evaluate_gate(RULES, {"mape": 0.15, "r2": 0.9}, {"mape": 0.10}, "4")
    assert not verdict.passed
    [failure] = verdict.failures
    assert failure.rule == "regression" and failure.limit == pytest.approx(0.11)
    assert "vs production v4 0.1: exceeds 10.0% regression limit" in failure.reason


def test_regression_within_limit_passes():
    assert evaluate_gate(RULES, {"mape": 0.105, "r2": 0.9}, {"mape": 0.10}, "4").passed


def test_regression_for_maximize_uses_absolute_baseline():
    rules = {"r2": MetricRule(direction="maximize", max_regression=0.5)}
    assert evaluate_gate(rules, {"r2": -0.4}, {"r2": -0.3}, "1").passed  # -0.3 - 0.15 = -0.45
    assert not evaluate_gate(rules, {"r2": -0.5}, {"r2": -0.3}, "1").passed


def test_first_model_skips_regression_and_says_so():
    verdict = evaluate_gate(RULES, {"mape": 0.1, "r2": 0.8}, {}, None)
    assert verdict.passed
    assert any("no production model yet" in r.reason for r in verdict.results)
    assert verdict.summary() == "PASSED: 2 rule(s) met, 1 not applicable (no production model yet)"


@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf])
def test_missing_nan_or_infinite_metric_fails_closed(bad):
    metrics = {"r2": 0.8} if bad is None else {"mape": bad, "r2": 0.8}
    verdict = evaluate_gate(RULES, metrics, {"mape": 0.1}, "2")
    assert not verdict.passed
    assert {r.rule for r in verdict.failures} == {"threshold", "regression"}
    assert "fail closed" in verdict.summary()


@pytest.mark.parametrize("bad", [None, math.nan])
def test_missing_production_baseline_fails_closed_when_production_exists(bad):
    baseline = {} if bad is None else {"mape": bad}
    verdict = evaluate_gate(RULES, {"mape": 0.1, "r2": 0.8}, baseline, "2")
    assert not verdict.passed
    assert "production v2 mape is" in verdict.summary()


def test_verdict_serialises_for_xcom():
    data = evaluate_gate(RULES, {"mape": 0.1, "r2": 0.8}, {}, None).as_dict()
    assert data["passed"] is True and data["production_version"] is None
    assert {r["metric"] for r in data["results"]} == {"mape", "r2"}
