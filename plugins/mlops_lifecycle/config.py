"""The model line as configuration: one strict YAML file per line, validated before anything runs.

``load_model_lines`` reads every ``*.yaml`` / ``*.yml`` in the model-lines folder (hidden files, such
as editors' lock files, are not model lines) and returns the valid configs and, separately, one
:class:`ModelLineConfigError` per invalid file, so one bad file never takes the other lines' DAGs
down, whatever it does wrong. Messages name the file, the line and column, the field path, what was
expected and what was found, and the nearest allowed key for a misspelt one.

Strict: no type coercion (``retries: true`` is not 1, ``timezone: NO`` is not a string), finite
numbers, names matching patterns, file paths that stay inside ``include/``, gate metrics that the
training entrypoint declares (its ``METRICS`` tuple, read without importing it).
"""

from __future__ import annotations

import ast
import difflib
import re
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mlops_lifecycle import paths
from mlops_lifecycle.exceptions import ModelLineConfigError
from mlops_lifecycle.yaml_source import Source, YamlProblem

SUFFIXES = (".yaml", ".yml")
NAME_PATTERN = r"^[a-z][a-z0-9_]{2,48}$"
ALIAS_PATTERN = r"^[a-zA-Z][a-zA-Z0-9_-]{0,62}$"
GCP_PROJECT_PATTERN = r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$"
BQ_TABLE_PATTERN = r"[a-z][a-z0-9-]{4,28}[a-z0-9]\.[A-Za-z0-9_]+\.[A-Za-z0-9_$-]+"
SQL_TABLE_REF = re.compile(r"{{\s*tables\.([A-Za-z_][A-Za-z0-9_]*)\s*}}")
TAG_PATTERN = r"^[\w.:/-]{1,100}$"  # Airflow refuses DAG tags longer than 100 characters
LOCAL_TABLE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"  # a DuckDB sample table: a name, never a path
# ports the local stack already uses (Airflow API and log servers, MLflow, PostgreSQL, Redis, RabbitMQ)
RESERVED_PORTS = {8080: "Airflow", 8793: "Airflow logs", 8794: "Airflow logs", 5000: "MLflow", 5432: "PostgreSQL"}
RESERVED_PORTS |= {6379: "Redis", 5672: "RabbitMQ", 15672: "RabbitMQ"}


class _Strict(BaseModel):
    # strict: YAML's true/false/"3" are not coerced to numbers, nor numbers to strings; inf/nan refused
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True, strict=True, allow_inf_nan=False)


def inside_include(value: str) -> str:
    """A path relative to include/ that stays inside it (no absolute path, no way out with ``..``)."""
    if Path(value).is_absolute():
        raise ValueError(f"'{value}' is absolute: paths are relative to include/")
    root = paths.include_dir()
    if not (root / value).resolve().is_relative_to(root):
        raise ValueError(f"'{value}' leads outside include/ ({(root / value).resolve()})")
    return value


IncludePath = Annotated[str, Field(min_length=1), AfterValidator(inside_include)]


class Owner(_Strict):
    team: str = Field(min_length=1, description="Team that owns the model line (Airflow owner).")
    email: str | None = Field(default=None, pattern=r"^[^@\s]+@[^@\s]+$")


def five_field_cron(value: str) -> str:
    from croniter import croniter

    if value.startswith("@") or len(value.split()) != 5 or not croniter.is_valid(value):
        raise ValueError(f"'{value}' is not a five-field cron expression (e.g. '0 3 * * 1' for Mondays 03:00)")
    return value


def iana_timezone(value: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"'{value}' is not an IANA time zone (e.g. 'UTC', 'Europe/Berlin')") from None
    return value


Cron = Annotated[str, AfterValidator(five_field_cron)]
TimeZone = Annotated[str, AfterValidator(iana_timezone)]


