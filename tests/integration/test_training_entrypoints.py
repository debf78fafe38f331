"""The training entrypoints as the lifecycle runs them: real processes against a real MLflow (SQLite).

Snapshots are made the way the local adapter makes them (feature SQL over the generated data), and
what downstream steps rely on is checked: the result line, run tags, metric names, the reference
profile, the registered version, the production comparison, reuse on retry and clear failures.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pytest
from test_sample_data import feature_frame

from mlops_lifecycle.adapters.sample_data import generate_daily_demand

TRAINING_DIR = Path(__file__).resolve().parents[2] / "include" / "training"
WINDOW_START, WINDOW_END = date(2024, 11, 25), date(2026, 11, 23)
HOLDOUT_START = WINDOW_END - timedelta(days=28)
TARGETS = {"demand_forecast": "units_sold", "high_demand_alert": "high_demand"}
METRICS = {
    "demand_forecast": {"mape", "rmse", "mae", "r2"},
    "high_demand_alert": {"roc_auc", "brier", "log_loss", "precision_at_0_5", "recall_at_0_5"},
}
HEAVY_MODULES = (
    "mlflow.sklearn",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "sklearn.ensemble",
    "sklearn.linear_model",
    "skops.io",
    "pyarrow.parquet",
)
DEMAND_FEATURES = [
    "market_id", "day_of_week", "day_of_year", "month", "is_holiday", "promo", "price", "price_ratio_28",
    "lag_7", "lag_14", "lag_21", "lag_28", "same_weekday_mean_4", "rolling_mean_28", "rolling_std_28",
]  # fmt: skip

ALERT_FEATURES = [
    "day_of_week", "is_holiday", "promo", "promo_days_7", "price_ratio_28", "lag_1_ratio", "lag_7_ratio",
    "weekday_index",
]  # fmt: skip


@dataclass(frozen=True)
class Workspace:
    """A working directory with its own MLflow (SQLite db, artifacts under it) and the snapshots."""

    root: Path
    snapshots: Path
    pycache: Path

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root}/mlflow.db"

    def snapshot(self, line: str) -> Path:
        return self.snapshots / f"{line}.parquet"


@pytest.fixture(scope="module")
def pycache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bytecode cache for the entrypoint processes.

    This machine sets PYTHONDONTWRITEBYTECODE and the venv has no .pyc files, so every process
    would compile mlflow, sklearn and pandas from source (~7 s of CPU each). A cache outside the
    venv, kept in pytest's cache folder when there is one, pays that once.
    """
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("training-pycache") if cache is not None else tmp_path_factory.mktemp("pycache")
    if not any(folder.iterdir()):  # fill it once, before several processes compile the same modules
        subprocess.run(
            [sys.executable, "-c", f"import {', '.join(HEAVY_MODULES)}"],
            env=bytecode_environment(folder),
            check=True,
            timeout=300,
        )
    return folder


