-- High-demand alert features: one row per market and day in [window_start, window_end).
--
-- Target: high_demand (binary) = 1 when a day sells more than 1.25 x the mean of the same weekday
-- over the previous four weeks. Comparing with the same weekday keeps the alert about unusual days
-- (promotions, holidays, shocks) instead of flagging every Saturday. The alert is issued at the
-- start of the day, so features may use history up to yesterday. Features are scale free (ratios),
-- so one model serves every market, including new ones; market_id is a key, not a feature.
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

trailing_stats AS (
  SELECT
    market_id,
    day_number,
    -- days d-28 .. d-1: everything known at the start of the day
    AVG(units_sold) OVER (
      PARTITION BY market_id ORDER BY day_number RANGE BETWEEN 28 PRECEDING AND 1 PRECEDING
    ) AS mean_units_28,
    AVG(price) OVER (
      PARTITION BY market_id ORDER BY day_number RANGE BETWEEN 28 PRECEDING AND 1 PRECEDING
    ) AS mean_price_28,
    CAST(SUM(promo) OVER (
      PARTITION BY market_id ORDER BY day_number RANGE BETWEEN 7 PRECEDING AND 1 PRECEDING
    ) AS INT64) AS promo_days_7
  FROM history
),

labelled AS (
  SELECT
    h.market_id,
    h.date,
    h.day_number,
    h.units_sold,
    h.promo,
    h.is_holiday,
    h.price,
    t.mean_units_28,
    t.mean_price_28,
    t.promo_days_7,
    l1.units_sold AS lag_1,
    l7.units_sold AS lag_7,
    (l7.units_sold + l14.units_sold + l21.units_sold + l28.units_sold) / 4 AS same_weekday_mean_4
  FROM history AS h
  JOIN trailing_stats AS t
    ON t.market_id = h.market_id AND t.day_number = h.day_number
  LEFT JOIN history AS l1
    ON l1.market_id = h.market_id AND l1.day_number = h.day_number - 1
  LEFT JOIN history AS l7
    ON l7.market_id = h.market_id AND l7.day_number = h.day_number - 7
  LEFT JOIN history AS l14
    ON l14.market_id = h.market_id AND l14.day_number = h.day_number - 14
  LEFT JOIN history AS l21
    ON l21.market_id = h.market_id AND l21.day_number = h.day_number - 21
  LEFT JOIN history AS l28
    ON l28.market_id = h.market_id AND l28.day_number = h.day_number - 28
  WHERE h.date >= DATE '{{ window_start }}'
)

SELECT
  market_id,
  date,
  MOD(day_number - 3, 7) + 1 AS day_of_week,  -- 1 = Sunday .. 7 = Saturday, as in BigQuery
  is_holiday,
  promo,
  promo_days_7,
  SAFE_DIVIDE(price, mean_price_28) AS price_ratio_28,
  SAFE_DIVIDE(lag_1, mean_units_28) AS lag_1_ratio,
  SAFE_DIVIDE(lag_7, mean_units_28) AS lag_7_ratio,
  SAFE_DIVIDE(same_weekday_mean_4, mean_units_28) AS weekday_index,
  CASE
    WHEN same_weekday_mean_4 IS NULL THEN NULL  -- no baseline: no label, rather than a wrong 0
    WHEN units_sold > 1.25 * same_weekday_mean_4 THEN 1
    ELSE 0
  END AS high_demand
FROM labelled
ORDER BY market_id, date