class Schedule(_Strict):
    cron: Cron = Field(description="Cron expression; each run's data interval is one cron period.")
    timezone: TimeZone = "UTC"
    start_date: Annotated[date, Field(strict=False, description="ISO date (YYYY-MM-DD) of the first interval.")]
    catchup: bool = False

    @model_validator(mode="before")
    @classmethod
    def _one_run_at_a_time(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_active_runs" in data:
            raise ValueError(
                "max_active_runs is not configurable: a line runs one lifecycle run at a time, the single writer "
                "of its registry aliases and deployment repository (backfills, which are backtests, run in parallel "
                "up to the backfill's own max_active_runs)"
            )
        return data


class Window(_Strict):
    training_lookback_days: int = Field(ge=28, le=3660, description="Days of data up to the window end.")
    holdout_days: int = Field(ge=1, le=366, description="Last days of the window kept for evaluation.")

    @model_validator(mode="after")
    def _holdout_fits(self) -> Window:
        if self.holdout_days * 2 > self.training_lookback_days:
            raise ValueError(
                f"holdout_days ({self.holdout_days}) must be at most half of training_lookback_days "
                f"({self.training_lookback_days}) so there is data left to train on"
            )
        return self


def _tables_matching(tables: dict[str, str], pattern: str, rule: str) -> dict[str, str]:
    bad = {k: v for k, v in tables.items() if not re.fullmatch(pattern, v)}
    if bad:
        raise ValueError(f"{rule}, got {bad}")
    return tables


class _ExtractCommon(_Strict):
    sql: IncludePath = Field(description="Feature SQL in BigQuery dialect, relative to include/.")
    tables: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], str] = Field(
        min_length=1, description="Names used as {{ tables.NAME }} in the SQL."
    )


class ExtractDuckDB(_ExtractCommon):
    """Embedded local adapter: DuckDB over generated sample data."""

    warehouse: Literal["duckdb"]

    @field_validator("tables")
    @classmethod
    def _table_names(cls, value: dict[str, str]) -> dict[str, str]:
        return _tables_matching(
            value, LOCAL_TABLE_PATTERN, "local sample tables are plain names (letters, digits, _), not paths"
        )


class ExtractBigQuery(_ExtractCommon):
    """Production adapter: a BigQuery query job materialises one snapshot table per data window."""

    warehouse: Literal["bigquery"]
    project: str = Field(pattern=GCP_PROJECT_PATTERN, description="Project that runs the jobs and holds snapshots.")
    dataset: str = Field(pattern=r"^[A-Za-z0-9_]{1,1024}$", description="Dataset for the snapshot tables.")
    location: str = Field(min_length=2, description="BigQuery location of the jobs and the dataset (EU, US, ...).")
    gcp_conn_id: str = "google_cloud_default"
    poll_interval_seconds: float = Field(default=4.0, gt=0, le=600)

    @field_validator("tables")
    @classmethod
    def _fully_qualified(cls, value: dict[str, str]) -> dict[str, str]:
        return _tables_matching(
            value, BQ_TABLE_PATTERN, "BigQuery tables must be fully qualified as project.dataset.table"
        )


Extract = Annotated[ExtractDuckDB | ExtractBigQuery, Field(discriminator="warehouse")]


class _TrainCommon(_Strict):
    entrypoint: IncludePath = Field(description="Training script, relative to include/.")
    target: str = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    timeout_minutes: int = Field(default=60, ge=1, le=24 * 60)


class TrainLocal(_TrainCommon):
    """Embedded local adapter: the entrypoint in a local process."""

    backend: Literal["local_process"]


class DatabricksGitSource(_Strict):
    """How the entrypoint reaches the workspace: the run checks out the training code revision from git."""

    git_url: str = Field(min_length=1, description="Repository holding this package (Databricks git_source).")
    git_provider: Literal[
        "gitHub",
        "gitHubEnterprise",
        "gitLab",
        "gitLabEnterpriseEdition",
        "bitbucketCloud",
        "bitbucketServer",
        "azureDevOpsServices",
        "awsCodeCommit",
    ] = "gitLab"
    include_path: str = Field(default="include", description="Folder of include/ inside that repository.")


class TrainDatabricks(_TrainCommon):
    """Production adapter: a Databricks run (one-time on a job cluster, or run-now of an existing job)."""

    backend: Literal["databricks"]
    databricks_conn_id: str = "databricks_default"
    job_id: int | None = Field(default=None, ge=1, description="Run-now of this existing job, not a one-time run.")
    task: Literal["python_file", "notebook", "wheel"] = Field(
        default="python_file", description="Task type of a one-time run."
    )
    cluster: dict[str, Any] | None = Field(default=None, description="Job cluster spec (Databricks new_cluster).")
    existing_cluster_id: str | None = None
    source: DatabricksGitSource | None = None
    wheel: dict[str, str] | None = Field(default=None, description="package_name and entry_point of a wheel task.")
    libraries: list[dict[str, Any]] = Field(default_factory=list)
    mlflow_token_secret: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$",
        description="Databricks secret scope/key holding the token of a self-hosted MLflow (never in job params).",
    )
    poll_interval_seconds: float = Field(default=30.0, gt=0, le=600)

    @model_validator(mode="after")
    def _one_way_to_run(self) -> TrainDatabricks:
        if self.job_id is not None:
            if self.cluster or self.existing_cluster_id or self.source or self.wheel:
                raise ValueError(
                    "job_id runs an existing job: drop cluster, existing_cluster_id, source and wheel "
                    "(the job defines them)"
                )
            return self
        if (self.cluster is None) == (self.existing_cluster_id is None):
            raise ValueError("a one-time run needs exactly one of 'cluster' (a job cluster) or 'existing_cluster_id'")
        if self.task == "wheel":
            if not self.wheel or set(self.wheel) != {"package_name", "entry_point"}:
                raise ValueError("task 'wheel' needs wheel: {package_name: ..., entry_point: ...}")
        elif self.source is None:
            raise ValueError(
                f"task '{self.task}' needs 'source' (git_url, git_provider): the run checks out the "
                "entrypoint at the training code revision"
            )
        return self


