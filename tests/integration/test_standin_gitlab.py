"""The GitLab v4 stand-in, driven only through the real python-gitlab client.

Each test checks something the lifecycle's review and deploy-wait steps rely on: an idempotent
branch/commit/MR, the approval and merge a human gives, the pipeline and per-environment deployments
that follow, and the transport faults python-gitlab must survive (or surface).
"""

from __future__ import annotations

import base64
import threading
import time

import gitlab
import pytest
import requests

from standins.base import Fault
from standins.gitlab import AutoReview, CIPlan, GitLabStandIn

USERS = {"bot-token": "mlops-bot", "alice-token": "alice", "bob-token": "bob"}
PROJECT = "platform/deploy-repo"
MODEL_FILE = "models/churn/model.yaml"
INITIAL = {MODEL_FILE: "version: 2\n", "README.md": "# deploy repo\n"}
FAST_CI = CIPlan(step_seconds=0.03)


@pytest.fixture
def standin():
    with GitLabStandIn(USERS, initial_files=INITIAL, ci=FAST_CI) as server:
        yield server


def client(standin: GitLabStandIn, token: str = "bot-token", **kwargs) -> gitlab.Gitlab:
    return gitlab.Gitlab(standin.url, private_token=token, retry_transient_errors=True, **kwargs)


def propose(project, branch: str, version: int, reviewers: list[int] | None = None):
    """What the review step does: a branch, one commit pinning the version, an MR."""
    project.branches.create({"branch": branch, "ref": "main"})
    project.commits.create(
        {
            "branch": branch,
            "commit_message": f"Promote churn v{version}",
            "actions": [
                {"action": "update", "file_path": MODEL_FILE, "content": f"version: {version}\n"},
                {"action": "create", "file_path": f"changelog/churn-v{version}.md", "content": f"# v{version}\n"},
            ],
        }
    )
    return project.mergerequests.create(
        {
            "source_branch": branch,
            "target_branch": "main",
            "title": f"Promote churn v{version}",
            "description": "changelog",
            "labels": ["mlops", "churn"],
            "reviewer_ids": reviewers or [],
            "remove_source_branch": True,
        }
    )


def test_branch_commit_and_file_read_back(standin):
    project = client(standin).projects.get(PROJECT)  # the path is sent percent-encoded
    assert (project.path_with_namespace, project.default_branch) == (PROJECT, "main")
    assert project.web_url == f"{standin.url}/{PROJECT}"
    assert client(standin).projects.get(project.id).id == project.id  # numeric id works too

    branch = project.branches.create({"branch": "mlops/churn/v3", "ref": "main"})
    assert branch.commit["id"] == standin.branches["main"]
    with pytest.raises(gitlab.GitlabCreateError) as exists:
        project.branches.create({"branch": "mlops/churn/v3", "ref": "main"})
    assert exists.value.response_code == 400 and "Branch already exists" in str(exists.value)
    with pytest.raises(gitlab.GitlabGetError) as missing:
        project.branches.get("mlops/churn/nope")
    assert missing.value.response_code == 404 and "Branch Not Found" in str(missing.value)

    commit = project.commits.create(
        {
            "branch": "mlops/churn/v3",
            "commit_message": "Promote churn v3\n\nrun key churn/2024-05-01",
            "actions": [
                {"action": "update", "file_path": MODEL_FILE, "content": "version: 3\n"},
                {
                    "action": "create",
                    "file_path": "changelog/churn-v3.md",
                    "content": base64.b64encode(b"# v3\n").decode(),
                    "encoding": "base64",
                },
            ],
        }
    )
    assert len(commit.id) == 40 and commit.parent_ids == [standin.branches["main"]]
    assert commit.title == "Promote churn v3"

    read = project.files.get(file_path=MODEL_FILE, ref="mlops/churn/v3")
    assert read.decode() == b"version: 3\n" and read.last_commit_id == commit.id
    assert project.files.raw(file_path="changelog/churn-v3.md", ref="mlops/churn/v3") == b"# v3\n"
    assert project.files.get(file_path=MODEL_FILE, ref="main").decode() == b"version: 2\n"  # main untouched
    with pytest.raises(gitlab.GitlabGetError) as no_file:
        project.files.get(file_path="models/none.yaml", ref="main")
    assert no_file.value.response_code == 404 and "File Not Found" in str(no_file.value)

    # python-gitlab's own ``path=`` keyword overrides the URL: a path filter goes in query_parameters
    history = project.commits.list(query_parameters={"ref_name": "mlops/churn/v3", "path": MODEL_FILE}, get_all=True)
    assert [c.id for c in history] == [commit.id, standin.commits_on("main")[-1]["id"]]
    assert project.commits.get(commit.id).message.startswith("Promote churn v3")


