"""Build each model line's DAGs from its validated config. Parse-time only: no network, no heavy imports.

The lifecycle DAG::

    route >> extract >> train >> gate >> stage >> <review and deploy> >> verify_serving >> promote
    (every step after stage that may fail) --one_failed--> restore_staging
    promote >> housekeeping   (retention: bounded registry and disk, after a promotion)

``route`` sends a backfill run to the backtest instead (``backtest_extract >> backtest_train >>
backtest_report``, the report only in the window that finishes last: nothing there writes to the
registry, the deployment repository or the service) and skips a run whose window is older than
production's; later steps check again before they deploy or promote.

Which operator runs a stage is looked up in one table per stage, keyed by the YAML value that names
the backend (``extract.warehouse``, ``train.backend``). Review and deploy go together (GitLab CI deploys
what a GitLab merge request merged; the local service what the local review merged) and their task
graphs differ, so each pair has a small builder:

    local_git + local_process:  open_review >> approve_review >> merge_review >> deploy
    gitlab + gitlab_ci:         open_review (MR) >> await_merge >> await_pipeline >> await_deployments

Adding a backend is one operator module filling its stage's contract (``mlops_lifecycle.contract``), its
config class in ``config.py``, and one row here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from airflow.sdk import (
    DAG,
    Asset,
    AssetOrTimeSchedule,
    BaseOperator,
    CronDataIntervalTimetable,
    Param,
    TriggerRule,
)

from mlops_lifecycle import paths
from mlops_lifecycle.config import ModelLineConfig, load_model_lines, model_line_files
from mlops_lifecycle.exceptions import ModelLineConfigError
from mlops_lifecycle.notify import FailureAlert
from mlops_lifecycle.operators.backtest import BacktestReportOperator
from mlops_lifecycle.operators.deploy_gitlab_ci import AwaitDeploymentsOperator, AwaitPipelineOperator
from mlops_lifecycle.operators.deploy_local_process import LocalDeployOperator
from mlops_lifecycle.operators.extract import ExtractOperator
from mlops_lifecycle.operators.extract_bigquery import BigQueryExtractOperator
from mlops_lifecycle.operators.extract_duckdb import DuckDBExtractOperator
from mlops_lifecycle.operators.housekeeping import HousekeepingOperator
from mlops_lifecycle.operators.monitor import (
    AlertOwnersOperator,
    DriftCheckOperator,
    RetrainRequestOperator,
    ServedSnapshotOperator,
)
from mlops_lifecycle.operators.registry import GateOperator, PromoteOperator, RestoreStagingOperator, StageOperator
from mlops_lifecycle.operators.review_gitlab import AwaitMergeOperator, OpenMergeRequestOperator
from mlops_lifecycle.operators.review_local_git import (
    MergeReviewOperator,
    OpenLocalReviewOperator,
    ReviewApprovalOperator,
)
from mlops_lifecycle.operators.route import RouteRunOperator
from mlops_lifecycle.operators.train import TrainOperator
from mlops_lifecycle.operators.train_databricks import DatabricksTrainOperator
from mlops_lifecycle.operators.train_local_process import LocalProcessTrainOperator
from mlops_lifecycle.operators.verify import VerifyServingOperator


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
        + (
            f"\nBesides its schedule, a run starts when `{config.monitor_dag_id}` requests a retrain after a drift "
            "breach (asset `" + f"{config.model_line}__retrain_request`); it trains on data up to the request.\n"
            if config.monitoring is not None and config.monitoring.retrain_on_breach
            else ""
        )
    )


#: extract.warehouse -> its operator
EXTRACT: dict[str, type[ExtractOperator]] = {
    "duckdb": DuckDBExtractOperator,
    "bigquery": BigQueryExtractOperator,
}
#: train.backend -> its operator
TRAIN: dict[str, type[TrainOperator]] = {
    "local_process": LocalProcessTrainOperator,
    "databricks": DatabricksTrainOperator,
}


@dataclass(frozen=True)
class Delivery:
    """The review-and-deploy part of the graph, as promote and restore_staging need it."""

    review: BaseOperator  # its output: contract.Review
    approval: BaseOperator  # contract.Approval
    merge: BaseOperator  # contract.Merge
    deploy: BaseOperator  # contract.Deployment
    may_fail: list[BaseOperator]  # steps whose failure withdraws the staging alias


def _local_review_and_deploy(common: dict[str, Any], train: BaseOperator, gate: BaseOperator) -> Delivery:
    review = OpenLocalReviewOperator(task_id="open_review", candidate=train.output, verdict=gate.output, **common)
    approval = ReviewApprovalOperator(task_id="approve_review", review=review.output, candidate=train.output, **common)
    merge = MergeReviewOperator(
        task_id="merge_review", review=review.output, approval=approval.output, candidate=train.output, **common
    )
    deploy = LocalDeployOperator(task_id="deploy", candidate=train.output, merge=merge.output, **common)
    return Delivery(review, approval, merge, deploy, may_fail=[review, approval, merge, deploy])


def _gitlab_review_and_deploy(common: dict[str, Any], train: BaseOperator, gate: BaseOperator) -> Delivery:
    review = OpenMergeRequestOperator(task_id="open_review", candidate=train.output, verdict=gate.output, **common)
    merged = AwaitMergeOperator(task_id="await_merge", review=review.output, candidate=train.output, **common)
    pipeline = AwaitPipelineOperator(task_id="await_pipeline", merge=merged.output, **common)
    deploy = AwaitDeploymentsOperator(
        task_id="await_deployments", merge=merged.output, pipeline=pipeline.output, **common
    )
    return Delivery(review, approval=merged, merge=merged, deploy=deploy, may_fail=[review, merged, pipeline, deploy])


#: (review.backend, deploy.backend) -> the builder of that pair's review-and-deploy tasks
DELIVERY: dict[tuple[str, str], Callable[[dict[str, Any], BaseOperator, BaseOperator], Delivery]] = {
    ("local_git", "local_process"): _local_review_and_deploy,
    ("gitlab", "gitlab_ci"): _gitlab_review_and_deploy,
}


def _backtest(config: ModelLineConfig, common: dict[str, Any]) -> BaseOperator:
    """A backfill run's branch: the window and its horizon, the baseline (and variant) trained on it, the report.

    Three tasks a window, as few as the stages allow (each task costs a process and a scheduler pass):
    the training task trains the baseline and the variant the run asked for, and starts the report only
    when its window is the backfill's last. The same extract and training backends as the lifecycle;
    nothing here writes to the registry, the deployment repository or the service. Returns the first task.
    """
    extract = EXTRACT[config.extract.warehouse](task_id="backtest_extract", with_horizon=True, **common)
    # several jobs in one task: the timeout covers the baseline and a variant
    timeout = timedelta(minutes=2 * config.train.timeout_minutes)
    train = TRAIN[config.train.backend](
        task_id="backtest_train", snapshot=extract.output, backtest=True, execution_timeout=timeout, **common
    )
    # one report task of the line at a time: two windows finishing together may both start one (see
    # operators/backtest.py); the second then finds the report of the same windows built, instead of racing it
    report = BacktestReportOperator(
        task_id="backtest_report", challenger=train.output, max_active_tis_per_dag=1, **common
    )
    extract >> train >> report
    return extract


def _default_args(config: ModelLineConfig) -> dict[str, Any]:
    return {
        "owner": config.owner.team,
        "retries": config.retries,
        "retry_delay": timedelta(seconds=config.retry_delay_seconds),
        "on_failure_callback": FailureAlert(config) if config.alerting.on_failure else None,
    }


def retrain_request(config: ModelLineConfig) -> Asset:
    """The asset whose events are the drift monitor's retrain requests; the lifecycle DAG is scheduled on it."""
    return Asset(
        name=f"{config.model_line}__retrain_request",
        uri=f"x-mlops-lifecycle://{config.model_line}/retrain-request",  # x-: no provider lookup at parse time
        group="mlops-lifecycle",
    )


