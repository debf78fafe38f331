"""The generated sample data and the feature SQL of both model lines on the embedded warehouse.

The SQL is BigQuery dialect. These tests handle it the way the local adapter does (jinja2 with
StrictUndefined, then sqlglot to DuckDB) and run it over the generated data, so a feature that
does not survive transpilation, leaks the future or leaves holes fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import duckdb
import jinja2
import jinja2.meta
import numpy as np
import pandas as pd
import pytest
import sqlglot

from mlops_lifecycle.adapters.sample_data import SAMPLE_EPOCH, generate_daily_demand

SQL_DIR = Path(__file__).resolve().parents[2] / "include" / "sql"
LINES = ("demand_forecast", "high_demand_alert")
TARGETS = {"demand_forecast": "units_sold", "high_demand_alert": "high_demand"}
WINDOW_START, WINDOW_END = date(2023, 1, 2), date(2024, 1, 1)


def render_feature_sql(line: str, table: str, window_start: date, window_end: date) -> str:
    """The model line's feature SQL rendered for one window, still in BigQuery dialect."""
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined)
    template = environment.from_string((SQL_DIR / f"{line}_features.sql").read_text())
    return template.render(
        tables={"daily_demand": table},
        window_start=window_start.isoformat(),
        window_end=window_end.isoformat(),
    )


def feature_frame(line: str, demand: pd.DataFrame, window_start: date, window_end: date) -> pd.DataFrame:
    """Run a model line's feature SQL over ``demand`` in DuckDB, as the local adapter does."""
    sql = render_feature_sql(line, "daily_demand", window_start, window_end)
    with duckdb.connect() as connection:
        connection.register("generated", demand)
        connection.execute("CREATE VIEW daily_demand AS SELECT * FROM generated")
        return connection.sql(sqlglot.transpile(sql, read="bigquery", write="duckdb")[0]).df()


@pytest.fixture(scope="module")
def demand() -> pd.DataFrame:
    return generate_daily_demand(SAMPLE_EPOCH, WINDOW_END)


# --- sample data ------------------------------------------------------------------------------


def test_a_day_has_the_same_values_whatever_window_asks_for() -> None:
    early = generate_daily_demand(date(2020, 1, 1), date(2021, 6, 30))
    late = generate_daily_demand(date(2021, 1, 1), date(2022, 12, 31))
    again = generate_daily_demand(date(2020, 1, 1), date(2021, 6, 30))

    def overlap(frame: pd.DataFrame) -> pd.DataFrame:
        inside = (frame["date"] >= date(2021, 1, 1)) & (frame["date"] <= date(2021, 6, 30))
        return frame[inside].reset_index(drop=True)

    assert len(overlap(early)) == 12 * 181
    pd.testing.assert_frame_equal(overlap(early), overlap(late))
    pd.testing.assert_frame_equal(early, again)
    # fewer markets leave the others unchanged too
    few = generate_daily_demand(date(2021, 1, 1), date(2021, 6, 30), n_markets=3)
    same_markets = overlap(early)[overlap(early)["market_id"] <= "M03"].reset_index(drop=True)
    pd.testing.assert_frame_equal(few, same_markets)


def test_the_seed_changes_the_data() -> None:
    one = generate_daily_demand(date(2022, 1, 1), date(2022, 1, 31))
    other = generate_daily_demand(date(2022, 1, 1), date(2022, 1, 31), seed=7)
    assert not np.allclose(one["units_sold"], other["units_sold"])


def test_every_market_has_one_row_per_day_with_sane_values(demand: pd.DataFrame) -> None:
    markets = sorted(demand["market_id"].unique())
    days = (WINDOW_END - SAMPLE_EPOCH).days + 1
    assert markets == [f"M{i:02d}" for i in range(1, 13)]
    assert len(demand) == len(markets) * days
    assert not demand.duplicated(["market_id", "date"]).any()
    assert demand["date"].min() == SAMPLE_EPOCH and demand["date"].max() == WINDOW_END
    assert list(demand.columns) == ["market_id", "date", "units_sold", "price", "promo", "is_holiday"]
    assert demand.notna().all().all()
    assert (demand["units_sold"] >= 0).all() and (demand["price"] > 0).all()
    assert set(demand["promo"].unique()) == {0, 1} and set(demand["is_holiday"].unique()) == {0, 1}
    levels = demand.groupby("market_id")["units_sold"].mean()
    assert levels.max() > 2 * levels.min(), "markets should differ in size"


