-- Demand forecast features: one row per market and day in [window_start, window_end).
--
-- Target: units_sold (regression). Every feature is known 7 days ahead, so the model can forecast a
-- week out: calendar, planned price and promotion, and sales history lagged by at least 7 days.
-- History is read from 60 days before the window so lags and rolling means are complete on the
-- window's first day. Lags join on a day number instead of LAG(), so a missing day yields NULL
-- rather than silently shifting the series.
--
-- Written in BigQuery SQL; the local adapter transpiles it to DuckDB with sqlglot. Day of week is
-- computed from a day count because EXTRACT(DAYOFWEEK) is 1..7 in BigQuery but 0..6 in DuckDB.
WITH history AS (
  SELECT
    market_id,
    date,
    DATE_DIFF(date, DATE '1970-01-01', DAY) AS day_number,
    CAST(units_sold AS FLOAT64) AS units_sold,
    CAST(price AS FLOAT64) AS price,
    CAST(promo AS INT64) AS promo,
    CAST(is_holiday AS INT64) AS is_holiday
  FROM {{ tables.daily_demand }}
  WHERE date >= DATE_SUB(DATE '{{ window_start }}', INTERVAL 60 DAY)
    AND date < DATE '{{ window_end }}'
),

rolling AS (
  SELECT
    market_id,
    day_number,
    -- days d-34 .. d-7: the last four weeks known a week ahead
    AVG(units_sold) OVER (
      PARTITION BY market_id ORDER BY day_number RANGE BETWEEN 34 PRECEDING AND 7 PRECEDING
    ) AS rolling_mean_28,
    STDDEV_SAMP(units_sold) OVER (
      PARTITION BY market_id ORDER BY day_number RANGE BETWEEN 34 PRECEDING AND 7 PRECEDING
    ) AS rolling_std_28,
    AVG(price) OVER (
      PARTITION BY market_id ORDER BY day_number RANGE BETWEEN 34 PRECEDING AND 7 PRECEDING
    ) AS rolling_mean_price_28
  FROM history
)

SELECT
  h.market_id,
  h.date,
  MOD(h.day_number - 3, 7) + 1 AS day_of_week,  -- 1 = Sunday .. 7 = Saturday, as in BigQuery
  EXTRACT(DAYOFYEAR FROM h.date) AS day_of_year,
  EXTRACT(MONTH FROM h.date) AS month,
  h.is_holiday,
  h.promo,
  h.price,
  SAFE_DIVIDE(h.price, r.rolling_mean_price_28) AS price_ratio_28,
  l7.units_sold AS lag_7,
  l14.units_sold AS lag_14,
  l21.units_sold AS lag_21,
  l28.units_sold AS lag_28,
  (l7.units_sold + l14.units_sold + l21.units_sold + l28.units_sold) / 4 AS same_weekday_mean_4,
  r.rolling_mean_28,
  r.rolling_std_28,
  h.units_sold
FROM history AS h
JOIN rolling AS r
  ON r.market_id = h.market_id AND r.day_number = h.day_number
LEFT JOIN history AS l7
  ON l7.market_id = h.market_id AND l7.day_number = h.day_number - 7
LEFT JOIN history AS l14
  ON l14.market_id = h.market_id AND l14.day_number = h.day_number - 14
LEFT JOIN history AS l21
  ON l21.market_id = h.market_id AND l21.day_number = h.day_number - 21
LEFT JOIN history AS l28
  ON l28.market_id = h.market_id AND l28.day_number = h.day_number - 28
WHERE h.date >= DATE '{{ window_start }}'
ORDER BY h.market_id, h.date
