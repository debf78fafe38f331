"""The deployment repository: its layout, and the adapter for a model line's review backend.

Layout (the same in a local git repository and in the GitLab project made from ``include/deployment``):
``models/<line>.yaml`` pins the version a line serves, ``changelog/<line>.md`` records every proposal
and promotion, and each candidate is reviewed on the branch ``review/<line>/v<version>``.

Adapters (both fill :class:`mlops_lifecycle.contract.DeploymentRepository`):
``local_git.LocalGitRepository`` (``review.backend: local_git``) and
``gitlab.GitLabDeploymentRepository`` (``review.backend: gitlab``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from mlops_lifecycle import paths

if TYPE_CHECKING:
    from mlops_lifecycle.config import ModelLineConfig
    from mlops_lifecycle.contract import DeploymentRepository
    from mlops_lifecycle.deployment_repository.local_git import LocalGitRepository


def pin_path(model_line: str) -> str:
    return f"models/{model_line}.yaml"


def changelog_path(model_line: str) -> str:
    return f"changelog/{model_line}.md"


def review_branch(model_line: str, version: str) -> str:
    return f"review/{model_line}/v{version}"


def local_repository(config: ModelLineConfig) -> LocalGitRepository:
    """The local git repository of a line with ``review.backend: local_git``."""
    from mlops_lifecycle.config import ReviewLocalGit
    from mlops_lifecycle.deployment_repository.local_git import LocalGitRepository

    if not isinstance(config.review, ReviewLocalGit):
        raise TypeError(f"{config.model_line}: review.backend is {config.review.backend}, not local_git")
    return LocalGitRepository(paths.local_home() / config.review.repository)


def _gitlab(config: ModelLineConfig) -> DeploymentRepository:
    from mlops_lifecycle.config import ReviewGitLab
    from mlops_lifecycle.deployment_repository.gitlab import GitLabDeploymentRepository
    from mlops_lifecycle.hooks.gitlab import GitLabHook

    review = config.review
    if not isinstance(review, ReviewGitLab):
        raise TypeError(f"{config.model_line}: review.backend is {review.backend}, not gitlab")
    return GitLabDeploymentRepository(GitLabHook(review.gitlab_conn_id), review.project, review.target_branch)


#: ``review.backend`` -> how to open that line's deployment repository
ADAPTERS: dict[str, Callable[[ModelLineConfig], DeploymentRepository]] = {
    "local_git": local_repository,
    "gitlab": _gitlab,
}


def open_repository(config: ModelLineConfig) -> DeploymentRepository:
    """The deployment repository of ``config``'s line, through the adapter of its review backend."""
    return ADAPTERS[config.review.backend](config)
