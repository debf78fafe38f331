"""Wait in the triggerer for GitLab: a merge request approved and merged, its pipeline, its deployments.

Each trigger holds only serialisable values (connection id, project, ids, an absolute deadline),
fetches the connection once, then polls GitLab through python-gitlab in a worker thread, logging a
line whenever what it sees changes. It yields exactly one event: ``{"status": ..., "message": ...}``
plus what the operator needs. Statuses: ``success``; ``rejected`` (MR closed, merged without an
independent approval, pipeline or a deployment failed); ``timeout``; ``error`` (GitLab kept failing).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

if TYPE_CHECKING:
    from mlops_lifecycle.hooks.gitlab import GitLabHook

TERMINAL_FAILURES = {"failed", "canceled", "skipped"}
MAX_CONSECUTIVE_ERRORS = 10


class _GitLabPollTrigger(BaseTrigger):
    """Poll ``check`` until it returns an event payload or the deadline passes."""

    def __init__(self, *, conn_id: str, project: str, deadline: float, poll_interval: float) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.project = project
        self.deadline = deadline
        self.poll_interval = poll_interval

    def _kwargs(self) -> dict[str, Any]:
        return {
            "conn_id": self.conn_id,
            "project": self.project,
            "deadline": self.deadline,
            "poll_interval": self.poll_interval,
        }

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return f"{type(self).__module__}.{type(self).__qualname__}", self._kwargs()

    def waiting_for(self) -> str:
        raise NotImplementedError

    def check(self, hook: GitLabHook) -> tuple[str, dict[str, Any] | None]:
        """(what is seen now, an event payload when the wait is over)."""
        raise NotImplementedError

    async def _hook(self) -> GitLabHook:
        from asgiref.sync import sync_to_async

        from mlops_lifecycle.hooks.gitlab import GitLabHook

        hook = GitLabHook(self.conn_id)
        conn = await sync_to_async(GitLabHook.get_connection)(self.conn_id)
        hook.settings = GitLabHook.settings_from(conn)  # cached_property: no connection lookup in the thread
        return hook

    async def run(self) -> AsyncIterator[TriggerEvent]:
        self.log.info("Waiting for %s (deadline in %.0f s)", self.waiting_for(), self.deadline - time.time())
        try:
            hook = await self._hook()
        except Exception as exc:
            yield TriggerEvent({"status": "error", "message": f"GitLab connection '{self.conn_id}': {exc}"})
            return
        last_seen, errors = "", 0
        while True:
            try:
                seen, payload = await asyncio.to_thread(self.check, hook)
                errors = 0
            except Exception as exc:  # python-gitlab already retried transient errors inside
                errors += 1
                seen, payload = f"GitLab error ({type(exc).__name__}: {exc})", None
                if errors >= MAX_CONSECUTIVE_ERRORS:
                    yield TriggerEvent(
                        {"status": "error", "message": f"Gave up waiting for {self.waiting_for()}: {seen}"}
                    )
                    return
            if seen != last_seen:
                self.log.info("%s: %s", self.waiting_for(), seen)
                last_seen = seen
            if payload is not None:
                yield TriggerEvent(payload)
                return
            if time.time() >= self.deadline:
                yield TriggerEvent(
                    {"status": "timeout", "message": f"Timed out waiting for {self.waiting_for()}; last seen: {seen}"}
                )
                return
            await asyncio.sleep(min(self.poll_interval, max(0.0, self.deadline - time.time())))


class MergeRequestMergedTrigger(_GitLabPollTrigger):
    """The MR is merged after approval by ``min_approvals`` people other than its author."""

    def __init__(self, *, iid: int, min_approvals: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.iid = iid
        self.min_approvals = min_approvals

    def _kwargs(self) -> dict[str, Any]:
        return {**super()._kwargs(), "iid": self.iid, "min_approvals": self.min_approvals}

    def waiting_for(self) -> str:
        return f"merge request !{self.iid} in {self.project} to be approved ({self.min_approvals}) and merged"

    def check(self, hook: GitLabHook) -> tuple[str, dict[str, Any] | None]:
        mr = hook.merge_request_state(self.project, self.iid)
        independent = mr.independent_approvers
        by_author = " (the author's own approval does not count)" if mr.author in mr.approvers else ""
        seen = f"{mr.state}, approved by {', '.join(independent) or 'nobody'}{by_author}"
        base = {"mr": mr.as_dict(), "web_url": mr.web_url}
        if mr.state == "closed":
            who = f" by {mr.closed_by}" if mr.closed_by else ""
            return seen, {**base, "status": "rejected", "message": f"Merge request !{self.iid} was closed{who}"}
        if mr.state == "merged":
            if len(independent) < self.min_approvals:
                return seen, {
                    **base,
                    "status": "rejected",
                    "message": (
                        f"Merge request !{self.iid} was merged by {mr.merged_by or 'someone'} with "
                        f"{len(independent)} approval(s) from people other than its author {mr.author} "
                        f"({self.min_approvals} required){by_author}"
                    ),
                }
            if not mr.merge_commit_sha:
                return seen + ", merge commit not known yet", None
            return seen, {
                **base,
                "status": "success",
                "message": f"Merge request !{self.iid} merged as {mr.merge_commit_sha[:12]}, "
                f"approved by {', '.join(independent)}",
            }
        return seen, None


class PipelineSucceededTrigger(_GitLabPollTrigger):
    """The newest pipeline of ``sha`` on ``ref`` (the target branch) succeeds.

    The ref matters with fast-forward merges: the merge commit is then the merge request's head, and
    its merge request pipeline (tests only, no deployment) must not pass for the branch pipeline.
    """

    def __init__(self, *, sha: str, ref: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sha = sha
        self.ref = ref

    def _kwargs(self) -> dict[str, Any]:
        return {**super()._kwargs(), "sha": self.sha, "ref": self.ref}

    def waiting_for(self) -> str:
        return f"the pipeline of {self.sha[:12]} in {self.project} to succeed"

    def check(self, hook: GitLabHook) -> tuple[str, dict[str, Any] | None]:
        pipelines = hook.pipelines_for(self.project, self.sha, self.ref)
        if not pipelines:
            return "no pipeline yet", None
        p = pipelines[0]
        seen = f"pipeline {p.id} {p.status}"
        base = {"pipeline_id": p.id, "web_url": p.web_url}
        if p.status == "success":
            return seen, {**base, "status": "success", "message": f"Pipeline {p.id} of {self.sha[:12]} succeeded"}
        if p.status in TERMINAL_FAILURES:
            return seen, {**base, "status": "rejected", "message": f"Pipeline {p.id} of {self.sha[:12]} {p.status}"}
        if p.status in ("manual", "blocked", "scheduled", "waiting_for_resource"):
            # e.g. a protected production deployment waiting for someone to run it: still waiting
            seen += f" (waiting for a person or a resource: {p.web_url})"
        return seen, None


class DeploymentsSucceededTrigger(_GitLabPollTrigger):
    """Deployments of ``sha`` succeed in each environment, in the configured order."""

    def __init__(self, *, sha: str, environments: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sha = sha
        self.environments = list(environments)

    def _kwargs(self) -> dict[str, Any]:
        return {**super()._kwargs(), "sha": self.sha, "environments": self.environments}

    def waiting_for(self) -> str:
        return f"deployments of {self.sha[:12]} to {' -> '.join(self.environments)}"

    def check(self, hook: GitLabHook) -> tuple[str, dict[str, Any] | None]:
        done: dict[str, dict[str, Any]] = {}
        for env in self.environments:
            found = hook.deployments_for(self.project, self.sha, env)
            if not found:
                return self._seen(done, f"{env}: not started"), None
            d = found[0]
            if d.status in TERMINAL_FAILURES:
                return self._seen(done, f"{env}: {d.status}"), {
                    "status": "rejected",
                    "deployments": done,
                    "message": f"Deployment {d.id} of {self.sha[:12]} to {env} {d.status} (job {d.job}); "
                    "later environments were not deployed",
                }
            if d.status != "success":
                return self._seen(done, f"{env}: {d.status}"), None
            done[env] = {"id": d.id, "job": d.job, "pipeline_id": d.pipeline_id, "finished_at": d.updated_at}
        return self._seen(done, "all done"), {
            "status": "success",
            "deployments": done,
            "message": f"{self.sha[:12]} deployed to " + ", ".join(f"{e} (#{v['id']})" for e, v in done.items()),
        }

    @staticmethod
    def _seen(done: dict[str, Any], now: str) -> str:
        return ", ".join([*(f"{e}: success" for e in done), now])
