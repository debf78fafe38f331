"""The drift monitor on the embedded local adapters: real traffic to the real service, its prediction log,
a real MLflow server, Airflow's metadata DB recording the retrain request.

v1 serves ordinary traffic, then v2 is deployed and serves traffic whose ``price`` is shifted: one
check of the whole stretch splits it by version, finds v1 fine and v2 drifted in ``price`` only, logs
one MLflow run per version with its report, alerts the owners and emits the retrain request. Checking
the same stretch again does nothing twice; a later breach inside the cool-down alerts but requests nothing.
"""

from __future__ import annotations

import copy
import json
import time
import urllib.request
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
import yaml

import devstack
from conftest import MODEL_LINES
from mlops_lifecycle import paths

LINE = "e2e_drift"
BASE = yaml.safe_load((paths.include_dir() / "model_lines" / "demand_forecast.yaml").read_text())
W1, W2 = datetime(2026, 10, 5, 3, tzinfo=UTC), datetime(2026, 10, 12, 3, tzinfo=UTC)
ASSET = f"{LINE}__retrain_request"


def write_line(port: int, ground_truth: bool = False) -> None:
    data = copy.deepcopy(BASE)
    data.update(model_line=LINE, retries=0, retry_delay_seconds=1)
    data["registry"] = {"model_name": LINE, "experiment": f"/e2e/{LINE}"}
    data["train"]["parameters"] = {"max_iter": 60, "learning_rate": 0.1}
    data["review"].update(auto_approve=True)
    data["deploy"].update(port=port, verify_timeout_seconds=120)
    if ground_truth:
        data["monitoring"]["ground_truth"]["min_rows"] = 10  # one forecast per market (12) per served day
    else:
        data["monitoring"].pop("ground_truth")  # live performance: the last test
    data["monitoring"]["limits"]["min_rows"] = 100
    data["monitoring"]["cooldown_hours"] = 24
    (MODEL_LINES / f"{LINE}.yaml").write_text(yaml.safe_dump(data))


def traffic(rows: int, seed: int) -> list[dict]:
    """Rows like the training data (a random draw from W1's training snapshot): ordinary traffic."""
    snapshot = next((paths.local_home() / "warehouse" / "snapshots").glob(f"{LINE}__*20261005T0300.parquet"))
    frame = pd.read_parquet(snapshot).dropna()
    features = [c for c in frame.columns if c not in ("date", "units_sold")]
    return json.loads(frame[features].sample(rows, random_state=seed).to_json(orient="records"))


