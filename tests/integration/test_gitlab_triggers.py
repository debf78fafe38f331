"""The GitLab triggers, run to their one event against the GitLab v4 stand-in (python-gitlab in a thread).

What a user relies on: the triggerer can rebuild each trigger from what it serialised; a merge counts
only after an approval by someone other than the author; a closed MR, a failed pipeline or a failed
deployment stops the wait with a message naming who or what; nothing happening ends at the deadline
with the last state seen; and GitLab failing every time ends the wait instead of polling forever.
"""

from __future__ import annotations

import importlib
import json
import time
from typing import Any

import pytest

from mlops_lifecycle.hooks.gitlab import GitLabHook
from mlops_lifecycle.triggers import gitlab as gitlab_triggers
from mlops_lifecycle.triggers.gitlab import (
    DeploymentsSucceededTrigger,
    MergeRequestMergedTrigger,
    PipelineSucceededTrigger,
)
from standins.base import Fault
from standins.gitlab import AutoReview, CIPlan, GitLabStandIn
from trigger_events import first_event

USERS = {"bot-token": "mlops-bot", "alice-token": "alice", "bob-token": "bob"}
PROJECT = "platform/model-deployments"
CONN_ID = "gitlab_test"
BRANCH = "review/demand_forecast/v3"
ENVIRONMENTS = ["dev", "staging", "production"]
POLL = 0.05


def connect(monkeypatch: pytest.MonkeyPatch, standin: GitLabStandIn, max_retries: int = 3) -> GitLabHook:
    conn = {
        "conn_type": "http",
        "host": standin.url,
        "password": "bot-token",
        "extra": {"timeout": 5, "max_retries": max_retries},
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(conn))
    return GitLabHook(CONN_ID)


def gitlab(ci: CIPlan | None = None, auto_review: AutoReview | None = None) -> GitLabStandIn:
    return GitLabStandIn(
        USERS,
        project_path=PROJECT,
        initial_files={"README.md": "# deployments\n"},
        ci=ci or CIPlan(step_seconds=0.02),
        auto_review=auto_review,
    )


@pytest.fixture
def standin():
    with gitlab() as server:
        yield server


def open_mr(hook: GitLabHook) -> int:
    """What OpenMergeRequestOperator does, as the bot: a branch, one commit, one MR."""
    hook.ensure_branch(PROJECT, BRANCH, "main")
    hook.commit_files(PROJECT, BRANCH, {"models/demand_forecast.yaml": "model_version: '3'\n"}, "propose v3")
    mr, _ = hook.ensure_merge_request(PROJECT, BRANCH, "main", "promote v3", "changelog", [], [])
    return mr.iid


def mr_trigger(iid: int, seconds: float = 10.0, **kwargs: Any) -> MergeRequestMergedTrigger:
    return MergeRequestMergedTrigger(
        conn_id=CONN_ID, project=PROJECT, iid=iid, deadline=time.time() + seconds, poll_interval=POLL, **kwargs
    )


def pipeline_trigger(sha: str, seconds: float = 10.0, ref: str | None = None) -> PipelineSucceededTrigger:
    return PipelineSucceededTrigger(
        conn_id=CONN_ID, project=PROJECT, sha=sha, ref=ref, deadline=time.time() + seconds, poll_interval=POLL
    )


def deployments_trigger(sha: str, seconds: float = 10.0) -> DeploymentsSucceededTrigger:
    return DeploymentsSucceededTrigger(
        conn_id=CONN_ID,
        project=PROJECT,
        sha=sha,
        environments=ENVIRONMENTS,
        deadline=time.time() + seconds,
        poll_interval=POLL,
    )


# -- serialisation --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "trigger",
    [
        pytest.param(mr_trigger(7, min_approvals=2), id="merge-request"),
        pytest.param(pipeline_trigger("a" * 40), id="pipeline"),
        pytest.param(deployments_trigger("b" * 40), id="deployments"),
    ],
)
def test_serialize_round_trips_through_an_importable_classpath(trigger):
    classpath, kwargs = trigger.serialize()

    module, _, name = classpath.rpartition(".")
    cls = getattr(importlib.import_module(module), name)  # what the triggerer does
    assert cls is type(trigger) and module == "mlops_lifecycle.triggers.gitlab"
    assert json.loads(json.dumps(kwargs)) == kwargs  # plain values only
    assert cls(**kwargs).serialize() == (classpath, kwargs)
    assert kwargs["deadline"] == trigger.deadline and kwargs["conn_id"] == CONN_ID