def test_commit_errors_are_gitlabs(standin):
    project = client(standin).projects.get(PROJECT, lazy=True)

    def commit(actions, **extra):
        return project.commits.create({"branch": "main", "commit_message": "x", "actions": actions, **extra})

    with pytest.raises(gitlab.GitlabCreateError) as created_twice:
        commit([{"action": "create", "file_path": MODEL_FILE, "content": "x"}])
    assert created_twice.value.response_code == 400
    assert "A file with this name already exists" in str(created_twice.value)
    with pytest.raises(gitlab.GitlabCreateError) as update_missing:
        commit([{"action": "update", "file_path": "models/none.yaml", "content": "x"}])
    assert update_missing.value.response_code == 400
    with pytest.raises(gitlab.GitlabCreateError) as no_branch:
        project.commits.create({"branch": "nope", "commit_message": "x", "actions": []})
    assert no_branch.value.response_code == 400
    head = standin.branches["main"]
    assert len(standin.commits_on("main")) == 1  # a rejected commit changes nothing

    # start_branch creates the branch and commits in one call; the stale last_commit_id guard holds
    made = project.commits.create(
        {
            "branch": "mlops/churn/v4",
            "start_branch": "main",
            "commit_message": "v4",
            "actions": [{"action": "update", "file_path": MODEL_FILE, "content": "version: 4\n"}],
        }
    )
    assert standin.branches["mlops/churn/v4"] == made.id and made.parent_ids == [head]
    with pytest.raises(gitlab.GitlabCreateError) as stale:
        project.commits.create(
            {
                "branch": "mlops/churn/v4",
                "commit_message": "v4 again",
                "actions": [
                    {"action": "update", "file_path": MODEL_FILE, "content": "version: 5\n", "last_commit_id": head}
                ],
            }
        )
    assert "changed since you started editing" in str(stale.value)
    assert standin.file_at("mlops/churn/v4", MODEL_FILE) == "version: 4\n"


def test_merge_request_create_list_get_update_and_duplicate(standin):
    gl = client(standin)
    project = gl.projects.get(PROJECT)
    alice_id = gl.users.list(username="alice")[0].id
    mr = propose(project, "mlops/churn/v3", 3, reviewers=[alice_id])

    assert (mr.iid, mr.state, mr.merge_commit_sha) == (1, "opened", None)
    assert mr.web_url == f"{standin.url}/{PROJECT}/-/merge_requests/1"
    assert mr.author["username"] == "mlops-bot" and [r["username"] for r in mr.reviewers] == ["alice"]
    assert mr.labels == ["mlops", "churn"] and mr.sha == standin.branches["mlops/churn/v3"]
    assert mr.force_remove_source_branch is True

    found = project.mergerequests.list(source_branch="mlops/churn/v3", target_branch="main", state="opened")
    assert [m.iid for m in found] == [1]
    assert project.mergerequests.list(state="merged") == []

    with pytest.raises(gitlab.GitlabCreateError) as duplicate:
        project.mergerequests.create({"source_branch": "mlops/churn/v3", "target_branch": "main", "title": "again"})
    assert duplicate.value.response_code == 409
    assert "Another open merge request already exists for this source branch: !1" in str(duplicate.value)

    fetched = project.mergerequests.get(1)
    fetched.title = "Promote churn v3 (gate passed)"
    fetched.labels = ["mlops", "churn", "gate-passed"]
    fetched.save()
    again = project.mergerequests.get(1)
    assert again.title == "Promote churn v3 (gate passed)" and again.labels == ["mlops", "churn", "gate-passed"]
    assert any("requested review from @alice" in n.body for n in again.notes.list(get_all=True))


