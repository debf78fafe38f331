"""review, ``review.backend: gitlab``: a merge request in the GitLab deployment repository.

open_review  commits the changelog entry and version pin on ``review/<line>/v<version>`` and opens
             one MR per version (a retry finds the branch, the commit and the MR).
await_merge  defers until the MR is merged after approval by someone other than its author;
             closed, or merged without that approval, stops the run (registry unchanged). Approval
             and merge are one event here: XCom :class:`mlops_lifecycle.contract.MergedReview`.
The wait has a deadline from the YAML and runs in the triggerer: no worker slot is held.
"""

from __future__ import annotations

import time
from functools import cached_property
from typing import TYPE_CHECKING, Any

from mlops_lifecycle.config import ReviewGitLab
from mlops_lifecycle.exceptions import ReviewRejected, ReviewTimedOut
from mlops_lifecycle.links import GitLabMergeRequestLink, MlflowRunLink
from mlops_lifecycle.operators.base import LifecycleOperator, Upstream, event_or_fail
from mlops_lifecycle.operators.review import OpenReviewOperator
from mlops_lifecycle.triggers.gitlab import MergeRequestMergedTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

    from mlops_lifecycle.config import ModelLineConfig
    from mlops_lifecycle.contract import Candidate, MergedReview, Review
    from mlops_lifecycle.hooks.gitlab import GitLabHook


class GitLabReviewMixin:
    """The line's GitLab review settings and the hook on its connection."""

    config: ModelLineConfig

    @property
    def review_cfg(self) -> ReviewGitLab:
        review = self.config.review
        if not isinstance(review, ReviewGitLab):
            raise TypeError(f"{self.config.model_line}: review.backend is {review.backend}, not gitlab")
        return review

    @cached_property
    def gitlab(self) -> GitLabHook:
        from mlops_lifecycle.hooks.gitlab import GitLabHook

        return GitLabHook(self.review_cfg.gitlab_conn_id)


class OpenMergeRequestOperator(GitLabReviewMixin, OpenReviewOperator):
    """Commit the proposal on its review branch and open (or find) its merge request."""

    operator_extra_links = (MlflowRunLink(), GitLabMergeRequestLink())

    def execute(self, context: Context) -> Review:
        from mlops_lifecycle.changelog import render_merge_request

        review, c = self.review_cfg, self.candidate
        self.ensure_not_superseded(c["run_key"], c["model_version"])  # no merge request for the past
        proposal = self.proposal(context)
        branch, commit = self.commit_proposal(proposal)
        location = self.deployment_repo.location
        self.log.info("Review branch %s at %s in %s", branch, commit[:12], location)
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
            "repository": location,
        }


class AwaitMergeOperator(GitLabReviewMixin, LifecycleOperator):
    """Defer until the MR is approved by someone other than its author and merged."""

    template_fields = ("review", "candidate")
    operator_extra_links = (GitLabMergeRequestLink(),)
    ui_color = "#fcefdc"

    def __init__(self, *, review: Upstream, candidate: Upstream, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.review: Review = review
        self.candidate: Candidate = candidate

    def execute(self, context: Context) -> None:
        cfg = self.review_cfg
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

    def execute_complete(self, context: Context, event: dict[str, Any]) -> MergedReview:
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
                f"{event['message']}. No decision within review.timeout_hours ({self.review_cfg.timeout_hours} h): "
                "not retried; close the merge request or re-run the DAG to wait again. Registry unchanged."
            )
        event_or_fail(event, ReviewRejected)
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
