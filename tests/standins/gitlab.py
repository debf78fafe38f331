"""A GitLab REST API v4 stand-in for one project, driven through the real python-gitlab client.

It serves the subset of the documented v4 contract the lifecycle's GitLab adapter uses: users,
the project, branches, files, commits (multi-file actions), merge requests with approvals and
notes, pipelines with jobs, deployments and environments. State is in memory: commits carry a full
file snapshot, branches point at commits, merge commits have two parents.

Tests play the humans and the CI through Python methods (:meth:`GitLabStandIn.approve`,
:meth:`GitLabStandIn.merge`, :meth:`GitLabStandIn.close`), or let :class:`AutoReview` do it; a merge
starts a simulated pipeline (:class:`CIPlan`) that deploys to each environment in order and can call
back into the test (``on_deploy``) to start a real service for the pinned files.

Contract notes (what python-gitlab relies on):

- project ids are numeric or the percent-encoded path (``platform%2Fdeploy-repo``); file paths and
  branch names in URLs are percent-encoded too, so every route matches the raw path;
- lists are paginated with ``page``/``per_page`` (default 20, max 100) and answer with ``Link``
  (``rel="next"`` is what ``iterator=True``/``get_all=True`` follow) and ``X-Page``, ``X-Per-Page``,
  ``X-Next-Page``, ``X-Prev-Page``, ``X-Total``, ``X-Total-Pages``;
- errors are ``{"message": ...}`` (or ``{"error": ...}`` for a missing parameter), with GitLab's
  status codes: 401 unknown token, 404 not found, 400 invalid commit/branch, 409 duplicate MR.
"""

from __future__ import annotations

import base64
import hashlib
import math
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode

from .base import Request, Response, StandIn

API = "/api/v4"
_SEG = r"[^/]+"  # one percent-encoded path segment


# -- configuration of the simulated humans and CI -------------------------------------------------
@dataclass
class CIPlan:
    """What the CI does after a merge: a pipeline on the merge commit of the target branch.

    A ``test`` job runs first (``pipeline_status`` other than ``"success"`` fails it, and the pipeline,
    before any deployment); then one ``deploy:<env>`` job and one deployment per environment, in order.
    ``deployment_status`` gives the final status per environment (default ``"success"``); a deployment
    that does not succeed fails the pipeline and stops later environments. ``on_deploy(environment,
    sha, files)`` is called when a deployment that is meant to succeed runs, with the repository files
    at that sha; if it raises, that deployment fails.
    """

    environments: list[str] = field(default_factory=lambda: ["dev", "staging", "production"])
    pipeline_status: str = "success"
    deployment_status: dict[str, str] = field(default_factory=dict)
    step_seconds: float = 0.2
    on_deploy: Callable[[str, str, dict[str, str]], Any] | None = None
    external_urls: dict[str, str] = field(default_factory=dict)


@dataclass
class AutoReview:
    """When an MR is opened: after ``delay_seconds``, ``approver`` approves it, then merges or closes it."""

    approver: str = "alice"
    merge: bool = True
    close: bool = False
    delay_seconds: float = 0.3


# -- internal state -------------------------------------------------------------------------------
@dataclass
class _Commit:
    id: str
    parent_ids: list[str]
    message: str
    author_name: str
    author_email: str
    created_at: datetime
    files: dict[str, str]
    seq: int


@dataclass
class _MergeRequest:
    id: int
    iid: int
    title: str
    description: str
    source_branch: str
    target_branch: str
    author: str
    labels: list[str]
    reviewers: list[str]
    remove_source_branch: bool
    created_at: datetime
    updated_at: datetime
    state: str = "opened"
    sha: str | None = None  # frozen when the MR stops being open
    merge_commit_sha: str | None = None
    merged_by: str | None = None
    merged_at: datetime | None = None
    closed_by: str | None = None
    closed_at: datetime | None = None
    approvals: list[tuple[str, datetime]] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Job:
    id: int
    name: str
    stage: str
    pipeline_id: int
    created_at: datetime
    environment: str | None = None
    status: str = "created"
    started_at: datetime | None = None
    finished_at: datetime | None = None
    failure_reason: str | None = None


@dataclass
class _Pipeline:
    id: int
    iid: int
    sha: str
    ref: str
    user: str
    created_at: datetime
    updated_at: datetime
    status: str = "pending"
    source: str = "push"
    started_at: datetime | None = None
    finished_at: datetime | None = None
    jobs: list[_Job] = field(default_factory=list)


@dataclass
class _Environment:
    id: int
    name: str
    external_url: str | None
    created_at: datetime
    updated_at: datetime


@dataclass
class _Deployment:
    id: int
    iid: int
    environment: str
    ref: str
    sha: str
    user: str
    job_id: int
    pipeline_id: int
    created_at: datetime
    updated_at: datetime
    status: str = "running"
    finished_at: datetime | None = None


class _ApiError(Exception):
    def __init__(self, status: int, message: Any, key: str = "message") -> None:
        super().__init__(f"{status} {message}")
        self.response = Response(status, {key: message})


