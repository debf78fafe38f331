"""GitLabHook and GitLabDeploymentRepository against the GitLab v4 stand-in, through the real python-gitlab.

What a user relies on: one review branch, one commit and one merge request per model version, however
often a task is retried and whatever the network does between GitLab acting and the client hearing it;
transient errors and rate limits are ridden out, a lasting outage fails the try without leaving half a
change; the production changelog commit never triggers a deployment; and text written into a merge
request cannot act on it (quick actions) or break its metrics table.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from mlops_lifecycle.changelog import Proposal, md_code, md_text, render_merge_request, render_proposal
from mlops_lifecycle.deployment_repository.gitlab import GitLabDeploymentRepository
from mlops_lifecycle.exceptions import LifecycleError
from mlops_lifecycle.gate import GateVerdict, RuleResult
from mlops_lifecycle.hooks.gitlab import GitLabHook
from standins.base import Fault
from standins.gitlab import CIPlan, GitLabStandIn

USERS = {"bot-token": "mlops-bot", "alice-token": "alice", "bob-token": "bob"}
PROJECT = "platform/model-deployments"
CONN_ID = "gitlab_test"
MAX_RETRIES = 3
BRANCH = "review/demand_forecast/v3"
PIN = "models/demand_forecast.yaml"
CHANGELOG = "changelog/demand_forecast.md"
MAIN_CHANGELOG = "# demand_forecast\n\n## demand_forecast v2: promoted to production\n\n- Approved by alice\n"
PIN_V2 = "model_line: demand_forecast\nmodel_version: '2'\n"
PIN_V3 = "model_line: demand_forecast\nmodel_version: '3'\n"
ENTRY_V3 = "## demand_forecast v3: proposed for production\n\n- MLflow run: `abc`\n\n"
MESSAGE = "demand_forecast: propose v3 for production"

# main without the line's files (its first version) and main with an earlier version (files updated)
FIRST_VERSION = {"README.md": "# deployments\n"}
LATER_VERSION = {"README.md": "# deployments\n", PIN: PIN_V2, CHANGELOG: MAIN_CHANGELOG}

POST_BRANCHES = r".*/repository/branches"
POST_COMMITS = r".*/repository/commits"
POST_MRS = r".*/merge_requests"


def connect(monkeypatch: pytest.MonkeyPatch, standin: GitLabStandIn, **extra: object) -> GitLabHook:
    conn = {
        "conn_type": "http",
        "host": standin.url,
        "password": "bot-token",
        "extra": {"timeout": 5, "max_retries": MAX_RETRIES, **extra},
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(conn))
    return GitLabHook(CONN_ID)


def start(initial: dict[str, str]) -> GitLabStandIn:
    return GitLabStandIn(USERS, project_path=PROJECT, initial_files=initial, ci=CIPlan(step_seconds=0.02)).start()


@pytest.fixture
def standin():
    server = start(LATER_VERSION)
    yield server
    server.stop()


@pytest.fixture(params=[pytest.param(FIRST_VERSION, id="first-version"), pytest.param(LATER_VERSION, id="later")])
def any_standin(request):
    """Both shapes of main: the files are created (first version) or updated (a later version)."""
    server = start(request.param)
    yield server
    server.stop()


@pytest.fixture
def hook(monkeypatch, standin) -> GitLabHook:
    return connect(monkeypatch, standin)


@pytest.fixture
def repo(hook) -> GitLabDeploymentRepository:
    return GitLabDeploymentRepository(hook, PROJECT, "main")


def open_review(repo: GitLabDeploymentRepository) -> str:
    return repo.open_review(BRANCH, replace={PIN: PIN_V3}, append={CHANGELOG: ENTRY_V3}, message=MESSAGE)


def assert_one_review_commit(standin: GitLabStandIn, main_head: str, main_changelog: str | None) -> None:
    """The branch is main plus exactly one commit holding the pin and main's changelog with the entry."""
    history = standin.commits_on(BRANCH)
    assert [c["title"] for c in history[:2]] == [MESSAGE, standin.commits_on("main")[0]["title"]]
    assert history[0]["parent_ids"] == [main_head] and history[1]["id"] == main_head
    assert standin.branches[BRANCH] == history[0]["id"]
    assert standin.file_at(BRANCH, PIN) == PIN_V3
    assert standin.file_at(BRANCH, CHANGELOG) == (main_changelog or "") + ENTRY_V3
    assert standin.branches["main"] == main_head, "main is only changed by a merge"