Train = Annotated[TrainLocal | TrainDatabricks, Field(discriminator="backend")]


class Registry(_Strict):
    model_name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,200}$")
    experiment: str = Field(min_length=1)
    staging_alias: Annotated[str, Field(pattern=ALIAS_PATTERN)] = "staging"
    production_alias: Annotated[str, Field(pattern=ALIAS_PATTERN)] = "production"
    previous_production_alias: Annotated[str, Field(pattern=ALIAS_PATTERN)] = "previous_production"

    @model_validator(mode="after")
    def _distinct_aliases(self) -> Registry:
        aliases = [self.staging_alias, self.production_alias, self.previous_production_alias]
        if len(set(aliases)) != len(aliases):
            raise ValueError(f"staging, production and previous-production aliases must differ: {aliases}")
        return self


class MetricRule(_Strict):
    direction: Literal["minimize", "maximize"]
    threshold: float | None = Field(default=None, description="Absolute limit: max for minimize, min for maximize.")
    max_regression: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="How much worse than production is tolerated, as a fraction (0.05 = 5%).",
    )

    @model_validator(mode="after")
    def _has_a_rule(self) -> MetricRule:
        if self.threshold is None and self.max_regression is None:
            raise ValueError("a gate metric needs 'threshold', 'max_regression' or both")
        return self


class Gate(_Strict):
    metrics: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")], MetricRule] = Field(min_length=1)


class _ReviewCommon(_Strict):
    reviewers: list[str] = Field(default_factory=list)
    timeout_hours: float = Field(
        default=72, gt=0, le=24 * 30, description="No answer by then fails the review (nothing merged)."
    )


class ReviewLocalGit(_ReviewCommon):
    """Embedded local adapter: a branch of a local git repository + Airflow human-in-the-loop approval."""

    backend: Literal["local_git"]
    repository: str = Field(
        default="deploy-repo",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
        description="Deployment repository: a folder name in the local home.",
    )
    auto_approve: bool = Field(default=False, description="Approve without a human (demo and tests).")


class ReviewGitLab(_ReviewCommon):
    """Production adapter: a merge request in the GitLab deployment repository."""

    backend: Literal["gitlab"]
    gitlab_conn_id: str = "gitlab_default"
    project: str = Field(pattern=r"^[\w.-]+(/[\w.-]+)+$", description="Deployment repository path (group/name).")
    target_branch: str = Field(default="main", min_length=1)
    labels: list[str] = Field(default_factory=lambda: ["model-promotion"])
    min_approvals: int = Field(default=1, ge=1, le=10, description="Approvals by people other than the author.")
    poll_interval_seconds: float = Field(default=60.0, gt=0, le=3600)


Review = Annotated[ReviewLocalGit | ReviewGitLab, Field(discriminator="backend")]


class _DeployCommon(_Strict):
    environments: list[str] = Field(
        default_factory=lambda: ["dev", "staging", "production"],
        min_length=1,
        description="Deployment order; the last one is production.",
    )
    verify_timeout_seconds: int = Field(default=300, ge=5, le=24 * 3600)
    poll_interval_seconds: float = Field(default=2.0, gt=0, le=600)

    @field_validator("environments")
    @classmethod
    def _ends_in_production(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"environments must be unique, got {value}")
        if value[-1] != "production":
            raise ValueError(f"the last environment must be 'production', got {value}")
        return value


class DeployLocal(_DeployCommon):
    """Embedded local adapter: one service process stands for the last environment."""

    backend: Literal["local_process"]
    port: int = Field(ge=1024, le=65535, description="Loopback port of the local production service.")

    @field_validator("port")
    @classmethod
    def _not_taken_by_the_stack(cls, value: int) -> int:
        import os

        taken = dict(RESERVED_PORTS)
        for variable, user in (("AIRFLOW__API__PORT", "Airflow API"), ("MLFLOW_PORT", "MLflow")):
            if os.environ.get(variable, "").isdigit():
                taken[int(os.environ[variable])] = user
        if value in taken:
            raise ValueError(f"{value} is {taken[value]}'s port on this stack: choose another")
        return value