def test_approvals_including_an_author_approval(standin):
    project = client(standin).projects.get(PROJECT)
    mr = propose(project, "mlops/churn/v3", 3)
    approvals = mr.approvals.get()
    assert (approvals.approved, approvals.approvals_left, approvals.approved_by) == (False, 1, [])

    standin.approve(mr.iid, "mlops-bot")  # recorded: the lifecycle itself must refuse a self-approval
    standin.approve(mr.iid, "alice")
    approvals = mr.approvals.get()
    assert approvals.approved is True and approvals.approvals_left == 0
    assert [a["user"]["username"] for a in approvals.approved_by] == ["mlops-bot", "alice"]
    assert approvals.approved_by[1]["user"]["id"] == client(standin).users.list(username="alice")[0].id


def test_merge_runs_pipeline_then_deployments_in_order(standin):
    seen: list[tuple[str, str, str, str, str]] = []
    watcher = client(standin, "alice-token")

    def on_deploy(environment: str, sha: str, files: dict[str, str]) -> None:
        # while the deployment runs, the API shows it running inside a running pipeline
        project = watcher.projects.get(PROJECT, lazy=True)
        (deployment,) = project.deployments.list(environment=environment, status="running")
        pipeline = project.pipelines.get(deployment.deployable["pipeline"]["id"])
        seen.append((environment, sha, files[MODEL_FILE], deployment.status, pipeline.status))

    standin.ci = CIPlan(step_seconds=0.03, on_deploy=on_deploy, external_urls={"production": "https://churn.example"})
    project = client(standin).projects.get(PROJECT)
    mr = propose(project, "mlops/churn/v3", 3)
    standin.approve(mr.iid, "alice")
    merge_sha = standin.merge(mr.iid, "alice")
    standin.wait_background()

    merged = project.mergerequests.get(mr.iid)
    assert (merged.state, merged.merge_commit_sha, merged.merged_by["username"]) == ("merged", merge_sha, "alice")
    commit = project.commits.get(merge_sha)
    assert commit.title == "Merge branch 'mlops/churn/v3' into 'main'" and len(commit.parent_ids) == 2
    assert standin.branches["main"] == merge_sha and "mlops/churn/v3" not in standin.branches  # source removed
    assert [n.body for n in merged.notes.list(get_all=True)][:2] == ["merged", "approved this merge request"]

    (pipeline,) = project.pipelines.list(sha=merge_sha, ref="main")
    assert project.pipelines.get(pipeline.id).status == "success"
    assert [j.name for j in pipeline.jobs.list(get_all=True)][::-1] == [
        "test",
        "deploy:dev",
        "deploy:staging",
        "deploy:production",
    ]
    deployments = project.deployments.list(order_by="id", sort="asc", get_all=True)
    assert [(d.environment["name"], d.status, d.sha) for d in deployments] == [
        ("dev", "success", merge_sha),
        ("staging", "success", merge_sha),
        ("production", "success", merge_sha),
    ]
    assert deployments[-1].deployable["pipeline"]["id"] == pipeline.id
    assert [(e, s, f, d, p) for e, s, f, d, p in seen] == [
        (env, merge_sha, "version: 3\n", "running", "running") for env in ("dev", "staging", "production")
    ]
    (production,) = project.environments.list(name="production")
    assert production.external_url == "https://churn.example"
    assert project.deployments.get(deployments[-1].id).environment["id"] == production.id

    # the deploy wait polls "what changed since": GitLab requires order_by=updated_at with updated_after
    since = deployments[0].updated_at
    newer = project.deployments.list(environment="production", updated_after=since, order_by="updated_at")
    assert [d.id for d in newer] == [deployments[-1].id]
    with pytest.raises(gitlab.GitlabListError) as unsorted:
        project.deployments.list(updated_after=since)
    assert unsorted.value.response_code == 400