def build_monitor_dag(config: ModelLineConfig, register: bool = True) -> DAG:
    """drift monitor: what production served in each interval, against the training reference of the
    version that served it; on a breach, alert the owners and request a retrain (asset event)."""
    monitoring = config.monitoring
    assert monitoring is not None
    tz = monitoring.timezone
    start = monitoring.start_date or config.schedule.start_date
    retrain = retrain_request(config)
    with DAG(
        dag_id=config.monitor_dag_id,
        description=f"Drift and live performance of the production {config.registry.model_name}",
        schedule=CronDataIntervalTimetable(monitoring.cron, timezone=tz),
        start_date=datetime.combine(start, datetime.min.time(), tzinfo=ZoneInfo(tz)),
        catchup=False,
        # intervals in order: the cool-down compares each request with the one before
        max_active_runs=1,
        default_args=_default_args(config),
        tags=sorted({"mlops", "monitor", f"line:{config.model_line}", f"team:{config.owner.team}", *config.tags}),
        doc_md=_monitor_doc(config),
        # a manual run may check any past stretch instead of an interval (e.g. since a deploy)
        params={
            "since": Param(None, type=["null", "string"], description="Check from (ISO time with zone); empty: "
                           "the last complete interval"),
            "until": Param(None, type=["null", "string"], description="Check until (default: now)"),
        },
        auto_register=register,
    ) as dag:
        common: dict[str, Any] = {"config": config}
        snapshot = ServedSnapshotOperator(task_id="snapshot_served", **common)
        check = DriftCheckOperator(task_id="check_drift", snapshot=snapshot.output, **common)
        alert = AlertOwnersOperator(task_id="alert_owners", findings=check.output, **common)
        request = RetrainRequestOperator(
            task_id="request_retrain",
            findings=check.output,
            outlets=[retrain] if monitoring.retrain_on_breach else [],
            inlets=[retrain] if monitoring.retrain_on_breach else [],  # to see what this run already requested
            **common,
        )
        # both on the breach, independently: a mail outage must not hold the retrain request back
        snapshot >> check >> [alert, request]
    return dag


