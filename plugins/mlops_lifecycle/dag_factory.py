"""Build each model line's DAGs from its validated config. Parse-time only: no network, no heavy imports.

The lifecycle DAG (local review and deploy)::

    extract >> train >> gate >> stage >> open_review >> approve_review >> merge_review
            >> deploy >> verify_serving >> promote
    (approve_review, merge_review, deploy, verify_serving) --one_failed--> restore_staging

with GitLab (review.backend gitlab, deploy.backend gitlab_ci) the middle becomes::

    open_review (MR) >> await_merge >> await_pipeline >> await_deployments >> verify_serving
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from airflow.sdk import DAG, CronDataIntervalTimetable, TriggerRule

from mlops_lifecycle import paths
from mlops_lifecycle.config import ModelLineConfig, load_model_lines
from mlops_lifecycle.exceptions import ModelLineConfigError
from mlops_lifecycle.operators.data import ExtractOperator, TrainOperator
from mlops_lifecycle.operators.deploy import LocalDeployOperator, VerifyServingOperator
from mlops_lifecycle.operators.gitlab import (
    AwaitDeploymentsOperator,
    AwaitMergeOperator,
    AwaitPipelineOperator,
    OpenMergeRequestOperator,
)
from mlops_lifecycle.operators.registry import (
    GateOperator,
    PromoteOperator,
    RestoreStagingOperator,
    StageOperator,
)
from mlops_lifecycle.operators.review import MergeReviewOperator, OpenReviewOperator, ReviewApprovalOperator

if TYPE_CHECKING:
    from airflow.sdk import Context


class FailureAlert:
    """On task failure, append an alert record for the line's owners (local sink: a JSON-lines file)."""

    def __init__(self, config: ModelLineConfig) -> None:
        self.model_line = config.model_line
        self.team = config.owner.team
        self.emails = list(config.alerting.emails)

    def __call__(self, context: Context) -> None:
        ti = context["ti"]
        exc = context.get("exception")
        record = {
            "model_line": self.model_line,
            "team": self.team,
            "to": self.emails,
            "dag_id": ti.dag_id,
            "run_id": ti.run_id,
            "task_id": ti.task_id,
            "error": f"{type(exc).__name__}: {exc}" if exc else "unknown",
        }
        target = paths.local_home() / "alerts" / f"{self.model_line}.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def _doc(config: ModelLineConfig) -> str:
    gate = "\n".join(
        f"| {name} | {rule.direction} | {rule.threshold if rule.threshold is not None else '-'} | "
        f"{rule.max_regression if rule.max_regression is not None else '-'} |"
        for name, rule in config.gate.metrics.items()
    )
    if config.review.backend == "gitlab":
        review = f"GitLab merge request in `{config.review.project}`, deployed by its CI"
    elif config.review.auto_approve:
        review = "automatic approval"
    else:
        review = "human approval under Required Actions"
    return (
        f"# {config.model_line}\n\n{config.description}\n\n"
        f"Owner: **{config.owner.team}**. Registered model `{config.registry.model_name}`, experiment "
        f"`{config.registry.experiment}`. Each run trains on {config.window.training_lookback_days} days up to "
        f"the end of its data interval, holding out the last {config.window.holdout_days}.\n\n"
        "| gate metric | direction | threshold | max regression vs production |\n|---|---|---|---|\n"
        f"{gate}\n\nReview: {review}.\n"
    )


def build_lifecycle_dag(config: ModelLineConfig) -> DAG:
    """retrain-and-promote: data window -> trained, gated, reviewed, deployed, verified, promoted model."""
    tz = config.schedule.timezone
    default_args: dict[str, Any] = {
        "owner": config.owner.team,
        "retries": config.retries,
        "retry_delay": timedelta(seconds=config.retry_delay_seconds),
        "on_failure_callback": FailureAlert(config) if config.alerting.on_failure else None,
    }
    with DAG(
        dag_id=config.lifecycle_dag_id,
        description=f"Retrain, gate, review, deploy and promote {config.registry.model_name}",
        schedule=CronDataIntervalTimetable(config.schedule.cron, timezone=tz),
        start_date=datetime.combine(config.schedule.start_date, datetime.min.time(), tzinfo=ZoneInfo(tz)),
        catchup=config.schedule.catchup,
        max_active_runs=config.schedule.max_active_runs,
        default_args=default_args,
        tags=sorted({"mlops", "lifecycle", f"line:{config.model_line}", f"team:{config.owner.team}", *config.tags}),
        doc_md=_doc(config),
    ) as dag:
        common = {"config": config}
        if config.extract.warehouse == "bigquery":
            from mlops_lifecycle.operators.bigquery import BigQuerySnapshotOperator

            extract = BigQuerySnapshotOperator(task_id="extract", **common)
        else:
            extract = ExtractOperator(task_id="extract", **common)
        train_class = TrainOperator
        if config.train.backend == "databricks":
            from mlops_lifecycle.operators.databricks import DatabricksTrainOperator

            train_class = DatabricksTrainOperator
        train = train_class(
            task_id="train",
            snapshot=extract.output,
            execution_timeout=timedelta(minutes=config.train.timeout_minutes),
            **common,
        )
        gate = GateOperator(task_id="gate", candidate=train.output, **common)
        stage = StageOperator(task_id="stage", candidate=train.output, verdict=gate.output, **common)
        if config.review.backend == "gitlab":
            review = OpenMergeRequestOperator(
                task_id="open_review", candidate=train.output, verdict=gate.output, **common
            )
            merged = AwaitMergeOperator(task_id="await_merge", review=review.output, candidate=train.output, **common)
            approval = merge = merged
            pipeline = AwaitPipelineOperator(task_id="await_pipeline", merge=merged.output, **common)
            deploy = AwaitDeploymentsOperator(
                task_id="await_deployments", merge=merged.output, pipeline=pipeline.output, **common
            )
            may_fail = [merged, pipeline, deploy]
        else:
            review = OpenReviewOperator(task_id="open_review", candidate=train.output, verdict=gate.output, **common)
            approval = ReviewApprovalOperator(
                task_id="approve_review", review=review.output, candidate=train.output, **common
            )
            merge = MergeReviewOperator(
                task_id="merge_review", review=review.output, approval=approval.output, **common
            )
            deploy = LocalDeployOperator(task_id="deploy", candidate=train.output, merge=merge.output, **common)
            may_fail = [approval, merge, deploy]
        verify = VerifyServingOperator(
            task_id="verify_serving", candidate=train.output, deployment=deploy.output, **common
        )
        PromoteOperator(
            task_id="promote",
            candidate=train.output,
            review=review.output,
            approval=approval.output,
            merge=merge.output,
            deployment=deploy.output,
            verification=verify.output,
            **common,
        )
        stage >> review
        # a rejected review or a failed deployment leaves the registry as it was
        restore = RestoreStagingOperator(
            task_id="restore_staging", trigger_rule=TriggerRule.ONE_FAILED, retries=0, **common
        )
        # promote stays a leaf, so the run still ends failed when restore_staging succeeds
        [*may_fail, verify] >> restore
    return dag


def build_all() -> tuple[dict[str, DAG], list[ModelLineConfigError]]:
    """Every valid model line's DAGs by dag_id, and the errors of the invalid ones."""
    configs, errors = load_model_lines()
    dags: dict[str, DAG] = {}
    for config in configs:
        dag = build_lifecycle_dag(config)
        dags[dag.dag_id] = dag
    return dags, errors
