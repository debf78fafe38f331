"""The data window of a run, including runs without a logical date."""

from __future__ import annotations

from datetime import UTC, date, datetime

from mlops_lifecycle import paths
from mlops_lifecycle.config import load_model_line
from mlops_lifecycle.window import last_complete_interval, resolve_window

CONFIG = load_model_line(paths.include_dir() / "model_lines" / "demand_forecast.yaml")


def test_window_comes_from_the_data_interval():
    start = datetime(2026, 11, 16, 3, tzinfo=UTC)
    end = datetime(2026, 11, 23, 3, tzinfo=UTC)
    w = resolve_window(CONFIG, start, end, None)
    assert w.window_end == date(2026, 11, 23)
    assert w.train_start == date(2024, 11, 23)  # 730 days
    assert w.holdout_start == date(2026, 10, 26)  # 28 days
    assert w.run_key == "demand_forecast/20261116T0300-20261123T0300"


def test_run_without_logical_date_uses_last_complete_period_before_it_was_triggered():
    triggered = datetime(2026, 11, 27, 15, 0, tzinfo=UTC)  # a Friday
    w = resolve_window(CONFIG, None, None, triggered)
    assert (w.interval_start, w.interval_end) == (
        datetime(2026, 11, 16, 3, tzinfo=UTC),
        datetime(2026, 11, 23, 3, tzinfo=UTC),
    )


def test_zero_width_interval_is_not_taken_as_a_window():
    at = datetime(2026, 11, 23, 3, tzinfo=UTC)
    w = resolve_window(CONFIG, at, at, at)
    assert w.interval_end == at and w.interval_start == datetime(2026, 11, 16, 3, tzinfo=UTC)


def test_last_complete_interval_on_a_tick_includes_that_tick():
    at = datetime(2026, 11, 23, 3, 0, tzinfo=UTC)
    assert last_complete_interval("0 3 * * 1", "UTC", at)[1] == at
