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


def write_line(port: int) -> None:
    data = copy.deepcopy(BASE)
    data.update(model_line=LINE, retries=0, retry_delay_seconds=1)
    data["registry"] = {"model_name": LINE, "experiment": f"/e2e/{LINE}"}
    data["train"]["parameters"] = {"max_iter": 60, "learning_rate": 0.1}
    data["review"].update(auto_approve=True)
    data["deploy"].update(port=port, verify_timeout_seconds=120)
    data["monitoring"].pop("ground_truth")  # live performance: tests/unit/test_monitoring.py and below
    data["monitoring"]["limits"]["min_rows"] = 100
    data["monitoring"]["cooldown_hours"] = 24
    (MODEL_LINES / f"{LINE}.yaml").write_text(yaml.safe_dump(data))


def traffic(rows: int, seed: int) -> list[dict]:
    """Rows like the training data (a random draw from W1's training snapshot): ordinary traffic."""
    snapshot = next((paths.local_home() / "warehouse" / "snapshots").glob(f"{LINE}__*20261005T0300.parquet"))
    frame = pd.read_parquet(snapshot).dropna()
    features = [c for c in frame.columns if c not in ("date", "units_sold")]
    return json.loads(frame[features].sample(rows, random_state=seed).to_json(orient="records"))


def send(port: int, rows: list[dict], batch: int = 100) -> None:
    for first in range(0, len(rows), batch):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/predict",
            data=json.dumps({"rows": rows[first : first + batch]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200


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