def _monitor_doc(config: ModelLineConfig) -> str:
    monitoring = config.monitoring
    assert monitoring is not None
    limits = monitoring.limits
    truth = monitoring.ground_truth
    live = (
        f"Live performance: rows served on day D predict D + {truth.prediction_offset_days}, whose actuals are "
        f"complete {truth.label_delay_days} day(s) later (`{truth.sql}`); a gate metric more than "
        f"{truth.max_regression:.0%} worse than the served version's holdout value is a breach."
        if truth
        else "No ground truth configured: drift and data quality only."
    )
    retrain = (
        f"A breach alerts the owners and requests a retrain of `{config.lifecycle_dag_id}` (asset "
        f"`{config.model_line}__retrain_request`), at most once per {monitoring.cooldown_hours:g} hours."
        if monitoring.retrain_on_breach
        else "A breach alerts the owners; no retrain is requested (retrain_on_breach: false)."
    )
    return (
        f"# {config.model_line}: drift monitor\n\nEach run checks what production served in its data interval, "
        "split by the model version that served it, against that version's training reference sample "
        f"(MLflow experiment `{config.monitoring_experiment}`, one run per version and interval).\n\n"
        "| check | breach when |\n|---|---|\n"
        f"| PSI (reference deciles) | >= {limits.psi:g} |\n"
        f"| KS (numeric), chi-squared (categorical) | p < {limits.p_value:g} over all columns (Bonferroni) |\n"
        f"| null rate | {limits.null_rate_increase:g} above the reference |\n"
        f"| out of the reference range | more than {limits.out_of_range_rate:g} of values |\n"
        f"| unseen categories | more than {limits.unseen_rate:g} of values |\n\n"
        f"Versions with fewer than {limits.min_rows} rows in an interval are reported, not judged.\n\n"
        f"{live}\n\n{retrain}\n"
    )