def _ts(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def _parse_time(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise _ApiError(400, f"{value!r} is invalid", key="error") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _as_list(value: Any) -> list[str]:
    """A GitLab list parameter: a comma-separated string or a JSON array."""
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [str(part).strip() for part in value if str(part).strip()]


def _blob_id(content: str) -> str:
    data = content.encode()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _tier(environment: str) -> str:
    name = environment.lower()
    if name.startswith("prod"):
        return "production"
    if name.startswith("stag"):
        return "staging"
    if name.startswith(("dev", "review")):
        return "development"
    if name.startswith("test"):
        return "testing"
    return "other"


class GitLabStandIn(StandIn):
    """GitLab v4 for one project; see the module docstring. Start it with ``with GitLabStandIn(...) as gl:``."""

    name = "gitlab"

    def __init__(
        self,
        users: dict[str, str],
        project_path: str = "platform/deploy-repo",
        default_branch: str = "main",
        initial_files: dict[str, str] | None = None,
        *,
        ci: CIPlan | None = None,
        auto_review: AutoReview | None = None,
        approvals_required: int = 1,
        project_id: int = 42,
    ) -> None:
        super().__init__()
        self.tokens = dict(users)  # private token -> username
        self.project_path = project_path
        self.project_id = project_id
        self.default_branch = default_branch
        self.ci = ci if ci is not None else CIPlan()
        self.auto_review = auto_review
        self.approvals_required = approvals_required
        self.deploy_errors: list[tuple[str, str, str]] = []  # (environment, sha, error) from on_deploy
        self._user_ids: dict[str, int] = {}
        for username in users.values():
            self._user(username)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._seq = 0
        self._last_now = datetime.now(UTC)
        self._ids = {"mr": 100, "note": 1000, "pipeline": 2000, "job": 5000, "deployment": 300, "env": 10}
        self._commits: dict[str, _Commit] = {}
        self._branches: dict[str, str] = {}
        self._mrs: dict[int, _MergeRequest] = {}
        self._pipelines: dict[int, _Pipeline] = {}
        self._deployments: dict[int, _Deployment] = {}
        self._environments: dict[str, _Environment] = {}
        files = initial_files if initial_files is not None else {"README.md": f"# {project_path}\n"}
        root = self._new_commit([], "Initial commit", "Administrator", "admin@example.com", dict(files))
        self._branches[default_branch] = root.id
        self._register_routes()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> GitLabStandIn:
        super().start()
        # base.py writes headers and body separately: with Nagle on, each answer waits ~40 ms for a
        # delayed ACK. Handlers are made per connection, so setting this after start is in time.
        assert self._server is not None
        self._server.RequestHandlerClass.disable_nagle_algorithm = True  # type: ignore[attr-defined]
        return self

    def __enter__(self) -> GitLabStandIn:
        return self.start()

    def stop(self) -> None:
        self._stopping.set()
        server = self._server
        if server is not None:
            # serve_forever only notices shutdown() between 0.5 s polls; a connection wakes it at once
            stopper = threading.Thread(target=server.shutdown, daemon=True)
            stopper.start()
            while stopper.is_alive():
                try:
                    socket.create_connection(server.server_address[:2], timeout=0.5).close()
                except OSError:
                    pass
                stopper.join(0.02)
        super().stop()

    def wait_background(self, timeout: float = 10.0) -> None:
        """Wait for auto-review and CI threads started so far to finish (tests call this before asserting)."""
        deadline = datetime.now(UTC) + timedelta(seconds=timeout)
        while True:
            with self.lock:
                alive = [t for t in self._threads if t.is_alive()]
            if not alive:
                return
            left = (deadline - datetime.now(UTC)).total_seconds()
            if left <= 0:
                raise TimeoutError(f"gitlab stand-in: background work still running: {[t.name for t in alive]}")
            alive[0].join(left)

    # -- test control: the humans ------------------------------------------------------------
    def approve(self, iid: int, username: str) -> None:
        """``username`` approves MR ``iid`` (an author approval is recorded too: the caller must notice it)."""
        with self.lock:
            mr = self._mr(iid)
            if mr.state != "opened":
                raise ValueError(f"MR !{iid} is {mr.state}; only an opened MR can be approved")
            self._user(username)
            if username not in [u for u, _ in mr.approvals]:
                now = self._now()
                mr.approvals.append((username, now))
                mr.updated_at = now
                self._note(mr, username, "approved this merge request", system=True)

    def merge(self, iid: int, username: str) -> str:
        """Merge MR ``iid`` as ``username``: a merge commit on the target branch, then the CI. Returns its sha."""
        with self.lock:
            mr = self._mr(iid)
            if mr.state != "opened":
                raise ValueError(f"MR !{iid} is {mr.state}; only an opened MR can be merged")
            if mr.source_branch not in self._branches or mr.target_branch not in self._branches:
                raise ValueError(f"MR !{iid}: source or target branch is gone")
            self._user(username)
            source, target = self._branches[mr.source_branch], self._branches[mr.target_branch]
            files = self._merge_files(source, target)
            message = (
                f"Merge branch '{mr.source_branch}' into '{mr.target_branch}'\n\n{mr.title}\n\n"
                f"See merge request {self.project_path}!{mr.iid}"
            )
            commit = self._new_commit([target, source], message, self._name(username), self._email(username), files)
            self._branches[mr.target_branch] = commit.id
            now = self._now()
            mr.state, mr.sha, mr.merge_commit_sha = "merged", source, commit.id
            mr.merged_by, mr.merged_at, mr.updated_at = username, now, now
            self._note(mr, username, "merged", system=True)
            if mr.remove_source_branch:
                self._branches.pop(mr.source_branch, None)
            self._start_pipeline(commit.id, mr.target_branch, username)
            return commit.id

    def close(self, iid: int, username: str) -> None:
        """Close MR ``iid`` as ``username`` (a reviewer rejecting the change)."""
        with self.lock:
            mr = self._mr(iid)
            if mr.state != "opened":
                raise ValueError(f"MR !{iid} is {mr.state}; only an opened MR can be closed")
            self._user(username)
            now = self._now()
            mr.state, mr.sha = "closed", self._branches.get(mr.source_branch, mr.sha)
            mr.closed_by, mr.closed_at, mr.updated_at = username, now, now
            self._note(mr, username, "closed", system=True)

    # -- inspection --------------------------------------------------------------------------
    @property
    def branches(self) -> dict[str, str]:
        """Branch name -> head sha."""
        with self.lock:
            return dict(self._branches)

    @property
    def merge_requests(self) -> list[dict[str, Any]]:
        """Every MR as the API shows it (``GET .../merge_requests/:iid``), by iid."""
        with self.lock:
            return [self._mr_json(mr, detail=True) for mr in sorted(self._mrs.values(), key=lambda m: m.iid)]

    def commits_on(self, branch: str) -> list[dict[str, Any]]:
        """The history of ``branch`` as the API lists it, newest first."""
        with self.lock:
            return [self._commit_json(c) for c in self._log(self._resolve(branch))]

    def file_at(self, ref: str, path: str) -> str | None:
        """The content of ``path`` at ``ref`` (branch or sha), or None."""
        with self.lock:
            try:
                return self._commits[self._resolve(ref)].files.get(path)
            except _ApiError:
                return None

    def notes(self, iid: int) -> list[dict[str, Any]]:
        """The notes of MR ``iid``, oldest first."""
        with self.lock:
            return [dict(note) for note in self._mr(iid).notes]

    @property
    def pipelines(self) -> list[dict[str, Any]]:
        """Every pipeline as the API shows it, by id, each with its ``jobs`` added."""
        with self.lock:
            out = []
            for pipeline in sorted(self._pipelines.values(), key=lambda p: p.id):
                data = self._pipeline_json(pipeline, detail=True)
                data["jobs"] = [self._job_json(job) for job in pipeline.jobs]
                out.append(data)
            return out

    @property
    def deployments(self) -> list[dict[str, Any]]:
        """Every deployment as the API shows it, by id."""
        with self.lock:
            return [self._deployment_json(d) for d in sorted(self._deployments.values(), key=lambda d: d.id)]

    # -- helpers: identity, time, ids --------------------------------------------------------
    def _now(self) -> datetime:
        """Wall-clock UTC, strictly increasing by at least 1 ms so orderings and filters are stable."""
        now = datetime.now(UTC)
        if now <= self._last_now + timedelta(milliseconds=1):
            now = self._last_now + timedelta(milliseconds=1)
        self._last_now = now
        return now

    def _next_id(self, kind: str) -> int:
        self._ids[kind] += 1
        return self._ids[kind]

    def _user(self, username: str) -> int:
        if username not in self._user_ids:
            self._user_ids[username] = len(self._user_ids) + 1
        return self._user_ids[username]

    @staticmethod
    def _name(username: str) -> str:
        return username.replace("-", " ").replace("_", " ").title()

    @staticmethod
    def _email(username: str) -> str:
        return f"{username}@example.com"

    def _user_json(self, username: str | None) -> dict[str, Any] | None:
        if username is None:
            return None
        return {
            "id": self._user(username),
            "username": username,
            "name": self._name(username),
            "state": "active",
            "locked": False,
            "avatar_url": None,
            "web_url": f"{self.url}/{username}",
        }

    @property
    def _web_url(self) -> str:
        return f"{self.url}/{self.project_path}"

    # -- helpers: repository -----------------------------------------------------------------
    def _new_commit(
        self, parents: list[str], message: str, author_name: str, author_email: str, files: dict[str, str]
    ) -> _Commit:
        self._seq += 1
        created = self._now()
        digest = hashlib.sha1(
            f"{self._seq}\0{parents}\0{message}\0{author_name}\0{created.isoformat()}".encode()
        ).hexdigest()
        commit = _Commit(digest, list(parents), message, author_name, author_email, created, files, self._seq)
        self._commits[digest] = commit
        return commit

    def _resolve(self, ref: str) -> str:
        """A branch name, full sha or unambiguous sha prefix (>= 7) -> full sha; 404 otherwise."""
        if ref in self._branches:
            return self._branches[ref]
        if ref in self._commits:
            return ref
        if len(ref) >= 7:
            matches = [sha for sha in self._commits if sha.startswith(ref)]
            if len(matches) == 1:
                return matches[0]
        raise _ApiError(404, "404 Commit Not Found")

    def _ancestors(self, sha: str) -> set[str]:
        seen: set[str] = set()
        stack = [sha]
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(self._commits[current].parent_ids)
        return seen

    def _log(self, head: str, path: str | None = None) -> list[_Commit]:
        """``git log head [-- path]``: ancestors newest first; with a path, the commits that changed it
        (a merge only when it differs from every parent, as git's default history simplification)."""
        commits = sorted((self._commits[sha] for sha in self._ancestors(head)), key=lambda c: c.seq, reverse=True)
        if path is None:
            return commits

        def changed(commit: _Commit) -> bool:
            mine = commit.files.get(path)
            if not commit.parent_ids:
                return mine is not None
            return all(self._commits[p].files.get(path) != mine for p in commit.parent_ids)

        return [c for c in commits if changed(c)]

    def _merge_base(self, a: str, b: str) -> str | None:
        common = self._ancestors(a) & self._ancestors(b)
        return max(common, key=lambda sha: self._commits[sha].seq) if common else None

    def _merge_files(self, source: str, target: str) -> dict[str, str]:
        """A three-way merge of file snapshots; a path changed differently on both sides is a conflict."""
        base_sha = self._merge_base(source, target)
        base = self._commits[base_sha].files if base_sha else {}
        ours, theirs = self._commits[target].files, self._commits[source].files
        merged: dict[str, str] = {}
        conflicts = []
        for path in sorted(set(base) | set(ours) | set(theirs)):
            b, o, t = base.get(path), ours.get(path), theirs.get(path)
            if t == b or o == t:
                value = o
            elif o == b:
                value = t
            else:
                conflicts.append(path)
                continue
            if value is not None:
                merged[path] = value
        if conflicts:
            raise ValueError(f"merge conflict in {conflicts}")
        return merged

    def _commit(
        self,
        username: str,
        branch: str,
        message: str,
        actions: list[dict[str, Any]],
        start_branch: str | None = None,
        start_sha: str | None = None,
        author_name: str | None = None,
        author_email: str | None = None,
        force: bool = False,
    ) -> tuple[_Commit, dict[str, int]]:
        """POST /repository/commits semantics; raises :class:`_ApiError` as GitLab answers."""
        exists = branch in self._branches
        start = start_branch or start_sha
        if start and start != branch and exists and not force:
            raise _ApiError(
                400, f"A branch called '{branch}' already exists. Switch to that branch in order to make changes"
            )
        if start_branch and start_branch not in self._branches:
            raise _ApiError(400, "Invalid start branch name")
        if start_sha and start_sha not in self._commits:
            raise _ApiError(400, "Invalid start sha")
        if start and (force or not exists):
            parent = self._branches[start_branch] if start_branch else start_sha
        elif exists:
            parent = self._branches[branch]
        else:
            raise _ApiError(400, "You can only create or edit files when you are on a branch")
        assert parent is not None
        files = dict(self._commits[parent].files)
        stats = {"additions": 0, "deletions": 0, "total": 0}
        for index, action in enumerate(actions):
            kind = action.get("action")
            path = str(action.get("file_path") or "").lstrip("/")
            if not path:
                raise _ApiError(400, f"actions[{index}][file_path] is missing", key="error")
            content = action.get("content")
            if content is not None and action.get("encoding") == "base64":
                content = base64.b64decode(content).decode()
            last_commit_id = action.get("last_commit_id")
            if kind in ("update", "delete", "move", "chmod") and last_commit_id:
                last = self._log(parent, path)
                if last and last[0].id != last_commit_id:
                    raise _ApiError(400, f"The file has changed since you started editing it: {path}")
            before = files.get(path)
            if kind == "create":
                if path in files:
                    raise _ApiError(400, "A file with this name already exists")
                files[path] = content or ""
            elif kind == "update":
                if path not in files:
                    raise _ApiError(400, "A file with this name doesn't exist")
                files[path] = content or ""
            elif kind == "delete":
                if path not in files:
                    raise _ApiError(400, "A file with this name doesn't exist")
                del files[path]
            elif kind == "move":
                previous = str(action.get("previous_path") or "").lstrip("/")
                if previous not in files:
                    raise _ApiError(400, "A file with this name doesn't exist")
                if path in files and path != previous:
                    raise _ApiError(400, "A file with this name already exists")
                moved = files.pop(previous)
                files[path] = content if content is not None else moved
                before = moved
            elif kind == "chmod":
                if path not in files:
                    raise _ApiError(400, "A file with this name doesn't exist")
            else:
                raise _ApiError(400, f"actions[{index}][action] does not have a valid value", key="error")
            old_lines, new_lines = len((before or "").splitlines()), len((files.get(path) or "").splitlines())
            stats["additions"] += max(0, new_lines - old_lines) if before is not None else new_lines
            stats["deletions"] += max(0, old_lines - new_lines) if path in files else old_lines
        stats["total"] = stats["additions"] + stats["deletions"]
        commit = self._new_commit(
            [parent],
            message,
            author_name or self._name(username),
            author_email or self._email(username),
            files,
        )
        self._branches[branch] = commit.id
        for mr in self._mrs.values():
            if mr.state == "opened" and mr.source_branch == branch:
                mr.updated_at = commit.created_at
                title = message.split("\n", 1)[0]
                self._note(mr, username, f"added 1 commit\n\n* {commit.id[:8]} - {title}", system=True)
        return commit, stats

    # -- helpers: merge requests, CI ---------------------------------------------------------
    def _mr(self, iid: int | str) -> _MergeRequest:
        try:
            return self._mrs[int(iid)]
        except (KeyError, ValueError):
            raise _ApiError(404, "404 Not found") from None

    def _note(self, mr: _MergeRequest, username: str, body: str, system: bool) -> dict[str, Any]:
        now = self._now()
        note = {
            "id": self._next_id("note"),
            "type": None,
            "body": body,
            "attachment": None,
            "author": self._user_json(username),
            "created_at": _ts(now),
            "updated_at": _ts(now),
            "system": system,
            "noteable_id": mr.id,
            "noteable_type": "MergeRequest",
            "noteable_iid": mr.iid,
            "project_id": self.project_id,
            "resolvable": False,
            "confidential": False,
            "internal": False,
        }
        mr.notes.append(note)
        return note

    def _after_open(self, iid: int) -> None:
        review = self.auto_review
        if review is None:
            return

        def run() -> None:
            if self._stopping.wait(review.delay_seconds):
                return
            try:
                with self.lock:
                    if self._mrs[iid].state != "opened":
                        return
                    self.approve(iid, review.approver)
                    if review.close:
                        self.close(iid, review.approver)
                    elif review.merge:
                        self.merge(iid, review.approver)
            except ValueError:
                return  # e.g. closed or conflicting meanwhile: a human would give up too

        self._spawn(f"gitlab-auto-review-!{iid}", run)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _environment(self, name: str) -> _Environment:
        if name not in self._environments:
            now = self._now()
            url = self.ci.external_urls.get(name)
            self._environments[name] = _Environment(self._next_id("env"), name, url, now, now)
        return self._environments[name]

    def _start_pipeline(self, sha: str, ref: str, username: str) -> _Pipeline:
        plan = self.ci
        now = self._now()
        pipeline = _Pipeline(self._next_id("pipeline"), len(self._pipelines) + 1, sha, ref, username, now, now)
        pipeline.jobs.append(_Job(self._next_id("job"), "test", "test", pipeline.id, now))
        for env in plan.environments:
            self._environment(env)
            pipeline.jobs.append(_Job(self._next_id("job"), f"deploy:{env}", f"deploy-{env}", pipeline.id, now, env))
        self._pipelines[pipeline.id] = pipeline
        files = dict(self._commits[sha].files)
        self._spawn(f"gitlab-ci-{pipeline.id}", lambda: self._run_pipeline(pipeline, plan, files))
        return pipeline

    def _finish(self, pipeline: _Pipeline, status: str) -> None:
        now = self._now()
        pipeline.status, pipeline.finished_at, pipeline.updated_at = status, now, now
        for job in pipeline.jobs:
            if job.status == "created":
                job.status = "skipped"

    def _run_pipeline(self, pipeline: _Pipeline, plan: CIPlan, files: dict[str, str]) -> None:
        def step() -> bool:
            return not self._stopping.wait(plan.step_seconds)

        test_job = pipeline.jobs[0]
        if not step():
            return
        with self.lock:
            now = self._now()
            pipeline.status, pipeline.started_at, pipeline.updated_at = "running", now, now
            test_job.status, test_job.started_at = "running", now
        if not step():
            return
        with self.lock:
            test_job.finished_at = self._now()
            if plan.pipeline_status != "success":
                test_job.status = plan.pipeline_status
                test_job.failure_reason = "script_failure" if plan.pipeline_status == "failed" else None
                self._finish(pipeline, plan.pipeline_status)
                return
            test_job.status = "success"
        for job in pipeline.jobs[1:]:
            env = job.environment
            assert env is not None
            status = plan.deployment_status.get(env, "success")
            with self.lock:
                now = self._now()
                job.status, job.started_at = "running", now
                environment = self._environment(env)
                environment.updated_at = now
                deployment = _Deployment(
                    self._next_id("deployment"),
                    len(self._deployments) + 1,
                    env,
                    pipeline.ref,
                    pipeline.sha,
                    pipeline.user,
                    job.id,
                    pipeline.id,
                    now,
                    now,
                )
                self._deployments[deployment.id] = deployment
            if status == "success" and plan.on_deploy is not None:
                try:
                    plan.on_deploy(env, pipeline.sha, dict(files))
                except Exception as exc:  # the deploy script failed: so does the deployment
                    status = "failed"
                    with self.lock:
                        self.deploy_errors.append((env, pipeline.sha, f"{type(exc).__name__}: {exc}"))
            if not step():
                return
            with self.lock:
                now = self._now()
                job.status, job.finished_at = status, now
                job.failure_reason = "script_failure" if status == "failed" else None
                deployment.status, deployment.updated_at = status, now
                deployment.finished_at = now if status in ("success", "failed", "canceled") else None
                if status != "success":
                    self._finish(pipeline, "canceled" if status == "canceled" else "failed")
                    return
        with self.lock:
            self._finish(pipeline, "success")

    # -- JSON views --------------------------------------------------------------------------
    def _commit_json(self, c: _Commit) -> dict[str, Any]:
        return {
            "id": c.id,
            "short_id": c.id[:8],
            "created_at": _ts(c.created_at),
            "parent_ids": list(c.parent_ids),
            "title": c.message.split("\n", 1)[0],
            "message": c.message,
            "author_name": c.author_name,
            "author_email": c.author_email,
            "authored_date": _ts(c.created_at),
            "committer_name": c.author_name,
            "committer_email": c.author_email,
            "committed_date": _ts(c.created_at),
            "trailers": {},
            "extended_trailers": {},
            "web_url": f"{self._web_url}/-/commit/{c.id}",
        }

    def _branch_json(self, name: str) -> dict[str, Any]:
        head = self._branches[name]
        default_head = self._branches.get(self.default_branch)
        return {
            "name": name,
            "commit": self._commit_json(self._commits[head]),
            "merged": name != self.default_branch
            and default_head is not None
            and head in self._ancestors(default_head),
            "protected": name == self.default_branch,
            "default": name == self.default_branch,
            "developers_can_push": False,
            "developers_can_merge": False,
            "can_push": True,
            "web_url": f"{self._web_url}/-/tree/{name}",
        }

    def _mr_sha(self, mr: _MergeRequest) -> str | None:
        if mr.state == "opened":
            return self._branches.get(mr.source_branch, mr.sha)
        return mr.sha

    def _approved(self, mr: _MergeRequest) -> bool:
        return len(mr.approvals) >= max(1, self.approvals_required)

    def _mr_json(self, mr: _MergeRequest, detail: bool = False) -> dict[str, Any]:
        reference = f"!{mr.iid}"
        if mr.state != "opened":
            detailed = "not_open"
        elif not self._approved(mr) and self.approvals_required > 0:
            detailed = "not_approved"
        else:
            detailed = "mergeable"
        data: dict[str, Any] = {
            "id": mr.id,
            "iid": mr.iid,
            "project_id": self.project_id,
            "title": mr.title,
            "description": mr.description,
            "state": mr.state,
            "created_at": _ts(mr.created_at),
            "updated_at": _ts(mr.updated_at),
            "merged_by": self._user_json(mr.merged_by),
            "merge_user": self._user_json(mr.merged_by),
            "merged_at": _ts(mr.merged_at),
            "closed_by": self._user_json(mr.closed_by),
            "closed_at": _ts(mr.closed_at),
            "target_branch": mr.target_branch,
            "source_branch": mr.source_branch,
            "user_notes_count": sum(1 for n in mr.notes if not n["system"]),
            "upvotes": 0,
            "downvotes": 0,
            "author": self._user_json(mr.author),
            "assignees": [],
            "assignee": None,
            "reviewers": [self._user_json(u) for u in mr.reviewers],
            "source_project_id": self.project_id,
            "target_project_id": self.project_id,
            "labels": list(mr.labels),
            "draft": mr.title.lower().startswith(("draft:", "[draft]", "(draft)")),
            "work_in_progress": mr.title.lower().startswith(("draft:", "[draft]", "(draft)")),
            "milestone": None,
            "merge_when_pipeline_succeeds": False,
            "merge_status": "can_be_merged",
            "detailed_merge_status": detailed,
            "sha": self._mr_sha(mr),
            "merge_commit_sha": mr.merge_commit_sha,
            "squash_commit_sha": None,
            "discussion_locked": None,
            "should_remove_source_branch": None,
            "force_remove_source_branch": mr.remove_source_branch,
            "prepared_at": _ts(mr.created_at),
            "reference": reference,
            "references": {"short": reference, "relative": reference, "full": f"{self.project_path}{reference}"},
            "web_url": f"{self._web_url}/-/merge_requests/{mr.iid}",
            "time_stats": {
                "time_estimate": 0,
                "total_time_spent": 0,
                "human_time_estimate": None,
                "human_total_time_spent": None,
            },
            "squash": False,
            "squash_on_merge": False,
            "task_completion_status": {"count": 0, "completed_count": 0},
            "has_conflicts": False,
            "blocking_discussions_resolved": True,
        }
        if detail:
            head = self._mr_sha(mr)
            target = self._branches.get(mr.target_branch)
            base = self._merge_base(head, target) if head and target else None
            data.update(
                {
                    "subscribed": False,
                    "changes_count": None,
                    "latest_build_started_at": None,
                    "latest_build_finished_at": None,
                    "first_deployed_to_production_at": None,
                    "pipeline": None,
                    "head_pipeline": None,
                    "diff_refs": {"base_sha": base, "head_sha": head, "start_sha": target},
                    "merge_error": None,
                    "first_contribution": False,
                    "user": {"can_merge": True},
                }
            )
        return data

    def _approvals_json(self, mr: _MergeRequest, username: str | None = None) -> dict[str, Any]:
        approved_by = [{"user": self._user_json(u)} for u, _ in mr.approvals]
        return {
            "id": mr.id,
            "iid": mr.iid,
            "project_id": self.project_id,
            "title": mr.title,
            "description": mr.description,
            "state": mr.state,
            "created_at": _ts(mr.created_at),
            "updated_at": _ts(mr.updated_at),
            "merge_status": "can_be_merged",
            "approved": self._approved(mr),
            "approvals_required": self.approvals_required,
            "approvals_left": max(0, self.approvals_required - len(mr.approvals)),
            "require_password_to_approve": False,
            "approved_by": approved_by,
            "suggested_approvers": [],
            "approvers": [],
            "approver_groups": [],
            "user_has_approved": username in [u for u, _ in mr.approvals],
            "user_can_approve": username is not None and username not in [u for u, _ in mr.approvals],
            "approval_rules_left": [],
            "has_approval_rules": False,
            "merge_request_approvers_available": False,
            "multiple_approval_rules_available": False,
            "invalid_approvers_rules": [],
        }

    def _pipeline_json(self, p: _Pipeline, detail: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": p.id,
            "iid": p.iid,
            "project_id": self.project_id,
            "sha": p.sha,
            "ref": p.ref,
            "status": p.status,
            "source": p.source,
            "created_at": _ts(p.created_at),
            "updated_at": _ts(p.updated_at),
            "web_url": f"{self._web_url}/-/pipelines/{p.id}",
            "name": None,
        }
        if detail:
            end = p.finished_at
            data.update(
                {
                    "before_sha": self._commits[p.sha].parent_ids[0] if self._commits[p.sha].parent_ids else None,
                    "tag": False,
                    "yaml_errors": None,
                    "user": self._user_json(p.user),
                    "started_at": _ts(p.started_at),
                    "finished_at": _ts(end),
                    "committed_at": None,
                    "duration": round((end - p.started_at).total_seconds()) if end and p.started_at else None,
                    "queued_duration": None,
                    "coverage": None,
                    "detailed_status": {
                        "icon": f"status_{p.status}",
                        "text": p.status,
                        "label": p.status,
                        "group": p.status,
                        "tooltip": p.status,
                        "has_details": True,
                        "details_path": f"/{self.project_path}/-/pipelines/{p.id}",
                    },
                }
            )
        return data

    def _job_json(self, job: _Job) -> dict[str, Any]:
        pipeline = self._pipelines[job.pipeline_id]
        end, start = job.finished_at, job.started_at
        return {
            "id": job.id,
            "status": job.status,
            "stage": job.stage,
            "name": job.name,
            "ref": pipeline.ref,
            "tag": False,
            "coverage": None,
            "allow_failure": False,
            "created_at": _ts(job.created_at),
            "started_at": _ts(start),
            "finished_at": _ts(end),
            "erased_at": None,
            "duration": (end - start).total_seconds() if end and start else None,
            "queued_duration": None,
            "user": self._user_json(pipeline.user),
            "commit": self._commit_json(self._commits[pipeline.sha]),
            "pipeline": self._pipeline_json(pipeline),
            "web_url": f"{self._web_url}/-/jobs/{job.id}",
            "project": {"ci_job_token_scope_enabled": False},
            "artifacts": [],
            "runner": None,
            "runner_manager": None,
            "artifacts_expire_at": None,
            "archived": False,
            "tag_list": [],
            "failure_reason": job.failure_reason,
        }

    def _environment_json(self, env: _Environment, detail: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": env.id,
            "name": env.name,
            "slug": env.name.lower().replace("/", "-").replace("_", "-"),
            "description": None,
            "external_url": env.external_url,
            "state": "available",
            "tier": _tier(env.name),
            "created_at": _ts(env.created_at),
            "updated_at": _ts(env.updated_at),
            "auto_stop_at": None,
        }
        if detail:
            mine = [d for d in self._deployments.values() if d.environment == env.name]
            data["last_deployment"] = self._deployment_json(max(mine, key=lambda d: d.id)) if mine else None
        return data

    def _deployment_json(self, d: _Deployment) -> dict[str, Any]:
        pipeline = self._pipelines[d.pipeline_id]
        job = next(j for j in pipeline.jobs if j.id == d.job_id)
        return {
            "id": d.id,
            "iid": d.iid,
            "ref": d.ref,
            "sha": d.sha,
            "created_at": _ts(d.created_at),
            "updated_at": _ts(d.updated_at),
            "finished_at": _ts(d.finished_at),
            "status": d.status,
            "user": self._user_json(d.user),
            "environment": self._environment_json(self._environments[d.environment]),
            "deployable": self._job_json(job),
            "pending_approval_count": 0,
            "approvals": [],
        }

    # -- HTTP plumbing -----------------------------------------------------------------------
    def _api(self, method: str, pattern: str, handler: Callable[..., Response]) -> None:
        def wrapped(req: Request, **groups: str) -> Response:
            username = self._authenticate(req)
            if username is None:
                return Response(401, {"message": "401 Unauthorized"})
            with self.lock:
                try:
                    project = groups.pop("project", None)
                    if project is not None and project not in (str(self.project_id), self.project_path):
                        raise _ApiError(404, "404 Project Not Found")
                    return handler(req, username, **groups)
                except _ApiError as exc:
                    return exc.response

        self.route(method, API + pattern, wrapped, raw=True)

    def _authenticate(self, req: Request) -> str | None:
        token = req.headers.get("private-token")
        if token is None:
            scheme, _, value = req.headers.get("authorization", "").partition(" ")
            token = value.strip() if scheme.lower() == "bearer" else None
        return self.tokens.get(token) if token else None

    @staticmethod
    def _params(req: Request) -> dict[str, Any]:
        """Query and body parameters merged, as GitLab's API layer does (the body wins)."""
        params: dict[str, Any] = {}
        for key, values in req.query.items():
            params[key[:-2] if key.endswith("[]") else key] = values if key.endswith("[]") else values[-1]
        if req.body:
            content_type = req.headers.get("content-type", "")
            if "application/x-www-form-urlencoded" in content_type:
                for key, values in parse_qs(req.body.decode()).items():
                    params[key[:-2] if key.endswith("[]") else key] = values if key.endswith("[]") else values[-1]
            else:
                try:
                    body = req.json()
                except ValueError as exc:
                    raise _ApiError(400, "400 Bad request - body is not valid JSON") from exc
                if isinstance(body, dict):
                    params.update(body)
        return params

    @staticmethod
    def _require(params: dict[str, Any], *names: str) -> None:
        for name in names:
            if params.get(name) in (None, ""):
                raise _ApiError(400, f"{name} is missing", key="error")

    def _page(self, req: Request, items: list[Any]) -> Response:
        """One page of ``items`` with GitLab's pagination headers (offset pagination)."""
        try:
            per_page = min(max(int(req.arg("per_page") or 20), 1), 100)
            page = max(int(req.arg("page") or 1), 1)
        except ValueError:
            raise _ApiError(400, "page or per_page is invalid", key="error") from None
        total = len(items)
        pages = max(1, math.ceil(total / per_page))
        kept = [(k, v) for k, values in req.query.items() if k not in ("page", "per_page") for v in values]

        def link(number: int, rel: str) -> str:
            query = urlencode([*kept, ("page", number), ("per_page", per_page)])
            return f'<{self.url}{req.raw_path}?{query}>; rel="{rel}"'

        links = []
        if page > 1:
            links.append(link(page - 1, "prev"))
        if page < pages:
            links.append(link(page + 1, "next"))
        links += [link(1, "first"), link(pages, "last")]
        headers = {
            "X-Page": str(page),
            "X-Per-Page": str(per_page),
            "X-Next-Page": str(page + 1) if page < pages else "",
            "X-Prev-Page": str(page - 1) if page > 1 else "",
            "X-Total": str(total),
            "X-Total-Pages": str(pages),
            "Link": ", ".join(links),
        }
        return Response(200, items[(page - 1) * per_page : page * per_page], headers)

    @staticmethod
    def _sorted(items: list[Any], key: Callable[[Any], Any], sort: str | None, default: str) -> list[Any]:
        direction = sort or default
        if direction not in ("asc", "desc"):
            raise _ApiError(400, "sort does not have a valid value", key="error")
        return sorted(items, key=key, reverse=direction == "desc")

    # -- routes ------------------------------------------------------------------------------
    def _register_routes(self) -> None:
        p = rf"/projects/(?P<project>{_SEG})"
        iid = r"(?P<iid>\d+)"
        self._api("GET", "/version", lambda req, user: Response(200, {"version": "17.0.0", "revision": "standin"}))
        self._api("GET", "/user", self._get_current_user)
        self._api("GET", "/users", self._list_users)
        self._api("GET", r"/users/(?P<user_id>\d+)", self._get_user)
        self._api("GET", p, self._get_project)
        self._api("GET", p + "/repository/branches", self._list_branches)
        self._api("POST", p + "/repository/branches", self._create_branch)
        self._api("GET", p + rf"/repository/branches/(?P<branch>{_SEG})", self._get_branch)
        self._api("DELETE", p + rf"/repository/branches/(?P<branch>{_SEG})", self._delete_branch)
        files = p + rf"/repository/files/(?P<file_path>{_SEG})"
        self._api("GET", files, self._get_file)
        self._api("HEAD", files, self._get_file)
        self._api("GET", files + "/raw", self._get_file_raw)
        self._api("POST", files, self._write_file)
        self._api("PUT", files, self._write_file)
        self._api("DELETE", files, self._write_file)
        self._api("GET", p + "/repository/commits", self._list_commits)
        self._api("POST", p + "/repository/commits", self._create_commit)
        self._api("GET", p + rf"/repository/commits/(?P<sha>{_SEG})", self._get_commit)
        self._api("GET", p + "/merge_requests", self._list_mrs)
        self._api("POST", p + "/merge_requests", self._create_mr)
        self._api("GET", p + f"/merge_requests/{iid}", self._get_mr)
        self._api("PUT", p + f"/merge_requests/{iid}", self._update_mr)
        self._api("PUT", p + f"/merge_requests/{iid}/merge", self._merge_mr)
        self._api("GET", p + f"/merge_requests/{iid}/approvals", self._get_approvals)
        self._api("POST", p + f"/merge_requests/{iid}/approve", self._approve_mr)
        self._api("GET", p + f"/merge_requests/{iid}/notes", self._list_notes)
        self._api("POST", p + f"/merge_requests/{iid}/notes", self._create_note)
        self._api("GET", p + "/pipelines", self._list_pipelines)
        self._api("GET", p + r"/pipelines/(?P<pipeline_id>\d+)", self._get_pipeline)
        self._api("GET", p + r"/pipelines/(?P<pipeline_id>\d+)/jobs", self._list_jobs)
        self._api("GET", p + "/deployments", self._list_deployments)
        self._api("GET", p + r"/deployments/(?P<deployment_id>\d+)", self._get_deployment)
        self._api("GET", p + "/environments", self._list_environments)
        self._api("GET", p + r"/environments/(?P<environment_id>\d+)", self._get_environment)

    # users, project
    def _get_current_user(self, req: Request, user: str) -> Response:
        data = self._user_json(user) or {}
        data.update({"email": self._email(user), "created_at": _ts(self._commits_first_time()), "bot": False})
        return Response(200, data)

    def _commits_first_time(self) -> datetime:
        return min(c.created_at for c in self._commits.values())

    def _list_users(self, req: Request, user: str) -> Response:
        wanted = req.arg("username")
        names = sorted(self._user_ids, key=self._user_ids.__getitem__)
        return self._page(req, [self._user_json(n) for n in names if wanted is None or n.lower() == wanted.lower()])

    def _get_user(self, req: Request, user: str, user_id: str) -> Response:
        for name, number in self._user_ids.items():
            if number == int(user_id):
                return Response(200, self._user_json(name))
        raise _ApiError(404, "404 User Not Found")

    def _get_project(self, req: Request, user: str) -> Response:
        namespace, _, path = self.project_path.rpartition("/")
        return Response(
            200,
            {
                "id": self.project_id,
                "name": path,
                "path": path,
                "name_with_namespace": f"{namespace} / {path}" if namespace else path,
                "path_with_namespace": self.project_path,
                "description": None,
                "default_branch": self.default_branch,
                "visibility": "private",
                "web_url": self._web_url,
                "http_url_to_repo": f"{self._web_url}.git",
                "ssh_url_to_repo": f"git@127.0.0.1:{self.project_path}.git",
                "namespace": {
                    "id": 1,
                    "name": namespace,
                    "path": namespace.rsplit("/", 1)[-1],
                    "kind": "group",
                    "full_path": namespace,
                },
                "created_at": _ts(self._commits_first_time()),
                "last_activity_at": _ts(max(c.created_at for c in self._commits.values())),
                "archived": False,
                "empty_repo": False,
                "merge_method": "merge",
                "only_allow_merge_if_pipeline_succeeds": False,
                "remove_source_branch_after_merge": True,
            },
        )

    # branches
    def _list_branches(self, req: Request, user: str) -> Response:
        search = req.arg("search")
        names = sorted(n for n in self._branches if not search or search in n)
        return self._page(req, [self._branch_json(n) for n in names])

    def _get_branch(self, req: Request, user: str, branch: str) -> Response:
        if branch not in self._branches:
            raise _ApiError(404, "404 Branch Not Found")
        return Response(200, self._branch_json(branch))

    def _create_branch(self, req: Request, user: str) -> Response:
        params = self._params(req)
        self._require(params, "branch", "ref")
        name, ref = str(params["branch"]), str(params["ref"])
        if name in self._branches:
            raise _ApiError(400, "Branch already exists")
        try:
            sha = self._resolve(ref)
        except _ApiError:
            raise _ApiError(400, "Invalid reference name: " + ref) from None
        self._branches[name] = sha
        return Response(201, self._branch_json(name))

    def _delete_branch(self, req: Request, user: str, branch: str) -> Response:
        if branch not in self._branches:
            raise _ApiError(404, "404 Branch Not Found")
        if branch == self.default_branch:
            raise _ApiError(400, "Cannot remove the default branch")
        del self._branches[branch]
        return Response(204)

    # files
    def _file_lookup(self, file_path: str, ref: str) -> tuple[_Commit, str]:
        try:
            commit = self._commits[self._resolve(ref)]
        except _ApiError:
            raise _ApiError(404, "404 Commit Not Found") from None
        if file_path not in commit.files:
            raise _ApiError(404, "404 File Not Found")
        return commit, commit.files[file_path]

    def _get_file(self, req: Request, user: str, file_path: str) -> Response:
        ref = req.arg("ref")
        if not ref:
            raise _ApiError(400, "ref is missing", key="error")
        commit, content = self._file_lookup(file_path, ref)
        last = self._log(commit.id, file_path)[0].id
        data = content.encode()
        body = {
            "file_name": file_path.rsplit("/", 1)[-1],
            "file_path": file_path,
            "size": len(data),
            "encoding": "base64",
            "content": base64.b64encode(data).decode(),
            "content_sha256": hashlib.sha256(data).hexdigest(),
            "ref": ref,
            "blob_id": _blob_id(content),
            "commit_id": commit.id,
            "last_commit_id": last,
            "execute_filemode": False,
        }
        headers = {
            "X-Gitlab-File-Path": file_path,
            "X-Gitlab-File-Name": body["file_name"],
            "X-Gitlab-Size": str(len(data)),
            "X-Gitlab-Encoding": "base64",
            "X-Gitlab-Ref": ref,
            "X-Gitlab-Blob-Id": body["blob_id"],
            "X-Gitlab-Commit-Id": commit.id,
            "X-Gitlab-Last-Commit-Id": last,
            "X-Gitlab-Content-Sha256": body["content_sha256"],
        }
        return Response(200, body, headers)

    def _get_file_raw(self, req: Request, user: str, file_path: str) -> Response:
        _, content = self._file_lookup(file_path, req.arg("ref") or self.default_branch)
        return Response(200, content.encode(), {"Content-Type": "text/plain; charset=utf-8"})

    def _write_file(self, req: Request, user: str, file_path: str) -> Response:
        """Single-file create (POST), update (PUT) and delete (DELETE): one commit each."""
        params = self._params(req)
        self._require(params, "branch", "commit_message")
        kind = {"POST": "create", "PUT": "update", "DELETE": "delete"}[req.method]
        if kind != "delete":
            self._require(params, "content")
        action = {
            "action": kind,
            "file_path": file_path,
            "content": params.get("content"),
            "encoding": params.get("encoding"),
            "last_commit_id": params.get("last_commit_id"),
        }
        self._commit(
            user,
            str(params["branch"]),
            str(params["commit_message"]),
            [action],
            start_branch=params.get("start_branch"),
            author_name=params.get("author_name"),
            author_email=params.get("author_email"),
        )
        if kind == "delete":
            return Response(204)
        return Response(201 if kind == "create" else 200, {"file_path": file_path, "branch": params["branch"]})

    # commits
    def _list_commits(self, req: Request, user: str) -> Response:
        ref = req.arg("ref_name") or self.default_branch
        try:
            head = self._resolve(ref)
        except _ApiError:
            return self._page(req, [])
        commits = self._log(head, req.arg("path"))
        if req.arg("since"):
            since = _parse_time(req.arg("since") or "")
            commits = [c for c in commits if c.created_at >= since]
        if req.arg("until"):
            until = _parse_time(req.arg("until") or "")
            commits = [c for c in commits if c.created_at <= until]
        return self._page(req, [self._commit_json(c) for c in commits])

    def _create_commit(self, req: Request, user: str) -> Response:
        params = self._params(req)
        self._require(params, "branch", "commit_message", "actions")
        actions = params["actions"]
        if not isinstance(actions, list) or not all(isinstance(a, dict) for a in actions):
            raise _ApiError(400, "actions is invalid", key="error")
        commit, stats = self._commit(
            user,
            str(params["branch"]),
            str(params["commit_message"]),
            actions,
            start_branch=params.get("start_branch"),
            start_sha=params.get("start_sha"),
            author_name=params.get("author_name"),
            author_email=params.get("author_email"),
            force=_truthy(params.get("force")),
        )
        body = self._commit_json(commit)
        body.update({"stats": stats, "status": None, "last_pipeline": None, "project_id": self.project_id})
        return Response(201, body)

    def _get_commit(self, req: Request, user: str, sha: str) -> Response:
        commit = self._commits[self._resolve(sha)]
        body = self._commit_json(commit)
        pipelines = [p for p in self._pipelines.values() if p.sha == commit.id]
        last = max(pipelines, key=lambda p: p.id) if pipelines else None
        body.update(
            {
                "status": last.status if last else None,
                "last_pipeline": self._pipeline_json(last) if last else None,
                "project_id": self.project_id,
            }
        )
        return Response(200, body)

    # merge requests
    def _list_mrs(self, req: Request, user: str) -> Response:
        params = self._params(req)
        state = params.get("state") or "all"
        if state not in ("opened", "closed", "merged", "locked", "all"):
            raise _ApiError(400, "state does not have a valid value", key="error")
        mrs = list(self._mrs.values())
        if state != "all":
            mrs = [m for m in mrs if m.state == state]
        for name in ("source_branch", "target_branch"):
            if params.get(name):
                mrs = [m for m in mrs if getattr(m, name) == params[name]]
        if params.get("author_username"):
            mrs = [m for m in mrs if m.author == params["author_username"]]
        if params.get("labels"):
            wanted = _as_list(params["labels"])
            mrs = [m for m in mrs if all(label in m.labels for label in wanted)]
        if params.get("iids"):
            wanted_iids = {int(i) for i in _as_list(params["iids"])}
            mrs = [m for m in mrs if m.iid in wanted_iids]
        order_by = params.get("order_by") or "created_at"
        if order_by not in ("created_at", "updated_at", "merged_at", "title"):
            raise _ApiError(400, "order_by does not have a valid value", key="error")
        mrs = self._sorted(
            mrs, lambda m: (getattr(m, order_by) or datetime.min.replace(tzinfo=UTC), m.iid), params.get("sort"), "desc"
        )
        return self._page(req, [self._mr_json(m) for m in mrs])

    def _get_mr(self, req: Request, user: str, iid: str) -> Response:
        return Response(200, self._mr_json(self._mr(iid), detail=True))

    def _reviewers(self, value: Any) -> list[str]:
        ids = {int(i) for i in _as_list(value if not isinstance(value, int) else [value])}
        return [name for name, number in self._user_ids.items() if number in ids]

    def _create_mr(self, req: Request, user: str) -> Response:
        params = self._params(req)
        self._require(params, "source_branch", "target_branch", "title")
        source, target = str(params["source_branch"]), str(params["target_branch"])
        if source == target:
            raise _ApiError(422, ["You can't use same project/branch for source and target"])
        for role, name in (("Source", source), ("Target", target)):
            if name not in self._branches:
                raise _ApiError(422, [f'{role} branch "{name}" does not exist'])
        for other in self._mrs.values():
            if other.state == "opened" and other.source_branch == source and other.target_branch == target:
                raise _ApiError(
                    409, [f"Another open merge request already exists for this source branch: !{other.iid}"]
                )
        now = self._now()
        mr = _MergeRequest(
            id=self._next_id("mr"),
            iid=len(self._mrs) + 1,
            title=str(params["title"]),
            description=str(params.get("description") or ""),
            source_branch=source,
            target_branch=target,
            author=user,
            labels=_as_list(params.get("labels")),
            reviewers=self._reviewers(params.get("reviewer_ids")),
            remove_source_branch=_truthy(params.get("remove_source_branch")),
            created_at=now,
            updated_at=now,
        )
        self._mrs[mr.iid] = mr
        if mr.reviewers:
            self._note(mr, user, "requested review from " + " and ".join(f"@{u}" for u in mr.reviewers), system=True)
        self._after_open(mr.iid)
        return Response(201, self._mr_json(mr, detail=True))

    def _update_mr(self, req: Request, user: str, iid: str) -> Response:
        mr = self._mr(iid)
        params = self._params(req)
        for name in ("title", "description", "target_branch"):
            if params.get(name) is not None:
                setattr(mr, name, str(params[name]))
        if "labels" in params:
            mr.labels = _as_list(params["labels"])
        for label in _as_list(params.get("add_labels")):
            if label not in mr.labels:
                mr.labels.append(label)
        removed = set(_as_list(params.get("remove_labels")))
        mr.labels = [label for label in mr.labels if label not in removed]
        if "reviewer_ids" in params:
            mr.reviewers = self._reviewers(params["reviewer_ids"])
        if "remove_source_branch" in params:
            mr.remove_source_branch = _truthy(params["remove_source_branch"])
        event = params.get("state_event")
        if event == "close" and mr.state == "opened":
            self.close(mr.iid, user)
        elif event == "reopen" and mr.state == "closed":
            mr.state, mr.closed_at, mr.closed_by = "opened", None, None
            self._note(mr, user, "reopened", system=True)
        mr.updated_at = self._now()
        return Response(200, self._mr_json(mr, detail=True))

    def _merge_mr(self, req: Request, user: str, iid: str) -> Response:
        mr = self._mr(iid)
        if mr.state != "opened":
            raise _ApiError(405, "405 Method Not Allowed")
        params = self._params(req)
        if params.get("sha") and params["sha"] != self._mr_sha(mr):
            raise _ApiError(409, "SHA does not match HEAD of source branch: " + str(self._mr_sha(mr)))
        try:
            self.merge(mr.iid, user)
        except ValueError:
            raise _ApiError(422, "Branch cannot be merged") from None
        return Response(200, self._mr_json(mr, detail=True))

    def _get_approvals(self, req: Request, user: str, iid: str) -> Response:
        return Response(200, self._approvals_json(self._mr(iid), user))

    def _approve_mr(self, req: Request, user: str, iid: str) -> Response:
        mr = self._mr(iid)
        if user in [u for u, _ in mr.approvals] or mr.state != "opened":
            raise _ApiError(401, "401 Unauthorized")
        self.approve(mr.iid, user)
        return Response(201, self._approvals_json(mr, user))

    def _list_notes(self, req: Request, user: str, iid: str) -> Response:
        notes = self._sorted(list(self._mr(iid).notes), lambda n: n["id"], req.arg("sort"), "desc")
        return self._page(req, [dict(n) for n in notes])

    def _create_note(self, req: Request, user: str, iid: str) -> Response:
        params = self._params(req)
        self._require(params, "body")
        mr = self._mr(iid)
        note = self._note(mr, user, str(params["body"]), system=False)
        mr.updated_at = self._now()
        return Response(201, dict(note))

    # pipelines, jobs
    def _list_pipelines(self, req: Request, user: str) -> Response:
        params = self._params(req)
        items = list(self._pipelines.values())
        for name in ("sha", "ref", "status", "source"):
            if params.get(name):
                items = [p for p in items if getattr(p, name) == params[name]]
        if params.get("username"):
            items = [p for p in items if p.user == params["username"]]
        scope = params.get("scope")
        if scope == "finished":
            items = [p for p in items if p.status in ("success", "failed", "canceled", "skipped")]
        elif scope in ("running", "pending"):
            items = [p for p in items if p.status == scope]
        if params.get("updated_after"):
            after = _parse_time(params["updated_after"])
            items = [p for p in items if p.updated_at > after]
        if params.get("updated_before"):
            before = _parse_time(params["updated_before"])
            items = [p for p in items if p.updated_at < before]
        order_by = params.get("order_by") or "id"
        keys: dict[str, Callable[[_Pipeline], Any]] = {
            "id": lambda p: p.id,
            "status": lambda p: (p.status, p.id),
            "ref": lambda p: (p.ref, p.id),
            "updated_at": lambda p: (p.updated_at, p.id),
            "user_id": lambda p: (self._user(p.user), p.id),
        }
        if order_by not in keys:
            raise _ApiError(400, "order_by does not have a valid value", key="error")
        items = self._sorted(items, keys[order_by], params.get("sort"), "desc")
        return self._page(req, [self._pipeline_json(p) for p in items])

    def _pipeline(self, pipeline_id: str) -> _Pipeline:
        pipeline = self._pipelines.get(int(pipeline_id))
        if pipeline is None:
            raise _ApiError(404, "404 Not found")
        return pipeline

    def _get_pipeline(self, req: Request, user: str, pipeline_id: str) -> Response:
        return Response(200, self._pipeline_json(self._pipeline(pipeline_id), detail=True))

    def _list_jobs(self, req: Request, user: str, pipeline_id: str) -> Response:
        jobs = list(self._pipeline(pipeline_id).jobs)
        scope = _as_list(self._params(req).get("scope"))
        if scope:
            jobs = [j for j in jobs if j.status in scope]
        return self._page(req, [self._job_json(j) for j in sorted(jobs, key=lambda j: j.id, reverse=True)])

    # deployments, environments
    def _list_deployments(self, req: Request, user: str) -> Response:
        params = self._params(req)
        order_by = params.get("order_by") or "id"
        updated_filter = params.get("updated_after") or params.get("updated_before")
        if updated_filter and order_by != "updated_at":
            raise _ApiError(400, "400 Bad request - `updated_at` filter requires `updated_at` sort")
        items = list(self._deployments.values())
        if params.get("environment"):
            items = [d for d in items if d.environment == params["environment"]]
        if params.get("status"):
            statuses = ("created", "running", "success", "failed", "canceled", "skipped", "blocked")
            if params["status"] not in statuses:
                raise _ApiError(400, "status does not have a valid value", key="error")
            items = [d for d in items if d.status == params["status"]]
        if params.get("updated_after"):
            after = _parse_time(params["updated_after"])
            items = [d for d in items if d.updated_at > after]
        if params.get("updated_before"):
            before = _parse_time(params["updated_before"])
            items = [d for d in items if d.updated_at < before]
        never = datetime.min.replace(tzinfo=UTC)
        keys: dict[str, Callable[[_Deployment], Any]] = {
            "id": lambda d: d.id,
            "iid": lambda d: d.iid,
            "created_at": lambda d: (d.created_at, d.id),
            "updated_at": lambda d: (d.updated_at, d.id),
            "finished_at": lambda d: (d.finished_at or never, d.id),
        }
        if order_by not in keys:
            raise _ApiError(400, "order_by does not have a valid value", key="error")
        items = self._sorted(items, keys[order_by], params.get("sort"), "asc")
        return self._page(req, [self._deployment_json(d) for d in items])

    def _get_deployment(self, req: Request, user: str, deployment_id: str) -> Response:
        deployment = self._deployments.get(int(deployment_id))
        if deployment is None:
            raise _ApiError(404, "404 Not found")
        return Response(200, self._deployment_json(deployment))

    def _list_environments(self, req: Request, user: str) -> Response:
        params = self._params(req)
        items = sorted(self._environments.values(), key=lambda e: e.id)
        if params.get("name"):
            items = [e for e in items if e.name == params["name"]]
        if params.get("search"):
            items = [e for e in items if str(params["search"]) in e.name]
        return self._page(req, [self._environment_json(e) for e in items])

    def _get_environment(self, req: Request, user: str, environment_id: str) -> Response:
        for env in self._environments.values():
            if env.id == int(environment_id):
                return Response(200, self._environment_json(env, detail=True))
        raise _ApiError(404, "404 Environment Not Found")
