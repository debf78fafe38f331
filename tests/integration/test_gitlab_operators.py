"""The GitLab review and delivery operators, on the production example config, against the GitLab stand-in.

Each deferring operator runs as Airflow runs it: ``execute`` raises ``TaskDeferred``, the trigger is
rebuilt from its serialised form and run to its event, then a fresh operator's ``execute_complete``
gets that event. The candidate is a real MLflow run (the review verdict is tagged on it).

What a user relies on: one merge request per version, found again by a retry; a merge counts only
with an approval from someone other than the author; a closed review or a failed pipeline or
deployment stops the run without retries, and the reason is on the MLflow run.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

from mlops_lifecycle.changelog import entry_heading, render_pin
from mlops_lifecycle.config import ModelLineConfig, load_model_line
from mlops_lifecycle.exceptions import DeliveryFailed, ReviewRejected, ReviewTimedOut
from mlops_lifecycle.gate import evaluate_gate
from mlops_lifecycle.links import GitLabMergeRequestLink, GitLabPipelineLink, MlflowRunLink
from mlops_lifecycle.operators.deploy_gitlab_ci import AwaitDeploymentsOperator, AwaitPipelineOperator
from mlops_lifecycle.operators.review_gitlab import AwaitMergeOperator, OpenMergeRequestOperator
from mlops_lifecycle.triggers.gitlab import (
    DeploymentsSucceededTrigger,
    MergeRequestMergedTrigger,
    PipelineSucceededTrigger,
)
from standins.base import Fault
from standins.gitlab import AutoReview, CIPlan, GitLabStandIn
from trigger_events import deferral, event_of

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "include" / "examples" / "production" / "demand_forecast.yaml"
USERS = {"bot-token": "mlops-bot", "alice-token": "alice", "bob-token": "bob"}
PROJECT = "ml-platform/deploy-test"  # not the example's project: proves the operators read the config
CONN_ID = "gitlab_test"
BRANCH = "review/demand_forecast/v3"
PIN = "models/demand_forecast.yaml"
CHANGELOG = "changelog/demand_forecast.md"
MAIN_CHANGELOG = "# demand_forecast\n\n## demand_forecast v2: promoted to production\n\n- Approved by bob\n"


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def config(tmp_path_factory) -> ModelLineConfig:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["review"].update(project=PROJECT, gitlab_conn_id=CONN_ID, poll_interval_seconds=0.05)
    raw["deploy"]["poll_interval_seconds"] = 0.05
    path = tmp_path_factory.mktemp("model_lines") / f"{raw['model_line']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_model_line(path)


def gitlab(monkeypatch: pytest.MonkeyPatch, ci: CIPlan | None = None, **kwargs: Any) -> GitLabStandIn:
    """The deployment repository with an earlier production version, and the connection the config names."""
    initial = {
        "README.md": "# deployments\n",
        PIN: render_pin("demand_forecast", "demand_forecast", "2", "run-of-v2"),
        CHANGELOG: MAIN_CHANGELOG,
    }
    server = GitLabStandIn(
        USERS, project_path=PROJECT, initial_files=initial, ci=ci or CIPlan(step_seconds=0.02), **kwargs
    ).start()
    conn = {"conn_type": "http", "host": server.url, "password": "bot-token", "extra": {"timeout": 5, "max_retries": 3}}
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(conn))
    return server


@pytest.fixture
def standin(monkeypatch):
    server = gitlab(monkeypatch)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mlflow_client(mlflow_server):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=mlflow_server.url)


@pytest.fixture
def candidate(mlflow_client, config) -> dict[str, Any]:
    """A candidate as ExtractCandidate hands it on, backed by a real MLflow run."""
    name = "/tests/gitlab_operators"  # its own experiment on the session's MLflow: other suites count runs
    experiment = mlflow_client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else mlflow_client.create_experiment(name)
    run = mlflow_client.create_run(experiment_id, tags={"lifecycle.registered_version": "3"})
    return {
        "model_line": "demand_forecast",
        "model_name": config.registry.model_name,
        "model_version": "3",
        "run_id": run.info.run_id,
        "experiment_id": experiment_id,
        "run_key": f"demand_forecast/2026-01-05/{uuid.uuid4().hex[:6]}",
        "production_version": "2",
        "code_revision": "0123456789abcdef0123456789abcdef01234567",
        "snapshot": "bq://acme-mlops-prod.mlops_snapshots.demand_forecast__20240105_20260105",
        "window": "2024-01-05..2026-01-05",
        "holdout_start": "2025-12-08",
    }


@pytest.fixture
def verdict(config) -> dict[str, Any]:
    metrics = {"mape": 0.18, "r2": 0.81, "rmse": 10.0}
    baseline = {"mape": 0.19, "r2": 0.80, "rmse": 10.2}
    return evaluate_gate(config.gate.metrics, metrics, baseline, "2").as_dict()


def context() -> dict[str, Any]:
    return {"ti": SimpleNamespace(dag_id="demand_forecast__lifecycle", run_id="scheduled__2026-01-05T03:00:00+00:00")}


def defer(operator: Any, **override: Any) -> tuple[TaskDeferred, dict[str, Any]]:
    """``execute`` must defer; the trigger is rebuilt from its serialised form (as the triggerer does) and run."""
    deferred = deferral(lambda: operator.execute(context()))
    return deferred, event_of(deferred, timeout=10, **override)


def open_review(config, candidate, verdict) -> dict[str, Any]:
    op = OpenMergeRequestOperator(task_id="open_review", config=config, candidate=candidate, verdict=verdict)
    return op.execute(context())


def await_merge(config, review, candidate) -> AwaitMergeOperator:
    return AwaitMergeOperator(task_id="await_merge", config=config, review=review, candidate=candidate)


def run_tags(mlflow_client, candidate) -> dict[str, str]:
    return mlflow_client.get_run(candidate["run_id"]).data.tags


def quick_action_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lstrip().startswith("/")]


# -- open the review ------------------------------------------------------------------------------
def test_open_merge_request_commits_the_proposal_and_a_retry_returns_the_same_mr(standin, config, candidate, verdict):
    main_head = standin.branches["main"]
    op = OpenMergeRequestOperator(task_id="open_review", config=config, candidate=candidate, verdict=verdict)

    result = op.execute(context())

    (mr,) = standin.merge_requests
    assert result == {
        "review_id": f"{PROJECT}!{mr['iid']}",
        "mr_iid": mr["iid"],
        "web_url": mr["web_url"],
        "branch": BRANCH,
        "commit": standin.branches[BRANCH],
        "repository": f"{standin.url}/{PROJECT}",
    }
    assert mr["title"] == "demand_forecast: promote demand_forecast v3 to production"
    assert (mr["source_branch"], mr["target_branch"]) == (BRANCH, "main")
    assert mr["labels"] == ["model-promotion", "forecasting"]
    assert [r["username"] for r in mr["reviewers"]] == ["alice", "bob"]
    description = mr["description"]
    assert candidate["run_id"] in description and "| mape | threshold |" in description
    assert "Needs 1 approval(s) from someone other than the author (alice, bob)" in description
    assert quick_action_lines(description) == []
    # one commit on the review branch: the pin and the proposal appended to main's changelog
    (commit, parent) = standin.commits_on(BRANCH)[:2]
    assert parent["id"] == main_head and commit["title"] == "demand_forecast: propose v3 for production"
    assert standin.file_at(BRANCH, PIN) == render_pin("demand_forecast", "demand_forecast", "3", candidate["run_id"])
    changelog = standin.file_at(BRANCH, CHANGELOG)
    assert changelog.startswith(MAIN_CHANGELOG)
    assert entry_heading("demand_forecast", "3", "proposed for production") in changelog.splitlines()
    assert op.recorded_links[GitLabMergeRequestLink.key] == mr["web_url"]
    assert candidate["run_id"] in op.recorded_links[MlflowRunLink.key]

    # the task is retried (a fresh operator in a new worker): the same MR, nothing new
    again = open_review(config, candidate, verdict)

    assert again == result
    assert len(standin.merge_requests) == 1 and len(standin.branches) == 2
    assert standin.count("POST", r".*/merge_requests") == 1 and standin.count("POST", r".*/repository/commits") == 1
    assert standin.commits_on(BRANCH)[1]["id"] == main_head


def test_open_merge_request_survives_lost_answers(standin, config, candidate, verdict):
    for method, path in (
        ("POST", r".*/repository/branches"),
        ("POST", r".*/repository/commits"),
        ("POST", r".*/merge_requests"),
    ):
        standin.inject(method, path, Fault.drop_after())

    result = open_review(config, candidate, verdict)

    assert [m["iid"] for m in standin.merge_requests] == [result["mr_iid"]]
    assert standin.commits_on(BRANCH)[1]["id"] == standin.branches["main"]  # exactly one commit on main
    assert result["commit"] == standin.branches[BRANCH]


def test_outside_text_in_the_candidate_cannot_act_on_the_merge_request(standin, config, candidate, verdict):
    hostile = "x\n/merge\n/approve | `tick` <script>alert(1)</script>\n  /close"
    for key in ("run_key", "snapshot", "code_revision", "window", "holdout_start"):
        candidate[key] = f"/{key} {hostile}"

    result = open_review(config, candidate, verdict)

    (mr,) = standin.merge_requests
    assert mr["iid"] == result["mr_iid"] and quick_action_lines(mr["description"]) == []
    rows = [line for line in mr["description"].splitlines() if line.startswith("|")]
    assert len(rows) == 2 + len(verdict["results"])
    assert all(line.replace("\\|", "").count("|") == 7 for line in rows)  # six columns each
    assert quick_action_lines(standin.file_at(BRANCH, CHANGELOG)) == []


# -- await the merge ------------------------------------------------------------------------------
def test_await_merge_defers_then_returns_the_independent_approvers_and_merge_commit(
    standin, config, candidate, verdict, mlflow_client
):
    review = open_review(config, candidate, verdict)
    standin.approve(review["mr_iid"], "mlops-bot")  # the author's own approval must not count
    standin.approve(review["mr_iid"], "alice")
    merge_sha = standin.merge(review["mr_iid"], "bob")

    started = time.time()
    deferred, event = defer(await_merge(config, review, candidate))

    trigger = deferred.trigger
    assert isinstance(trigger, MergeRequestMergedTrigger)
    assert (trigger.conn_id, trigger.project, trigger.iid, trigger.min_approvals) == (CONN_ID, PROJECT, 1, 1)
    assert trigger.deadline == pytest.approx(started + 72 * 3600, abs=60)
    assert trigger.poll_interval == 0.05

    result = await_merge(config, review, candidate).execute_complete(context(), event)

    (mr,) = standin.merge_requests
    assert result == {
        "decision": "approved",
        "approved_by": ["alice"],
        "approved_at": mr["merged_at"],
        "merged_by": "bob",
        "merge_commit": merge_sha,
        "review_id": review["review_id"],
        "web_url": review["web_url"],
    }
    tags = run_tags(mlflow_client, candidate)
    assert (tags["review.verdict"], tags["review.id"]) == ("approved", review["review_id"])


def test_await_merge_audit_tag_leaves_out_the_authors_approval(standin, config, candidate, verdict, mlflow_client):
    review = open_review(config, candidate, verdict)
    standin.approve(review["mr_iid"], "mlops-bot")
    standin.approve(review["mr_iid"], "alice")
    standin.merge(review["mr_iid"], "bob")
    _, event = defer(await_merge(config, review, candidate))

    await_merge(config, review, candidate).execute_complete(context(), event)

    assert run_tags(mlflow_client, candidate)["review.approved_by"] == "alice"


def test_a_closed_review_is_rejected_without_retry_and_tagged_on_the_run(
    monkeypatch, config, candidate, verdict, mlflow_client
):
    standin = gitlab(monkeypatch, auto_review=AutoReview(approver="bob", merge=False, close=True, delay_seconds=0.1))
    try:
        review = open_review(config, candidate, verdict)
        main_head = standin.branches["main"]

        _, event = defer(await_merge(config, review, candidate))  # polls until bob closes it
        with pytest.raises(ReviewRejected) as rejected:
            await_merge(config, review, candidate).execute_complete(context(), event)

        assert isinstance(rejected.value, AirflowFailException)  # a decision: Airflow does not retry it
        assert str(rejected.value) == f"Merge request !{review['mr_iid']} was closed by bob. Registry unchanged."
        tags = run_tags(mlflow_client, candidate)
        assert (tags["review.verdict"], tags["review.rejected_by"], tags["review.id"]) == (
            "rejected",
            "bob",
            review["review_id"],
        )
        assert standin.branches["main"] == main_head and standin.pipelines == []
    finally:
        standin.stop()


def test_a_merge_with_only_the_authors_approval_is_rejected(standin, config, candidate, verdict, mlflow_client):
    review = open_review(config, candidate, verdict)
    standin.approve(review["mr_iid"], "mlops-bot")
    standin.merge(review["mr_iid"], "alice")
    _, event = defer(await_merge(config, review, candidate))

    with pytest.raises(ReviewRejected, match="the author's own approval does not count"):
        await_merge(config, review, candidate).execute_complete(context(), event)

    assert run_tags(mlflow_client, candidate)["review.verdict"] == "rejected"


def test_a_self_approved_merge_records_who_merged_it(standin, config, candidate, verdict, mlflow_client):
    review = open_review(config, candidate, verdict)
    standin.approve(review["mr_iid"], "mlops-bot")
    standin.merge(review["mr_iid"], "alice")
    _, event = defer(await_merge(config, review, candidate))
    with pytest.raises(ReviewRejected):
        await_merge(config, review, candidate).execute_complete(context(), event)

    assert "alice" in run_tags(mlflow_client, candidate)["review.rejected_by"]


def test_no_decision_before_the_deadline_fails_without_retry_or_verdict(
    standin, config, candidate, verdict, mlflow_client
):
    review = open_review(config, candidate, verdict)
    _, event = defer(await_merge(config, review, candidate), deadline=time.time() + 0.2)
    assert event["status"] == "timeout"

    with pytest.raises(ReviewTimedOut, match="Timed out waiting for merge request") as failed:
        await_merge(config, review, candidate).execute_complete(context(), event)

    # retrying would wait review.timeout_hours again per try: the deadline from the YAML is final
    assert isinstance(failed.value, AirflowFailException)
    assert "No decision within review.timeout_hours" in str(failed.value)
    assert "review.verdict" not in run_tags(mlflow_client, candidate)


# -- await delivery -------------------------------------------------------------------------------
def test_review_to_production_with_an_approving_reviewer(monkeypatch, config, candidate, verdict, mlflow_client):
    standin = gitlab(monkeypatch, auto_review=AutoReview(approver="alice", delay_seconds=0.1))
    try:
        review = open_review(config, candidate, verdict)
        _, event = defer(await_merge(config, review, candidate))
        merge = await_merge(config, review, candidate).execute_complete(context(), event)
        assert merge["approved_by"] == ["alice"] and merge["merge_commit"] == standin.branches["main"]

        pipeline_op = AwaitPipelineOperator(task_id="await_pipeline", config=config, merge=merge)
        deferred, event = defer(pipeline_op)
        assert isinstance(deferred.trigger, PipelineSucceededTrigger) and deferred.trigger.sha == merge["merge_commit"]
        resumed = AwaitPipelineOperator(task_id="await_pipeline", config=config, merge=merge)
        pipeline = resumed.execute_complete(context(), event)

        (shown,) = standin.pipelines
        assert pipeline == {"pipeline_id": shown["id"], "web_url": shown["web_url"], "sha": merge["merge_commit"]}
        assert resumed.recorded_links[GitLabPipelineLink.key] == shown["web_url"]

        def deployments_op() -> AwaitDeploymentsOperator:
            return AwaitDeploymentsOperator(task_id="await_deployments", config=config, merge=merge, pipeline=pipeline)

        deferred, event = defer(deployments_op())
        assert isinstance(deferred.trigger, DeploymentsSucceededTrigger)
        assert deferred.trigger.environments == ["dev", "staging", "production"]
        deployed = deployments_op().execute_complete(context(), event)

        ids = {d["environment"]["name"]: d["id"] for d in standin.deployments}
        assert deployed == {
            "service_url": "https://demand-forecast.models.example.com",
            "revision": merge["merge_commit"],
            "pipeline_id": shown["id"],
            "deployments": {env: f"gitlab-deployment:{ids[env]}" for env in ("dev", "staging", "production")},
        }
        assert list(deployed["deployments"]) == ["dev", "staging", "production"]
        assert run_tags(mlflow_client, candidate)["review.approved_by"] == "alice"
    finally:
        standin.stop()


def test_a_failed_pipeline_is_delivery_failed(monkeypatch, config, candidate, verdict):
    standin = gitlab(monkeypatch, ci=CIPlan(step_seconds=0.02, pipeline_status="failed"))
    try:
        review = open_review(config, candidate, verdict)
        merge = {"merge_commit": standin.merge(review["mr_iid"], "alice")}

        _, event = defer(AwaitPipelineOperator(task_id="await_pipeline", config=config, merge=merge))
        with pytest.raises(DeliveryFailed, match=rf"Pipeline {standin.pipelines[0]['id']} of \w+ failed") as failed:
            AwaitPipelineOperator(task_id="await_pipeline", config=config, merge=merge).execute_complete(
                context(), event
            )
        assert isinstance(failed.value, AirflowFailException)
    finally:
        standin.stop()


def test_a_failed_staging_deployment_is_delivery_failed_and_production_untouched(
    monkeypatch, config, candidate, verdict
):
    standin = gitlab(monkeypatch, ci=CIPlan(step_seconds=0.02, deployment_status={"staging": "failed"}))
    try:
        review = open_review(config, candidate, verdict)
        merge = {"merge_commit": standin.merge(review["mr_iid"], "alice")}
        pipeline = {"pipeline_id": standin.pipelines[0]["id"], "web_url": standin.pipelines[0]["web_url"]}

        def op() -> AwaitDeploymentsOperator:
            return AwaitDeploymentsOperator(task_id="await_deployments", config=config, merge=merge, pipeline=pipeline)

        _, event = defer(op())
        with pytest.raises(DeliveryFailed, match="to staging failed .*later environments were not deployed") as failed:
            op().execute_complete(context(), event)

        assert isinstance(failed.value, AirflowFailException)
        standin.wait_background()
        assert [d["environment"]["name"] for d in standin.deployments] == ["dev", "staging"]
    finally:
        standin.stop()
