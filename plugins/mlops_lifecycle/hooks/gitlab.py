"""GitLab (REST v4 through python-gitlab), reached through an Airflow connection. There is no provider.

Connection ``gitlab_default`` (type ``http``): ``host`` is the GitLab URL (``https://gitlab.example.com``;
``schema``/``port`` are used when the host has no scheme), ``password`` is an access token with the
``api`` scope. Optional ``extra``: ``timeout`` (seconds per request, default 30), ``max_retries``
(default 6), ``verify_ssl`` (default true), ``web_url`` (for links, default the API URL).

python-gitlab retries 5xx, dropped connections and 429 (sleeping ``Retry-After`` when given, an
exponential backoff otherwise). It also retries a POST whose connection dropped after GitLab acted,
so every write here is made idempotent at the application level: read, compare, write only what is
missing, and on a write error read again before giving up.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

from mlops_lifecycle.exceptions import LifecycleError

if TYPE_CHECKING:
    from collections.abc import Mapping

    import gitlab
    from gitlab.v4.objects import Project


@dataclass(frozen=True)
class GitLabSettings:
    url: str
    token: str = field(repr=False)
    timeout: float = 30.0
    max_retries: int = 6
    verify_ssl: bool = True
    web_url: str = ""


@dataclass(frozen=True)
class MergeRequestState:
    iid: int
    state: str  # opened | closed | locked | merged
    web_url: str
    author: str
    approvers: tuple[str, ...]
    merge_commit_sha: str | None
    merged_by: str | None
    merged_at: str | None
    closed_by: str | None

    @property
    def independent_approvers(self) -> tuple[str, ...]:
        """Approvers other than the author (an author approving their own MR does not count)."""
        return tuple(a for a in self.approvers if a != self.author)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "approvers": list(self.approvers)}


@dataclass(frozen=True)
class PipelineState:
    id: int
    status: str
    web_url: str
    sha: str
    ref: str


@dataclass(frozen=True)
class DeploymentState:
    id: int
    environment: str
    status: str
    sha: str
    job: str | None
    pipeline_id: int | None
    updated_at: str | None


class GitLabHook(BaseHook):
    conn_name_attr = "gitlab_conn_id"
    default_conn_name = "gitlab_default"
    conn_type = "http"
    hook_name = "GitLab (lifecycle)"

    def __init__(self, gitlab_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.gitlab_conn_id = gitlab_conn_id

    # connection ------------------------------------------------------------------------------
    @classmethod
    def settings_from(cls, conn: Any) -> GitLabSettings:
        if not conn.host:
            raise LifecycleError(f"Connection '{conn.conn_id}' needs a host: the GitLab URL")
        if not conn.password:
            raise LifecycleError(f"Connection '{conn.conn_id}' needs a password: a GitLab access token (api scope)")
        host = conn.host if "://" in conn.host else f"{conn.schema or 'https'}://{conn.host}"
        url = f"{host}:{conn.port}" if conn.port and "://" not in conn.host else host
        extra = conn.extra_dejson
        return GitLabSettings(
            url=url.rstrip("/"),
            token=conn.password,
            timeout=float(extra.get("timeout", 30)),
            max_retries=int(extra.get("max_retries", 6)),
            verify_ssl=str(extra.get("verify_ssl", True)).strip().lower() not in ("false", "0", "no", "off"),
            web_url=str(extra.get("web_url") or url).rstrip("/"),
        )

    @cached_property
    def settings(self) -> GitLabSettings:
        return self.settings_from(self.get_connection(self.gitlab_conn_id))

    @cached_property
    def client(self) -> gitlab.Gitlab:
        return self.client_for(self.settings)

    @staticmethod
    def client_for(settings: GitLabSettings) -> gitlab.Gitlab:
        import gitlab

        client = gitlab.Gitlab(
            settings.url,
            private_token=settings.token,
            timeout=settings.timeout,
            ssl_verify=settings.verify_ssl,
            retry_transient_errors=True,
            user_agent="mlops-lifecycle (airflow)",
        )
        # python-gitlab reads max_retries per request; keep it bounded so a flapping server fails the try
        client.http_request = _bounded(client.http_request, settings.max_retries)  # type: ignore[method-assign]
        return client

    def project(self, path: str) -> Project:
        return self.client.projects.get(path, lazy=True)

    def current_user(self) -> str:
        self.client.auth()
        return self.client.user.username  # type: ignore[union-attr]

    # repository -------------------------------------------------------------------------------
    def branch_head(self, project: str, branch: str) -> str | None:
        import gitlab

        try:
            return self.project(project).branches.get(branch).commit["id"]
        except gitlab.GitlabGetError as exc:
            if exc.response_code == 404:
                return None
            raise

    def ensure_branch(self, project: str, branch: str, ref: str) -> str:
        """The branch's head; created from ``ref`` if missing (a retry finds the first try's branch)."""
        import gitlab

        head = self.branch_head(project, branch)
        if head is not None:
            return head
        try:
            return self.project(project).branches.create({"branch": branch, "ref": ref}).commit["id"]
        except gitlab.GitlabCreateError:
            head = self.branch_head(project, branch)  # created by a try whose answer we never heard
            if head is None:
                raise
            return head

    def read_file(self, project: str, path: str, ref: str) -> str | None:
        found = self._file(project, path, ref)
        return found[0] if found else None

    def _file(self, project: str, path: str, ref: str) -> tuple[str, str] | None:
        """(content, last commit id of the file) at ``ref``, or None."""
        import gitlab

        try:
            f = self.project(project).files.get(file_path=path, ref=ref)
        except gitlab.GitlabGetError as exc:
            if exc.response_code == 404:
                return None
            raise
        return base64.b64decode(f.content).decode(), f.last_commit_id

    def commit_files(self, project: str, branch: str, files: Mapping[str, str], message: str) -> tuple[str, bool]:
        """Make ``branch`` hold ``files`` with one commit; (head sha, whether a commit was made now).

        Only files whose content differs are written; when none differ (a retry after the first
        try's commit landed) nothing is committed. Updates carry the file's ``last_commit_id``, so a
        request that python-gitlab re-sends after a lost answer is refused instead of applied twice.
        """
        import gitlab

        def actions() -> list[dict[str, str]]:
            out = []
            for path, content in files.items():
                current = self._file(project, path, branch)
                if current is None:
                    out.append({"action": "create", "file_path": path, "content": content})
                elif current[0] != content:
                    out.append(
                        {"action": "update", "file_path": path, "content": content, "last_commit_id": current[1]}
                    )
            return out

        todo = actions()
        if not todo:
            return self.branch_head(project, branch) or "", False
        try:
            commit = self.project(project).commits.create(
                {"branch": branch, "commit_message": message, "actions": todo}
            )
            return commit.id, True
        except gitlab.GitlabCreateError:
            if actions():  # not our own earlier write: a real conflict
                raise
            return self.branch_head(project, branch) or "", False

    # merge requests --------------------------------------------------------------------------
    def find_merge_request(self, project: str, source: str, target: str) -> Any | None:
        """The newest MR from ``source`` to ``target`` that is open or merged (closed ones are history)."""
        mrs = self.project(project).mergerequests.list(
            source_branch=source, target_branch=target, state="all", order_by="created_at", sort="desc", get_all=True
        )
        for mr in mrs:
            if mr.state in ("opened", "merged", "locked"):
                return mr
        return mrs[0] if mrs else None

    def ensure_merge_request(
        self,
        project: str,
        source: str,
        target: str,
        title: str,
        description: str,
        labels: list[str],
        reviewers: list[str],
    ) -> tuple[Any, bool]:
        """(MR, created now). One MR per source branch: a retry finds the first try's MR."""
        import gitlab

        with naming(project, f"opening the merge request {source} -> {target}"):
            existing = self.find_merge_request(project, source, target)
            if existing is not None and existing.state != "closed":
                return existing, False
            data: dict[str, Any] = {
                "source_branch": source,
                "target_branch": target,
                "title": title,
                "description": description,
                "labels": ",".join(labels),
                "remove_source_branch": False,
            }
            reviewer_ids = self.user_ids(reviewers)
            if reviewer_ids:
                data["reviewer_ids"] = reviewer_ids
            try:
                return self.project(project).mergerequests.create(data), True
            except gitlab.GitlabCreateError:
                found = self.find_merge_request(project, source, target)  # 409: our own earlier try made it
                if found is None or found.state == "closed":
                    raise
                return found, False

    def user_ids(self, usernames: list[str]) -> list[int]:
        ids = []
        for name in usernames:
            users = self.client.users.list(username=name)
            if not users:
                raise LifecycleError(f"GitLab has no user '{name}' (review.reviewers)")
            ids.append(users[0].id)
        return ids

    def merge_request_state(self, project: str, iid: int) -> MergeRequestState:
        p = self.project(project)
        mr = p.mergerequests.get(iid)
        approvals = mr.approvals.get()
        approvers = tuple(a["user"]["username"] for a in getattr(approvals, "approved_by", []) or [])
        return MergeRequestState(
            iid=mr.iid,
            state=mr.state,
            web_url=mr.web_url,
            author=mr.author["username"],
            approvers=approvers,
            # fast-forward and squash merges leave merge_commit_sha empty: the MR's commit is on the target
            merge_commit_sha=(
                getattr(mr, "merge_commit_sha", None)
                or getattr(mr, "squash_commit_sha", None)
                or (getattr(mr, "sha", None) if mr.state == "merged" else None)
            ),
            merged_by=((getattr(mr, "merged_by", None) or {}).get("username")),
            merged_at=getattr(mr, "merged_at", None),
            closed_by=((getattr(mr, "closed_by", None) or {}).get("username")),
        )

    # delivery --------------------------------------------------------------------------------
    def pipelines_for(self, project: str, sha: str, ref: str | None = None) -> list[PipelineState]:
        """Pipelines of commit ``sha`` (on branch ``ref``, if given), newest first."""
        filters: dict[str, Any] = {"sha": sha} if ref is None else {"sha": sha, "ref": ref}
        found = self.project(project).pipelines.list(**filters, order_by="id", sort="desc", get_all=True)
        return [PipelineState(p.id, p.status, p.web_url, p.sha, p.ref) for p in found]

    def deployments_for(self, project: str, sha: str, environment: str) -> list[DeploymentState]:
        """Deployments of commit ``sha`` to ``environment``, newest first."""
        found = self.project(project).deployments.list(
            environment=environment, order_by="id", sort="desc", get_all=True
        )
        out = []
        for d in found:
            if d.sha != sha:
                continue
            job = d.deployable or {}
            out.append(
                DeploymentState(
                    id=d.id,
                    environment=d.environment["name"],
                    status=d.status,
                    sha=d.sha,
                    job=job.get("name"),
                    pipeline_id=(job.get("pipeline") or {}).get("id"),
                    updated_at=getattr(d, "updated_at", None),
                )
            )
        return out

    def web_url(self, project: str) -> str:
        return f"{self.settings.web_url}/{project}"


@contextmanager
def naming(project: str, operation: str) -> Iterator[None]:
    """Re-raise GitLab errors as a (retryable) LifecycleError naming the project and the operation."""
    import gitlab
    import requests

    try:
        yield
    except LifecycleError:
        raise
    except (gitlab.GitlabError, requests.RequestException) as exc:
        raise LifecycleError(f"GitLab {project}: {operation} failed: {type(exc).__name__}: {exc}") from exc


def _bounded(http_request: Any, max_retries: int) -> Any:
    def request(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("max_retries", max_retries)
        return http_request(*args, **kwargs)

    return request
