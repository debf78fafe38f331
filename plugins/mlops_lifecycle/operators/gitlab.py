"""Review and delivery on GitLab: open the merge request, then defer until merged, built and deployed.

open_review  commits the changelog entry and version pin on ``review/<line>/v<version>`` and opens
             one MR per version (a retry finds the branch, the commit and the MR).
await_merge  defers until the MR is merged after approval by someone other than its author;
             closed, or merged without that approval, stops the run (registry unchanged).
await_pipeline, await_deployments
             defer until the merge commit's pipeline succeeds and its deployments succeed in each
             configured environment, in order.
Every wait has a deadline from the YAML and runs in the triggerer: no worker slot is held.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from mlops_lifecycle.exceptions import DeliveryFailed, LifecycleError, ReviewRejected, ReviewTimedOut
from mlops_lifecycle.links import GitLabMergeRequestLink, GitLabPipelineLink, MlflowRunLink
from mlops_lifecycle.operators.base import LifecycleOperator
from mlops_lifecycle.operators.review import OpenReviewOperator
from mlops_lifecycle.triggers.gitlab import (
    DeploymentsSucceededTrigger,
    MergeRequestMergedTrigger,
    PipelineSucceededTrigger,
)

if TYPE_CHECKING:
    from airflow.sdk import Context


def _event_or_fail(event: dict[str, Any] | None, rejected: type[Exception]) -> dict[str, Any]:
    """Validate a trigger event: success passes; rejected is a decision; timeout/error may be retried."""
    if not event or "status" not in event:
        raise LifecycleError(f"Malformed trigger event: {event!r}")
    if event["status"] == "success":
        return event
    if event["status"] in ("rejected", "timeout"):
        # a decision (or a deadline from the YAML): retrying the wait cannot change it
        raise rejected(event["message"] + ". Registry unchanged.")
    raise LifecycleError(event.get("message", str(event)) + ". Registry unchanged.")


class OpenMergeRequestOperator(OpenReviewOperator):
    """Commit the proposal on its review branch and open (or find) its merge request."""

    operator_extra_links = (MlflowRunLink(), GitLabMergeRequestLink())

    def execute(self, context: Context) -> dict[str, Any]:
        from mlops_lifecycle.changelog import render_merge_request

        review, c = self.config.review, self.candidate
        proposal = self.proposal(context)
        branch, commit = self.commit_proposal(proposal)
        self.log.info("Review branch %s at %s in %s", branch, commit[:12], self.deployment_repo.path)
        mr, created = self.gitlab.ensure_merge_request(
            review.project,
            source=branch,
            target=review.target_branch,
            title=f"{c['model_line']}: promote {c['model_name']} v{c['model_version']} to production",
            description=render_merge_request(proposal, reviewers=review.reviewers, min_approvals=review.min_approvals),
            labels=review.labels,
            reviewers=review.reviewers,
        )
        self.set_link(GitLabMergeRequestLink.key, mr.web_url)
        self.log.info("%s merge request !%s: %s", "Opened" if created else "Found existing", mr.iid, mr.web_url)
        return {
            "review_id": f"{review.project}!{mr.iid}",
            "mr_iid": mr.iid,
            "web_url": mr.web_url,
            "branch": branch,
            "commit": commit,
            "repository": self.deployment_repo.path,
        }


class AwaitMergeOperator(LifecycleOperator):
    """Defer until the MR is approved by someone other than its author and merged."""

    template_fields = ("review", "candidate")
    operator_extra_links = (GitLabMergeRequestLink(),)
    ui_color = "#fcefdc"

    def __init__(self, *, review: Any, candidate: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.review = review
        self.candidate = candidate

    def execute(self, context: Context) -> None:
        cfg = self.config.review
        self.set_link(GitLabMergeRequestLink.key, self.review["web_url"])
        self.log.info(
            "Deferring: waiting up to %s h for %s to be approved by %d reviewer(s) other than its author and merged",
            cfg.timeout_hours,
            self.review["web_url"],
            cfg.min_approvals,
        )
        self.defer(
            trigger=MergeRequestMergedTrigger(
                conn_id=cfg.gitlab_conn_id,
                project=cfg.project,
                iid=int(self.review["mr_iid"]),
                min_approvals=cfg.min_approvals,
                deadline=time.time() + cfg.timeout_hours * 3600,
                poll_interval=cfg.poll_interval_seconds,
            ),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        self.set_link(GitLabMergeRequestLink.key, self.review["web_url"])
        c = self.candidate
        mr = (event or {}).get("mr") or {}
        # an author approving their own merge request does not count
        approvers = [a for a in mr.get("approvers") or [] if a != mr.get("author")]
        if event and event.get("status") in ("success", "rejected"):
            if event["status"] == "success":
                tags = {"review.verdict": "approved", "review.approved_by": ",".join(approvers)}
            else:
                who = mr.get("closed_by") if mr.get("state") == "closed" else mr.get("merged_by")
                tags = {
                    "review.verdict": "rejected",
                    "review.rejected_by": who or "unknown",
                    "review.rejected_because": event["message"][:500],
                }
            self.registry.set_run_tags(c["run_id"], {**tags, "review.id": self.review["review_id"]})
        if event and event.get("status") == "timeout":
            raise ReviewTimedOut(
                f"{event['message']}. No decision within review.timeout_hours ({self.config.review.timeout_hours} h): "
                "not retried; close the merge request or re-run the DAG to wait again. Registry unchanged."
            )
        _event_or_fail(event, ReviewRejected)
        self.log.info(event["message"])
        return {
            "decision": "approved",
            "approved_by": approvers,
            "approved_at": mr.get("merged_at") or "unknown",
            "merged_by": mr.get("merged_by"),
            "merge_commit": mr["merge_commit_sha"],
            "review_id": self.review["review_id"],
            "web_url": mr["web_url"],
        }


class AwaitPipelineOperator(LifecycleOperator):
    """Defer until the pipeline of the merge commit succeeds."""

    template_fields = ("merge",)
    operator_extra_links = (GitLabPipelineLink(),)
    ui_color = "#fcefdc"

    def __init__(self, *, merge: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.merge = merge

    def execute(self, context: Context) -> None:
        review, deploy = self.config.review, self.config.deploy
        self.log.info(
            "Deferring: waiting up to %d min for the pipeline of %s",
            deploy.pipeline_timeout_minutes,
            self.merge["merge_commit"],
        )
        self.defer(
            trigger=PipelineSucceededTrigger(
                conn_id=review.gitlab_conn_id,
                project=review.project,
                sha=self.merge["merge_commit"],
                ref=review.target_branch,
                deadline=time.time() + deploy.pipeline_timeout_minutes * 60,
                poll_interval=deploy.poll_interval_seconds,
            ),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        if event and event.get("web_url"):
            self.set_link(GitLabPipelineLink.key, event["web_url"])
        _event_or_fail(event, DeliveryFailed)
        self.log.info(event["message"])
        return {"pipeline_id": event["pipeline_id"], "web_url": event["web_url"], "sha": self.merge["merge_commit"]}


class AwaitDeploymentsOperator(LifecycleOperator):
    """Defer until the merge commit is deployed to each environment, in the configured order."""

    template_fields = ("merge", "pipeline")
    operator_extra_links = (GitLabPipelineLink(),)
    ui_color = "#fcefdc"

    def __init__(self, *, merge: Any, pipeline: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.merge = merge
        self.pipeline = pipeline

    def execute(self, context: Context) -> None:
        review, deploy = self.config.review, self.config.deploy
        self.set_link(GitLabPipelineLink.key, self.pipeline["web_url"])
        self.log.info(
            "Deferring: waiting up to %d min for %s to be deployed to %s",
            deploy.deployment_timeout_minutes,
            self.merge["merge_commit"],
            " -> ".join(deploy.environments),
        )
        self.defer(
            trigger=DeploymentsSucceededTrigger(
                conn_id=review.gitlab_conn_id,
                project=review.project,
                sha=self.merge["merge_commit"],
                environments=list(deploy.environments),
                deadline=time.time() + deploy.deployment_timeout_minutes * 60,
                poll_interval=deploy.poll_interval_seconds,
            ),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        self.set_link(GitLabPipelineLink.key, self.pipeline["web_url"])
        _event_or_fail(event, DeliveryFailed)
        self.log.info(event["message"])
        return {
            "service_url": self.config.deploy.service_url,
            "revision": self.merge["merge_commit"],
            "pipeline_id": self.pipeline["pipeline_id"],
            "deployments": {env: f"gitlab-deployment:{d['id']}" for env, d in event["deployments"].items()},
        }
