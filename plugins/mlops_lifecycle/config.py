"""The model line as configuration: one strict YAML file per line, validated before anything runs.

``load_model_lines`` reads every ``*.yaml`` in the model-lines folder and returns the valid
configs and, separately, one :class:`ModelLineConfigError` per invalid file, so one bad file never
takes the other lines' DAGs down. Messages name the file, the field path, what was expected and
what was found.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mlops_lifecycle import paths
from mlops_lifecycle.exceptions import ModelLineConfigError

# libyaml's safe loader parses ~10x faster than the pure-Python one (parse time of 100 lines)
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
NAME_PATTERN = r"^[a-z][a-z0-9_]{2,48}$"
ALIAS_PATTERN = r"^[a-zA-Z][a-zA-Z0-9_-]{0,62}$"
GCP_PROJECT_PATTERN = r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$"
BQ_TABLE_PATTERN = r"[a-z][a-z0-9-]{4,28}[a-z0-9]\.[A-Za-z0-9_]+\.[A-Za-z0-9_$-]+"
SQL_TABLE_REF = re.compile(r"{{\s*tables\.([A-Za-z_][A-Za-z0-9_]*)\s*}}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Owner(_Strict):
    team: str = Field(min_length=1, description="Team that owns the model line (Airflow owner).")
    email: str | None = Field(default=None, pattern=r"^[^@\s]+@[^@\s]+$")


class Schedule(_Strict):
    cron: str = Field(description="Cron expression; each run's data interval is one cron period.")
    timezone: str = "UTC"
    start_date: date
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

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        from croniter import croniter

        if value.startswith("@") or not croniter.is_valid(value):
            raise ValueError(f"'{value}' is not a five-field cron expression (e.g. '0 3 * * 1' for Mondays 03:00)")
        return value


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


class _ExtractCommon(_Strict):
    sql: str = Field(description="Feature SQL in BigQuery dialect, relative to include/.")
    tables: dict[str, str] = Field(min_length=1, description="Names used as {{ tables.NAME }} in the SQL.")


class ExtractDuckDB(_ExtractCommon):
    """Embedded local adapter: DuckDB over generated sample data."""

    warehouse: Literal["duckdb"]


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
        bad = {k: v for k, v in value.items() if not re.fullmatch(BQ_TABLE_PATTERN, v)}
        if bad:
            raise ValueError(f"BigQuery tables must be fully qualified as project.dataset.table, got {bad}")
        return value


Extract = Annotated[ExtractDuckDB | ExtractBigQuery, Field(discriminator="warehouse")]


class _TrainCommon(_Strict):
    entrypoint: str = Field(description="Training script, relative to include/.")
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
    repository: str = Field(default="deploy-repo", description="Deployment repository, relative to the local home.")
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
    entrypoint: str | None = Field(default=None, description="Another training script, relative to include/.")


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


class Alerting(_Strict):
    emails: list[Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+$")]] = Field(default_factory=list)
    on_failure: bool = True


class ModelLineConfig(_Strict):
    model_line: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    owner: Owner
    tags: list[str] = Field(default_factory=list)
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

    @property
    def lifecycle_dag_id(self) -> str:
        return f"{self.model_line}__lifecycle"

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
        if not self.entrypoint_path.is_file():
            problems.append(
                f"train.entrypoint: file {self.entrypoint_path} does not exist (paths are relative to include/)"
            )
        for name, variant in self.backtest.variants.items():
            if variant.entrypoint and not (paths.include_dir() / variant.entrypoint).is_file():
                problems.append(
                    f"backtest.variants.{name}.entrypoint: file {paths.include_dir() / variant.entrypoint} does not "
                    "exist (paths are relative to include/)"
                )
        if (self.review.backend == "gitlab") != (self.deploy.backend == "gitlab_ci"):
            problems.append(
                f"review.backend '{self.review.backend}' and deploy.backend '{self.deploy.backend}' do not go "
                "together: GitLab CI deploys what a GitLab merge request merged (gitlab + gitlab_ci), and the "
                "local service deploys what the local git review merged (local_git + local_process)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


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
        if members and field is not None and field.discriminator and parts:
            tag = parts.pop(0)
            current = next(
                (m for m in members if tag in typing.get_args(m.model_fields[field.discriminator].annotation)), None
            )
    return shown, current


def _format_error(error: Mapping[str, Any], model: type[BaseModel]) -> str:
    shown, _ = _walk(model, error["loc"])
    loc = ".".join(shown)
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, error["loc"][:-1])
        hint = f" (allowed keys here: {', '.join(allowed)})" if allowed else ""
        return f"{loc}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{loc}: required field is missing"
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        ctx = error.get("ctx", {})
        return (
            f"{loc}.{ctx.get('discriminator', '?').strip(chr(39))}: Input should be one of "
            f"{ctx.get('expected_tags', '?')} (got {ctx.get('tag', 'nothing')!r})"
        )
    message = error["msg"].removeprefix("Value error, ")
    if not loc:  # cross-field checks name their own fields
        return message
    found = error.get("input")
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
    shown = str(path)
    try:
        raw = yaml.load(path.read_text(), Loader=SAFE_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ModelLineConfigError(shown, [f"{where}not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    except OSError as exc:
        raise ModelLineConfigError(shown, [f"cannot read file: {exc.strerror}"]) from None
    if not isinstance(raw, dict):
        raise ModelLineConfigError(shown, [f"expected a mapping at the top level, got {type(raw).__name__}"])
    try:
        config = ModelLineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ModelLineConfigError(shown, [_format_error(e, ModelLineConfig) for e in exc.errors()]) from None
    if config.model_line != path.stem:
        raise ModelLineConfigError(shown, [f"model_line: '{config.model_line}' must equal the file name '{path.stem}'"])
    return config


_LOADED: dict[tuple[object, ...], tuple[list[ModelLineConfig], list[ModelLineConfigError]]] = {}


def _folder_state(folder: Path) -> tuple[object, ...]:
    """What the result depends on: every YAML file's name, size and mtime, and the include folder."""
    files = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.glob("*.yaml")))
    return (str(folder), str(paths.include_dir()), files)