# -- connection ----------------------------------------------------------------------------------------
def test_settings_come_from_the_airflow_connection(monkeypatch, standin):
    hook = connect(monkeypatch, standin, web_url="https://gitlab.example.com/")
    assert (hook.settings.url, hook.settings.timeout, hook.settings.max_retries) == (standin.url, 5.0, 3)
    assert hook.web_url(PROJECT) == f"https://gitlab.example.com/{PROJECT}"
    assert "bot-token" not in repr(hook.settings)
    assert hook.current_user() == "mlops-bot"


def test_a_connection_without_a_token_is_refused_naming_it(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_GITLAB_NOTOKEN", json.dumps({"conn_type": "http", "host": "gitlab.example.com"}))
    with pytest.raises(LifecycleError, match="Connection 'gitlab_notoken' needs a password"):
        GitLabHook("gitlab_notoken").settings  # noqa: B018


def test_a_uri_connection_gives_scheme_port_and_extras(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_GITLAB_URI", "http://:bot-token@gitlab.example.com:8443/?max_retries=2&timeout=7")
    settings = GitLabHook("gitlab_uri").settings
    assert (settings.url, settings.max_retries, settings.timeout) == ("https://gitlab.example.com:8443", 2, 7.0)


def test_verify_ssl_false_in_a_uri_connection_is_honoured(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_GITLAB_URI", "http://:bot-token@gitlab.example.com/?verify_ssl=false")
    assert GitLabHook("gitlab_uri").settings.verify_ssl is False


# -- open_review: one branch, one commit, however often it runs -----------------------------------
def test_open_review_commits_pin_and_changelog_once_and_a_retry_changes_nothing(monkeypatch, any_standin):
    standin = any_standin
    repo = GitLabDeploymentRepository(connect(monkeypatch, standin), PROJECT, "main")
    main_head, main_changelog = standin.branches["main"], standin.file_at("main", CHANGELOG)

    sha = open_review(repo)

    assert sha == standin.branches[BRANCH]
    assert_one_review_commit(standin, main_head, main_changelog)
    assert repo.read(BRANCH, CHANGELOG) == (main_changelog or "") + ENTRY_V3
    assert (standin.count("POST", POST_BRANCHES), standin.count("POST", POST_COMMITS)) == (1, 1)

    # the task is retried (a new hook, as in a new worker process): it finds the first try's work
    again = open_review(GitLabDeploymentRepository(connect(monkeypatch, standin), PROJECT, "main"))

    assert again == sha
    assert_one_review_commit(standin, main_head, main_changelog)
    assert (standin.count("POST", POST_BRANCHES), standin.count("POST", POST_COMMITS)) == (1, 1)


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(Fault.drop_after(), id="dropped-after-gitlab-committed"),
        pytest.param(Fault.drop_before(), id="dropped-before-gitlab-saw-it"),
        pytest.param(Fault.status_code(502), id="502"),
    ],
)
def test_a_lost_answer_to_the_commit_still_gives_exactly_one_commit(monkeypatch, any_standin, fault):
    standin = any_standin
    repo = GitLabDeploymentRepository(connect(monkeypatch, standin), PROJECT, "main")
    main_head, main_changelog = standin.branches["main"], standin.file_at("main", CHANGELOG)
    standin.inject("POST", POST_COMMITS, fault)

    sha = open_review(repo)

    assert standin.count("POST", POST_COMMITS) == 2  # python-gitlab re-sent the commit
    assert sha == standin.branches[BRANCH]
    assert_one_review_commit(standin, main_head, main_changelog)


def test_a_lost_answer_to_the_branch_creation_finds_the_branch(standin, hook, repo):
    main_head = standin.branches["main"]
    standin.inject("POST", POST_BRANCHES, Fault.drop_after())

    assert hook.ensure_branch(PROJECT, BRANCH, "main") == main_head

    assert standin.count("POST", POST_BRANCHES) == 2  # the re-sent request met "Branch already exists"
    assert standin.branches[BRANCH] == main_head
    open_review(repo)
    assert_one_review_commit(standin, main_head, MAIN_CHANGELOG)


def test_a_lost_answer_to_the_merge_request_creation_gives_one_merge_request(standin, hook, repo):
    open_review(repo)
    standin.inject("POST", POST_MRS, Fault.drop_after())

    mr, _ = hook.ensure_merge_request(PROJECT, BRANCH, "main", "Promote v3", "description", ["mlops"], ["alice"])

    assert standin.count("POST", POST_MRS) == 2  # the re-sent request was answered 409
    (only,) = standin.merge_requests
    assert (mr.iid, mr.state, mr.source_branch) == (only["iid"], "opened", BRANCH)
    assert only["title"] == "Promote v3" and [r["username"] for r in only["reviewers"]] == ["alice"]


@pytest.mark.parametrize(
    ("fault", "times", "min_seconds"),
    [
        pytest.param(Fault.status_code(503), 2, 0.0, id="503-twice"),
        pytest.param(Fault.rate_limited(retry_after=1), 1, 1.0, id="429-retry-after"),
        pytest.param(Fault.rate_limited(), 1, 0.0, id="429-without-retry-after"),
    ],
)
def test_transient_errors_and_rate_limits_are_ridden_out(standin, repo, fault, times, min_seconds):
    main_head = standin.branches["main"]
    standin.inject("POST", POST_COMMITS, fault, times=times)

    started = time.monotonic()
    sha = open_review(repo)
    elapsed = time.monotonic() - started

    assert standin.count("POST", POST_COMMITS) == 1 + times
    assert sha == standin.branches[BRANCH]
    assert_one_review_commit(standin, main_head, MAIN_CHANGELOG)
    assert elapsed >= min_seconds  # Retry-After is obeyed


def test_a_lasting_outage_fails_the_try_and_leaves_nothing_half_written(standin, hook, repo):
    import gitlab

    main_head = standin.branches["main"]
    standin.inject("POST", POST_COMMITS, Fault.status_code(503), times=1 + MAX_RETRIES)  # longer than retries last

    with pytest.raises(LifecycleError) as failed:
        open_review(repo)

    assert failed.value.__cause__.response_code == 503 and "503" in str(failed.value)
    assert isinstance(failed.value.__cause__, gitlab.GitlabCreateError)
    assert standin.count("POST", POST_COMMITS) == 1 + MAX_RETRIES  # bounded by the connection's max_retries
    assert standin.branches[BRANCH] == main_head, "the branch holds no partial commit"
    assert standin.file_at(BRANCH, PIN) == PIN_V2 and standin.file_at(BRANCH, CHANGELOG) == MAIN_CHANGELOG
    assert standin.branches["main"] == main_head and standin.merge_requests == []

    # GitLab is back: the retried task completes the review with one commit
    open_review(repo)
    assert_one_review_commit(standin, main_head, MAIN_CHANGELOG)


def test_a_lasting_outage_error_names_the_project_and_branch(standin, repo):
    standin.inject("POST", POST_COMMITS, Fault.status_code(503), times=100)
    with pytest.raises(LifecycleError) as failed:
        open_review(repo)
    assert PROJECT in str(failed.value) and BRANCH in str(failed.value)


# -- merge requests -------------------------------------------------------------------------------
def test_ensure_merge_request_sets_title_description_labels_and_reviewers_once(standin, hook, repo):
    open_review(repo)
    args = (PROJECT, BRANCH, "main", "demand_forecast: promote v3", "The changelog", ["model-promotion", "ml"])

    mr, created = hook.ensure_merge_request(*args, reviewers=["alice", "bob"])
    again, created_again = hook.ensure_merge_request(*args, reviewers=["alice", "bob"])

    assert (created, created_again) == (True, False) and again.iid == mr.iid
    assert standin.count("POST", POST_MRS) == 1
    (shown,) = standin.merge_requests
    assert (shown["title"], shown["description"]) == ("demand_forecast: promote v3", "The changelog")
    assert (shown["source_branch"], shown["target_branch"], shown["state"]) == (BRANCH, "main", "opened")
    assert shown["labels"] == ["model-promotion", "ml"]
    assert [r["username"] for r in shown["reviewers"]] == ["alice", "bob"]
    assert shown["author"]["username"] == "mlops-bot" and shown["force_remove_source_branch"] is False
    assert mr.web_url == f"{standin.url}/{PROJECT}/-/merge_requests/{mr.iid}"


def test_an_unknown_reviewer_is_named_and_no_merge_request_is_opened(standin, hook, repo):
    open_review(repo)
    with pytest.raises(LifecycleError, match="GitLab has no user 'carol' \\(review.reviewers\\)"):
        hook.ensure_merge_request(PROJECT, BRANCH, "main", "t", "d", [], ["alice", "carol"])
    assert standin.count("POST", POST_MRS) == 0 and standin.merge_requests == []


def test_a_closed_merge_request_is_history_and_a_new_one_is_opened(standin, hook, repo):
    open_review(repo)
    first, _ = hook.ensure_merge_request(PROJECT, BRANCH, "main", "t", "d", [], [])
    standin.close(first.iid, "bob")

    second, created = hook.ensure_merge_request(PROJECT, BRANCH, "main", "t", "d", [], [])

    assert created and second.iid != first.iid and second.state == "opened"
    assert [(m["iid"], m["state"]) for m in standin.merge_requests] == [(first.iid, "closed"), (second.iid, "opened")]
    assert hook.find_merge_request(PROJECT, BRANCH, "main").iid == second.iid


def test_a_merged_merge_request_is_found_not_reopened(standin, hook, repo):
    open_review(repo)
    first, _ = hook.ensure_merge_request(PROJECT, BRANCH, "main", "t", "d", [], [])
    standin.merge(first.iid, "alice")

    again, created = hook.ensure_merge_request(PROJECT, BRANCH, "main", "t", "d", [], [])

    assert (again.iid, again.state, created) == (first.iid, "merged", False)
    assert len(standin.merge_requests) == 1


def test_merge_request_state_reports_approvers_merge_and_close(standin, hook, repo):
    open_review(repo)
    mr, _ = hook.ensure_merge_request(PROJECT, BRANCH, "main", "t", "d", [], [])
    opened = hook.merge_request_state(PROJECT, mr.iid)
    assert (opened.state, opened.author, opened.approvers, opened.merge_commit_sha) == ("opened", "mlops-bot", (), None)

    standin.approve(mr.iid, "mlops-bot")
    standin.approve(mr.iid, "alice")
    sha = standin.merge(mr.iid, "bob")
    merged = hook.merge_request_state(PROJECT, mr.iid)

    assert merged.approvers == ("mlops-bot", "alice") and merged.independent_approvers == ("alice",)
    assert (merged.state, merged.merge_commit_sha, merged.merged_by) == ("merged", sha, "bob")
    assert merged.merged_at and merged.closed_by is None
    assert merged.as_dict()["approvers"] == ["mlops-bot", "alice"]


# -- delivery -------------------------------------------------------------------------------------
def test_pipelines_and_deployments_of_the_merge_commit(standin, hook, repo):
    open_review(repo)
    mr, _ = hook.ensure_merge_request(PROJECT, BRANCH, "main", "t", "d", [], [])
    sha = standin.merge(mr.iid, "alice")
    standin.wait_background()

    (pipeline,) = hook.pipelines_for(PROJECT, sha)
    assert (pipeline.id, pipeline.status, pipeline.sha, pipeline.ref) == (
        standin.pipelines[0]["id"],
        "success",
        sha,
        "main",
    )
    assert hook.pipelines_for(PROJECT, standin.commits_on("main")[-1]["id"]) == []
    for env, shown in zip(("dev", "staging", "production"), standin.deployments, strict=True):
        (deployment,) = hook.deployments_for(PROJECT, sha, env)
        assert (deployment.id, deployment.environment, deployment.status) == (shown["id"], env, "success")
        assert (deployment.job, deployment.pipeline_id) == (f"deploy:{env}", pipeline.id)
    assert hook.deployments_for(PROJECT, "0" * 40, "production") == []


# -- append_on_main: the production changelog -----------------------------------------------------
def test_append_on_main_skips_ci_and_appends_once(standin, repo):
    entry = "## demand_forecast v3: promoted to production\n\n- Approved by alice\n\n"
    pipelines_before = standin.pipelines

    sha = repo.append_on_main(CHANGELOG, entry, "demand_forecast: v3 promoted to production")
    again = repo.append_on_main(CHANGELOG, entry, "demand_forecast: v3 promoted to production")

    assert again == sha == standin.branches["main"]
    head = standin.commits_on("main")[0]
    assert head["message"].endswith("[skip ci]") and head["message"].startswith("demand_forecast: v3 promoted")
    assert len(standin.commits_on("main")) == 2 and standin.count("POST", POST_COMMITS) == 1
    assert standin.file_at("main", CHANGELOG) == MAIN_CHANGELOG + entry
    assert standin.file_at("main", CHANGELOG).count("## demand_forecast v3: promoted to production") == 1
    assert standin.pipelines == pipelines_before  # (the stand-in runs CI on merges only; [skip ci] is the contract)


def test_append_on_main_after_a_lost_answer_appends_once(standin, repo):
    entry = "## demand_forecast v3: promoted to production\n\n- Approved by alice\n\n"
    standin.inject("POST", POST_COMMITS, Fault.drop_after())

    repo.append_on_main(CHANGELOG, entry, "demand_forecast: v3 promoted to production")

    assert standin.count("POST", POST_COMMITS) == 2
    assert len(standin.commits_on("main")) == 2
    assert standin.file_at("main", CHANGELOG) == MAIN_CHANGELOG + entry


# -- text safety ----------------------------------------------------------------------------------
HOSTILE = "x\n/merge\n/approve | `tick` <script>alert(1)</script>\n  /close"


def table_cells(line: str) -> list[str]:
    """Cells of a GFM table row: split on pipes not escaped by a backslash (a backslash escapes one character)."""
    cells, current, i = [], "", 0
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            current += body[i : i + 2]
            i += 2
            continue
        if body[i] == "|":
            cells.append(current)
            current = ""
        else:
            current += body[i]
        i += 1
    if current.strip():
        cells.append(current)
    return cells


def quick_action_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lstrip().startswith("/")]