@pytest.mark.parametrize(
    ("plan", "expected_deployments", "expected_pipeline"),
    [
        pytest.param(
            {"deployment_status": {"staging": "failed"}},
            [("dev", "success"), ("staging", "failed")],
            "failed",
            id="failed-staging-stops-production",
        ),
        pytest.param({"pipeline_status": "failed"}, [], "failed", id="failed-pipeline-deploys-nothing"),
    ],
)
def test_failed_ci_stops_later_environments(standin, plan, expected_deployments, expected_pipeline):
    deployed: list[str] = []
    standin.ci = CIPlan(step_seconds=0.03, on_deploy=lambda env, sha, files: deployed.append(env), **plan)
    project = client(standin).projects.get(PROJECT)
    mr = propose(project, "mlops/churn/v3", 3)
    merge_sha = standin.merge(mr.iid, "alice")
    standin.wait_background()

    (pipeline,) = project.pipelines.list(sha=merge_sha)
    assert pipeline.status == expected_pipeline
    deployments = project.deployments.list(sort="asc", get_all=True)
    assert [(d.environment["name"], d.status) for d in deployments] == expected_deployments
    assert project.deployments.list(environment="production") == []
    assert deployed == [env for env, status in expected_deployments if status == "success"]
    jobs = {j.name: j.status for j in pipeline.jobs.list(get_all=True)}
    assert jobs["deploy:production"] == "skipped"


def test_a_failing_deploy_hook_fails_that_deployment(standin):
    def on_deploy(environment: str, sha: str, files: dict[str, str]) -> None:
        if environment == "production":
            raise RuntimeError("service did not start")

    standin.ci = CIPlan(step_seconds=0.03, on_deploy=on_deploy)
    project = client(standin).projects.get(PROJECT)
    merge_sha = standin.merge(propose(project, "mlops/churn/v3", 3).iid, "alice")
    standin.wait_background()
    (production,) = project.deployments.list(environment="production")
    assert production.status == "failed" and production.deployable["status"] == "failed"
    assert project.pipelines.list(sha=merge_sha)[0].status == "failed"
    assert standin.deploy_errors == [("production", merge_sha, "RuntimeError: service did not start")]


def test_auto_review_merges_or_closes_without_a_test_thread():
    with GitLabStandIn(USERS, initial_files=INITIAL, ci=FAST_CI, auto_review=AutoReview(delay_seconds=0.05)) as s:
        project = client(s).projects.get(PROJECT)
        mr = propose(project, "mlops/churn/v3", 3)
        s.wait_background()
        merged = project.mergerequests.get(mr.iid)
        assert merged.state == "merged" and merged.approvals.get().approved_by[0]["user"]["username"] == "alice"
        assert [d.status for d in project.deployments.list()] == ["success"] * 3

    rejecting = AutoReview(approver="bob", merge=False, close=True, delay_seconds=0.05)
    with GitLabStandIn(USERS, initial_files=INITIAL, ci=FAST_CI, auto_review=rejecting) as s:
        project = client(s).projects.get(PROJECT)
        main_before = s.branches["main"]
        mr = propose(project, "mlops/churn/v3", 3)
        s.wait_background()
        closed = project.mergerequests.get(mr.iid)
        assert (closed.state, closed.closed_by["username"], closed.merge_commit_sha) == ("closed", "bob", None)
        assert s.branches["main"] == main_before and s.pipelines == [] and s.deployments == []
        assert [m.iid for m in project.mergerequests.list(state="closed")] == [mr.iid]


def test_closed_mr_by_a_human_is_not_merged(standin):
    project = client(standin).projects.get(PROJECT)
    mr = propose(project, "mlops/churn/v3", 3)
    standin.close(mr.iid, "bob")
    assert project.mergerequests.get(mr.iid).state == "closed"
    with pytest.raises(ValueError, match="closed"):
        standin.merge(mr.iid, "alice")
    # the branch is free for a new MR once the old one is closed
    assert project.mergerequests.create({"source_branch": "mlops/churn/v3", "target_branch": "main", "title": "t"})


def test_unknown_token_is_401_and_bearer_tokens_work(standin):
    with pytest.raises(gitlab.GitlabAuthenticationError) as denied:
        client(standin, "wrong-token").projects.get(PROJECT)
    assert denied.value.response_code == 401 and "401 Unauthorized" in str(denied.value)
    gl = gitlab.Gitlab(standin.url, oauth_token="alice-token")
    gl.auth()
    assert gl.user.username == "alice"
    assert standin.branches == {"main": standin.commits_on("main")[0]["id"]}  # nothing happened


