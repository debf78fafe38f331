"""The drift monitor's decisions (plain functions): intervals, the label join with its delay, live
performance against the served version's holdout, the cool-down, and what a manual run may ask."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from mlops_lifecycle.config import GroundTruth, MetricRule
from mlops_lifecycle.monitoring import (
    IntervalRequestInvalid,
    cooldown_until,
    join_actuals,
    labelled_interval,
    monitor_key,
    performance_breaches,
    requested_check,
    summary,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def truth(**changes) -> GroundTruth:  # noqa: ANN003
    base = {"key": ["market_id"], "prediction_offset_days": 7, "label_delay_days": 1}
    return GroundTruth.model_validate(base | changes)


def test_the_labelled_days_are_those_whose_actuals_are_all_in_by_the_end():
    # a daily check at 05:00 (the README's cron): offset 7, complete one day after the predicted day ends
    start, end = datetime(2026, 12, 1, 5, tzinfo=UTC), datetime(2026, 12, 2, 5, tzinfo=UTC)
    first, last = labelled_interval(truth(), start, end)
    # served on Nov 23 (predicting Nov 30, complete at the end of Dec 1): all in by Dec 2 05:00
    assert (first, last) == (datetime(2026, 11, 23, tzinfo=UTC), datetime(2026, 11, 24, tzinfo=UTC))
    served_on = last - timedelta(seconds=1)  # the latest row it scores
    complete_at = served_on.replace(hour=0, minute=0, second=0) + timedelta(days=7 + 1 + 1)
    assert complete_at <= end
    # consecutive checks score consecutive days, each once; two checks within one day score it once
    assert labelled_interval(truth(), end, end + timedelta(days=1))[0] == last
    morning, noon = labelled_interval(truth(), end, end + timedelta(hours=6)), labelled_interval(
        truth(), end + timedelta(hours=6), end + timedelta(hours=12)
    )
    assert morning[0] == morning[1] and noon[0] == noon[1]  # nothing new completes within a day


def test_airflow_pendulum_times_stay_aware_through_interval_arithmetic():
    import pendulum

    from mlops_lifecycle.config import Monitoring
    from mlops_lifecycle.monitoring import monitor_interval

    monitoring = Monitoring.model_validate({"cron": "0 5 * * *", "ground_truth": {"key": ["market_id"]}})
    start, end = monitor_interval(
        monitoring, pendulum.datetime(2026, 11, 30, 5, tz="UTC"), pendulum.datetime(2026, 12, 1, 5, tz="UTC"), None
    )
    first, last = labelled_interval(monitoring.ground_truth, start, end)
    assert first.tzinfo is not None and last.tzinfo is not None  # pendulum 3.3 dropped it after a subtraction
    assert (start - timedelta(days=8)).tzinfo is not None


def test_label_join_uses_the_serving_day_plus_the_horizon_and_the_key():
    served = pd.DataFrame(
        {
            "ts": pd.to_datetime(["2026-11-20T10:00Z", "2026-11-20T23:59Z", "2026-11-21T00:01Z", "2026-11-20T12:00Z"]),
            "market_id": ["m01", "m02", "m01", "m99"],
            "prediction": [10.0, 20.0, 30.0, 40.0],
        }
    )
    actuals = pd.DataFrame(
        {
            "market_id": ["m01", "m02", "m01", "m01"],
            "date": pd.to_datetime(["2026-11-27", "2026-11-27", "2026-11-28", "2026-11-20"]),
            "actual": [11.0, 19.0, 33.0, 999.0],
        }
    )
    joined = join_actuals(served, actuals, truth())
    # m01 served on the 20th predicts the 27th (not the 20th's 999); the row after midnight predicts the 28th;
    # m99 has no actual and is dropped
    pairs = sorted(zip(joined["prediction"], joined["actual"], strict=True))
    assert pairs == [(10.0, 11.0), (20.0, 19.0), (30.0, 33.0)]


def test_label_join_matches_keys_whatever_their_type_in_the_warehouse():
    served = pd.DataFrame({"ts": pd.to_datetime(["2026-11-20T10:00Z"]), "store": ["7"], "prediction": [1.0]})
    actuals = pd.DataFrame({"store": [7], "date": pd.to_datetime(["2026-11-20"]), "actual": [1.0]})
    assert len(join_actuals(served, actuals, truth(key=["store"], prediction_offset_days=0))) == 1


def test_live_performance_breaches_relative_to_the_holdout_in_the_metric_direction():
    rules = {
        "mape": MetricRule(direction="minimize", threshold=0.25),
        "r2": MetricRule(direction="maximize", threshold=0.7),
    }
    holdout = {"mape": 0.10, "r2": 0.80}
    assert performance_breaches({"mape": 0.12, "r2": 0.78}, holdout, rules, 0.25) == []
    reasons = performance_breaches({"mape": 0.14, "r2": 0.55}, holdout, rules, 0.25)
    assert len(reasons) == 2 and reasons[0].startswith("live mape 0.14 vs 0.1") and "40% worse" in reasons[0]
    assert "live r2 0.55 vs 0.8" in reasons[1]
    # better than the holdout is never a breach; a missing or non-finite metric is not judged
    assert performance_breaches({"mape": 0.01, "r2": float("nan")}, holdout, rules, 0.25) == []


def test_cooldown():
    assert cooldown_until(None, 24) is None
    assert cooldown_until(NOW, 0) is None
    assert cooldown_until(NOW, 24) == NOW + timedelta(hours=24)


def test_monitor_key_is_one_per_version_and_interval():
    a = monitor_key("line", "3", NOW, NOW + timedelta(hours=6))
    assert a == "line/v3/20261201T120000-20261201T180000"
    assert a != monitor_key("line", "4", NOW, NOW + timedelta(hours=6))


def test_a_manual_run_may_check_a_past_stretch_and_says_what_is_wrong_otherwise():
    assert requested_check(None, NOW) is None
    assert requested_check({"since": None, "until": None}, NOW) is None  # the form's empty fields
    since = "2026-12-01T10:00:00+00:00"
    assert requested_check({"since": since}, NOW) == (datetime(2026, 12, 1, 10, tzinfo=UTC), NOW)
    for conf, says in [
        ({"since": "2026-12-01T13:00:00+00:00"}, "must be before until"),
        ({"since": since, "until": "2026-12-02T00:00:00+00:00"}, "not after now"),
        ({"since": "2026-12-01T10:00:00"}, "time zone"),
        ({"since": "yesterday"}, "ISO 8601"),
        ({"until": since}, "'since' is required"),
        ({"since": "2026-10-01T00:00:00+00:00"}, "at most 31 days"),
        ({"since": since, "window": 3}, "unknown run conf keys ['window']"),
    ]:
        with pytest.raises(IntervalRequestInvalid, match=says.replace("[", r"\[").replace("]", r"\]")):
            requested_check(conf, NOW)


def test_summary_names_the_versions_that_breached_and_their_first_reasons():
    findings = {"1": {"breaches": []}, "2": {"breaches": ["price: psi 0.9 >= 0.2", "a", "b", "c"]}}
    assert summary(findings) == "v2: price: psi 0.9 >= 0.2; a; b; and 1 more"
    assert summary({"1": {"breaches": []}}) == "no breach"