def build_lifecycle_dag(config: ModelLineConfig, register: bool = True) -> DAG:
    """retrain-and-promote: data window -> trained, gated, reviewed, deployed, verified, promoted model."""
    tz = config.schedule.timezone
    default_args = _default_args(config)
    schedule: Any = CronDataIntervalTimetable(config.schedule.cron, timezone=tz)
    if config.monitoring is not None and config.monitoring.retrain_on_breach:
        # the cron, or a retrain the drift monitor requests (its window: up to the request, window.py)
        schedule = AssetOrTimeSchedule(timetable=schedule, assets=[retrain_request(config)])
    with DAG(
        dag_id=config.lifecycle_dag_id,
        description=f"Retrain, gate, review, deploy and promote {config.registry.model_name}",
        schedule=schedule,
        start_date=datetime.combine(config.schedule.start_date, datetime.min.time(), tzinfo=ZoneInfo(tz)),
        catchup=config.schedule.catchup,
        # one lifecycle run of a line at a time: the scheduler makes each line's runs the single writer of
        # its aliases and deployment repository (a queued or cleared run waits; backfill runs, which are
        # backtests and write nothing, are bounded by the backfill's own max_active_runs instead)
        max_active_runs=1,
        default_args=default_args,
        tags=sorted({"mlops", "lifecycle", f"line:{config.model_line}", f"team:{config.owner.team}", *config.tags}),
        doc_md=_doc(config),
        auto_register=register,  # False: built only to see whether it can be (model_line_config_errors.py)
    ) as dag:
        common: dict[str, Any] = {"config": config}
        route = RouteRunOperator(task_id="route", **common)
        extract = EXTRACT[config.extract.warehouse](task_id="extract", **common)
        route >> [extract, _backtest(config, common)]
        train = TRAIN[config.train.backend](
            task_id="train",
            snapshot=extract.output,
            execution_timeout=timedelta(minutes=config.train.timeout_minutes),
            **common,
        )
        gate = GateOperator(task_id="gate", candidate=train.output, **common)
        stage = StageOperator(task_id="stage", candidate=train.output, verdict=gate.output, **common)
        delivery = DELIVERY[(config.review.backend, config.deploy.backend)](common, train, gate)
        verify = VerifyServingOperator(
            task_id="verify_serving", candidate=train.output, deployment=delivery.deploy.output, **common
        )
        promote = PromoteOperator(
            task_id="promote",
            candidate=train.output,
            review=delivery.review.output,
            approval=delivery.approval.output,
            merge=delivery.merge.output,
            deployment=delivery.deploy.output,
            verification=verify.output,
            **common,
        )
        stage >> delivery.review
        # a rejected review or a failed deployment leaves the registry as it was
        restore = RestoreStagingOperator(task_id="restore_staging", trigger_rule=TriggerRule.ONE_FAILED, **common)
        [*delivery.may_fail, verify] >> restore
        # retention once production moved forward: a failed run deletes nothing (housekeeping is then
        # upstream_failed, a failed leaf, so the run still ends failed when restore_staging succeeds), and it
        # never holds a worker slot beside a deferred wait; a backtest or superseded run skips it
        promote >> HousekeepingOperator(task_id="housekeeping", **common)
    return dag


def build_all(register: bool = True) -> tuple[dict[str, DAG], list[ModelLineConfigError]]:
    """Every valid model line's DAGs by dag_id, and the errors of the invalid ones.

    A line whose DAG cannot be built (whatever Airflow refuses that validation let through) is reported
    as its file's error; the other lines' DAGs are built all the same.
    """
    configs, errors = load_model_lines()
    dags: dict[str, DAG] = {}
    for config in configs:
        try:
            built = [build_lifecycle_dag(config, register)]
            if config.monitoring is not None:
                built.append(build_monitor_dag(config, register))
        except Exception as exc:  # noqa: BLE001 - one line's problem must not take the others down
            folder = paths.model_lines_dir()
            path = next((p for p in model_line_files(folder) if p.stem == config.model_line), folder)
            errors.append(ModelLineConfigError(str(path), [f"its DAG cannot be built: {type(exc).__name__}: {exc}"]))
            continue
        dags.update((dag.dag_id, dag) for dag in built)
    return dags, errors