class DeployGitLabCI(_DeployCommon):
    """Production adapter: the deployment repository's GitLab CI deploys to each environment in order."""

    backend: Literal["gitlab_ci"]
    service_url: str = Field(pattern=r"^https?://\S+$", description="Base URL of the production service.")
    pipeline_timeout_minutes: int = Field(default=60, ge=1, le=24 * 60)
    deployment_timeout_minutes: int = Field(default=120, ge=1, le=7 * 24 * 60)


Deploy = Annotated[DeployLocal | DeployGitLabCI, Field(discriminator="backend")]


BASELINE_VARIANT = "baseline"


class BacktestVariant(_Strict):
    """Another model idea to backtest against the line's own training (the baseline)."""

    description: str = ""
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of train.parameters for this variant."
    )
    entrypoint: IncludePath | None = Field(default=None, description="Another training script, relative to include/.")


class Backtest(_Strict):
    """How a backfill of the lifecycle DAG backtests the line over past windows."""

    horizon_days: int | None = Field(
        default=None, ge=1, le=366, description="Out-of-time days evaluated after each window; default one period."
    )
    champion: Literal["chain", "served"] = Field(
        default="chain",
        description="Compared with: the last model this backtest would have promoted (chain), or the version "
        "that really served production at the window's end (served, from the audit events).",
    )
    variants: dict[Annotated[str, Field(pattern=NAME_PATTERN)], BacktestVariant] = Field(default_factory=dict)

    @field_validator("variants")
    @classmethod
    def _baseline_is_reserved(cls, value: dict[str, BacktestVariant]) -> dict[str, BacktestVariant]:
        if BASELINE_VARIANT in value:
            raise ValueError(f"'{BASELINE_VARIANT}' is the line's own training: name the variant something else")
        return value


class Retention(_Strict):
    """What the housekeeping task keeps (it never deletes what an alias or an audit record names)."""

    keep_candidates: int = Field(
        default=5, ge=1, le=1000, description="Newest registered versions kept besides aliased and audited ones."
    )
    snapshot_days: int = Field(
        default=90, ge=1, le=3650, description="Snapshots nothing kept names are deleted once older than this."
    )


class Alerting(_Strict):
    emails: list[Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+$")]] = Field(default_factory=list)
    on_failure: bool = True
    smtp_conn_id: str | None = Field(
        default=None,
        min_length=1,
        description="Airflow SMTP connection that mails the alerts; unset: .local/alerts/<line>.jsonl (local).",
    )


class DriftLimits(_Strict):
    """When a monitored interval breaches: the drift and data-quality thresholds (README: Drift monitoring)."""

    psi: float = Field(default=0.2, gt=0, description="Population stability index at or above this: drifted.")
    p_value: float = Field(
        default=0.01,
        gt=0,
        lt=1,
        description="Family-wise significance of the KS / chi-squared tests (Bonferroni over the columns).",
    )
    null_rate_increase: float = Field(default=0.05, gt=0, le=1, description="Null rate above the reference's by more.")
    out_of_range_rate: float = Field(default=0.05, gt=0, le=1, description="Share outside the reference's range.")
    unseen_rate: float = Field(default=0.05, gt=0, le=1, description="Share of categories the reference never saw.")
    min_rows: int = Field(
        default=1000,
        ge=1,
        description="Fewer served rows of a version: reported, not judged (PSI's noise alone is about "
        "bins/rows: at 100 rows clean data breaches 0.2 often).",
    )


class GroundTruth(_Strict):
    """How actuals join back to what production predicted, for live performance."""

    sql: IncludePath | None = Field(
        default=None,
        description="BigQuery-dialect SQL, relative to include/, giving the key columns, `date` and the actual "
        "for every day in [{{ window_start }}, {{ window_end }}); default: the line's feature SQL (extract.sql).",
    )
    actual: str | None = Field(
        default=None, min_length=1, description="The column of that SQL holding the actual (default: train.target)."
    )
    key: list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]] = Field(
        min_length=1, description="Columns of a served row that name what was predicted (e.g. market_id)."
    )
    prediction_offset_days: int = Field(
        default=0, ge=0, le=366, description="A row served on day D predicts day D + this (the forecast horizon)."
    )
    label_delay_days: int = Field(
        default=1, ge=0, le=366, description="Actuals of a day are complete this many days after it."
    )
    max_regression: float = Field(
        default=0.2,
        gt=0,
        description="Breach when a gate metric is live this fraction worse than the served version's holdout value.",
    )
    min_rows: int = Field(
        default=50, ge=1, description="Fewer labelled rows of a version: live metrics reported, not judged."
    )


