"""Deterministic generated daily demand: the data behind the embedded local warehouse.

The series look like retail demand (per-market level and trend, weekend peak, yearly season,
holidays, promotions, a price effect, autocorrelated multiplicative noise) so the feature SQL and
the models have real signal to find. Every random draw comes from a stream keyed by (seed, market,
stream) and indexed by days since :data:`SAMPLE_EPOCH`, so the value of a (market, day) never
depends on the window that was asked for: windows can be generated independently and still agree,
like reads from one warehouse table.

numpy and pandas are imported inside the function: this module lives in the Airflow plugins
package, which must stay cheap to import at DAG-parse time.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

SAMPLE_EPOCH = date(2019, 1, 1)
"""The earliest day that has data; earlier days are simply not in the table."""

COLUMNS = ("market_id", "date", "units_sold", "price", "promo", "is_holiday")

# Per-stream ids, so adding a stream never shifts the draws of another.
_MARKET_PARAMS, _NOISE, _PROMO, _PRICE = 0, 1, 2, 3

# Weekday multipliers, Monday..Sunday: a weekend peak on Saturday.
_WEEKLY_PROFILE = (0.90, 0.88, 0.91, 0.96, 1.07, 1.22, 1.06)
_PROMO_START_PROBABILITY = 0.04
_PROMO_DAYS = 4
_PROMO_DISCOUNT = 0.2
_PROMO_DISPLAY_UPLIFT = 1.15
_PRICE_ELASTICITY = -1.4


def _holidays(year: int) -> dict[date, float]:
    """Fixed and floating (US retail) holidays of ``year`` with their demand multiplier."""

    def nth_weekday(month: int, weekday: int, n: int) -> date:
        first = date(year, month, 1)
        return first + timedelta(days=(weekday - first.weekday()) % 7 + 7 * (n - 1))

    def last_weekday(month: int, weekday: int) -> date:
        last = date(year + (month == 12), month % 12 + 1, 1) - timedelta(days=1)
        return last - timedelta(days=(last.weekday() - weekday) % 7)

    thanksgiving = nth_weekday(11, 3, 4)  # fourth Thursday of November
    return {
        date(year, 1, 1): 1.30,  # New Year's Day
        last_weekday(5, 0): 1.25,  # Memorial Day
        date(year, 7, 4): 1.45,  # Independence Day
        nth_weekday(9, 0, 1): 1.25,  # Labor Day
        thanksgiving: 1.40,
        thanksgiving + timedelta(days=1): 1.70,  # Black Friday
        date(year, 12, 24): 1.50,
        date(year, 12, 25): 1.35,
        date(year, 12, 31): 1.40,
    }


def _stream(seed: int, market: int, stream: int) -> np.random.Generator:
    import numpy as np

    return np.random.default_rng([seed, market, stream])


def generate_daily_demand(start: date, end: date, n_markets: int = 12, seed: int = 20240101) -> pd.DataFrame:
    """Daily demand of markets ``M01``..``Mnn`` for every day in ``[start, end]`` (inclusive).

    Days before :data:`SAMPLE_EPOCH` have no data and are left out. Columns: ``market_id`` (str),
    ``date`` (date32), ``units_sold`` (float, whole units, >= 0), ``price`` (float), ``promo`` and
    ``is_holiday`` (int 0/1). Rows are ordered by market, then date.
    """
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    if start > end:
        raise ValueError(f"start {start} is after end {end}")
    if not 1 <= n_markets <= 99:
        raise ValueError(f"n_markets must be between 1 and 99, got {n_markets}")

    # Generate from the epoch so every stream is indexed by day; slice to the window at the end.
    n_days = max((end - SAMPLE_EPOCH).days + 1, 0)
    window = slice(max((start - SAMPLE_EPOCH).days, 0), n_days)
    days = np.arange(n_days)
    dates = np.datetime64(SAMPLE_EPOCH, "D") + days
    weekday = (days + SAMPLE_EPOCH.weekday()) % 7
    day_of_year = (dates - dates.astype("datetime64[Y]")).astype(np.int64) + 1
    years = days / 365.25

    holiday_uplift = np.ones(n_days)
    for year in range(SAMPLE_EPOCH.year, end.year + 1):
        for day, uplift in _holidays(year).items():
            if SAMPLE_EPOCH <= day <= end:
                holiday_uplift[(day - SAMPLE_EPOCH).days] = uplift
    is_holiday = (holiday_uplift != 1.0).astype(np.int64)
    weekly = np.asarray(_WEEKLY_PROFILE)[weekday]

    columns: dict[str, list[np.ndarray]] = {name: [] for name in COLUMNS if name != "date"}
    for market in range(1, n_markets + 1):
        params = _stream(seed, market, _MARKET_PARAMS)
        level = params.lognormal(np.log(180.0), 0.5)
        growth = params.uniform(-0.03, 0.12)  # per year, linear
        season_amplitude = params.uniform(0.06, 0.20)
        season_peak_day = params.uniform(0, 365.25)
        weekend_strength = params.uniform(0.6, 1.4)
        base_price = params.uniform(2.5, 12.0)
        inflation = params.uniform(0.01, 0.04)

        promo_starts = _stream(seed, market, _PROMO).random(n_days) < _PROMO_START_PROBABILITY
        started = np.concatenate([[0], np.cumsum(promo_starts)])
        promo = started[1:] > started[np.maximum(days + 1 - _PROMO_DAYS, 0)]  # a start in the last N days

        list_price = base_price * (1 + inflation * years)
        price_noise = 1 + 0.02 * _stream(seed, market, _PRICE).standard_normal(n_days)
        price = np.round(list_price * price_noise * np.where(promo, 1 - _PROMO_DISCOUNT, 1.0), 2)

        # AR(1) log-noise: demand shocks persist for a few days, as in real series.
        log_noise = _stream(seed, market, _NOISE).standard_normal(n_days) * 0.07
        for i in range(1, n_days):
            log_noise[i] += 0.55 * log_noise[i - 1]

        units = (
            level
            * (1 + growth * years)
            * (1 + weekend_strength * (weekly - 1))
            * (1 + season_amplitude * np.cos(2 * np.pi * (day_of_year - season_peak_day) / 365.25))
            * holiday_uplift
            * np.where(promo, _PROMO_DISPLAY_UPLIFT, 1.0)
            * (price / list_price) ** _PRICE_ELASTICITY
            * np.exp(log_noise)
        )
        columns["market_id"].append(np.full(n_days, f"M{market:02d}")[window])
        columns["units_sold"].append(np.maximum(np.round(units), 0.0)[window])
        columns["price"].append(price[window])
        columns["promo"].append(promo.astype(np.int64)[window])
        columns["is_holiday"].append(is_holiday[window])

    data = {name: np.concatenate(parts) for name, parts in columns.items()}
    return pd.DataFrame(
        {
            "market_id": pd.array(data["market_id"], dtype="str"),
            "date": pd.array(pa.array(np.tile(dates[window], n_markets)), dtype=pd.ArrowDtype(pa.date32())),
            "units_sold": data["units_sold"],
            "price": data["price"],
            "promo": data["promo"],
            "is_holiday": data["is_holiday"],
        }
    )
