"""The deployment repository as a GitLab project (``review.backend: gitlab``), through :class:`GitLabHook`.

Reviews are branches with a merge request (opened by the review operator); people merge them in
GitLab, so this adapter does not merge. The production changelog is committed on the target branch
with ``[skip ci]``.
"""

from __future__ import annotations

from collections.abc import Mapping

from mlops_lifecycle.hooks.gitlab import GitLabHook, naming


class GitLabDeploymentRepository:
    """The deployment repository on GitLab (fills :class:`mlops_lifecycle.contract.DeploymentRepository`).

    ``open_review`` commits the proposal on a review branch; ``append_on_main`` writes the
    production changelog on the target branch. Appends skip an entry whose heading is already there.
    """

    def __init__(self, hook: GitLabHook, project: str, target_branch: str) -> None:
        self.hook = hook
        self.project = project
        self.main = target_branch

    @property
    def location(self) -> str:
        return self.hook.web_url(self.project)

    def read(self, ref: str, path: str) -> str | None:
        return self.hook.read_file(self.project, path, ref)

    def _appended(self, current: str | None, entry: str) -> str:
        current = current or ""
        heading = entry.splitlines()[0]
        if heading in current.splitlines():
            return current
        return current + ("" if not current or current.endswith("\n") else "\n") + entry

    def open_review(self, branch: str, replace: Mapping[str, str], append: Mapping[str, str], message: str) -> str:
        with naming(self.project, f"committing the review on branch {branch}"):
            self.hook.ensure_branch(self.project, branch, self.main)
            files = dict(replace)
            for path, entry in append.items():
                files[path] = self._appended(self.read(branch, path), entry)
            sha, _ = self.hook.commit_files(self.project, branch, files, message)
        return sha

    def append_on_main(self, path: str, entry: str, message: str) -> str:
        """Commit on the target branch with ``[skip ci]``: a changelog line must not redeploy anything."""
        with naming(self.project, f"appending to {path} on {self.main}"):
            content = self._appended(self.read(self.main, path), entry)
            sha, _ = self.hook.commit_files(self.project, self.main, {path: content}, f"{message} [skip ci]")
        return sha