class Monitoring(_Strict):
    """The line's drift monitor DAG (``<line>__monitor``): what production served, against the training reference."""

    cron: Cron = Field(description="Schedule of the monitor; each run checks its data interval.")
    timezone: TimeZone = "UTC"
    start_date: Annotated[date | None, Field(strict=False, description="First interval (default: schedule's).")] = None
    served: Literal["prediction_log", "bigquery"] = Field(
        default="prediction_log",
        description="prediction_log: the local service's log files; bigquery: the table a log shipper fills "
        "(include/deployment/README.md), snapshotted like extract's tables.",
    )
    served_table: str | None = Field(
        default=None,
        pattern=rf"^{BQ_TABLE_PATTERN}$",
        description="project.dataset.table of the shipped prediction logs (served: bigquery).",
    )
    query_timeout_seconds: int = Field(
        default=900, ge=10, le=6 * 3600, description="How long a BigQuery snapshot query of the monitor may run."
    )
    limits: DriftLimits = Field(default_factory=DriftLimits)
    exclude: list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]] = Field(
        default_factory=list,
        description="Features not checked for drift: calendar features, whose interval is always a slice of the "
        "reference's year (day_of_year in a daily interval drifts by construction).",
    )
    ground_truth: GroundTruth | None = None
    retrain_on_breach: bool = Field(default=True, description="A breach requests a lifecycle run (asset event).")
    cooldown_hours: float = Field(
        default=24.0, ge=0, le=24 * 366, description="No second retrain request within this time of the last one."
    )


