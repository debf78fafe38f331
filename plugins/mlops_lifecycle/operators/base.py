"""What every lifecycle operator shares: its model-line config, the run's window, hooks and adapters.

``__init__`` only stores arguments; hooks and adapters are cached properties built in the worker.
Values from upstream tasks arrive as XComArgs at parse time and are rendered into the stage
contract's types (``mlops_lifecycle.contract``) before ``execute``; operators annotate them with
those types, so ``make lint`` (mypy) checks every field they read.

Operator modules are named after the stage and the YAML backend value they implement
(``train_databricks.py`` for ``train.backend: databricks``); stage-neutral steps live in
``registry.py`` (gate, stage, promote, restore) and ``verify.py``; what both backends of a stage
share lives in ``extract.py``, ``train.py`` and ``review.py``.
"""

from __future__ import annotations

import subprocess
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

from airflow.sdk import BaseOperator

from mlops_lifecycle import paths
from mlops_lifecycle.config import ModelLineConfig
from mlops_lifecycle.exceptions import LifecycleError, Superseded
from mlops_lifecycle.window import DataWindow, resolve_window, run_key_interval

if TYPE_CHECKING:
    from airflow.sdk import Context

    from mlops_lifecycle.contract import DeploymentRepository
    from mlops_lifecycle.hooks.mlflow_registry import MlflowRegistryHook

ASSET_TRIGGERED = "asset_triggered"  # a run the drift monitor's retrain request started
BACKFILL = "backfill"  # a backtest (lifecycle) or a look at past intervals (monitor)


def run_type(context: Context) -> str:
    """The run's type as a string: scheduled, manual, backfill, asset_triggered."""
    value = getattr(context.get("dag_run"), "run_type", None)
    return str(getattr(value, "value", value))


#: an upstream task's output: an XComArg when the DAG is built, the contract's value in ``execute``
Upstream = Any

SectionT = TypeVar("SectionT")