def test_weekends_sell_more_than_weekdays_in_every_market(demand: pd.DataFrame) -> None:
    weekday = pd.to_datetime(demand["date"].astype(str)).dt.weekday
    weekend_mean = demand[weekday >= 5].groupby("market_id")["units_sold"].mean()
    weekday_mean = demand[weekday < 5].groupby("market_id")["units_sold"].mean()
    assert (weekend_mean > 1.05 * weekday_mean).all()


def test_holidays_are_flagged_and_sell_more(demand: pd.DataFrame) -> None:
    flagged = set(demand.loc[demand["is_holiday"] == 1, "date"])
    thanksgiving, black_friday = date(2023, 11, 23), date(2023, 11, 24)
    for holiday in (date(2023, 1, 1), date(2023, 7, 4), thanksgiving, black_friday, date(2023, 12, 25)):
        assert holiday in flagged, holiday
    assert date(2023, 3, 15) not in flagged
    assert 8 <= len([d for d in flagged if d.year == 2023]) <= 12

    frame = demand.assign(week=pd.to_datetime(demand["date"].astype(str)).dt.to_period("W"))
    weekly_mean = frame.groupby(["market_id", "week"])["units_sold"].transform("mean")
    uplift = (frame["units_sold"] / weekly_mean)[frame["is_holiday"] == 1].mean()
    assert uplift > 1.15


def test_promotions_cut_the_price_and_lift_sales(demand: pd.DataFrame) -> None:
    by_promo = demand.groupby(["market_id", "promo"])[["units_sold", "price"]].mean().unstack("promo")
    assert (by_promo[("price", 1)] < 0.9 * by_promo[("price", 0)]).all()
    assert (by_promo[("units_sold", 1)] > 1.2 * by_promo[("units_sold", 0)]).all()
    assert 0.05 < demand["promo"].mean() < 0.3


def test_days_before_the_epoch_have_no_data() -> None:
    clipped = generate_daily_demand(SAMPLE_EPOCH - timedelta(days=30), SAMPLE_EPOCH + timedelta(days=1))
    assert sorted(set(clipped["date"])) == [SAMPLE_EPOCH, SAMPLE_EPOCH + timedelta(days=1)]
    empty = generate_daily_demand(date(2010, 1, 1), date(2010, 12, 31))
    assert empty.empty and list(empty.columns) == list(clipped.columns)
    with pytest.raises(ValueError, match="after end"):
        generate_daily_demand(date(2022, 2, 1), date(2022, 1, 1))


# --- feature SQL --------------------------------------------------------------------------------


@pytest.mark.parametrize("line", LINES)
def test_sql_uses_only_the_adapter_variables(line: str) -> None:
    source = (SQL_DIR / f"{line}_features.sql").read_text()
    variables = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(source))
    assert variables == {"tables", "window_start", "window_end"}


@pytest.mark.parametrize("line", LINES)
def test_features_cover_the_window_once_per_market_day_without_nulls(line: str, demand: pd.DataFrame) -> None:
    features = feature_frame(line, demand, WINDOW_START, WINDOW_END)

    dates = pd.to_datetime(features["date"])
    assert dates.min() == pd.Timestamp(WINDOW_START)
    assert dates.max() == pd.Timestamp(WINDOW_END - timedelta(days=1)), "window end is exclusive"
    assert not features.duplicated(["market_id", "date"]).any()
    assert len(features) == 12 * (WINDOW_END - WINDOW_START).days
    nulls = features.isna().sum()
    assert not nulls.any(), f"NULLs after the warm-up margin: {nulls[nulls > 0].to_dict()}"
    assert TARGETS[line] in features.columns


