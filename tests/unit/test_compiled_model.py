"""The compiled model path (include/deployment/model_service/compiled.py) against scikit-learn itself.

Every supported pipeline is fitted on small synthetic data (with NaN, and unknown categories at
predict time) and must give what ``getattr(model, predict_fn)(pandas.DataFrame(data))`` gives, to
1e-9 relative, for 1, 7 and 500 rows. The two shipped pipelines come from their training modules
(loaded from their files, as tests/test_training_entrypoints.py does: include/ is not on sys.path).
Unsupported models must be refused with a reason naming what is unsupported.

scikit-learn and pandas are imported inside the tests, not at collection.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
TRAINING_DIR = REPO / "include" / "training"
DEPLOYMENT_DIR = REPO / "include" / "deployment"
RTOL = 1e-9
MARKETS = [f"market_{i}" for i in range(6)]


def _load(name: str, register: bool) -> ModuleType:
    """A training module from its file. ``lifecycle_training`` is registered in ``sys.modules`` (as
    tests/test_training_entrypoints.py does): the line modules import it and its dataclasses look it up.
    """
    if register and name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name if register else f"_compiled_test_{name}", TRAINING_DIR / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compiled() -> ModuleType:
    if str(DEPLOYMENT_DIR) not in sys.path:
        sys.path.insert(0, str(DEPLOYMENT_DIR))
    from model_service import compiled

    return compiled


@pytest.fixture(scope="module")
def lines() -> dict[str, ModuleType]:
    _load("lifecycle_training", register=True)
    return {name: _load(name, register=False) for name in ("demand_forecast", "high_demand_alert")}


# --------------------------------------------------------------------------------------------------
# Synthetic data shaped like the two model lines' feature tables.
# --------------------------------------------------------------------------------------------------
def demand_data(n: int, seed: int, unknown_markets: bool = False) -> dict[str, np.ndarray]:
    """Columns of the demand-forecast features; lags have NaN, rolling_std_28 only at predict time."""
    rng = np.random.default_rng(seed)
    markets = MARKETS + (["market_new", "zz"] if unknown_markets else [])
    data: dict[str, np.ndarray] = {
        "market_id": np.array(rng.choice(markets, n).tolist(), dtype=object),
        "day_of_week": rng.integers(0, 7, n),
        "day_of_year": rng.integers(1, 366, n),
        "month": rng.integers(1, 13, n),
        "is_holiday": rng.integers(0, 2, n),
        "promo": rng.integers(0, 2, n),
        "price": rng.uniform(1, 10, n),
        "price_ratio_28": rng.uniform(0.7, 1.3, n),
    }
    for name in ("lag_7", "lag_14", "lag_21", "lag_28", "same_weekday_mean_4", "rolling_mean_28", "rolling_std_28"):
        values = rng.gamma(4.0, 10.0, n)
        if name != "rolling_std_28" or unknown_markets:
            values[rng.random(n) < 0.15] = np.nan
        data[name] = values
    return data


def demand_target(data: dict[str, np.ndarray], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    market = np.array([MARKETS.index(m) for m in data["market_id"]])
    lag = np.where(np.isnan(data["lag_7"]), 80.0, data["lag_7"])  # missing lag: a different level
    mu = np.exp(0.5 + 0.1 * market + 0.4 * data["promo"] + 0.02 * lag - 0.1 * data["price"])
    return rng.poisson(mu).astype(float)


def alert_data(n: int, seed: int, unknown_days: bool = False) -> dict[str, np.ndarray]:
    """Columns of the high-demand-alert features, NaN in the ratios (the imputer's work)."""
    rng = np.random.default_rng(seed)
    data: dict[str, np.ndarray] = {
        "day_of_week": rng.integers(0, 9 if unknown_days else 7, n),
        "is_holiday": rng.integers(0, 2, n),
        "promo": rng.integers(0, 2, n),
        "promo_days_7": rng.integers(0, 8, n),
    }
    for name in ("price_ratio_28", "lag_1_ratio", "lag_7_ratio", "weekday_index"):
        values = rng.normal(1.0, 0.2, n)
        values[rng.random(n) < 0.1] = np.nan
        data[name] = values
    return data


def alert_target(data: dict[str, np.ndarray], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    score = (
        2 * data["promo"] + 3 * (np.nan_to_num(data["lag_1_ratio"], nan=1.0) - 1) + rng.normal(0, 1, len(data["promo"]))
    )
    return (score > 1.0).astype(int)


def frame(data: dict[str, np.ndarray]) -> Any:
    import pandas as pd

    return pd.DataFrame(data)


def rows(data: dict[str, np.ndarray], index: Any) -> dict[str, np.ndarray]:
    return {name: values[index] for name, values in data.items()}


def assert_same(model: Any, predict_fn: str, data: dict[str, np.ndarray], compiled: ModuleType) -> Any:
    """Compile, then compare with scikit-learn on 1, 7 and 500 rows (and a lone row of each kind)."""
    cm, why = compiled.compile_model(model, predict_fn, list(data))
    assert cm is not None, why
    assert why == ""
    n = len(next(iter(data.values())))
    for index in (slice(0, 1), slice(3, 10), slice(0, 500), slice(n - 1, n)):
        part = rows(data, index)
        expected = getattr(model, predict_fn)(frame(part))
        got = cm.predict(part)
        assert got.shape == expected.shape and got.dtype == expected.dtype
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=0)
    return cm


# --------------------------------------------------------------------------------------------------
# The shipped pipelines.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["poisson", "squared_error"])
def test_demand_forecast_pipeline_matches_sklearn(
    loss: str, lines: dict[str, ModuleType], compiled: ModuleType
) -> None:
    line = lines["demand_forecast"]
    train = demand_data(400, seed=1)
    model = line.build({**line.DEFAULT_PARAMS, "loss": loss}).fit(frame(train), demand_target(train, seed=2))
    cm = assert_same(model, "predict", demand_data(600, seed=3, unknown_markets=True), compiled)
    assert "HistGradientBoostingRegressor(300 trees" in cm.description
    assert ("log link" in cm.description) == (loss == "poisson")
    assert cm.max_rows_faster >= 100


def test_high_demand_alert_pipeline_matches_sklearn(lines: dict[str, ModuleType], compiled: ModuleType) -> None:
    line = lines["high_demand_alert"]
    train = alert_data(400, seed=4)
    model = line.build(dict(line.DEFAULT_PARAMS)).fit(frame(train), alert_target(train, seed=5))
    test = alert_data(600, seed=6, unknown_days=True)
    assert_same(model, "predict_proba", test, compiled)
    # float32 numeric columns: scikit-learn imputes and scales in float32, so must we
    test32 = {k: (v.astype(np.float32) if k != "day_of_week" else v) for k, v in test.items()}
    assert_same(model, "predict_proba", test32, compiled)


def test_string_columns_as_numpy_strings_and_missing_values(lines: dict[str, ModuleType], compiled: ModuleType) -> None:
    line = lines["demand_forecast"]
    train = demand_data(300, seed=7)
    train["market_id"][:20] = None  # a missing market seen in fit: pandas makes it NaN, a category
    params = {**line.DEFAULT_PARAMS, "max_iter": 50}
    model = line.build(params).fit(frame(train), demand_target(demand_data(300, seed=7), seed=8))
    test = demand_data(50, seed=9, unknown_markets=True)
    assert_same(model, "predict", {**test, "market_id": np.array(test["market_id"].tolist(), dtype=str)}, compiled)
    test["market_id"][::3] = None
    assert_same(model, "predict", test, compiled)


# --------------------------------------------------------------------------------------------------
# Other supported shapes.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["gamma", "absolute_error", "quantile"])
def test_other_regression_losses(loss: str, compiled: ModuleType) -> None:
    from sklearn.ensemble import HistGradientBoostingRegressor

    train = demand_data(300, seed=10)
    del train["market_id"]
    y = demand_target(demand_data(300, seed=10), seed=11) + 1.0
    params = {"quantile": 0.8} if loss == "quantile" else {}
    model = HistGradientBoostingRegressor(loss=loss, max_iter=40, random_state=0, **params).fit(frame(train), y)
    test = demand_data(600, seed=12, unknown_markets=True)
    del test["market_id"]
    assert_same(model, "predict", test, compiled)  # a bare estimator, columns by feature_names_in_


def test_binary_hgb_classifier_predict_proba(compiled: ModuleType) -> None:
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    train = demand_data(400, seed=13)
    y = np.where(demand_target(train, seed=14) > 10, "high", "low")
    encode = ColumnTransformer(
        [("market", OneHotEncoder(handle_unknown="ignore", sparse_output=False), ["market_id"])],
        remainder="passthrough",
    )
    model = Pipeline([("features", encode), ("model", HistGradientBoostingClassifier(max_iter=100, random_state=0))])
    model.fit(frame(train), y)
    assert_same(model, "predict_proba", demand_data(600, seed=15, unknown_markets=True), compiled)


def test_nan_split_and_infinite_values(compiled: ModuleType) -> None:
    """A feature whose NaN alone carries the signal gets a 'split on NaN' node (threshold +inf)."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    rng = np.random.default_rng(16)
    n = 400
    signal = rng.uniform(0, 1, n)
    signal[rng.random(n) < 0.3] = np.nan
    train = {"signal": signal, "other": rng.normal(size=n)}
    y = np.where(np.isnan(signal), 10.0, 0.0) + train["other"]
    model = HistGradientBoostingRegressor(max_iter=20, random_state=0).fit(frame(train), y)
    nodes = [p.nodes for it in model._predictors for p in it]
    assert any(((~nd["is_leaf"].astype(bool)) & np.isposinf(nd["num_threshold"])).any() for nd in nodes)
    test = {
        "signal": np.array([np.nan, 0.5, np.inf, -np.inf, np.nan, 0.0, 1.0]),
        "other": np.array([0.0, np.nan, 1.0, np.inf, -np.inf, np.nan, 2.0]),
    }
    cm, why = compiled.compile_model(model, "predict", ["signal", "other"])
    assert cm is not None, why
    np.testing.assert_allclose(cm.predict(test), model.predict(frame(test)), rtol=RTOL, atol=0)


def test_column_selections_drop_passthrough_and_nested_pipeline(compiled: ModuleType) -> None:
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    train = alert_data(300, seed=17)
    train["market_id"] = np.array(np.random.default_rng(18).choice(MARKETS, 300).tolist(), dtype=object)
    names = list(train)
    numeric = Pipeline([("impute", SimpleImputer(strategy="mean")), ("scale", StandardScaler(with_mean=False))])
    mask = [name in ("price_ratio_28", "lag_1_ratio") for name in names]
    encode = ColumnTransformer(
        [
            ("market", OneHotEncoder(handle_unknown="ignore", sparse_output=False), [names.index("market_id")]),
            ("ratios", numeric, mask),
            ("weekday", OneHotEncoder(sparse_output=False, dtype=np.float32), ["day_of_week"]),
            ("dropped", "drop", ["lag_7_ratio"]),
            ("kept", "passthrough", ["is_holiday", "promo"]),
            ("nothing", StandardScaler(), []),
        ],
        remainder=Pipeline(
            [("impute", SimpleImputer(strategy="most_frequent")), ("scale", StandardScaler()), ("again", "passthrough")]
        ),
    )
    model = Pipeline(
        [("features", encode), ("scale", StandardScaler()), ("skip", "passthrough"), ("model", LogisticRegression())]
    ).fit(frame(train), alert_target(train, seed=19))
    test = alert_data(600, seed=20)
    test["market_id"] = np.array(np.random.default_rng(21).choice([*MARKETS, "new"], 600).tolist(), dtype=object)
    assert_same(model, "predict_proba", test, compiled)

    # a category never seen in fit with handle_unknown="error" is an error, as in scikit-learn
    cm, _ = compiled.compile_model(model, "predict_proba", list(test))
    unknown = rows(test, slice(0, 3))
    unknown["day_of_week"] = np.array([1, 2, 8])
    with pytest.raises(ValueError, match="unknown categories"):
        model.predict_proba(frame(unknown))
    with pytest.raises(ValueError, match="unknown categories"):
        cm.predict(unknown)


def test_imputer_strategies_and_dropped_empty_feature(compiled: ModuleType) -> None:
    import warnings

    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    train = alert_data(300, seed=22)
    train["empty"] = np.full(300, np.nan)  # no observed value: SimpleImputer drops it
    y = alert_target(train, seed=23)
    for strategy in ("mean", "median", "most_frequent", "constant"):
        impute = ColumnTransformer([("num", SimpleImputer(strategy=strategy, fill_value=-1.0), list(train)[1:])])
        model = Pipeline([("features", impute), ("model", LogisticRegression(max_iter=500))])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(frame(train), y)
            test = alert_data(600, seed=24)
            test["empty"] = np.where(np.arange(600) % 2 == 0, np.nan, 3.0)
            assert_same(model, "predict_proba", test, compiled)


# --------------------------------------------------------------------------------------------------
# Refusals.
# --------------------------------------------------------------------------------------------------
def _small() -> tuple[dict[str, np.ndarray], np.ndarray]:
    data = alert_data(200, seed=25)
    data["market_id"] = np.array(np.random.default_rng(26).choice(MARKETS, 200).tolist(), dtype=object)
    return data, alert_target(data, seed=27)


def _encoded(encoder: Any, estimator: Any) -> Any:
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline

    ct = ColumnTransformer(
        [("market", encoder, ["market_id"]), ("num", SimpleImputer(), ["lag_1_ratio", "promo"])],
    )
    return Pipeline([("features", ct), ("model", estimator)])


def _unsupported_cases() -> list[tuple[str, Any, str, str]]:
    """(case, unfitted model, predict_fn, text the reason must contain)."""
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor, RandomForestRegressor
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, OneHotEncoder

    dense = {"handle_unknown": "ignore", "sparse_output": False}
    numbers = ColumnTransformer([("num", "passthrough", ["day_of_week", "lag_1_ratio"])])
    return [
        ("drop first", _encoded(OneHotEncoder(drop="first", sparse_output=False), LogisticRegression()),
         "predict_proba", "drop='first'"),
        ("sparse one-hot", _encoded(OneHotEncoder(handle_unknown="ignore"), LogisticRegression()),
         "predict_proba", "sparse"),
        ("infrequent", _encoded(OneHotEncoder(min_frequency=50, **dense), LogisticRegression()),
         "predict_proba", "infrequent"),
        ("random forest", _encoded(OneHotEncoder(**dense), RandomForestRegressor(n_estimators=3)),
         "predict", "RandomForestRegressor"),
        ("multiclass hgb", _encoded(OneHotEncoder(**dense), HistGradientBoostingClassifier(max_iter=5)),
         "predict_proba", "3 classes"),
        ("multiclass logistic", _encoded(OneHotEncoder(**dense), LogisticRegression()), "predict_proba", "3 classes"),
        ("classifier predict", _encoded(OneHotEncoder(**dense), LogisticRegression()), "predict", "predict_proba"),
        ("categorical hgb", Pipeline([("features", numbers), ("model", HistGradientBoostingRegressor(
            categorical_features=[0], max_iter=5))]), "predict", "categorical"),
        ("imputer indicator", _encoded(OneHotEncoder(**dense), LogisticRegression()).set_params(
            features__num=SimpleImputer(add_indicator=True)), "predict_proba", "add_indicator"),
        ("function transformer", _encoded(OneHotEncoder(**dense), LogisticRegression()).set_params(
            features__num=FunctionTransformer(np.nan_to_num)), "predict_proba", "FunctionTransformer"),
    ]  # fmt: skip


def test_unsupported_models_are_refused_with_a_reason(compiled: ModuleType) -> None:
    import warnings

    data, y = _small()
    three = np.where(data["promo"] == 1, "a", np.where(y == 1, "b", "c"))
    for case, model, predict_fn, reason in _unsupported_cases():
        target = three if "multiclass" in case else (y.astype(float) if predict_fn == "predict" else y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(frame(data), target)
        cm, why = compiled.compile_model(model, predict_fn, list(data))
        assert cm is None, case
        assert reason in why, (case, why)


def test_refuses_columns_missing_from_the_signature(compiled: ModuleType) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import OneHotEncoder

    data, y = _small()
    model = _encoded(OneHotEncoder(handle_unknown="ignore", sparse_output=False), LogisticRegression())
    model.fit(frame(data), y)
    cm, why = compiled.compile_model(model, "predict_proba", [c for c in data if c != "lag_1_ratio"])
    assert cm is None and "lag_1_ratio" in why
