"""Human review of a candidate (embedded local adapter: a git branch + Airflow human-in-the-loop).

Open: commit the changelog entry and the version pin on a branch of the deployment repository.
Approve: an Airflow approval showing that changelog (``review.auto_approve`` answers it at once for
the demo and tests); rejection fails the run and nothing is merged. Merge: merge the branch.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLOperator

from mlops_lifecycle.changelog import entry_heading
from mlops_lifecycle.exceptions import ReviewRejected
from mlops_lifecycle.links import MlflowRunLink
from mlops_lifecycle.operators.base import LifecycleOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from mlops_lifecycle.changelog import Proposal
    from mlops_lifecycle.config import ModelLineConfig

AUTO_APPROVER = "auto_approve (model-line config)"


def review_branch(model_line: str, version: str) -> str:
    return f"review/{model_line}/v{version}"


def changelog_path(model_line: str) -> str:
    return f"changelog/{model_line}.md"


def pin_path(model_line: str) -> str:
    return f"models/{model_line}.yaml"


class OpenReviewOperator(LifecycleOperator):
    """Commit the proposal (changelog entry + version pin) on the review branch; one branch per version."""

    template_fields = ("candidate", "verdict")
    operator_extra_links = (MlflowRunLink(),)

    def __init__(self, *, candidate: Any, verdict: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.candidate = candidate
        self.verdict = verdict

    def execute(self, context: Context) -> dict[str, Any]:
        proposal = self.proposal(context)
        branch, commit = self.commit_proposal(proposal)
        self.log.info("Review %s at commit %s in %s", branch, commit, self.deployment_repo.path)
        return {"review_id": branch, "branch": branch, "commit": commit, "repository": str(self.deployment_repo.path)}

    def proposal(self, context: Context) -> Proposal:
        from mlops_lifecycle.changelog import Proposal
        from mlops_lifecycle.gate import GateVerdict, RuleResult

        c = self.candidate
        run_url = self.registry.run_url(c["experiment_id"], c["run_id"])
        self.set_link(MlflowRunLink.key, run_url)
        verdict = GateVerdict(
            passed=self.verdict["passed"],
            results=tuple(RuleResult(**r) for r in self.verdict["results"]),
            production_version=self.verdict["production_version"],
        )
        ids = self.airflow_ids(context)
        return Proposal(
            model_line=c["model_line"],
            model_name=c["model_name"],
            model_version=c["model_version"],
            run_id=c["run_id"],
            run_url=run_url,
            run_key=c["run_key"],
            window_label=c["window"],
            holdout_start=c["holdout_start"],
            snapshot=c["snapshot"],
            code_revision=c["code_revision"],
            verdict=verdict,
            airflow_dag_id=ids["airflow.dag_id"],
            airflow_run_id=ids["airflow.run_id"],
            airflow_url=airflow_run_url(ids["airflow.dag_id"], ids["airflow.run_id"]),
            model_version_url=self.model_version_url(c["model_version"]),
        )

    def commit_proposal(self, proposal: Proposal) -> tuple[str, str]:
        """Commit the changelog entry and the version pin on the review branch: (branch, commit)."""
        from mlops_lifecycle.changelog import render_pin, render_proposal

        c = self.candidate
        branch = review_branch(c["model_line"], c["model_version"])
        commit = self.deployment_repo.open_review(
            branch,
            replace={
                pin_path(c["model_line"]): render_pin(c["model_line"], c["model_name"], c["model_version"], c["run_id"])
            },
            append={changelog_path(c["model_line"]): render_proposal(proposal)},
            message=f"{c['model_line']}: propose v{c['model_version']} for production",
        )
        return branch, commit


def airflow_run_url(dag_id: str, run_id: str) -> str | None:
    """Link to the DAG run in the Airflow UI ([api] base_url), for changelogs and merge requests."""
    from urllib.parse import quote

    from airflow.configuration import conf

    base = conf.get("api", "base_url", fallback="") or ""
    return f"{base.rstrip('/')}/dags/{quote(dag_id)}/runs/{quote(run_id)}" if base.startswith("http") else None


def changelog_entry(text: str, heading: str) -> str:
    """The entry under ``heading`` in a changelog file (up to the next entry)."""
    lines = text.splitlines()
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end]).strip()


class ReviewApprovalOperator(LifecycleOperator, ApprovalOperator):
    """Airflow human-in-the-loop approval of the review, showing its changelog entry.

    The task waits in ``awaiting_input`` (no worker slot) until someone answers under
    "Required Actions" in the Airflow UI or through the REST API. Reject fails the run: nothing is
    merged, deployed or promoted.
    """

    template_fields = ("review", "candidate")

    def __init__(self, *, config: ModelLineConfig, review: Any, candidate: Any, **kwargs: Any) -> None:
        reviewers = config.review.reviewers
        super().__init__(
            config=config,
            subject=f"Approve {config.model_line} for production?",
            body="(the changelog entry is loaded when the review opens)",
            assigned_users=[{"id": r, "name": r} for r in reviewers] or None,
            response_timeout=timedelta(hours=config.review.timeout_hours),
            **kwargs,
        )
        self.review = review
        self.candidate = candidate

    def execute(self, context: Context) -> Any:
        c = self.candidate
        text = self.deployment_repo.read(self.review["review_id"], changelog_path(c["model_line"])) or ""
        heading = entry_heading(c["model_line"], c["model_version"], "proposed for production")
        self.subject = f"Approve {c['model_name']} v{c['model_version']} for production?"
        self.body = changelog_entry(text, heading) if heading in text.splitlines() else text
        self.log.info("Review %s asks:\n%s", self.review["review_id"], self.body)
        earlier = self._earlier_approval(c)
        if earlier is not None:
            self.log.info(
                "Review %s was approved and merged before (%s): not asking again", self.review["review_id"], earlier
            )
            return earlier
        if self.config.review.auto_approve:
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

    def _earlier_approval(self, c: dict[str, Any]) -> dict[str, Any] | None:
        """A re-run of an already merged review reuses its recorded approval instead of asking twice."""
        if not self.deployment_repo.is_merged(self.review["review_id"]):
            return None
        tags = self.registry.version_tags(c["model_name"], c["model_version"])
        if "audit.approved_by" in tags:
            return {
                "decision": "approved",
                "approved_by": tags["audit.approved_by"].split(","),
                "approved_at": tags.get("audit.approved_at", "unknown"),
            }
        merge = self.deployment_repo.merge_commit_of(self.review["review_id"])
        subject = self.deployment_repo.git("log", "-1", "--format=%s%x00%cI", merge)
        text, at = subject.split("\0")
        approvers = text.partition("(approved by ")[2].rstrip(")")
        return {"decision": "approved", "approved_by": approvers.split(", ") if approvers else [], "approved_at": at}

    @staticmethod
    def _decision(approvers: list[str], at: datetime) -> dict[str, Any]:
        return {"decision": "approved", "approved_by": approvers, "approved_at": at.isoformat(timespec="seconds")}


class MergeReviewOperator(LifecycleOperator):
    """Merge the approved review branch into main (a retry finds the existing merge commit)."""

    template_fields = ("review", "approval")

    def __init__(self, *, review: Any, approval: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.review = review
        self.approval = approval

    def execute(self, context: Context) -> dict[str, Any]:
        if self.approval.get("decision") != "approved":
            raise ReviewRejected(f"Review {self.review['review_id']} is not approved: {self.approval}")
        sha = self.deployment_repo.merge(
            self.review["review_id"],
            f"Merge {self.review['review_id']} (approved by {', '.join(self.approval['approved_by'])})",
        )
        return {"merge_commit": sha, "review_id": self.review["review_id"]}
