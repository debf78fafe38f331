"""open_review: what both review backends share. XCom: :class:`mlops_lifecycle.contract.Review`.

The proposal (changelog entry with the gate table, and the version pin) is committed on the version's
review branch of the deployment repository: one branch per version, so a retry finds it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlops_lifecycle.deployment_repository import changelog_path, pin_path, review_branch
from mlops_lifecycle.links import MlflowRunLink
from mlops_lifecycle.operators.base import LifecycleOperator, Upstream

if TYPE_CHECKING:
    from airflow.sdk import BaseOperatorLink, Context

    from mlops_lifecycle.changelog import Proposal
    from mlops_lifecycle.contract import Candidate, GateOutcome


class OpenReviewOperator(LifecycleOperator):
    """Base of the review backends (``review.backend``): build the proposal and commit it for review."""

    template_fields = ("candidate", "verdict")
    operator_extra_links: tuple[BaseOperatorLink, ...] = (MlflowRunLink(),)

    def __init__(self, *, candidate: Upstream, verdict: Upstream, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.candidate: Candidate = candidate
        self.verdict: GateOutcome = verdict

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