def bytecode_environment(pycache: Path) -> dict[str, str]:
    """This process's environment, writing bytecode to ``pycache``."""
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return environment | {"PYTHONPYCACHEPREFIX": str(pycache)}


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One snapshot per model line, made the way the local adapter makes them."""
    folder = tmp_path_factory.mktemp("snapshots")
    demand = generate_daily_demand(WINDOW_START - timedelta(days=60), WINDOW_END)
    for line in TARGETS:
        feature_frame(line, demand, WINDOW_START, WINDOW_END).to_parquet(folder / f"{line}.parquet")
    return folder


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory: pytest.TempPathFactory, snapshots: Path, pycache: Path) -> Callable[[str], Workspace]:
    """Makes fresh workspaces that share the snapshots and the bytecode cache."""
    return lambda name: Workspace(tmp_path_factory.mktemp(name), snapshots, pycache)


@dataclass(frozen=True)
class Started:
    """An entrypoint process under way; its stdout and stderr go to files (no pipe to drain)."""

    process: subprocess.Popen[bytes]
    logs: Path

    def finish(self) -> subprocess.CompletedProcess[str]:
        returncode = self.process.wait(timeout=300)
        stdout, stderr = (self.logs / "stdout").read_text(), (self.logs / "stderr").read_text()
        return subprocess.CompletedProcess(self.process.args, returncode, stdout, stderr)


def start(
    workspace: Workspace,
    line: str,
    run_key: str,
    *,
    holdout_start: date = HOLDOUT_START,
    params: dict[str, Any] | None = None,
) -> Started:
    """Start an entrypoint with the exact CLI the lifecycle uses."""
    command = [
        sys.executable, str(TRAINING_DIR / f"{line}.py"),
        "--snapshot", str(workspace.snapshot(line)),
        "--run-key", run_key,
        "--model-line", line,
        "--experiment", f"/lifecycle/{line}",
        "--registered-model", line,
        "--production-alias", "production",
        "--holdout-start", holdout_start.isoformat(),
        "--window-start", WINDOW_START.isoformat(),
        "--window-end", WINDOW_END.isoformat(),
        "--target", TARGETS[line],
        "--params", json.dumps(params or {}),
        "--tags", json.dumps({"airflow.dag_id": f"{line}__lifecycle", "airflow.run_id": run_key}),
        "--result-file", str(workspace.root / "results" / f"{run_key}.json"),
    ]  # fmt: skip
    environment = bytecode_environment(workspace.pycache) | {
        "MLFLOW_TRACKING_URI": workspace.tracking_uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",  # no network from tests
    }
    logs = workspace.root / "logs" / run_key
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout", "w") as stdout, open(logs / "stderr", "w") as stderr:
        process = subprocess.Popen(command, cwd=workspace.root, env=environment, stdout=stdout, stderr=stderr)
    return Started(process, logs)


def train(workspace: Workspace, line: str, run_key: str, **options: Any) -> subprocess.CompletedProcess[str]:
    return start(workspace, line, run_key, **options).finish()


def result_of(process: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The result line: stdout holds exactly one JSON line when the run succeeded."""
    assert process.returncode == 0, process.stderr[-3000:]
    lines = process.stdout.splitlines()
    assert len(lines) == 1, f"stdout must be the result line only, got {lines}"
    return json.loads(lines[0])


def reference_sample(client: Any, workspace: Workspace, run_id: str) -> pd.DataFrame:
    """The run's ``reference_sample.parquet``."""
    folder = workspace.root / "artifacts" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    return pd.read_parquet(client.download_artifacts(run_id, "reference_sample.parquet", str(folder)))


