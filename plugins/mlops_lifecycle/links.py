"""Buttons on a task in the Airflow UI that open the MLflow run, the model version and the service.

The operator records the URL while it runs (``LifecycleOperator.set_link``); after the task ends
the worker stores each link in XCom, where the UI reads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey


class _RecordedLink(BaseOperatorLink):
    key: ClassVar[str]

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        return getattr(operator, "recorded_links", {}).get(self.key, "")


class MlflowRunLink(_RecordedLink):
    name = "MLflow run"
    key = "mlflow_run"


class MlflowModelVersionLink(_RecordedLink):
    name = "MLflow model version"
    key = "mlflow_model_version"


class ServiceVersionLink(_RecordedLink):
    name = "Service /version"
    key = "service_version"


class GitLabMergeRequestLink(_RecordedLink):
    name = "GitLab merge request"
    key = "gitlab_merge_request"


class GitLabPipelineLink(_RecordedLink):
    name = "GitLab pipeline"
    key = "gitlab_pipeline"


class DatabricksRunLink(_RecordedLink):
    name = "Databricks run"
    key = "databricks_run"


class BacktestReportLink(_RecordedLink):
    name = "Backtest report"
    key = "backtest_report"


class DriftReportLink(_RecordedLink):
    name = "Drift report"
    key = "drift_report"
