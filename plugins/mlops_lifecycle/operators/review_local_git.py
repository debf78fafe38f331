"""review, ``review.backend: local_git`` (the embedded local adapter): a git branch + Airflow human-in-the-loop.

open_review     commits the changelog entry and the version pin on ``review/<line>/v<version>`` of the
                local deployment repository.
approve_review  an Airflow approval showing that changelog (``review.auto_approve`` answers it at once
                for the demo and tests); a rejection fails the run and nothing is merged. The decision
                is recorded as structured data on the candidate's MLflow run (``review.approval``).
merge_review    merges the branch into main.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLOperator

from mlops_lifecycle.changelog import entry_heading
from mlops_lifecycle.config import ReviewLocalGit
from mlops_lifecycle.deployment_repository import changelog_path, local_repository
from mlops_lifecycle.exceptions import ReviewRejected
from mlops_lifecycle.operators.base import LifecycleOperator, Upstream
from mlops_lifecycle.operators.review import OpenReviewOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from mlops_lifecycle.config import ModelLineConfig
    from mlops_lifecycle.contract import Approval, Candidate, Merge, MergingRepository, Review

AUTO_APPROVER = "auto_approve (model-line config)"
#: run tag holding the approval as JSON ({"approved_by": [...], "approved_at": ISO time})
APPROVAL_TAG = "review.approval"


class LocalGitReviewMixin:
    """The local deployment repository, typed as one the lifecycle merges into."""

    config: ModelLineConfig

    @cached_property
    def merging_repo(self) -> MergingRepository:
        return local_repository(self.config)


class OpenLocalReviewOperator(OpenReviewOperator):
    """Commit the proposal (changelog entry + version pin) on the review branch; one branch per version."""

    def execute(self, context: Context) -> Review:
        self.ensure_not_superseded(self.candidate["run_key"], self.candidate["model_version"])
        proposal = self.proposal(context)
        branch, commit = self.commit_proposal(proposal)
        location = self.deployment_repo.location
        self.log.info("Review %s at commit %s in %s", branch, commit, location)
        return {"review_id": branch, "branch": branch, "commit": commit, "repository": location}


def changelog_entry(text: str, heading: str) -> str:
    """The entry under ``heading`` in a changelog file (up to the next entry)."""
    lines = text.splitlines()
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end]).strip()


class ReviewApprovalOperator(LocalGitReviewMixin, LifecycleOperator, ApprovalOperator):
    """Airflow human-in-the-loop approval of the review, showing its changelog entry.

    The task waits in ``awaiting_input`` (no worker slot) until someone answers under
    "Required Actions" in the Airflow UI or through the REST API. Reject fails the run: nothing is
    merged, deployed or promoted.
    """

    template_fields = ("review", "candidate")

    def __init__(self, *, config: ModelLineConfig, review: Upstream, candidate: Upstream, **kwargs: Any) -> None:
        reviewers = config.review.reviewers
        super().__init__(
            config=config,
            subject=f"Approve {config.model_line} for production?",
            body="(the changelog entry is loaded when the review opens)",
            assigned_users=[{"id": r, "name": r} for r in reviewers] or None,
            response_timeout=timedelta(hours=config.review.timeout_hours),
            **kwargs,
        )
        self.review: Review = review
        self.candidate: Candidate = candidate

    def execute(self, context: Context) -> Any:
        c = self.candidate
        self.ensure_not_superseded(c["run_key"], c["model_version"])  # never ask anyone to approve the past
        text = self.merging_repo.read(self.review["review_id"], changelog_path(c["model_line"])) or ""
        heading = entry_heading(c["model_line"], c["model_version"], "proposed for production")
        self.subject = f"Approve {c['model_name']} v{c['model_version']} for production?"
        self.body = changelog_entry(text, heading) if heading in text.splitlines() else text
        self.log.info("Review %s asks:\n%s", self.review["review_id"], self.body)
        earlier = self._earlier_approval(c)
        if earlier is not None:
            self.log.info("Review %s was approved before (%s): not asking again", self.review["review_id"], earlier)
            return earlier
        if self.section(self.config.review, ReviewLocalGit).auto_approve:
            self.log.info("review.auto_approve is set: approving without a human")
            return self._decision([AUTO_APPROVER], datetime.now(UTC))
        return super().execute(context)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        payload = HITLOperator.execute_complete(self, context, event)
        who = (payload.get("responded_by_user") or {}).get("name") or "unknown"
        c = self.candidate
        at = payload["responded_at"].isoformat(timespec="seconds")
        verdict = "approved" if payload["chosen_options"] == [self.APPROVE] else "rejected"
        # the decision is recorded on the run (tracking), so a rejected candidate says who rejected it
        self.registry.set_run_tags(
            c["run_id"], {"review.verdict": verdict, f"review.{verdict}_by": who, f"review.{verdict}_at": at}
        )
        if verdict == "rejected":
            raise ReviewRejected(
                f"Review {self.review['review_id']} of {c['model_name']} v{c['model_version']} rejected by "
                f"{who}: nothing merged, deployed or promoted; restore_staging puts the staging alias back"
            )
        self.log.info("Approved by %s", who)
        return self._decision([who], payload["responded_at"])

    def _earlier_approval(self, c: Candidate) -> Approval | None:
        """An approval this candidate already has (recorded as data on its run) is reused, never asked again.

        That covers a re-run of an already merged review and a retry of this task after the answer was
        recorded (Airflow can lose the task's success as it resumes from waiting for input).
        """
        recorded = self.registry.get_run(c["run_id"]).data.tags.get(APPROVAL_TAG)
        if recorded:
            data = json.loads(recorded)
            return {"decision": "approved", "approved_by": data["approved_by"], "approved_at": data["approved_at"]}
        if self.merging_repo.is_merged(self.review["review_id"]):
            self.log.warning(
                "Review %s is merged but its run %s records no approval (%s): asking again",
                self.review["review_id"],
                c["run_id"],
                APPROVAL_TAG,
            )
        return None

    def _decision(self, approvers: list[str], at: datetime) -> Approval:
        """The approval, recorded once on the candidate's run as structured data before it is returned."""
        approval: Approval = {
            "decision": "approved",
            "approved_by": approvers,
            "approved_at": at.isoformat(timespec="seconds"),
        }
        record = {"approved_by": approvers, "approved_at": approval["approved_at"]}
        self.registry.set_run_tags(self.candidate["run_id"], {APPROVAL_TAG: json.dumps(record)})
        return approval


class MergeReviewOperator(LocalGitReviewMixin, LifecycleOperator):
    """Merge the approved review branch into main (a retry finds the existing merge commit)."""

    template_fields = ("review", "approval", "candidate")

    def __init__(self, *, review: Upstream, approval: Upstream, candidate: Upstream, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.review: Review = review
        self.approval: Approval = approval
        self.candidate: Candidate = candidate

    def execute(self, context: Context) -> Merge:
        if self.approval.get("decision") != "approved":
            raise ReviewRejected(f"Review {self.review['review_id']} is not approved: {self.approval}")
        self.ensure_not_superseded(self.candidate["run_key"], self.candidate["model_version"])
        sha = self.merging_repo.merge(
            self.review["review_id"],
            f"Merge {self.review['review_id']} (approved by {', '.join(self.approval['approved_by'])})",
        )
        return {"merge_commit": sha, "review_id": self.review["review_id"]}