@contextlib.contextmanager
def tracking(workspace: Workspace) -> Iterator[Any]:
    """A client of the workspace's MLflow; ``models:/`` URIs resolve against it meanwhile."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(workspace.tracking_uri)
    try:
        yield mlflow.MlflowClient()
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def independent_runs(
    workspaces: Callable[[str], Workspace],
) -> Iterator[dict[str, tuple[Workspace, Started]]]:
    """Runs that need no other run, started together at the beginning so they overlap with the
    sequential demand story (each in its own workspace: SQLite does not like concurrent writers)."""
    runs = {}
    for name, line, run_key, options in [
        ("alert", "high_demand_alert", "high_demand_alert/w1/train", {"params": {"C": 0.5}}),
        ("empty_holdout", "demand_forecast", "demand_forecast/late/train", {"holdout_start": WINDOW_END}),
        ("bad_params", "high_demand_alert", "high_demand_alert/typo/train", {"params": {"CC": 1}}),
    ]:
        workspace = workspaces(name)
        runs[name] = (workspace, start(workspace, line, run_key, **options))
    yield runs
    for _, started in runs.values():
        if started.process.poll() is None:
            started.process.kill()


@pytest.fixture(scope="module")
def training() -> ModuleType:
    """The shared helpers module, loaded from its file (include/ is not on sys.path)."""
    path = TRAINING_DIR / "lifecycle_training.py"
    spec = importlib.util.spec_from_file_location("lifecycle_training", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("lifecycle_training", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# --- end to end through MLflow --------------------------------------------------------------------


def test_demand_forecast_registers_compares_with_production_and_reuses_on_retry(
    workspaces: Callable[[str], Workspace], independent_runs: dict[str, Any]
) -> None:
    import mlflow

    workspace = workspaces("demand")  # the independent runs are already under way meanwhile
    first = result_of(train(workspace, "demand_forecast", "demand_forecast/w1/train"))
    assert first["model_version"] == "1" and first["production_version"] is None and not first["reused"]
    assert set(first["metrics"]) == METRICS["demand_forecast"]
    # the sample data has signal: the model clears the gate of include/model_lines/demand_forecast.yaml
    assert first["metrics"]["mape"] < 0.25 and first["metrics"]["r2"] > 0.7
    assert json.loads((workspace.root / "results" / "demand_forecast/w1/train.json").read_text()) == first

    with tracking(workspace) as client:
        run = client.get_run(first["run_id"])
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"demand_forecast-{WINDOW_START}_{WINDOW_END}"
        expected_tags = {
            "lifecycle.run_key": "demand_forecast/w1/train",
            "lifecycle.model_line": "demand_forecast",
            "lifecycle.window_start": WINDOW_START.isoformat(),
            "lifecycle.window_end": WINDOW_END.isoformat(),
            "lifecycle.holdout_start": HOLDOUT_START.isoformat(),
            "lifecycle.snapshot": str(workspace.snapshot("demand_forecast")),
            "lifecycle.production_version": "none",
            "lifecycle.registered_version": "1",
            "airflow.dag_id": "demand_forecast__lifecycle",
        }
        assert {key: run.data.tags.get(key) for key in expected_tags} == expected_tags
        assert run.data.metrics == pytest.approx(first["metrics"])
        assert run.data.params["model_class"].endswith(".HistGradientBoostingRegressor")
        assert int(run.data.params["holdout_rows"]) == 12 * 28
        assert int(run.data.params["train_rows"]) == 12 * (HOLDOUT_START - WINDOW_START).days

        version = client.get_model_version("demand_forecast", "1")
        assert version.status == "READY" and version.run_id == first["run_id"]
        assert version.tags["lifecycle.run_key"] == "demand_forecast/w1/train"
        assert version.tags["lifecycle.model_line"] == "demand_forecast"
        signature = mlflow.models.get_model_info("models:/demand_forecast/1").signature
        assert signature.inputs.input_names() == DEMAND_FEATURES

        profile_path = client.download_artifacts(first["run_id"], "reference_profile.json", str(workspace.root))
        profile = json.loads(Path(profile_path).read_text())
        assert set(profile["columns"]) == {*DEMAND_FEATURES, "units_sold", "prediction"}
        lag = profile["columns"]["lag_7"]
        assert lag["count"] == int(run.data.params["train_rows"]) and lag["null_count"] == 0
        assert sum(lag["histogram"]["counts"]) == lag["count"] and len(lag["histogram"]["bin_edges"]) == 11
        assert list(lag["quantiles"]) == ["0.01", "0.05", "0.25", "0.5", "0.75", "0.95", "0.99"]
        assert lag["min"] <= lag["quantiles"]["0.5"] <= lag["max"]
        markets = profile["columns"]["market_id"]["frequencies"]
        assert len(markets) == 12 and sum(markets.values()) == pytest.approx(1.0)
        # the monitor's view: how to compare each column, and the raw sample beside the profile
        assert profile["schema_version"] == 2
        numeric = dict.fromkeys([*DEMAND_FEATURES[1:], "prediction"], "numeric")
        assert profile["kinds"] == {"market_id": "categorical"} | numeric
        train_rows = int(run.data.params["train_rows"])
        assert profile["sample"] == {"artifact": "reference_sample.parquet", "rows": train_rows, "of_rows": train_rows}
        first_sample = reference_sample(client, workspace, first["run_id"])
        # fewer training rows than the bound: the sample is the whole training split
        assert list(first_sample.columns) == [*DEMAND_FEATURES, "units_sold", "prediction"]
        assert len(first_sample) == train_rows and first_sample["units_sold"].notna().all()

        # v1 goes to production; the next candidate is measured against it on the same holdout
        client.set_registered_model_alias("demand_forecast", "production", "1")
    second = result_of(train(workspace, "demand_forecast", "demand_forecast/w2/train", params={"max_iter": 120}))
    assert second["model_version"] == "2" and second["production_version"] == "1"
    production_metrics = {f"production.{name}" for name in METRICS["demand_forecast"]}
    assert set(second["metrics"]) == METRICS["demand_forecast"] | production_metrics
    assert second["metrics"]["production.mape"] == pytest.approx(first["metrics"]["mape"])
    assert second["metrics"]["mape"] != first["metrics"]["mape"], "--params must change the model"

    with tracking(workspace) as client:
        run = client.get_run(second["run_id"])
        assert run.data.tags["lifecycle.production_version"] == "1"
        assert run.data.tags["lifecycle.production_run_id"] == first["run_id"]
        assert run.data.params["max_iter"] == "120"

        model = mlflow.pyfunc.load_model("models:/demand_forecast/2")
        row = pd.read_parquet(workspace.snapshot("demand_forecast")).tail(1)
        forecast = model.predict(row[DEMAND_FEATURES])
        assert forecast.shape == (1,) and 0 < forecast[0] < 10 * row["rolling_mean_28"].iloc[0]

        # a retrain on the same data samples the same rows; each prediction is the model's, on that row
        # (scored through pyfunc's schema enforcement: the sample keeps the training dtypes)
        second_sample = reference_sample(client, workspace, second["run_id"])
        inputs = [*DEMAND_FEATURES, "units_sold"]
        pd.testing.assert_frame_equal(second_sample[inputs], first_sample[inputs])
        assert second_sample["prediction"].to_numpy() == pytest.approx(model.predict(second_sample[DEMAND_FEATURES]))
        assert not np.allclose(second_sample["prediction"], first_sample["prediction"]), "v2 is another model"

    # an Airflow retry of the first step finds its run instead of registering a duplicate
    retry = result_of(train(workspace, "demand_forecast", "demand_forecast/w1/train"))
    assert retry["reused"] and (retry["run_id"], retry["model_version"]) == (first["run_id"], "1")
    with tracking(workspace) as client:
        assert len(client.search_model_versions("name='demand_forecast'")) == 2


def test_high_demand_alert_serves_probabilities(independent_runs: dict[str, Any]) -> None:
    import mlflow

    workspace, started = independent_runs["alert"]
    result = result_of(started.finish())
    assert result["model_version"] == "1" and result["production_version"] is None
    assert set(result["metrics"]) == METRICS["high_demand_alert"]
    # clears the gate of include/model_lines/high_demand_alert.yaml
    assert result["metrics"]["roc_auc"] > 0.7 and result["metrics"]["brier"] < 0.2

    snapshot = pd.read_parquet(workspace.snapshot("high_demand_alert")).tail(50)
    features = snapshot.drop(columns=["market_id", "date", "high_demand"])
    with tracking(workspace) as client:
        assert client.get_run(result["run_id"]).data.params["C"] == "0.5"
        probabilities = mlflow.pyfunc.load_model("models:/high_demand_alert/1").predict(features)
    assert probabilities.shape == (50, 2)
    assert np.allclose(probabilities.sum(axis=1), 1) and ((probabilities >= 0) & (probabilities <= 1)).all()
    alerted = probabilities[:, 1] >= 0.5
    assert snapshot["high_demand"].to_numpy()[alerted].mean() > snapshot["high_demand"].mean()

    # the reference sample's prediction is what the service serves: the probability of high demand
    with tracking(workspace) as client:
        sample = reference_sample(client, workspace, result["run_id"])
        served = mlflow.pyfunc.load_model("models:/high_demand_alert/1").predict(sample[ALERT_FEATURES])
    assert list(sample.columns) == [*ALERT_FEATURES, "high_demand", "prediction"]
    assert sample["prediction"].to_numpy() == pytest.approx(served[:, 1])


def test_an_empty_holdout_fails_the_run_with_a_clear_message(independent_runs: dict[str, Any]) -> None:
    workspace, started = independent_runs["empty_holdout"]
    result = started.finish()

    assert result.returncode == 2
    assert result.stdout == ""
    assert "error: holdout is empty: no row on or after the holdout start" in result.stderr
    assert f"holdout start {WINDOW_END}" in result.stderr
    with tracking(workspace) as client:
        experiment = client.get_experiment_by_name("/lifecycle/demand_forecast")
        runs = client.search_runs([experiment.experiment_id])
        assert [(r.info.status, r.data.tags["lifecycle.run_key"]) for r in runs] == [
            ("FAILED", "demand_forecast/late/train")
        ]
        assert client.search_registered_models() == []


def test_bad_hyperparameters_are_rejected_before_training(independent_runs: dict[str, Any]) -> None:
    workspace, started = independent_runs["bad_params"]
    result = started.finish()
    assert result.returncode == 2
    assert "--params: unknown hyperparameters ['CC'] for LogisticRegression" in result.stderr
    assert not (workspace.root / "mlflow.db").exists(), "rejected before MLflow is touched"


# --- helpers, in process --------------------------------------------------------------------------


def test_mape_stays_finite_on_days_without_sales(training: ModuleType) -> None:
    value = training.mean_absolute_percentage_error(np.array([0.0, 100.0]), np.array([2.0, 110.0]))
    assert value == pytest.approx((2 / 1 + 10 / 100) / 2)


def test_profile_of_a_numeric_column_with_nulls(training: ModuleType) -> None:
    profile = training.column_profile(pd.Series([1.0, 2.0, None, 4.0, 100.0]), categorical=False)
    assert (profile["count"], profile["null_count"]) == (4, 1)
    assert (profile["min"], profile["max"], profile["mean"]) == (1.0, 100.0, 26.75)
    assert profile["histogram"]["counts"][0] == 3 and profile["histogram"]["counts"][-1] == 1
    assert math.isfinite(profile["std"])


def test_reference_sample_is_bounded_seeded_and_keeps_each_row_whole(training: ModuleType) -> None:
    line = training.ModelLine(
        task="regression",
        categorical=("market_id",),
        numeric=("price",),
        estimator=object,
        default_params={},
        build=lambda params: None,
        metrics=lambda truth, scores: {},
    )
    rows = training.REFERENCE_SAMPLE_ROWS + 20_000
    price = np.arange(rows, dtype=float)
    features = pd.DataFrame({"price": price, "market_id": [f"M{i % 12:02d}" for i in range(rows)]})
    target = pd.Series(np.arange(rows, dtype="int64") * 2, name="units_sold")

    sample = training.reference_sample(line, features, target, price * 3)
    assert len(sample) == training.REFERENCE_SAMPLE_ROWS
    assert list(sample.columns) == ["market_id", "price", "units_sold", "prediction"]  # the line's order
    assert (sample.dtypes["price"], sample.dtypes["units_sold"]) == (np.float64, np.int64)
    # distinct training rows, in training order, drawn from the whole split, not its head
    assert sample["price"].is_unique and sample["price"].is_monotonic_increasing
    assert sample["price"].max() > training.REFERENCE_SAMPLE_ROWS
    # each row's target, category and prediction are its own
    assert (sample["units_sold"] == sample["price"] * 2).all() and (sample["prediction"] == sample["price"] * 3).all()
    assert (sample["market_id"] == [f"M{int(p) % 12:02d}" for p in sample["price"]]).all()
    # the same data draws the same sample
    pd.testing.assert_frame_equal(training.reference_sample(line, features, target, price * 3), sample)