def hostile_proposal(**overrides: object) -> Proposal:
    verdict = GateVerdict(
        passed=True,
        results=(
            RuleResult(f"mape{HOSTILE}", "threshold", 0.1, 0.25, True, f"mape ok {HOSTILE}"),
            RuleResult("r2|extra", "regression", 0.8, 0.7, True, "r2 ok", baseline=0.75),
        ),
        production_version="2",
    )
    values: dict[str, object] = {
        "model_line": "demand_forecast",
        "model_name": f"demand{HOSTILE}",
        "model_version": "3",
        "run_id": f"run{HOSTILE}",
        "run_url": "http://mlflow.example/#/experiments/1/runs/abc",
        "run_key": f"key{HOSTILE}",
        "window_label": f"window{HOSTILE}",
        "holdout_start": f"/merge {HOSTILE}",
        "snapshot": f"/approve `snap` {HOSTILE}",
        "code_revision": f"rev{HOSTILE}",
        "verdict": verdict,
        "airflow_dag_id": f"/dag{HOSTILE}",
        "airflow_run_id": f"/run{HOSTILE}",
        "airflow_url": None,
        "model_version_url": "http://mlflow.example/#/models/demand/versions/3",
    }
    return Proposal(**{**values, **overrides})  # type: ignore[arg-type]


