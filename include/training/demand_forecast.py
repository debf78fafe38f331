"""Demand forecast: units sold per market and day, one week ahead (regression).

Features come from ``include/sql/demand_forecast_features.sql`` and are all known 7 days ahead.
The model is a HistGradientBoostingRegressor (Poisson loss: sales are counts whose drivers multiply)
behind a one-hot encoding of the market. pyfunc ``predict`` returns the forecast units, a 1-D
float array. Holdout metrics: ``mape`` (fraction, zero-sales days floored at 1 unit), ``rmse``,
``mae``, ``r2``.

Usage: ``python include/training/demand_forecast.py --help``
"""

from __future__ import annotations

import sys
from typing import Any

import lifecycle_training
import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.metrics import mean_absolute_error, r2_score, root_mean_squared_error
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder

CATEGORICAL = ("market_id",)
NUMERIC = (
    "day_of_week",
    "day_of_year",
    "month",
    "is_holiday",
    "promo",
    "price",
    "price_ratio_28",
    "lag_7",
    "lag_14",
    "lag_21",
    "lag_28",
    "same_weekday_mean_4",
    "rolling_mean_28",
    "rolling_std_28",
)
DEFAULT_PARAMS: dict[str, Any] = {
    "loss": "poisson",
    "learning_rate": 0.05,
    "max_iter": 300,
    "max_leaf_nodes": 31,
    "min_samples_leaf": 20,
    "l2_regularization": 1.0,
    "early_stopping": False,
    "random_state": 0,
}


def build(params: dict[str, Any]) -> Pipeline:
    """One-hot market (unknown markets encode as all zeros), numeric features as they are."""
    encode = ColumnTransformer(
        [("market", OneHotEncoder(handle_unknown="ignore", sparse_output=False), list(CATEGORICAL))],
        remainder="passthrough",
        verbose_feature_names_out=False,
    )
    return Pipeline([("features", encode), ("model", HistGradientBoostingRegressor(**params))])


# the names metrics() returns: model-line validation checks gate metrics against them (read, not imported)
METRICS = ("mape", "rmse", "mae", "r2")


def metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Holdout metrics of the forecast; lower is better except ``r2``."""
    return {
        "mape": lifecycle_training.mean_absolute_percentage_error(y_true, y_pred),
        "rmse": float(root_mean_squared_error(y_true, y_pred)),
        "mae": float(mean_absolute_error(y_true, y_pred)),
        "r2": float(r2_score(y_true, y_pred)),
    }


LINE = lifecycle_training.ModelLine(
    task="regression",
    categorical=CATEGORICAL,
    numeric=NUMERIC,
    estimator=HistGradientBoostingRegressor,
    default_params=DEFAULT_PARAMS,
    build=build,
    metrics=metrics,
    metric_names=METRICS,
)

if __name__ == "__main__":
    sys.exit(lifecycle_training.main(LINE))