class ModelLineConfig(_Strict):
    model_line: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    owner: Owner
    tags: list[Annotated[str, Field(pattern=TAG_PATTERN)]] = Field(default_factory=list, max_length=20)
    retries: int = Field(default=2, ge=0, le=10)
    retry_delay_seconds: int = Field(default=60, ge=0, le=3600)
    schedule: Schedule
    window: Window
    extract: Extract
    train: Train
    registry: Registry
    gate: Gate
    review: Review
    deploy: Deploy
    alerting: Alerting = Field(default_factory=Alerting)
    backtest: Backtest = Field(default_factory=Backtest)
    retention: Retention = Field(default_factory=Retention)
    monitoring: Monitoring | None = None

    @property
    def lifecycle_dag_id(self) -> str:
        return f"{self.model_line}__lifecycle"

    @property
    def monitor_dag_id(self) -> str:
        return f"{self.model_line}__monitor"

    @property
    def monitoring_experiment(self) -> str:
        """Monitoring runs live beside the line's experiment, one run per served version and interval."""
        return f"{self.registry.experiment}-monitoring"

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the validated config: the audit record pins the exact thresholds and parameters used."""
        import hashlib

        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()

    @property
    def sql_path(self) -> Path:
        return paths.include_dir() / self.extract.sql

    @property
    def entrypoint_path(self) -> Path:
        return paths.include_dir() / self.train.entrypoint

    @property
    def backtest_experiment(self) -> str:
        """Backtest runs live beside the line's experiment, never among its registered versions."""
        return f"{self.registry.experiment}-backtests"

    def backtest_variant(self, name: str) -> tuple[str, dict[str, Any]]:
        """(entrypoint relative to include/, effective parameters) of a backtest variant; KeyError if unknown."""
        if name == BASELINE_VARIANT:
            return self.train.entrypoint, dict(self.train.parameters)
        variant = self.backtest.variants[name]
        return variant.entrypoint or self.train.entrypoint, {**self.train.parameters, **variant.parameters}

    @model_validator(mode="after")
    def _files_exist_and_match(self) -> ModelLineConfig:
        problems = []
        if not self.sql_path.is_file():
            problems.append(f"extract.sql: file {self.sql_path} does not exist (paths are relative to include/)")
        else:
            used = set(SQL_TABLE_REF.findall(self.sql_path.read_text()))
            missing = sorted(used - set(self.extract.tables))
            if missing:
                problems.append(
                    f"extract.tables: the SQL uses {{{{ tables.X }}}} for {missing} but tables only "
                    f"defines {sorted(self.extract.tables)}"
                )
        entrypoints = {"train.entrypoint": self.train.entrypoint}
        for name, variant in self.backtest.variants.items():
            if variant.entrypoint:
                entrypoints[f"backtest.variants.{name}.entrypoint"] = variant.entrypoint
        for field, entrypoint in entrypoints.items():
            path = paths.include_dir() / entrypoint
            if not path.is_file():
                problems.append(f"{field}: file {path} does not exist (paths are relative to include/)")
                continue
            declared = declared_metrics(path)
            if isinstance(declared, str):
                problems.append(f"{field}: {declared}")
                continue
            unknown = [m for m in self.gate.metrics if m not in declared]
            if unknown:
                problems.append(
                    f"gate.metrics: {unknown} not computed by {entrypoint} (its METRICS: {sorted(declared)}); a gate "
                    "metric that training never logs would reject every model"
                )
        if (self.review.backend == "gitlab") != (self.deploy.backend == "gitlab_ci"):
            problems.append(
                f"review.backend '{self.review.backend}' and deploy.backend '{self.deploy.backend}' do not go "
                "together: GitLab CI deploys what a GitLab merge request merged (gitlab + gitlab_ci), and the "
                "local service deploys what the local git review merged (local_git + local_process)"
            )
        if self.deploy.backend != "local_process" and self.alerting.emails and not self.alerting.smtp_conn_id:
            problems.append(
                "alerting.smtp_conn_id: required for a line deployed to production with alerting.emails: without "
                "it alerts go to a file on the Airflow worker (.local/alerts), which nobody reads there"
            )
        problems += self._monitoring_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _monitoring_problems(self) -> list[str]:
        monitoring = self.monitoring
        if monitoring is None:
            return []
        problems = []
        if monitoring.served == "prediction_log" and self.deploy.backend != "local_process":
            problems.append(
                f"monitoring.served: 'prediction_log' reads the local service's log, but deploy.backend is "
                f"'{self.deploy.backend}': ship the pods' prediction logs to BigQuery (include/deployment/README.md) "
                "and set served: bigquery with served_table"
            )
        if (monitoring.served == "bigquery") != (monitoring.served_table is not None):
            problems.append(
                "monitoring.served_table: required with served: bigquery (project.dataset.table of the shipped "
                "prediction logs), and only then"
            )
        if monitoring.served == "bigquery" and self.extract.warehouse != "bigquery":
            problems.append(
                "monitoring.served: 'bigquery' snapshots the shipped logs into extract's BigQuery dataset, but "
                f"extract.warehouse is '{self.extract.warehouse}'"
            )
        features = declared_features(self.entrypoint_path)
        unknown = [f for f in monitoring.exclude if features is not None and f not in features]
        if unknown:
            problems.append(
                f"monitoring.exclude: {unknown} are not features of {self.train.entrypoint} "
                f"({', '.join(features or ())})"
            )
        kinds = declared_feature_kinds(self.entrypoint_path) or {}
        reserved = sorted(set(kinds) & {"ts", "request_id", "model_version", "row_index", "prediction", "actual"})
        if reserved:
            problems.append(
                f"monitoring: features {reserved} of {self.train.entrypoint} clash with the served rows' own "
                "columns; rename them to be monitored"
            )
        odd = sorted(name for name in kinds if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name))
        if monitoring.served == "bigquery" and odd:
            problems.append(
                f"monitoring.served: features {odd} of {self.train.entrypoint} are not plain names, which the "
                "shipped table's JSON cannot be read into as columns"
            )
        truth = monitoring.ground_truth
        if truth is None:
            return problems
        sql = paths.include_dir() / (truth.sql or self.extract.sql)
        if not sql.is_file():
            problems.append(f"monitoring.ground_truth.sql: file {sql} does not exist (paths are relative to include/)")
        else:
            missing = sorted(set(SQL_TABLE_REF.findall(sql.read_text())) - set(self.extract.tables))
            if missing:
                problems.append(
                    f"monitoring.ground_truth.sql: uses {{{{ tables.X }}}} for {missing} but extract.tables only "
                    f"defines {sorted(self.extract.tables)} (the actuals are read from the same warehouse)"
                )
        unknown = [k for k in truth.key if features is not None and k not in features]
        if unknown:
            problems.append(
                f"monitoring.ground_truth.key: {unknown} are not features of {self.train.entrypoint} "
                f"({', '.join(features or ())}): a served row carries only the model's features"
            )
        return problems


def module_literals(path: Path) -> dict[str, Any]:
    """The literal values assigned at module level in a Python file (read, not imported); OSError or
    SyntaxError/ValueError when it cannot be read or parsed."""
    found: dict[str, Any] = {}
    for node in ast.parse(path.read_bytes(), filename=str(path)).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name):
            try:
                found[target.id] = ast.literal_eval(value)
            except ValueError:
                found[target.id] = None  # assigned, but not a literal
    return found