def load_model_lines(
    folder: Path | None = None,
) -> tuple[list[ModelLineConfig], list[ModelLineConfigError]]:
    """Validate every ``*.yaml`` in ``folder`` (cached per process while the files are unchanged).

    Both DAG files of the folder ask for the same result when one process parses them both.
    """
    folder = folder or paths.model_lines_dir()
    key = _folder_state(folder)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = _load_model_lines(folder)
    configs, errors = _LOADED[key]
    return list(configs), list(errors)


def _load_model_lines(folder: Path) -> tuple[list[ModelLineConfig], list[ModelLineConfigError]]:
    """Validate every ``*.yaml`` in ``folder``; return (valid configs, one error per invalid file).

    Lines that clash with an earlier valid line (same registered model, same service port) are
    reported as errors too, and left out.
    """
    configs: list[ModelLineConfig] = []
    errors: list[ModelLineConfigError] = []
    owners: dict[tuple[str, object], str] = {}
    for path in sorted(folder.glob("*.yaml")):
        try:
            config = load_model_line(path)
        except ModelLineConfigError as exc:
            errors.append(exc)
            continue
        clashes = []
        for field, value in (
            ("registry.model_name", config.registry.model_name),
            ("deploy.port", getattr(config.deploy, "port", None)),
        ):
            if value is None:
                continue
            first = owners.setdefault((field, value), config.model_line)
            if first != config.model_line:
                clashes.append(f"{field}: {value!r} is already used by model line '{first}'")
        if clashes:
            errors.append(ModelLineConfigError(str(path), clashes))
        else:
            configs.append(config)
    return configs, errors