def send(port: int, rows: list[dict], batch: int = 100) -> list[float]:
    predictions = []
    for first in range(0, len(rows), batch):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/predict",
            data=json.dumps({"rows": rows[first : first + batch]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
            predictions += json.loads(response.read())["predictions"]
    return predictions


def shifted(rows: list[dict], factor: float = 1.8) -> list[dict]:
    return [row | {"price": row["price"] * factor} for row in rows]


def check(since: datetime, until: datetime) -> devstack.LifecycleResult:
    time.sleep(1.5)  # the service writes its prediction log every 0.5 s
    return devstack.run_lifecycle(
        f"{LINE}__monitor", None, conf={"since": since.isoformat(), "until": until.isoformat()}
    )


def monitoring_runs() -> list:
    from mlops_lifecycle.hooks.mlflow_registry import MlflowRegistryHook

    client = MlflowRegistryHook().client
    experiment = client.get_experiment_by_name(f"/e2e/{LINE}-monitoring")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def alerts() -> list[dict]:
    target = paths.local_home() / "alerts" / f"{LINE}.jsonl"
    lines = target.read_text().splitlines() if target.exists() else []
    return [a for a in map(json.loads, lines) if a["kind"] == "drift_breach"]


def retrain_requests() -> list:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        query = select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
        query = query.where(AssetModel.name == ASSET)
        return [dict(event.extra or {}) for event in session.scalars(query)]


@pytest.fixture(scope="module")
def port(stack) -> int:  # noqa: ANN001
    port = devstack.free_port()
    write_line(port)
    yield port
    (MODEL_LINES / f"{LINE}.yaml").unlink(missing_ok=True)


def test_a_stretch_spanning_a_deploy_is_split_by_version_and_only_the_shifted_feature_breaches(port):
    assert devstack.run_lifecycle(f"{LINE}__lifecycle", W1).state == "success"
    since = datetime.now(UTC) - timedelta(seconds=1)
    send(port, traffic(500, seed=1))  # v1: ordinary traffic
    assert devstack.run_lifecycle(f"{LINE}__lifecycle", W2).state == "success"
    send(port, shifted(traffic(500, seed=2)))  # v2: price 1.8x
    # a log file with a broken line and a torn last line: counted and skipped, never fatal
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    broken = paths.local_home() / "predictions" / LINE / "v2" / day / "broken-1.jsonl"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_text('not json at all\n{"ts": "' + datetime.now(UTC).isoformat() + '", "request_id": "x"')
    until = datetime.now(UTC) + timedelta(seconds=1)

    result = check(since, until)

    assert result.state == "success", result.task_states
    assert result.task_states == {
        "snapshot_served": "success",
        "check_drift": "success",
        "alert_owners": "success",
        "request_retrain": "success",
    }
    runs = {r.data.tags["lifecycle.model_version"]: r for r in monitoring_runs()}
    assert set(runs) == {"1", "2"}
    v1, v2 = (json.loads(runs[v].data.tags["monitor.findings"]) for v in ("1", "2"))
    assert (v1["verdict"], v1["breaches"], v1["rows"]) == ("ok", [], 500)
    assert v2["verdict"] == "breach" and v2["rows"] == 500
    # the shifted feature, and no other feature (the model's output may move with it: that is prediction drift)
    assert set(v2["drifted"]) - {"prediction"} == {"price"}, v2["breaches"]
    assert runs["2"].data.metrics["drift.price.psi"] > 0.2 > runs["1"].data.metrics["drift.price.psi"]
    assert runs["2"].data.metrics["bad_log_lines"] == 2
    # calendar features the line excludes are not checked at all
    assert "drift.month.psi" not in runs["2"].data.metrics
    from mlops_lifecycle.hooks.mlflow_registry import MlflowRegistryHook

    client = MlflowRegistryHook().client
    artifacts = {a.path for a in client.list_artifacts(runs["2"].info.run_id)}
    assert {"drift_report.html", "drift_report.png"} <= artifacts
    report = open(client.download_artifacts(runs["2"].info.run_id, "drift_report.html")).read()  # noqa: SIM115
    assert "price" in report and "breach" in report.lower()
    # the owners are told, with the report, and one retrain is requested (the asset event), recorded on the run
    [alert] = alerts()
    assert alert["to"] == BASE["alerting"]["emails"] and alert["summary"].startswith("v2: price:")
    assert any(runs["2"].info.run_id in link for link in alert["reports"])
    [request] = retrain_requests()
    assert request["model_line"] == LINE and request["mlflow_runs"] == [runs["2"].info.run_id]
    tags = client.get_run(runs["2"].info.run_id).data.tags
    assert tags["monitor.retrain"] == "requested" and tags["monitor.alerted_at"]

    # the same stretch checked again: nothing logged, alerted or requested twice
    again = check(since, until)
    assert again.task_states["request_retrain"] == "skipped" and again.task_states["alert_owners"] == "success"
    assert len(monitoring_runs()) == 2 and len(alerts()) == 1 and len(retrain_requests()) == 1

    # a later breach inside the cool-down: the owners hear of it, no second retrain is requested
    later = datetime.now(UTC) - timedelta(seconds=1)
    send(port, shifted(traffic(300, seed=3)))
    cooled = check(later, datetime.now(UTC) + timedelta(seconds=1))
    assert cooled.task_states["alert_owners"] == "success" and cooled.task_states["request_retrain"] == "skipped"
    assert len(alerts()) == 2 and len(retrain_requests()) == 1
    newest = monitoring_runs()[-1]
    assert client.get_run(newest.info.run_id).data.tags["monitor.retrain"] == "cooldown"


def test_a_stretch_with_ordinary_traffic_breaches_nothing_and_requests_nothing(port):
    since = datetime.now(UTC) - timedelta(seconds=1)
    send(port, traffic(400, seed=4))
    result = check(since, datetime.now(UTC) + timedelta(seconds=1))
    assert result.task_states["check_drift"] == "success"
    assert result.task_states["alert_owners"] == "skipped" and result.task_states["request_retrain"] == "skipped"
    newest = json.loads(monitoring_runs()[-1].data.tags["monitor.findings"])
    assert newest["verdict"] == "ok" and newest["rows"] == 400


def test_a_check_of_the_future_is_refused_and_changes_nothing(port):
    before = len(monitoring_runs())
    now = datetime.now(UTC)
    result = devstack.run_lifecycle(
        f"{LINE}__monitor", None, conf={"since": now.isoformat(), "until": (now + timedelta(hours=1)).isoformat()}
    )
    assert result.task_states["snapshot_served"] == "failed" and result.state == "failed"
    assert len(monitoring_runs()) == before


def served_earlier(port: int, day, at: datetime, factor: float = 1.0) -> pd.DataFrame:  # noqa: ANN001
    """What production forecast for ``day`` when it served at ``at`` (a week before): every market's features of
    ``day`` (known 7 days ahead) scored by the service now, written to its prediction log with ``at``'s time
    (the log format is the contract a shipper and the monitor share). Returns the rows with the prediction."""
    from mlops_lifecycle.adapters.warehouse import LocalWarehouse

    warehouse = LocalWarehouse(paths.local_home() / "warehouse")
    warehouse.ensure_sample_data(through=day + timedelta(days=1))
    made = warehouse.snapshot(
        sql_template=(paths.include_dir() / BASE["extract"]["sql"]).read_text(),
        tables={"daily_demand": "daily_demand"},
        window_start=day,
        window_end=day + timedelta(days=1),
        name=f"{LINE}__features_of_{day:%Y%m%d}",
    )
    frame = pd.read_parquet(made.uri).dropna()
    features = [c for c in frame.columns if c not in ("date", "units_sold")]
    rows = json.loads(frame[features].to_json(orient="records"))
    predictions = [p * factor for p in send(port, rows)]
    folder = paths.local_home() / "predictions" / LINE / "v2" / f"{at:%Y-%m-%d}"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"earlier-{day:%Y%m%d}.jsonl").open("w") as log:
        for i, (row, prediction) in enumerate(zip(rows, predictions, strict=True)):
            stamp = (at + timedelta(seconds=i)).isoformat().replace("+00:00", "Z")
            head = {"ts": stamp, "request_id": f"earlier-{i}", "model_line": LINE, "model_name": LINE}
            log.write(json.dumps(head | {"model_version": "2", "rows": 1, "request": {"rows": [row]},
                                         "predictions": [prediction]}) + "\n")
    return frame.assign(prediction=predictions)


def test_live_performance_scores_what_was_served_a_horizon_and_a_delay_ago(port):
    """Rows served on day S predict S + 7, whose actuals are complete a day after that day ends: the check of
    [T0, T1) scores the rows served on the days [day(T0), day(T1)) moved back 8 days, with the gate's metrics."""
    write_line(port, ground_truth=True)
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    day = timedelta(days=1)
    # served 9 days ago, predicting 2 days ago: complete since midnight
    served = served_earlier(port, (midnight - 2 * day).date(), midnight - 9 * day + timedelta(minutes=1))
    result = check(midnight - day, datetime.now(UTC))
    assert result.task_states["check_drift"] == "success", result.task_states
    run = monitoring_runs()[-1]
    found = json.loads(run.data.tags["monitor.findings"])
    assert found["labelled_rows"] == len(served) == 12  # one forecast per market, each joined to its actual
    actual = served["units_sold"].to_numpy()
    mape = float(np.mean(np.abs(actual - served["prediction"].to_numpy()) / np.maximum(np.abs(actual), 1.0)))
    assert found["live"]["mape"] == pytest.approx(mape) and run.data.metrics["live.mape"] == pytest.approx(mape)
    assert set(found["holdout"]) == {"mape", "r2", "rmse"}  # the served version's own holdout, for comparison

    # a day whose forecasts were three times too high: a live performance breach of the version that served
    bad = served_earlier(port, (midnight - 3 * day).date(), midnight - 10 * day + timedelta(minutes=1), 3.0)
    result = check(midnight - 2 * day, midnight - day)
    assert result.task_states["alert_owners"] == "success", result.task_states
    found = json.loads(monitoring_runs()[-1].data.tags["monitor.findings"])
    assert found["labelled_rows"] == len(bad) and found["rows"] == 0  # nothing served that day by this test
    assert found["verdict"] == "breach" and any(b.startswith("live mape") for b in found["breaches"])
