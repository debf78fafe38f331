"""Drift statistics: the tests agree with scipy, fresh samples of the same data raise nothing, and each kind of
drift or data-quality problem is reported on the column it happened to, with a reason an operator can read."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mlops_lifecycle.drift import (
    DriftThresholds,
    check_drift,
    chi2_two_sample,
    ks_2samp,
    psi,
    reference_from_frame,
)

NUMERIC = ["age", "income", "tenure", "score", "balance", "orders", "temperature", "ratio"]
CATEGORICAL = ["region", "plan", "channel", "device"]
KINDS = {**dict.fromkeys(NUMERIC, "numeric"), **dict.fromkeys(CATEGORICAL, "categorical"), "prediction": "numeric"}
REGIONS, REGION_SHARES = ["north", "south", "east", "west"], [0.4, 0.3, 0.2, 0.1]


def features(rows: int, seed: int, region_shares: list[float] = REGION_SHARES) -> pd.DataFrame:
    """12 features of a customer table (discrete, skewed, with nulls, a rare category) and a prediction."""
    rng = np.random.default_rng(seed)
    balance = rng.normal(1000, 300, rows)
    balance[rng.random(rows) < 0.05] = np.nan  # nulls in the reference as well: not a breach by themselves
    return pd.DataFrame(
        {
            "age": rng.integers(18, 90, rows),
            "income": rng.lognormal(10, 0.5, rows),
            "tenure": rng.exponential(24, rows),
            "score": rng.normal(0, 1, rows),
            "balance": balance,
            "orders": rng.poisson(3, rows),
            "temperature": rng.normal(15, 8, rows),
            "ratio": rng.random(rows),
            "region": rng.choice(REGIONS, rows, p=region_shares),
            "plan": rng.choice(["free", "pro", "team"], rows, p=[0.7, 0.2, 0.1]),
            "channel": rng.choice(
                ["web", "app", "mail", "shop", "phone", "fax"], rows, p=[0.4, 0.3, 0.1, 0.1, 0.095, 0.005]
            ),
            "device": rng.integers(1, 6, rows),  # integer codes, a categorical feature
            "prediction": rng.normal(50, 10, rows),
        }
    )


@pytest.fixture(scope="module")
def reference() -> dict:
    return reference_from_frame(features(20_000, seed=1000), KINDS)


# --- the statistics agree with scipy -------------------------------------------------------------------------

_rng = np.random.default_rng(7)
KS_CASES = {
    "normal vs shifted normal": (_rng.normal(0, 1, 4000), _rng.normal(0.1, 1, 3000)),
    "same normal": (_rng.normal(0, 1, 20_000), _rng.normal(0, 1, 5000)),
    "ties (discrete values)": (_rng.integers(0, 5, 2000).astype(float), _rng.integers(0, 6, 700).astype(float)),
    "sizes 50 and 7": (_rng.normal(0, 1, 50), _rng.normal(0.5, 1, 7)),
    "current outside the reference": (_rng.normal(0, 1, 1000), _rng.normal(5, 1, 1000)),
    "identical": (np.arange(100.0), np.arange(100.0)),
}


@pytest.mark.parametrize("case", KS_CASES)
def test_ks_equals_scipy_asymptotic_two_sided(case):
    ref, cur = KS_CASES[case]
    expected = stats.ks_2samp(ref, cur, method="asymp")
    d, p = ks_2samp(np.sort(ref), cur)
    assert d == pytest.approx(expected.statistic, abs=1e-12)
    assert p == pytest.approx(expected.pvalue, abs=1e-9)


def test_ks_drops_nulls_and_refuses_an_unsorted_reference():
    ref, cur = KS_CASES["normal vs shifted normal"]
    with_nulls = np.concatenate([cur, [np.nan] * 30])
    assert ks_2samp(np.sort(ref), with_nulls) == ks_2samp(np.sort(ref), cur)
    with pytest.raises(ValueError, match="not sorted"):
        ks_2samp(ref, cur)


CHI2_CASES = {
    "same shares": ([400, 300, 200, 100], [41, 29, 20, 10]),
    "shifted shares": ([400, 300, 200, 100], [25, 25, 25, 25]),
    "a category only in the current": ([500, 500, 0], [40, 50, 10]),
    "a category empty in both": ([500, 0, 500], [40, 0, 60]),
    "large counts": ([40_000, 9_000, 1_000], [790_000, 200_000, 10_000]),
}


@pytest.mark.parametrize("case", CHI2_CASES)
def test_chi2_equals_scipy_contingency(case):
    ref, cur = CHI2_CASES[case]
    table = np.array([ref, cur])
    expected = stats.chi2_contingency(table[:, table.sum(axis=0) > 0], correction=False)
    statistic, p = chi2_two_sample(ref, cur)
    assert statistic == pytest.approx(expected.statistic, rel=1e-9)
    assert p == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-300)


def test_psi_by_hand():
    # (0.25 - 0.5) ln(0.25 / 0.5) + (0.75 - 0.5) ln(0.75 / 0.5)
    assert psi([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.25 * math.log(2) + 0.25 * math.log(1.5))
    # an empty reference bin counts as 1e-4: (0.9 - 1) ln 0.9 + (0.1 - 1e-4) ln(0.1 / 1e-4)
    assert psi([1.0, 0.0], [0.9, 0.1]) == pytest.approx(-0.1 * math.log(0.9) + 0.0999 * math.log(1000))
    assert psi([0.2] * 5, [0.2] * 5) == 0.0


# --- checks on data ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_fresh_samples_of_the_same_data_raise_nothing(reference, seed):
    # by design about 1 check in 100 of such data breaches by chance (p_value is family-wise 0.01)
    result = check_drift(reference, features(5000, seed))
    assert result.judged and result.rows == 5000
    assert result.breaches == []
    assert list(result.columns) == NUMERIC + CATEGORICAL  # features in reference order, prediction apart
    assert result.prediction is not None and not result.prediction.drifted
    assert all(c.psi is not None and c.psi < 0.05 for c in result.columns.values())


def test_a_mean_shift_is_reported_on_that_feature_only(reference):
    current = features(5000, seed=1)
    current["temperature"] += 8  # one standard deviation warmer
    result = check_drift(reference, current)
    assert {column for column, _ in result.breaches} == {"temperature"}
    drift = result.columns["temperature"]
    assert drift.test == "ks" and drift.statistic > 0.3
    reasons = " | ".join(drift.breaches)
    assert f"psi {drift.psi:.3g} >= 0.2" in reasons
    assert "ks p=" in reasons and "(0.01 over 13 columns)" in reasons  # 12 features and the prediction


def test_a_category_share_shift_is_reported_on_that_feature_only(reference):
    result = check_drift(reference, features(5000, seed=2, region_shares=[0.25, 0.25, 0.25, 0.25]))
    assert {column for column, _ in result.breaches} == {"region"}
    drift = result.columns["region"]
    assert drift.test == "chi2" and drift.p_value < 1e-10
    assert drift.unseen_rate == 0.0 and drift.out_of_range_rate is None
    assert drift.bins["labels"] == REGIONS  # most frequent in the reference first
    assert drift.bins["current"] == pytest.approx([0.25] * 4, abs=0.03)


def test_prediction_drift_is_reported_as_the_prediction(reference):
    current = features(5000, seed=3)
    current["prediction"] *= 1.3
    result = check_drift(reference, current)
    assert result.prediction is not None and result.prediction.drifted
    assert {column for column, _ in result.breaches} == {"prediction"}
    assert "prediction" not in result.columns


def test_nulls_out_of_range_and_unseen_categories_breach_their_thresholds(reference):
    current = features(5000, seed=4)
    current.loc[current.index[:600], "score"] = np.nan  # 12% null, the reference has none
    current.loc[current.index[-400:], "age"] = 120  # 8% above the reference's oldest (89)
    current.loc[current.index[:350], "plan"] = "enterprise"  # 7% a plan the reference never had
    current.loc[current.index[350:360], "plan"] = None
    result = check_drift(reference, current)

    score = result.columns["score"]
    assert score.null_rate == pytest.approx(0.12) and score.reference_null_rate == 0.0
    assert "null rate 0.12 vs 0 in the reference (+0.12 > 0.05)" in score.breaches

    age = result.columns["age"]
    assert age.out_of_range_rate == pytest.approx(0.08)
    assert "out of range 0.08 > 0.05 (outside the reference [18, 89])" in age.breaches

    plan = result.columns["plan"]
    assert plan.unseen_rate == pytest.approx(350 / 4990) and plan.unseen_examples == ("enterprise",)
    assert plan.null_rate == pytest.approx(10 / 5000)
    assert any(r.startswith("unseen categories 0.0701 > 0.05 (1 distinct)") for r in plan.breaches)
    assert "enterprise" in plan.unseen_examples and not any("enterprise" in r for r in plan.breaches)

    balance = result.columns["balance"]  # 5% nulls, as in the reference
    assert balance.null_rate == pytest.approx(0.05, abs=0.01) and not balance.drifted


def test_below_their_thresholds_nulls_and_unseen_values_are_reported_without_their_breach(reference):
    current = features(5000, seed=11)
    current.loc[current.index[:100], "score"] = np.nan  # 2%
    current.loc[current.index[:100], "plan"] = "enterprise"  # 2%
    result = check_drift(reference, current)
    assert result.columns["score"].null_rate == pytest.approx(0.02) and not result.columns["score"].drifted
    plan = result.columns["plan"]
    assert plan.unseen_rate == pytest.approx(0.02) and plan.unseen_examples == ("enterprise",)
    # a new category is still a change of the category shares, which the chi-squared test sees
    [reason] = plan.breaches
    assert reason.startswith("chi2 p=")
    assert [c for c, _ in result.breaches] == ["plan"]


def test_a_missing_column_and_non_numeric_values_are_schema_violations(reference):
    current = features(5000, seed=6).drop(columns=["tenure"])
    current["income"] = current["income"].astype(object)
    current.loc[current.index[:3], "income"] = ["n/a", "12,5", "<script>"]
    result = check_drift(reference, current)

    tenure = result.columns["tenure"]
    assert tenure.schema_violations == 5000 and tenure.psi is None and tenure.p_value is None
    assert tenure.breaches == ("column missing from the current data",)

    income = result.columns["income"]
    assert income.schema_violations == 3 and income.null_rate == 0.0
    assert income.breaches == ("3 value(s) not numeric",)  # the values themselves stay out of alerts and tags
    assert income.psi is not None and income.psi < 0.05  # the other 4,997 values still tested
    assert {column for column, _ in result.breaches} == {"tenure", "income"}


def test_integer_categories_read_back_as_floats_are_the_same_categories(reference):
    current = features(5000, seed=7)
    current["device"] = current["device"].astype(float)  # what an int column with a null becomes
    current.loc[current.index[:5], "device"] = np.nan
    device = check_drift(reference, current).columns["device"]
    assert device.unseen_rate == 0.0 and not device.drifted
    assert sorted(device.bins["labels"]) == ["1", "2", "3", "4", "5"]


def test_below_min_rows_statistics_without_a_verdict(reference):
    current = features(50, seed=8)
    current["temperature"] += 30
    current = current.drop(columns=["plan"])
    result = check_drift(reference, current)
    assert not result.judged and result.breaches == []
    temperature = result.columns["temperature"]
    assert temperature.psi > 1 and temperature.p_value < 1e-10 and not temperature.drifted
    assert result.columns["plan"].schema_violations == 50
    assert check_drift(reference, current, DriftThresholds(min_rows=50)).judged


def test_thresholds_are_configurable(reference):
    current = features(5000, seed=9)
    current["temperature"] += 2  # a quarter of a standard deviation
    assert "temperature" in {c for c, _ in check_drift(reference, current).breaches}  # by the KS test
    lenient = DriftThresholds(p_value=1e-100)
    assert check_drift(reference, current, lenient).breaches == []


def test_a_reference_refuses_what_it_cannot_profile():
    frame = features(200, seed=10)
    with pytest.raises(ValueError, match="not in the reference data"):
        reference_from_frame(frame, {"missing": "numeric"})
    with pytest.raises(ValueError, match="kind 'text'"):
        reference_from_frame(frame, {"region": "text"})
    with pytest.raises(ValueError, match="non-numeric value"):
        reference_from_frame(frame, {"region": "numeric"})


def test_reference_bins_are_deciles_open_at_both_ends(reference):
    income = reference["income"]
    assert income.bin_edges[0] == -np.inf and income.bin_edges[-1] == np.inf and len(income.bin_edges) == 11
    assert income.bin_shares == pytest.approx([0.1] * 10)
    age = reference["age"]  # 72 distinct ages: deciles, some bins wider
    assert age.minimum == 18 and age.maximum == 89 and sum(age.bin_shares) == pytest.approx(1.0)
    assert reference["region"].categories == pytest.approx(dict(zip(REGIONS, REGION_SHARES, strict=True)), abs=0.01)