# -- merge request --------------------------------------------------------------------------------
def test_approved_by_a_reviewer_and_merged_is_success_with_the_merge_commit(monkeypatch):
    with gitlab(auto_review=AutoReview(approver="alice", delay_seconds=0.2)) as standin:
        iid = open_mr(connect(monkeypatch, standin))

        event = first_event(mr_trigger(iid))  # polls while the MR is open, until alice has approved and merged

        (mr,) = standin.merge_requests
        assert event["status"] == "success"
        assert event["mr"]["merge_commit_sha"] == mr["merge_commit_sha"] == standin.branches["main"]
        assert event["mr"]["approvers"] == ["alice"] and event["mr"]["author"] == "mlops-bot"
        assert event["mr"]["merged_by"] == "alice" and event["web_url"] == mr["web_url"]
        assert f"merged as {mr['merge_commit_sha'][:12]}, approved by alice" in event["message"]


def test_closed_is_rejected_naming_who_closed_it(monkeypatch):
    with gitlab(auto_review=AutoReview(approver="bob", merge=False, close=True, delay_seconds=0.1)) as standin:
        iid = open_mr(connect(monkeypatch, standin))

        event = first_event(mr_trigger(iid))

        assert event["status"] == "rejected"
        assert event["message"] == f"Merge request !{iid} was closed by bob"
        assert event["mr"]["closed_by"] == "bob" and event["mr"]["merge_commit_sha"] is None


def test_merged_with_only_the_authors_approval_is_rejected(monkeypatch, standin):
    iid = open_mr(connect(monkeypatch, standin))
    standin.approve(iid, "mlops-bot")  # the bot that opened it
    standin.merge(iid, "mlops-bot")

    event = first_event(mr_trigger(iid))

    assert event["status"] == "rejected"
    assert "the author's own approval does not count" in event["message"]
    assert "0 approval(s) from people other than its author mlops-bot (1 required)" in event["message"]
    assert event["mr"]["approvers"] == ["mlops-bot"] and event["mr"]["state"] == "merged"


def test_fewer_independent_approvals_than_required_is_rejected(monkeypatch, standin):
    iid = open_mr(connect(monkeypatch, standin))
    standin.approve(iid, "alice")
    standin.merge(iid, "alice")

    event = first_event(mr_trigger(iid, min_approvals=2))

    assert event["status"] == "rejected" and "1 approval(s)" in event["message"] and "(2 required)" in event["message"]


def test_a_fast_forward_merge_is_success_with_the_commit_now_on_the_target(monkeypatch, standin):
    iid = open_mr(connect(monkeypatch, standin))
    standin.approve(iid, "alice")
    with standin.lock:  # what GitLab does for a project whose merge method is fast-forward: no merge commit
        mr = standin._mrs[iid]
        head = standin.branches[BRANCH]
        standin._branches["main"] = head
        mr.state, mr.sha, mr.merged_by, mr.merged_at = "merged", head, "alice", standin._now()

    event = first_event(mr_trigger(iid, seconds=1))

    assert event["status"] == "success" and head[:12] in event["message"]


def test_nothing_before_the_deadline_is_a_timeout_with_the_last_state(monkeypatch, standin):
    iid = open_mr(connect(monkeypatch, standin))
    standin.approve(iid, "alice")  # approved but never merged

    started = time.monotonic()
    event = first_event(mr_trigger(iid, seconds=0.3))

    assert time.monotonic() - started < 5
    assert event["status"] == "timeout"
    assert event["message"].endswith("last seen: opened, approved by alice")


def test_gitlab_failing_every_time_ends_in_error_after_the_limit(monkeypatch, standin):
    iid = open_mr(connect(monkeypatch, standin, max_retries=1))
    monkeypatch.setattr(gitlab_triggers, "MAX_CONSECUTIVE_ERRORS", 3)
    standin.inject("GET", r".*/merge_requests/\d+", Fault.status_code(503), times=1000)

    event = first_event(mr_trigger(iid, seconds=60))

    assert event["status"] == "error"
    assert event["message"].startswith(f"Gave up waiting for merge request !{iid} in {PROJECT}")
    assert "GitlabGetError" in event["message"] and "503" in event["message"]
    assert standin.count("GET", r".*/merge_requests/\d+") == 3 * 2  # 3 polls, each retried once by python-gitlab


def test_a_transient_error_between_polls_does_not_end_the_wait(monkeypatch, standin):
    iid = open_mr(connect(monkeypatch, standin, max_retries=0))
    monkeypatch.setattr(gitlab_triggers, "MAX_CONSECUTIVE_ERRORS", 2)
    standin.approve(iid, "alice")
    standin.merge(iid, "alice")
    standin.inject("GET", r".*/merge_requests/\d+", Fault.status_code(503), times=1)

    event = first_event(mr_trigger(iid))

    assert event["status"] == "success"


