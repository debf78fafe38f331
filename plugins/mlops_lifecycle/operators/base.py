"""What every lifecycle operator shares: its model-line config, the run's window, hooks and adapters.

``__init__`` only stores arguments; hooks and adapters are cached properties built in the worker.
"""

from __future__ import annotations

import subprocess
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from mlops_lifecycle import paths
from mlops_lifecycle.config import ModelLineConfig
from mlops_lifecycle.window import DataWindow, resolve_window

if TYPE_CHECKING:
    from airflow.sdk import Context

    from mlops_lifecycle.adapters.local_git import LocalGitRepository
    from mlops_lifecycle.hooks.gitlab import GitLabDeploymentRepository, GitLabHook
    from mlops_lifecycle.hooks.mlflow_registry import MlflowRegistryHook


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
        )

    @staticmethod
    def airflow_ids(context: Context) -> dict[str, str]:
        ti = context["ti"]
        return {"airflow.dag_id": ti.dag_id, "airflow.run_id": ti.run_id}

    def set_link(self, key: str, url: str | None) -> None:
        if url:
            self.recorded_links[key] = url

    @cached_property
    def registry(self) -> MlflowRegistryHook:
        from mlops_lifecycle.hooks.mlflow_registry import MlflowRegistryHook

        return MlflowRegistryHook(self.mlflow_conn_id)

    @cached_property
    def deployment_repo(self) -> LocalGitRepository | GitLabDeploymentRepository:
        """The deployment repository: a GitLab project, or the embedded local git repository."""
        review = self.config.review
        if review.backend == "gitlab":
            from mlops_lifecycle.hooks.gitlab import GitLabDeploymentRepository

            return GitLabDeploymentRepository(self.gitlab, review.project, review.target_branch)
        from mlops_lifecycle.adapters.local_git import LocalGitRepository

        return LocalGitRepository(paths.local_home() / review.repository)

    @cached_property
    def gitlab(self) -> GitLabHook:
        from mlops_lifecycle.hooks.gitlab import GitLabHook

        review = self.config.review
        if review.backend != "gitlab":
            raise TypeError(f"{self.config.model_line}: review.backend is {review.backend}, not gitlab")
        return GitLabHook(review.gitlab_conn_id)

    def model_version_url(self, version: str) -> str | None:
        return self.registry.model_version_url(self.config.registry.model_name, version)


def full_code_revision() -> str:
    """The full commit of the package a remote run checks out (``MLOPS_CODE_REVISION`` or git HEAD).

    Images built without ``.git`` set ``MLOPS_CODE_REVISION`` at build time. Uncommitted changes
    are refused: a remote run would silently train the committed code instead.
    """
    revision = code_revision(short=False)
    if revision.endswith("-dirty") or revision.startswith("unknown"):
        from mlops_lifecycle.exceptions import LifecycleError

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
