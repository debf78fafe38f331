"""High-demand alert: will a market sell over 1.25x its usual for this weekday today? (classification)

Features come from ``include/sql/high_demand_alert_features.sql``: scale-free ratios known at the
start of the day, so one model serves every market. The model is a logistic regression (one-hot
weekday, imputed and standardised ratios): calibrated probabilities and coefficients a reviewer can
read. pyfunc ``predict`` returns ``predict_proba``: an (n, 2) float array whose column 1 is the
probability of high demand. Holdout metrics: ``roc_auc``, ``brier``, ``log_loss``,
``precision_at_0_5``, ``recall_at_0_5``.

Usage: ``python include/training/high_demand_alert.py --help``
"""

from __future__ import annotations

import math
import sys
from typing import Any

import lifecycle_training
import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, log_loss, precision_score, recall_score, roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

CATEGORICAL = ("day_of_week",)
NUMERIC = (
    "is_holiday",
    "promo",
    "promo_days_7",
    "price_ratio_28",
    "lag_1_ratio",
    "lag_7_ratio",
    "weekday_index",
)
DEFAULT_PARAMS: dict[str, Any] = {"C": 1.0, "max_iter": 1000}


def build(params: dict[str, Any]) -> Pipeline:
    """One-hot weekday; numeric features imputed (median) and standardised; logistic regression."""
    numeric = Pipeline([("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())])
    encode = ColumnTransformer(
        [
            ("weekday", OneHotEncoder(handle_unknown="ignore", sparse_output=False), list(CATEGORICAL)),
            ("numeric", numeric, list(NUMERIC)),
        ],
        verbose_feature_names_out=False,
    )
    return Pipeline([("features", encode), ("model", LogisticRegression(**params))])


# the names metrics() returns: model-line validation checks gate metrics against them (read, not imported)
METRICS = ("roc_auc", "brier", "log_loss", "precision_at_0_5", "recall_at_0_5")


def metrics(y_true: np.ndarray, y_score: np.ndarray) -> dict[str, float]:
    """Holdout metrics of the alert; ``roc_auc`` is NaN when the holdout has a single class."""
    y_true = np.asarray(y_true).astype(int)
    y_score = np.clip(np.asarray(y_score, dtype=float), 0.0, 1.0)
    alert = (y_score >= 0.5).astype(int)
    single_class = len(np.unique(y_true)) < 2
    return {
        "roc_auc": math.nan if single_class else float(roc_auc_score(y_true, y_score)),
        "brier": float(brier_score_loss(y_true, y_score, labels=[0, 1])),
        "log_loss": float(log_loss(y_true, y_score, labels=[0, 1])),
        "precision_at_0_5": float(precision_score(y_true, alert, zero_division=0)),
        "recall_at_0_5": float(recall_score(y_true, alert, zero_division=0)),
    }


LINE = lifecycle_training.ModelLine(
    task="classification",
    categorical=CATEGORICAL,
    numeric=NUMERIC,
    estimator=LogisticRegression,
    default_params=DEFAULT_PARAMS,
    build=build,
    metrics=metrics,
    metric_names=METRICS,
)

if __name__ == "__main__":
    sys.exit(lifecycle_training.main(LINE))