class LifecycleOperator(BaseOperator):
    ui_color = "#e8f1fb"

    def __init__(self, *, config: ModelLineConfig, mlflow_conn_id: str = "mlflow_default", **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.mlflow_conn_id = mlflow_conn_id
        self.recorded_links: dict[str, str] = {}

    def window(self, context: Context) -> DataWindow:
        dag_run = context.get("dag_run")
        return resolve_window(
            self.config,
            context.get("data_interval_start"),
            context.get("data_interval_end"),
            getattr(dag_run, "run_after", None),
            requested=run_type(context) == ASSET_TRIGGERED,
        )

    @staticmethod
    def airflow_ids(context: Context) -> dict[str, str]:
        ti = context["ti"]
        return {"airflow.dag_id": ti.dag_id, "airflow.run_id": ti.run_id}

    @staticmethod
    def run_ref(context: Context) -> str:
        """Who did it, in audit records: ``airflow:<dag_id>/<run_id>``."""
        ti = context["ti"]
        return f"airflow:{ti.dag_id}/{ti.run_id}"

    def set_link(self, key: str, url: str | None) -> None:
        """Record an Extra Link for the UI (stored in XCom): never with credentials in it."""
        if url:
            from mlops_lifecycle.urls import without_userinfo

            self.recorded_links[key] = without_userinfo(url)

    @cached_property
    def registry(self) -> MlflowRegistryHook:
        from mlops_lifecycle.hooks.mlflow_registry import MlflowRegistryHook

        return MlflowRegistryHook(self.mlflow_conn_id)

    @cached_property
    def deployment_repo(self) -> DeploymentRepository:
        """The line's deployment repository, through the adapter of its review backend."""
        from mlops_lifecycle.deployment_repository import open_repository

        return open_repository(self.config)

    def section(self, value: object, kind: type[SectionT]) -> SectionT:
        """A config section narrowed to the backend this operator implements (the DAG factory guarantees it)."""
        if not isinstance(value, kind):
            raise LifecycleError(
                f"{type(self).__name__} implements {kind.__name__}, but model line {self.config.model_line} "
                f"configures {type(value).__name__}: the DAG factory picked the wrong operator"
            )
        return value

    def model_version_url(self, version: str) -> str | None:
        return self.registry.model_version_url(self.config.registry.model_name, version)

    def superseded_because(self, run_key: str, version: str | None = None) -> str | None:
        """Why a run for ``run_key`` (candidate ``version``, once trained) must not deploy or promote, or None.

        Production only moves forward: a run whose data window ends before the window of the version
        production serves is superseded, and so is another version of a window that ends at the same
        time. The same version (a re-run of production's own window) is not: it finds what was done.
        """
        reg = self.config.registry
        serving = self.registry.alias_version(reg.model_name, reg.production_alias)
        if serving is None or serving == version:
            return None
        serving_key = self.registry.version_tags(reg.model_name, serving).get("audit.run_key")
        if not serving_key:
            return None  # staged by hand, not by a lifecycle run: no window to compare with
        _, serving_end = run_key_interval(serving_key)
        _, end = run_key_interval(run_key)
        if end > serving_end or (end == serving_end and version is None):
            return None
        return (
            f"superseded by v{serving} (window {serving_key}): production serves a model of data up to "
            f"{serving_end:%Y-%m-%d %H:%M} UTC, and this run's window {run_key} ends "
            f"{'before' if end < serving_end else 'at the same time'}; nothing deployed. Production only moves "
            "forward: going back is a rollback, not a re-run"
        )

    def ensure_not_superseded(self, run_key: str, version: str) -> None:
        """Stop (a decision: not retried) before any deploy or promotion step of a superseded candidate."""
        because = self.superseded_because(run_key, version)
        if because:
            raise Superseded(f"{self.config.registry.model_name} v{version}: {because}")


def event_or_fail(event: dict[str, Any] | None, rejected: type[Exception]) -> dict[str, Any]:
    """Validate a trigger event: success passes; rejected is a decision; timeout/error may be retried."""
    if not event or "status" not in event:
        raise LifecycleError(f"Malformed trigger event: {event!r}")
    if event["status"] == "success":
        return event
    if event["status"] in ("rejected", "timeout"):
        # a decision (or a deadline from the YAML): retrying the wait cannot change it
        raise rejected(event["message"] + ". Registry unchanged.")
    raise LifecycleError(event.get("message", str(event)) + ". Registry unchanged.")


def full_code_revision() -> str:
    """The full commit of the package a remote run checks out (``MLOPS_CODE_REVISION`` or git HEAD).

    Images built without ``.git`` set ``MLOPS_CODE_REVISION`` at build time. Uncommitted changes
    are refused: a remote run would silently train the committed code instead.
    """
    revision = code_revision(short=False)
    if revision.endswith("-dirty") or revision.startswith("unknown"):
        raise LifecycleError(
            f"Training code revision is {revision}: a remote run checks out a commit, so commit (and push) "
            f"{paths.include_dir()} first, or set MLOPS_CODE_REVISION"
        )
    return revision


def code_revision(short: bool = True) -> str:
    """Git revision of the training code, SQL and model lines (``-dirty`` with uncommitted changes)."""
    import os

    if os.environ.get("MLOPS_CODE_REVISION"):
        return os.environ["MLOPS_CODE_REVISION"][:12] if short else os.environ["MLOPS_CODE_REVISION"]
    root = str(paths.include_dir())
    rev = subprocess.run(
        ["git", "-C", root, "rev-parse", *(["--short=12"] if short else []), "HEAD"], capture_output=True, text=True
    )
    if rev.returncode != 0:
        return "unknown (not a git checkout)"
    dirty = subprocess.run(
        ["git", "-C", root, "status", "--porcelain", "--", "training", "sql", "model_lines"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return rev.stdout.strip() + ("-dirty" if dirty else "")