@pytest.mark.parametrize("line", LINES)
def test_features_do_not_see_the_future(line: str, demand: pd.DataFrame) -> None:
    """Rewrite sales the features must not know (the forecast horizon: 7 days for the forecast,
    the same day for the alert) and check no feature of any window day moves."""
    horizon = 7 if line == "demand_forecast" else 1
    late = demand["date"] >= WINDOW_END - timedelta(days=horizon)
    altered = demand.assign(units_sold=demand["units_sold"].where(~late, demand["units_sold"] * 3 + 50))

    before = feature_frame(line, demand, WINDOW_START, WINDOW_END)
    after = feature_frame(line, altered, WINDOW_START, WINDOW_END)
    feature_columns = [c for c in before.columns if c != TARGETS[line]]
    pd.testing.assert_frame_equal(before[feature_columns], after[feature_columns])
    assert not before[TARGETS[line]].equals(after[TARGETS[line]]), "the target must see the altered sales"


def test_demand_features_match_their_definition(demand: pd.DataFrame) -> None:
    features = feature_frame("demand_forecast", demand, WINDOW_START, WINDOW_END)
    history = demand[demand["market_id"] == "M05"].set_index("date")["units_sold"]
    day = date(2023, 6, 10)  # a Saturday
    row = features[(features["market_id"] == "M05") & (features["date"].dt.date == day)].iloc[0]

    assert row["day_of_week"] == 7 and row["day_of_year"] == 161, "BigQuery convention: 1 = Sunday"
    assert row["units_sold"] == history[day]
    assert row["lag_7"] == history[day - timedelta(days=7)]
    assert row["lag_14"] == history[day - timedelta(days=14)]
    expected_mean = np.mean([history[day - timedelta(days=k)] for k in range(7, 35)])
    assert row["rolling_mean_28"] == pytest.approx(expected_mean)


def test_high_demand_label_matches_its_rule(demand: pd.DataFrame) -> None:
    features = feature_frame("high_demand_alert", demand, WINDOW_START, WINDOW_END)
    assert {"market_id", "units_sold"}.isdisjoint(features.columns[2:]), "no key or raw target as feature"
    history = demand.set_index(["market_id", "date"])["units_sold"]
    sample = features.sample(200, random_state=1)
    rows = zip(sample["market_id"], sample["date"].dt.date, sample["high_demand"], strict=True)
    for market, day, label in rows:
        baseline = np.mean([history[(market, day - timedelta(days=7 * k))] for k in range(1, 5)])
        assert label == int(history[(market, day)] > 1.25 * baseline)
    assert 0.05 < features["high_demand"].mean() < 0.35, "the alert should be rare but not vanishing"


@pytest.mark.parametrize("line", LINES)
def test_a_bigquery_table_reference_survives_transpilation(line: str, demand: pd.DataFrame) -> None:
    sql = render_feature_sql(line, "`proj.ds.daily_demand`", WINDOW_START, WINDOW_START + timedelta(days=7))
    with duckdb.connect() as connection:
        connection.register("generated", demand)
        connection.execute("ATTACH ':memory:' AS proj")
        connection.execute("CREATE SCHEMA proj.ds")
        connection.execute("CREATE VIEW proj.ds.daily_demand AS SELECT * FROM generated")
        features = connection.sql(sqlglot.transpile(sql, read="bigquery", write="duckdb")[0]).df()
    assert len(features) == 12 * 7


def test_importing_the_module_stays_cheap_for_dag_parsing() -> None:
    code = (
        "import sys, mlops_lifecycle.adapters.sample_data as m; "
        "heavy = {'numpy', 'pandas', 'pyarrow'} & set(sys.modules); "
        "assert not heavy, heavy; print(m.SAMPLE_EPOCH)"
    )
    plugins = Path(__file__).resolve().parents[2] / "plugins"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(plugins)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2019-01-01"