def test_an_unknown_connection_is_an_error_event(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_GITLAB_NOWHERE", raising=False)
    trigger = MergeRequestMergedTrigger(
        conn_id="gitlab_nowhere", project=PROJECT, iid=1, deadline=time.time() + 5, poll_interval=POLL
    )
    event = first_event(trigger)
    assert event["status"] == "error" and "GitLab connection 'gitlab_nowhere'" in event["message"]


# -- pipeline -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("pipeline_status", "status"), [("success", "success"), ("failed", "rejected")])
def test_pipeline_of_the_merge_commit(monkeypatch, pipeline_status, status):
    with gitlab(ci=CIPlan(step_seconds=0.05, pipeline_status=pipeline_status)) as standin:
        iid = open_mr(connect(monkeypatch, standin))
        sha = standin.merge(iid, "alice")

        event = first_event(pipeline_trigger(sha))

        (pipeline,) = standin.pipelines
        assert (event["status"], event["pipeline_id"], event["web_url"]) == (
            status,
            pipeline["id"],
            pipeline["web_url"],
        )
        assert (
            event["message"]
            == f"Pipeline {pipeline['id']} of {sha[:12]} {'succeeded' if status == 'success' else 'failed'}"
        )


def test_no_pipeline_for_the_commit_times_out_saying_so(monkeypatch, standin):
    connect(monkeypatch, standin)
    event = first_event(pipeline_trigger(standin.branches["main"], seconds=0.2))
    assert event["status"] == "timeout" and event["message"].endswith("last seen: no pipeline yet")


# -- deployments ----------------------------------------------------------------------------------
def test_deployments_in_order_each_with_its_id(monkeypatch, standin):
    iid = open_mr(connect(monkeypatch, standin))
    sha = standin.merge(iid, "alice")

    event = first_event(deployments_trigger(sha))  # polls while dev, then staging, then production run

    assert event["status"] == "success"
    shown = {d["environment"]["name"]: d for d in standin.deployments}
    assert list(event["deployments"]) == ENVIRONMENTS
    for env in ENVIRONMENTS:
        got = event["deployments"][env]
        assert (got["id"], got["job"]) == (shown[env]["id"], f"deploy:{env}")
        assert got["pipeline_id"] == standin.pipelines[0]["id"] and shown[env]["status"] == "success"
    ids = [event["deployments"][e]["id"] for e in ENVIRONMENTS]
    assert ids == sorted(ids)  # deployed in the configured order
    assert event["message"].startswith(f"{sha[:12]} deployed to dev (#{ids[0]}), staging (#{ids[1]})")


def test_failed_staging_is_rejected_and_production_is_never_deployed(monkeypatch):
    with gitlab(ci=CIPlan(step_seconds=0.02, deployment_status={"staging": "failed"})) as standin:
        iid = open_mr(connect(monkeypatch, standin))
        sha = standin.merge(iid, "alice")

        event = first_event(deployments_trigger(sha))
        standin.wait_background()

        staging = next(d for d in standin.deployments if d["environment"]["name"] == "staging")
        assert event["status"] == "rejected"
        assert f"Deployment {staging['id']} of {sha[:12]} to staging failed (job deploy:staging)" in event["message"]
        assert "later environments were not deployed" in event["message"]
        assert list(event["deployments"]) == ["dev"]
        assert [d["environment"]["name"] for d in standin.deployments] == ["dev", "staging"]


def test_deployments_of_an_earlier_commit_do_not_count(monkeypatch, standin):
    hook = connect(monkeypatch, standin)
    standin.merge(open_mr(hook), "alice")
    standin.wait_background()  # the earlier version is deployed everywhere
    later = hook.commit_files(PROJECT, "main", {"README.md": "v4\n"}, "unrelated change")[0]

    event = first_event(deployments_trigger(later, seconds=0.2))

    assert event["status"] == "timeout" and event["message"].endswith("last seen: dev: not started")


def test_pipeline_of_another_ref_for_the_same_commit_does_not_count(monkeypatch):
    """Fast-forward merges: the merge commit is the merge request's head, so its merge request pipeline
    (tests only, it deploys nothing) has the same sha. Only the target branch's pipeline counts."""
    with gitlab(ci=CIPlan(step_seconds=0.05, pipeline_status="failed")) as standin:
        iid = open_mr(connect(monkeypatch, standin))
        sha = standin.merge(iid, "alice")
        assert first_event(pipeline_trigger(sha))["status"] == "rejected"  # the branch pipeline failed
        standin.ci = CIPlan(step_seconds=0.05)
        merge_request_pipeline = standin._start_pipeline(sha, f"refs/merge-requests/{iid}/head", "alice")

        on_main = first_event(pipeline_trigger(sha, ref="main"))
        (branch_pipeline,) = [p for p in standin.pipelines if p["ref"] == "main"]
        assert (on_main["status"], on_main["pipeline_id"]) == ("rejected", branch_pipeline["id"])
        assert merge_request_pipeline.id != branch_pipeline["id"]