def declared_feature_kinds(entrypoint: Path) -> dict[str, str] | None:
    """Feature -> "categorical" | "numeric" from a training entrypoint's ``CATEGORICAL`` and ``NUMERIC``
    (read, not imported); None when it cannot be read or declares neither."""
    try:
        literals = module_literals(entrypoint)
    except (SyntaxError, ValueError, OSError):
        return None
    kinds: dict[str, str] = {}
    for name, kind in (("CATEGORICAL", "categorical"), ("NUMERIC", "numeric")):
        part = literals.get(name)
        if isinstance(part, (tuple, list)):
            kinds.update((str(feature), kind) for feature in part)
    return kinds or None


def declared_features(entrypoint: Path) -> tuple[str, ...] | None:
    """``CATEGORICAL + NUMERIC`` of a training entrypoint; None when it cannot be read or declares neither."""
    kinds = declared_feature_kinds(entrypoint)
    return tuple(kinds) if kinds else None


def declared_metrics(entrypoint: Path) -> tuple[str, ...] | str:
    """The ``METRICS`` tuple a training entrypoint declares at module level (read, not imported), or what is wrong."""
    try:
        value = module_literals(entrypoint).get("METRICS")
    except (SyntaxError, ValueError, OSError) as exc:
        return f"cannot read {entrypoint}: {exc}"
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    return (
        f"{entrypoint} declares no METRICS: a module-level tuple of the metric names it logs, e.g. "
        'METRICS = ("mape", "r2"), so the gate can be checked before training'
    )


def _walk(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[str], Any]:
    """Follow ``loc`` through the schema: the path to show (union tags dropped) and the type reached.

    For a tagged union (``extract.warehouse`` and the like) pydantic puts the tag in the location
    (``extract.bigquery.project``); users wrote ``extract.project``, so the tag is not shown.
    """
    import typing

    shown: list[str] = []
    current: Any = model
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        shown.append(str(part))
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            current = None
            continue
        field = current.model_fields.get(str(part))
        current = field.annotation if field is not None else None
        members = typing.get_args(current) if typing.get_origin(current) in (typing.Union, UnionType) else ()
        if len(members) == 2 and type(None) in members:  # an optional section: the section itself
            current = next(m for m in members if m is not type(None))
            members = ()
        if members and field is not None and field.discriminator and parts:
            tag = parts.pop(0)
            current = next(
                (m for m in members if tag in typing.get_args(m.model_fields[field.discriminator].annotation)), None
            )
    return shown, current


def _format_error(error: Mapping[str, Any], model: type[BaseModel], source: Source | None = None) -> str:
    """One schema error as '<line, column>: <field path>: <what is wrong> (got <value>)'."""
    shown, _ = _walk(model, error["loc"])
    kind = error["type"]
    where = ""
    if source is not None and shown:
        where = source.where(shown[:-1] if kind == "missing" else shown, key=kind == "extra_forbidden") + ": "
    return where + _describe(error, model, shown)