def test_merge_request_text_cannot_run_quick_actions_or_break_the_table():
    text = render_merge_request(hostile_proposal(), reviewers=["/assign @me", "bob|x"], min_approvals=1)

    assert quick_action_lines(text) == []
    assert "<script>" not in re.sub(r"`[^`\n]*`", "", text), "raw HTML only inside code spans (shown, not run)"
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 4  # header, separator, two rules
    assert {len(table_cells(row)) for row in table} == {6}
    assert "## " not in text.split("\n", 1)[0]  # the MR title carries the heading


def test_md_text_and_md_code_are_one_line_and_inert():
    assert md_text("/merge\nnext") == "\\/merge next"
    assert md_text("  /close") == "\\/close"
    assert md_text("a|b<c>") == "a\\|b&lt;c&gt;"
    assert md_code("a`b\nc") == "`a'b c`"


def test_md_text_keeps_a_backslash_pipe_in_its_cell():
    value = "a\\|b"
    row = f"| {md_text(value)} | rule |"
    assert len(table_cells(row)) == 2


@pytest.mark.parametrize(
    "override",
    [
        pytest.param({"model_version": "3\n/merge"}, id="model_version"),
        pytest.param({"run_url": "http://mlflow.example/runs/x\n/merge"}, id="run_url"),
    ],
)
def test_merge_request_text_with_newlines_in_version_or_links(override):
    text = render_merge_request(hostile_proposal(**override), reviewers=[], min_approvals=1)
    assert quick_action_lines(text) == []


def test_changelog_entry_keeps_its_heading_for_idempotent_appends():
    entry = render_proposal(hostile_proposal())
    assert entry.splitlines()[0] == "## demand_forecast v3: proposed for production"
    assert quick_action_lines(entry) == []
    assert re.search(r"^\| metric \| rule \|", entry, re.MULTILINE)