def test_transient_errors_and_rate_limits_are_retried(standin):
    project_path = r"/api/v4/projects/platform/deploy-repo"
    gl = client(standin)

    standin.inject("GET", project_path, Fault.status_code(503), times=2)
    assert gl.projects.get(PROJECT).default_branch == "main"
    assert standin.count("GET", project_path) == 3

    standin.inject("GET", project_path, Fault.rate_limited(retry_after=1))
    started = time.monotonic()
    gl.projects.get(PROJECT)
    assert time.monotonic() - started >= 1.0  # Retry-After is obeyed
    assert standin.count("GET", project_path) == 5

    standin.inject("GET", project_path, Fault.rate_limited())  # no Retry-After: exponential back-off
    gl.projects.get(PROJECT)
    assert standin.count("GET", project_path) == 7

    standin.inject("GET", project_path, Fault.status_code(503), times=3)
    with pytest.raises(gitlab.GitlabGetError) as gave_up:
        gl.projects.get(PROJECT, max_retries=2)
    assert gave_up.value.response_code == 503


def test_dropped_answer_after_a_commit_leaves_the_commit_made(standin):
    project = client(standin).projects.get(PROJECT, lazy=True)
    project.branches.create({"branch": "mlops/churn/v3", "ref": "main"})
    standin.inject("POST", r".*/repository/commits", Fault.drop_after())
    # python-gitlab retries a dropped connection; the retry meets the commit the first try made
    with pytest.raises(gitlab.GitlabCreateError) as retried:
        project.commits.create(
            {
                "branch": "mlops/churn/v3",
                "commit_message": "Promote churn v3",
                "actions": [{"action": "create", "file_path": "changelog/churn-v3.md", "content": "# v3\n"}],
            }
        )
    assert "A file with this name already exists" in str(retried.value)
    assert standin.count("POST", r".*/repository/commits") == 2
    history = standin.commits_on("mlops/churn/v3")
    assert [c["title"] for c in history] == ["Promote churn v3", "Initial commit"]
    assert standin.file_at("mlops/churn/v3", "changelog/churn-v3.md") == "# v3\n"

    # without retries the client sees the dropped connection itself
    standin.inject("POST", r".*/repository/commits", Fault.drop_after())
    plain = gitlab.Gitlab(standin.url, private_token="bot-token").projects.get(PROJECT, lazy=True)
    with pytest.raises(requests.ConnectionError):
        plain.commits.create(
            {
                "branch": "mlops/churn/v3",
                "commit_message": "v3 readme",
                "actions": [{"action": "update", "file_path": "README.md", "content": "v3\n"}],
            }
        )
    assert standin.commits_on("mlops/churn/v3")[0]["title"] == "v3 readme"


def test_dropped_answer_after_mr_creation_is_found_by_lookup(standin):
    project = client(standin).projects.get(PROJECT, lazy=True)
    standin.inject("POST", r".*/merge_requests", Fault.drop_after())
    with pytest.raises(gitlab.GitlabCreateError) as conflict:
        propose(project, "mlops/churn/v3", 3)
    assert conflict.value.response_code == 409  # the retry met the MR the first try opened
    (existing,) = project.mergerequests.list(source_branch="mlops/churn/v3", state="opened")
    assert existing.iid == 1 and len(standin.merge_requests) == 1


def test_lists_paginate_with_link_headers(standin):
    project = client(standin).projects.get(PROJECT, lazy=True)
    for n in range(24):
        project.branches.create({"branch": f"b{n:02d}", "ref": "main"})
    first = project.branches.list(per_page=10, get_all=False)
    assert len(first) == 10
    pages = project.branches.list(per_page=10, iterator=True)
    assert (pages.total, pages.total_pages, pages.next_page) == (25, 3, 2)
    assert len(list(pages)) == 25
    assert sorted(b.name for b in project.branches.list(get_all=True, per_page=7)) == sorted(standin.branches)


def test_background_threads_do_not_block_requests(standin):
    """A slow deploy hook (a service starting) must not hold the stand-in's lock."""
    release = threading.Event()
    standin.ci = CIPlan(environments=["dev"], step_seconds=0.01, on_deploy=lambda *a: release.wait(5))
    project = client(standin).projects.get(PROJECT)
    standin.merge(propose(project, "mlops/churn/v3", 3).iid, "alice")
    deadline = time.monotonic() + 5
    while not project.deployments.list(environment="dev") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert project.deployments.list(environment="dev")[0].status == "running"
    release.set()
    standin.wait_background()
    assert project.deployments.list(environment="dev")[0].status == "success"
