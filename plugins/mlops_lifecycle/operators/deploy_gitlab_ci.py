"""deploy, ``deploy.backend: gitlab_ci``: the deployment repository's GitLab CI deploys the merge commit.

await_pipeline     defers until the merge commit's pipeline on the target branch succeeds.
await_deployments  defers until that commit is deployed to each configured environment, in order.
XCom :class:`mlops_lifecycle.contract.Deployment` (with ``pipeline_id``). Every wait has a deadline
from the YAML and runs in the triggerer: no worker slot is held.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from mlops_lifecycle.config import DeployGitLabCI, ReviewGitLab
from mlops_lifecycle.exceptions import DeliveryFailed
from mlops_lifecycle.links import GitLabPipelineLink
from mlops_lifecycle.operators.base import LifecycleOperator, Upstream, event_or_fail
from mlops_lifecycle.triggers.gitlab import DeploymentsSucceededTrigger, PipelineSucceededTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

    from mlops_lifecycle.contract import CIPipeline, Deployment, Merge


class GitLabCIOperator(LifecycleOperator):
    """The line's GitLab project (from its review section) and CI settings (its deploy section)."""

    @property
    def review_cfg(self) -> ReviewGitLab:
        return self.section(self.config.review, ReviewGitLab)

    @property
    def deploy_cfg(self) -> DeployGitLabCI:
        return self.section(self.config.deploy, DeployGitLabCI)


class AwaitPipelineOperator(GitLabCIOperator):
    """Defer until the pipeline of the merge commit succeeds."""

    template_fields = ("merge",)
    operator_extra_links = (GitLabPipelineLink(),)
    ui_color = "#fcefdc"

    def __init__(self, *, merge: Upstream, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.merge: Merge = merge

    def execute(self, context: Context) -> None:
        review, deploy = self.review_cfg, self.deploy_cfg
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

    def execute_complete(self, context: Context, event: dict[str, Any]) -> CIPipeline:
        if event and event.get("web_url"):
            self.set_link(GitLabPipelineLink.key, event["web_url"])
        event_or_fail(event, DeliveryFailed)
        self.log.info(event["message"])
        return {"pipeline_id": event["pipeline_id"], "web_url": event["web_url"], "sha": self.merge["merge_commit"]}


class AwaitDeploymentsOperator(GitLabCIOperator):
    """Defer until the merge commit is deployed to each environment, in the configured order."""

    template_fields = ("merge", "pipeline")
    operator_extra_links = (GitLabPipelineLink(),)
    ui_color = "#fcefdc"

    def __init__(self, *, merge: Upstream, pipeline: Upstream, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.merge: Merge = merge
        self.pipeline: CIPipeline = pipeline

    def execute(self, context: Context) -> None:
        review, deploy = self.review_cfg, self.deploy_cfg
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

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Deployment:
        self.set_link(GitLabPipelineLink.key, self.pipeline["web_url"])
        event_or_fail(event, DeliveryFailed)
        self.log.info(event["message"])
        return {
            "service_url": self.deploy_cfg.service_url,
            "revision": self.merge["merge_commit"],
            "pipeline_id": self.pipeline["pipeline_id"],
            "deployments": {env: f"gitlab-deployment:{d['id']}" for env, d in event["deployments"].items()},
        }
