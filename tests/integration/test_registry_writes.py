"""Registry writes against a real MLflow server: safe to retry, and a second writer is refused.

MLflow has no compare-and-set. The lifecycle's single writer per line (one run at a time) carries it;
these tests check what remains each step's own job: a retry after a lost answer never loses what
staging pointed to, restore_staging is idempotent, and an alias someone else moved stops promotion
before anything is written.
"""

from __future__ import annotations

import copy
import itertools
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from mlops_lifecycle import paths
from mlops_lifecycle.audit import events
from mlops_lifecycle.config import ModelLineConfig
from mlops_lifecycle.exceptions import RegistryConflict
from mlops_lifecycle.operators.registry import PromoteOperator, RestoreStagingOperator, StageOperator

BASE = yaml.safe_load((paths.include_dir() / "model_lines" / "demand_forecast.yaml").read_text())
COUNTER = itertools.count()


@pytest.fixture
def line(mlflow_server) -> SimpleNamespace:  # noqa: ANN001
    """A fresh registered model with three versions, and the config of its line."""
    from mlops_lifecycle.hooks.mlflow_registry import MlflowRegistryHook

    name = f"registry_writes_{next(COUNTER)}"
    data = copy.deepcopy(BASE)
    data.update(model_line=name)
    data["registry"].update(model_name=name, experiment=f"/tests/{name}")
    config = ModelLineConfig.model_validate(data)
    registry = MlflowRegistryHook()
    client = registry.client
    client.create_registered_model(name)
    run = client.create_run(client.create_experiment(f"/tests/{name}"))
    for _ in range(3):
        client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return SimpleNamespace(name=name, config=config, registry=registry, run_id=run.info.run_id)


def candidate(line: SimpleNamespace, version: str, production: str | None, week: int = 2) -> dict[str, Any]:
    return {
        "model_line": line.name,
        "model_name": line.name,
        "model_version": version,
        "run_id": line.run_id,
        "experiment_id": "0",
        "run_key": f"{line.name}/202610{week:02d}T0300-202610{week + 7:02d}T0300",
        "production_version": production,
        "code_revision": "abc",
        "snapshot": "snap.parquet",
        "window": "2024-10-05..2026-10-05",
        "holdout_start": "2026-09-07",
    }


VERDICT = {"passed": True, "production_version": None, "results": [], "metrics": {"mape": 0.1}}


def context(run_id: str, pulled: dict | None = None, failed: tuple[str, ...] = ()) -> dict[str, Any]:
    """What a task sees of its run: its ids, its upstream XComs and task states."""
    ti = SimpleNamespace(
        dag_id="registry_writes__lifecycle",
        run_id=run_id,
        xcom_pull=lambda task_ids: (pulled or {}).get(task_ids),
        get_task_states=lambda **_: {run_id: dict.fromkeys(failed, "failed")},
    )
    return {"ti": ti}


def test_a_stage_retry_after_a_lost_answer_keeps_what_staging_pointed_to(line) -> None:
    line.registry.client.set_registered_model_alias(line.name, "staging", "1")
    c = candidate(line, "2", None)
    stage = StageOperator(task_id="stage", config=line.config, candidate=c, verdict=VERDICT)
    first = stage.execute(context("manual__a"))
    # the answer was lost after the alias moved: the retry finds staging on the candidate already
    retried = stage.execute(context("manual__a"))

    assert first == retried == {"alias": "staging", "version": "2", "previous": "1"}
    assert line.registry.alias_version(line.name, "staging") == "2"
    [staged] = events(line.registry.version_tags(line.name, "2"))
    assert (staged["event"], staged["from"], staged["to"], staged["by"]) == (
        "staged",
        "1",
        "2",
        "airflow:registry_writes__lifecycle/manual__a",
    )

    restore = RestoreStagingOperator(task_id="restore_staging", config=line.config)
    ctx = context("manual__a", pulled={"train": c}, failed=("deploy",))
    restored = restore.execute(ctx)
    assert restored is not None and restored["restored_to"] == "1" and "deploy failed" in restored["because"]
    assert restore.execute(ctx) is None, "a retried restore finds nothing left to do"
    assert line.registry.alias_version(line.name, "staging") == "1"
    log = events(line.registry.version_tags(line.name, "2"))
    assert [e["event"] for e in log] == ["staged", "staging_withdrawn"] and log[1]["to"] == "1"