def _describe(error: Mapping[str, Any], model: type[BaseModel], shown: list[str]) -> str:
    loc = ".".join(shown)
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, error["loc"][:-1])
        near = difflib.get_close_matches(str(error["loc"][-1]), allowed, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        listing = f" (allowed keys here: {', '.join(allowed)})" if allowed else ""
        return f"{loc}: unknown key{hint}{listing}"
    if error["type"] == "missing":
        return f"{loc}: required field is missing"
    found = error.get("input")
    if isinstance(found, bool) and error["type"] in ("string_type", "int_type", "float_type"):
        expected = {"string_type": "a string", "int_type": "an integer", "float_type": "a number"}[error["type"]]
        quote = "; quote the value if you meant text" if error["type"] == "string_type" else ""
        return (
            f"{loc}: expected {expected}, got the boolean {str(found).lower()} (YAML reads unquoted yes/no/on/off/"
            f"true/false as booleans{quote})"
        )
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        ctx = error.get("ctx", {})
        return (
            f"{loc}.{ctx.get('discriminator', '?').strip(chr(39))}: Input should be one of "
            f"{ctx.get('expected_tags', '?')} (got {ctx.get('tag', 'nothing')!r})"
        )
    message = error["msg"].removeprefix("Value error, ")
    if not loc:  # cross-field checks name their own fields
        return message
    if isinstance(found, (dict, list)) or found is None or error["type"].startswith("value_error"):
        return f"{loc}: {message}"
    return f"{loc}: {message} (got {found!r})"


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed where an unknown key was found."""
    _, current = _walk(model, loc)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return []


def load_model_line(path: Path) -> ModelLineConfig:
    """Read and validate one model-line file; raise :class:`ModelLineConfigError` naming the problems."""
    from mlops_lifecycle import yaml_source

    shown = str(path)
    try:
        source = yaml_source.read(path)
    except YamlProblem as exc:
        raise ModelLineConfigError(shown, [str(exc)]) from None
    except OSError as exc:
        hint = " (a broken symbolic link?)" if path.is_symlink() else ""
        raise ModelLineConfigError(shown, [f"cannot read file: {exc.strerror or exc}{hint}"]) from None
    raw = source.data
    if not isinstance(raw, dict):
        raise ModelLineConfigError(shown, [f"expected a mapping at the top level, got {type(raw).__name__}"])
    try:
        config = ModelLineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ModelLineConfigError(shown, [_format_error(e, ModelLineConfig, source) for e in exc.errors()]) from None
    if config.model_line != path.stem:
        where = source.where(["model_line"])
        raise ModelLineConfigError(
            shown, [f"{where}: model_line: '{config.model_line}' must equal the file name '{path.stem}'"]
        )
    return config


_LOADED: dict[tuple[object, ...], tuple[list[ModelLineConfig], list[ModelLineConfigError]]] = {}


def model_line_files(folder: Path) -> list[Path]:
    """The model-line files of ``folder``: ``*.yaml`` and ``*.yml``, not hidden (editors' lock and swap files)."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    return [p for p in entries if p.suffix in SUFFIXES and not p.name.startswith((".", "#", "~"))]


def _stat(path: Path) -> tuple[str, int, int]:
    try:
        st = path.stat()
    except OSError:  # a broken symbolic link: reported by load_model_line
        return (path.name, -1, -1)
    return (path.name, st.st_size, st.st_mtime_ns)


def _folder_state(folder: Path) -> tuple[object, ...]:
    """What the result depends on: every model-line file's name, size and mtime, and the include folder."""
    return (str(folder), str(paths.include_dir()), tuple(_stat(p) for p in model_line_files(folder)))


def load_model_lines(
    folder: Path | None = None,
) -> tuple[list[ModelLineConfig], list[ModelLineConfigError]]:
    """Validate every model-line file in ``folder`` (cached per process while the files are unchanged).

    Both DAG files of the folder ask for the same result when one process parses them both.
    """
    folder = folder or paths.model_lines_dir()
    key = _folder_state(folder)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = _load_model_lines(folder)
    configs, errors = _LOADED[key]
    return list(configs), list(errors)


def _load_one(path: Path) -> ModelLineConfig:
    """``load_model_line``, with anything unexpected a file makes happen reported as that file's error."""
    try:
        return load_model_line(path)
    except ModelLineConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever one file does wrong must not take the others down
        raise ModelLineConfigError(str(path), [f"could not be loaded: {type(exc).__name__}: {exc}"]) from None


def _load_model_lines(folder: Path) -> tuple[list[ModelLineConfig], list[ModelLineConfigError]]:
    """Validate every model-line file in ``folder``; return (valid configs, one error per invalid file).

    Two lines may not share a registered model or a service port. The file that has held it longer
    (older modification time; the file name breaks a tie) keeps its line; the newcomer is refused, with
    a message naming both files. So adding a file can never take a running line away.
    """
    loaded: list[tuple[Path, ModelLineConfig]] = []
    errors: list[ModelLineConfigError] = []
    names: dict[str, Path] = {}
    for path in model_line_files(folder):
        try:
            config = _load_one(path)
        except ModelLineConfigError as exc:
            errors.append(exc)
            continue
        if config.model_line in names:  # demand.yaml and demand.yml
            twin = names[config.model_line]
            errors.append(
                ModelLineConfigError(str(path), [f"model_line: '{config.model_line}' is also defined by {twin}"])
            )
            continue
        names[config.model_line] = path
        loaded.append((path, config))

    def seniority(item: tuple[Path, ModelLineConfig]) -> tuple[int, str]:
        return (_stat(item[0])[2], item[0].name)

    configs: list[ModelLineConfig] = []
    owners: dict[tuple[str, object], Path] = {}
    for path, config in sorted(loaded, key=seniority):
        clashes = []
        for field, value in (
            ("registry.model_name", config.registry.model_name),
            ("deploy.port", getattr(config.deploy, "port", None)),
        ):
            if value is None:
                continue
            first = owners.setdefault((field, value), path)
            if first != path:
                clashes.append(
                    f"{field}: {value!r} is already used by model line '{first.stem}' ({first}), which had it first; "
                    "this line is left out until one of the two files changes it"
                )
        if clashes:
            errors.append(ModelLineConfigError(str(path), clashes))
        else:
            configs.append(config)
    configs.sort(key=lambda c: c.model_line)
    return configs, errors