def test_restore_never_undoes_a_later_staging(line) -> None:
    line.registry.client.set_registered_model_alias(line.name, "staging", "1")
    c = candidate(line, "2", None)
    StageOperator(task_id="stage", config=line.config, candidate=c, verdict=VERDICT).execute(context("manual__a"))
    line.registry.client.set_registered_model_alias(line.name, "staging", "3")  # someone staged v3 since

    restored = RestoreStagingOperator(task_id="restore_staging", config=line.config).execute(
        context("manual__a", pulled={"train": c}, failed=("deploy",))
    )

    assert restored is None and line.registry.alias_version(line.name, "staging") == "3"


def test_a_second_writer_moving_production_stops_promotion_before_anything_is_written(line) -> None:
    client = line.registry.client
    client.set_registered_model_alias(line.name, "production", "1")
    client.set_model_version_tag(line.name, "1", "audit.run_key", f"{line.name}/20260921T0300-20260928T0300")
    c = candidate(line, "2", "1")
    client.set_registered_model_alias(line.name, "production", "3")  # moved by hand while the run deployed
    before = dict(client.get_model_version(line.name, "2").tags)
    promote = PromoteOperator(
        task_id="promote",
        config=line.config,
        candidate=c,
        review={"review_id": "r", "branch": "b", "commit": "c", "repository": "x"},
        approval={"decision": "approved", "approved_by": ["ann"], "approved_at": "2026-10-09T10:00:00+00:00"},
        merge={"merge_commit": "m" * 40, "review_id": "r"},
        deployment={"service_url": "http://127.0.0.1:9", "revision": "m", "deployments": {"production": "d"}},
        verification={"url": "http://127.0.0.1:9", "served_version": "2"},
    )

    with pytest.raises(RegistryConflict, match="alias 'production' points to v3, expected v1"):
        promote.execute(context("manual__a"))

    assert line.registry.alias_version(line.name, "production") == "3"
    assert dict(client.get_model_version(line.name, "2").tags) == before, "promotion wrote to the record"


def test_mlflow_unreachable_at_promote_says_what_serves_and_how_to_finish(line, monkeypatch) -> None:
    import json

    from airflow.sdk.exceptions import AirflowFailException

    import devstack
    from mlops_lifecycle.exceptions import LifecycleError

    nobody = devstack.free_port()  # nothing listens there: MLflow is down
    down = {"conn_type": "http", "extra": {"tracking_uri": f"http://127.0.0.1:{nobody}"}}
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_DOWN", json.dumps(down))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    promote = PromoteOperator(
        task_id="promote",
        config=line.config,
        mlflow_conn_id="mlflow_down",
        candidate=candidate(line, "2", "1"),
        review={"review_id": "r", "branch": "b", "commit": "c", "repository": "x"},
        approval={"decision": "approved", "approved_by": ["ann"], "approved_at": "2026-10-09T10:00:00+00:00"},
        merge={"merge_commit": "m" * 40, "review_id": "r"},
        deployment={"service_url": "http://127.0.0.1:9", "revision": "m", "deployments": {"production": "d"}},
        verification={"url": "http://127.0.0.1:9", "served_version": "2"},
    )

    with pytest.raises(LifecycleError) as raised:
        promote.execute(context("manual__a"))

    message = str(raised.value)
    assert not isinstance(raised.value, AirflowFailException), "MLflow coming back is worth a retry"
    assert f"while promoting {line.name} v2: production already serves it (verified at http://127.0.0.1:9)" in message
    assert "may still say v1" in message and "clearing promote finishes it" in message


def test_a_retried_approval_reuses_the_recorded_answer_and_asks_nobody(line) -> None:
    """Airflow can lose a task's success as it resumes from awaiting input: the retry must not ask again."""
    import json

    from mlops_lifecycle.operators.review_local_git import APPROVAL_TAG, ReviewApprovalOperator

    data = line.config.model_dump()
    data["review"]["auto_approve"] = False  # only a human could answer: a second ask would wait for one
    config = ModelLineConfig.model_validate(data)
    recorded = {"approved_by": ["ann (reviewer)"], "approved_at": "2026-10-09T10:00:00+00:00"}
    line.registry.client.set_tag(line.run_id, APPROVAL_TAG, json.dumps(recorded))
    approve = ReviewApprovalOperator(
        task_id="approve_review",
        config=config,
        review={"review_id": f"review/{line.name}/v2", "branch": "b", "commit": "c", "repository": "x"},
        candidate=candidate(line, "2", None),
    )

    assert approve.execute(context("manual__a")) == {"decision": "approved", **recorded}
