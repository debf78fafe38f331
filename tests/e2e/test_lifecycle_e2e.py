"""The whole lifecycle DAG on the embedded local adapters: real Airflow, MLflow server, git and service.

One model line lives through a sequence of weekly windows: first promotion, a re-run of the same
window, a gate rejection, a review rejection, something else answering on the service's port, a second
promotion against the first, and a new version that cannot come up (the old one keeps serving).
Every unhappy end must leave the registry as it was.
"""

from __future__ import annotations

import copy
import http.server
import json
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

import devstack
from conftest import MODEL_LINES, REVIEWER
from hammer import Hammer
from hitl import Reviewer
from mlops_lifecycle import paths
from mlops_lifecycle.audit import events

LINE = "e2e_demand"
DAG_ID = f"{LINE}__lifecycle"
BASE = yaml.safe_load((paths.include_dir() / "model_lines" / "demand_forecast.yaml").read_text())


def window(day: int, month: int = 10) -> datetime:
    """Logical date of a manual run: the end of the weekly data interval (Mondays 03:00 UTC)."""
    return datetime(2026, month, day, 3, tzinfo=UTC)


W1, W2, W3, W4, W5 = window(5), window(12), window(19), window(26), window(2, 11)


def deep_update(target: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            deep_update(target[key], value)
        else:
            target[key] = value
    return target


class Line:
    """The test model line: its YAML, and what its registry, repository and service look like."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.write()

    def write(self, **changes) -> None:  # noqa: ANN003
        data = deep_update(
            copy.deepcopy(BASE),
            {
                "model_line": LINE,
                "retries": 1,
                "retry_delay_seconds": 1,
                "registry": {"model_name": LINE, "experiment": f"/e2e/{LINE}"},
                "train": {"parameters": {"max_iter": 60, "learning_rate": 0.1}},
                "review": {"auto_approve": True, "reviewers": []},
                "deploy": {"port": self.port, "verify_timeout_seconds": 120},
            },
        )
        deep_update(data, changes)
        (MODEL_LINES / f"{LINE}.yaml").write_text(yaml.safe_dump(data))

    def run(self, logical_date: datetime) -> devstack.LifecycleResult:
        return devstack.run_lifecycle(DAG_ID, logical_date)

    @property
    def registry(self):  # noqa: ANN201
        from mlops_lifecycle.hooks.mlflow_registry import MlflowRegistryHook

        return MlflowRegistryHook()

    @property
    def repo(self):  # noqa: ANN201
        from mlops_lifecycle.deployment_repository.local_git import LocalGitRepository

        return LocalGitRepository(paths.local_home() / "deploy-repo")

    def registry_state(self) -> dict:
        """Aliases and every version's tags: what 'the registry as it was' means."""
        client = self.registry.client
        versions = client.search_model_versions(f"name='{LINE}'")
        return {
            "aliases": self.registry.aliases(LINE) if versions else {},
            "versions": {v.version: dict(client.get_model_version(LINE, v.version).tags) for v in versions},
        }

    def runs_with_key(self, logical_date: datetime) -> list:
        from mlops_lifecycle.config import load_model_line
        from mlops_lifecycle.window import resolve_window

        config = load_model_line(MODEL_LINES / f"{LINE}.yaml")
        w = resolve_window(config, None, None, logical_date)
        exp = self.registry.client.get_experiment_by_name(config.registry.experiment)
        return self.registry.client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`lifecycle.run_key` = '{w.run_key}'"
        )

    def served_version(self) -> str | None:
        answer = devstack.service_version(f"http://127.0.0.1:{self.port}")
        return None if answer is None else str(answer["model_version"])

    def changelog(self) -> str:
        return self.repo.read("main", f"changelog/{LINE}.md") or ""

    def commits(self) -> list[str]:
        return self.repo.log_subjects(limit=200)


@pytest.fixture(scope="module")
def line(stack) -> Line:  # noqa: ANN001
    return Line(devstack.free_port())


def assert_untouched(before: dict, after: dict, new_version: str, withdrawn_because: str | None = None) -> None:
    """Aliases unchanged, existing versions' tags unchanged, the new version unaliased.

    A candidate that never reached staging has no audit tags; one that reached staging before the
    review or the deployment failed keeps its audit record, which says it was withdrawn and why.
    """
    assert after["aliases"] == before["aliases"]
    for version, tags in before["versions"].items():
        assert after["versions"][version] == tags, f"tags of v{version} changed"
    assert new_version not in after["aliases"].values()
    audit = {k: v for k, v in after["versions"][new_version].items() if k.startswith("audit.")}
    if withdrawn_because is None:
        assert audit == {}
    else:
        staged, withdrawn = events(audit)
        assert staged["event"] == "staged" and withdrawn["event"] == "staging_withdrawn"
        assert withdrawn_because in withdrawn["because"] and withdrawn["by"] == staged["by"]
        assert withdrawn["to"] == staged["from"] == after["aliases"].get("staging")
        assert "audit.promoted_at" not in audit


def candidate_version(line: Line, logical_date: datetime) -> str:
    [run] = line.runs_with_key(logical_date)
    return run.data.tags["lifecycle.registered_version"]


def test_first_lifecycle_promotes_and_records_everything(line):
    result = line.run(W1)
    assert result.state == "success", result.task_states
    assert result.task_states["restore_staging"] == "skipped"

    assert line.registry.aliases(LINE) == {"staging": "1", "production": "1"}
    [run] = line.runs_with_key(W1)
    assert run.data.tags["airflow.dag_id"] == DAG_ID and run.data.tags["airflow.run_id"] == result.run_id
    assert run.data.tags["gate.verdict"] == "passed"
    assert {"mape", "r2", "rmse"} <= set(run.data.metrics)
    tags = line.registry.version_tags(LINE, "1")
    assert tags["audit.run_id"] == run.info.run_id
    assert tags["audit.data_window"] == "2024-10-05..2026-10-05"
    assert tags["audit.snapshot"].endswith(".parquet")
    assert tags["audit.code_revision"]
    from mlops_lifecycle.config import load_model_line

    assert tags["audit.config_sha256"] == load_model_line(MODEL_LINES / f"{LINE}.yaml").fingerprint
    assert tags["audit.gate_verdict"] == "passed"
    assert json.loads(tags["audit.metrics"])["mape"] == pytest.approx(run.data.metrics["mape"])
    assert tags["audit.approved_by"] == "auto_approve (model-line config)"
    # the approval is recorded once, as data, on the candidate's run: a re-run reuses it as it is
    approval = json.loads(run.data.tags["review.approval"])
    assert approval["approved_by"] == ["auto_approve (model-line config)"] and approval["approved_at"]
    assert tags["audit.review_id"] == f"review/{LINE}/v1"
    assert tags["audit.previous_production_version"] == "none"
    assert tags["audit.promoted_by"] == f"airflow:{DAG_ID}/{result.run_id}"
    assert "production" in json.loads(tags["audit.deployments"])
    merge_commit = tags["audit.merge_commit"]

    subjects = line.commits()
    assert subjects[0].endswith(f"{LINE}: v1 promoted to production")
    assert subjects[1].startswith(merge_commit[:7]) and f"Merge review/{LINE}/v1" in subjects[1]
    changelog = line.changelog()
    assert f"## {LINE} v1: proposed for production" in changelog
    assert f"## {LINE} v1: promoted to production" in changelog
    assert '"1"' in line.repo.read("main", f"models/{LINE}.yaml")
    assert line.served_version() == "1"

    # Deployed the way the deployment repository's pipeline does: the pinned version packaged (the
    # image's /opt/model), the service started on the package, the merge commit as its code revision.
    served = devstack.service_version(f"http://127.0.0.1:{line.port}")
    assert served["run_id"] == run.info.run_id and served["code_revision"] == merge_commit
    [package] = (paths.local_home() / "packages").glob(f"{LINE}-v1-*/package.json")
    manifest = json.loads(package.read_text())
    assert (manifest["model_version"], manifest["run_id"]) == ("1", run.info.run_id)
    assert manifest["golden_set_source"] == f"runs:/{run.info.run_id}/golden_set.json"
    assert served["packaged_at"] == manifest["packaged_at"]
    # ... and it logs what it scores where the drift monitor will read it.
    golden = json.loads((package.parent / "golden_set.json").read_text())
    request = urllib.request.Request(
        f"http://127.0.0.1:{line.port}/predict",
        data=json.dumps({"rows": golden["rows"][:3]}).encode(),
        headers={"Content-Type": "application/json", "X-Request-ID": "e2e-probe"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.loads(response.read())["predictions"] == pytest.approx(golden["predictions"][:3], rel=1e-6)
    logged: list[dict] = []
    for _ in range(50):
        files = (paths.local_home() / "predictions" / LINE / "v1").glob("*/*.jsonl")
        logged = [json.loads(x) for f in files for x in f.read_text().splitlines()]
        if any(r["request_id"] == "e2e-probe" for r in logged):
            break
        time.sleep(0.1)
    [probe] = [r for r in logged if r["request_id"] == "e2e-probe"]
    assert probe["request"] == {"rows": golden["rows"][:3]} and len(probe["predictions"]) == 3
    # the fast path serves it (compiled gradient boosting), having reproduced the training run's golden set
    service_log = (paths.local_home() / "services" / f"{LINE}-v1.log").read_text()
    [loaded] = [json.loads(x) for x in service_log.splitlines() if '"model_loaded"' in x][-1:]
    assert "HistGradientBoostingRegressor" in loaded["compiled"], loaded


def test_rerunning_a_window_does_nothing_twice(line):
    """Not even ask for approval again: with auto_approve off, a second ask would wait forever."""
    state, commits = line.registry_state(), line.commits()
    line.write(review={"auto_approve": False})
    try:
        result = line.run(W1)
    finally:
        line.write()
    assert result.state == "success", result.task_states
    assert len(line.runs_with_key(W1)) == 1, "trained twice"
    assert line.registry_state() == state
    assert line.commits() == commits
    assert line.served_version() == "1"


def test_gate_rejection_is_final_and_leaves_the_registry_untouched(line):
    line.write(gate={"metrics": {"r2": {"direction": "maximize", "threshold": 0.99999}}})
    before, commits = line.registry_state(), line.commits()
    result = line.run(W2)
    line.write()
    assert result.state == "failed"
    assert result.task_states["gate"] == "failed"
    assert result.task_states["stage"] == "upstream_failed"
    version = candidate_version(line, W2)
    assert_untouched(before, line.registry_state(), version)
    [run] = line.runs_with_key(W2)
    assert run.data.tags["gate.verdict"] == "rejected"
    assert "r2" in run.data.tags["gate.summary"] and "violates >= 0.99999" in run.data.tags["gate.summary"]
    assert line.commits() == commits and not line.repo.branch_exists(f"review/{LINE}/v{version}")
    assert line.served_version() == "1"
    alerts = [json.loads(x) for x in (paths.local_home() / "alerts" / f"{LINE}.jsonl").read_text().splitlines()]
    gate_alert = [a for a in alerts if a["task_id"] == "gate" and a["run_id"] == result.run_id]
    assert gate_alert and gate_alert[0]["error"].startswith("GateRejected: Gate rejected e2e_demand v")
    assert gate_alert[0]["to"] == ["forecasting-oncall@example.com"] and gate_alert[0]["team"] == "forecasting"


def test_gate_rejection_is_not_retried(line):
    """The gate had one retry configured, yet ran once: a rejection is a decision, not a flake."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        ti = (
            session.query(TaskInstance)
            .filter_by(dag_id=DAG_ID, task_id="gate")
            .order_by(TaskInstance.start_date.desc())
            .first()
        )
        assert ti.state == "failed" and ti.try_number == 1 and ti.max_tries == 1


def test_review_rejection_changes_nothing_else(line):
    line.write(review={"auto_approve": False})
    before, commits = line.registry_state(), line.commits()
    reviewer = Reviewer(DAG_ID, "Reject")
    reviewer.start()
    try:
        result = line.run(W3)
    finally:
        reviewer.stop()
        line.write()
    assert reviewer.error is None, reviewer.error
    version = candidate_version(line, W3)
    assert reviewer.answered["subject"] == f"Approve {LINE} v{version} for production?"
    assert f"## {LINE} v{version}: proposed for production" in reviewer.answered["body"]
    assert "| mape | threshold |" in reviewer.answered["body"]
    assert result.state == "failed"
    assert result.task_states["approve_review"] == "failed"
    assert result.task_states["merge_review"] == "upstream_failed"
    assert result.task_states["restore_staging"] == "success"
    assert_untouched(before, line.registry_state(), version, withdrawn_because="approve_review failed")
    assert line.commits() == commits, "main changed although the review was rejected"
    assert not line.repo.is_merged(f"review/{LINE}/v{version}")
    assert line.served_version() == "1"
    assert reviewer.answered["responded_by"]["name"] == REVIEWER
    [run] = line.runs_with_key(W3)
    assert run.data.tags["review.verdict"] == "rejected" and run.data.tags["review.rejected_by"] == REVIEWER


class StaleService(http.server.ThreadingHTTPServer):
    """Something else answering on the service's stable port with an old version.

    It takes the port while the line is stopped, so the line's front cannot: the new version starts and
    reports its identity on its own side port, but what clients (and verification) reach on the stable
    port is this. It must never pass for the new deployment.
    """

    def __init__(self, port: int, version: str) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = json.dumps({"model_version": version}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # noqa: ANN002
                pass

        super().__init__(("127.0.0.1", port), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_wrong_version_served_fails_verification_and_leaves_the_registry_untouched(line):
    from mlops_lifecycle.adapters.local_service import LocalServiceDeployer

    LocalServiceDeployer(paths.local_home()).stop(LINE)  # the front and v1: the port is free to take
    stale = StaleService(line.port, "1")
    line.write(deploy={"verify_timeout_seconds": 8, "poll_interval_seconds": 0.5})
    before = line.registry_state()
    try:
        result = line.run(W4)
    finally:
        stale.shutdown()
        stale.server_close()
        line.write()
    version = candidate_version(line, W4)
    assert result.state == "failed"
    assert result.task_states["verify_serving"] == "failed"
    assert result.task_states["promote"] == "upstream_failed"
    assert result.task_states["restore_staging"] == "success"
    assert_untouched(before, line.registry_state(), version, withdrawn_because="verify_serving failed")
    assert f"## {LINE} v{version}: promoted to production" not in line.changelog()


def test_next_window_is_gated_against_production_and_promoted(line):
    result = line.run(W5)
    assert result.state == "success", result.task_states
    version = candidate_version(line, W5)
    [run] = line.runs_with_key(W5)
    assert run.data.tags["lifecycle.production_version"] == "1"
    assert "production.mape" in run.data.metrics
    assert line.registry.aliases(LINE) == {"staging": version, "production": version, "previous_production": "1"}
    [replaced] = [e for e in events(line.registry.version_tags(LINE, "1")) if e["event"] == "replaced"]
    assert replaced["by_version"] == version and replaced["kept_as"] == "previous_production"
    assert line.registry.version_tags(LINE, version)["audit.previous_production_version"] == "1"
    assert f"## {LINE} v{version}: promoted to production" in line.changelog()
    assert line.served_version() == version


W6 = window(9, 11)


def test_an_old_window_run_after_a_newer_promotion_is_superseded_and_changes_nothing(line):
    """Running an old window again (what clearing an old run does): skipped first, nothing trained or deployed."""
    state, commits, served = line.registry_state(), line.commits(), line.served_version()

    result = line.run(W1)

    assert result.state == "success", "a superseded run is not an error"
    assert result.task_states["route"] == "skipped"
    assert set(result.task_states.values()) == {"skipped"}, result.task_states
    assert len(line.runs_with_key(W1)) == 1, "trained again"
    assert line.registry_state() == state and line.commits() == commits
    assert line.served_version() == served


def test_every_step_that_writes_refuses_a_superseded_candidate(line):
    """Clearing any one task of an old run: stage, review, merge, deploy and promote each stop before writing."""
    from types import SimpleNamespace

    from mlops_lifecycle.config import load_model_line
    from mlops_lifecycle.dag_factory import build_lifecycle_dag
    from mlops_lifecycle.exceptions import Superseded

    [old_run] = line.runs_with_key(W1)
    tags = old_run.data.tags
    old: dict = {
        "model_line": LINE,
        "model_name": LINE,
        "model_version": tags["lifecycle.registered_version"],
        "run_id": old_run.info.run_id,
        "experiment_id": old_run.info.experiment_id,
        "run_key": tags["lifecycle.run_key"],
        "production_version": None,
        "code_revision": tags["lifecycle.code_revision"],
        "snapshot": "old.parquet",
        "window": "old",
        "holdout_start": "2026-09-07",
    }
    review = {"review_id": f"review/{LINE}/v1", "branch": f"review/{LINE}/v1", "commit": "x", "repository": "r"}
    approval = {"decision": "approved", "approved_by": ["someone"], "approved_at": "2026-10-05T03:00:00+00:00"}
    merge = {"merge_commit": "0" * 40, "review_id": review["review_id"]}
    rendered = {
        "candidate": old,
        "verdict": {"passed": True, "production_version": None, "results": [], "metrics": {}},
        "review": review,
        "approval": approval,
        "merge": merge,
        "deployment": {"service_url": "http://127.0.0.1:9", "revision": "x", "deployments": {}},
        "verification": {"url": "http://127.0.0.1:9", "served_version": "1"},
    }
    dag = build_lifecycle_dag(load_model_line(MODEL_LINES / f"{LINE}.yaml"))
    context = {"ti": SimpleNamespace(dag_id=DAG_ID, run_id="manual__old_run_cleared")}
    state, commits, served = line.registry_state(), line.commits(), line.served_version()
    production = state["aliases"]["production"]

    for task_id in ("stage", "open_review", "approve_review", "merge_review", "deploy", "promote"):
        task = dag.get_task(task_id)
        for field in task.template_fields:
            setattr(task, field, rendered[field])
        with pytest.raises(Superseded, match=f"superseded by v{production} .*nothing deployed"):
            task.execute(context)

    assert line.registry_state() == state and line.commits() == commits
    assert line.served_version() == served


def test_a_failed_attempt_then_a_successful_rerun_leaves_a_true_audit_record(line):
    """Every audit field read back: events in order naming their runs, approvers as recorded, no stale state."""
    from mlops_lifecycle.adapters.local_service import LocalServiceDeployer

    previous = line.served_version()
    LocalServiceDeployer(paths.local_home()).stop(LINE)
    stale = StaleService(line.port, previous)  # the first attempt's front cannot take the port
    line.write(deploy={"verify_timeout_seconds": 8, "poll_interval_seconds": 0.5})
    try:
        first = line.run(W6)
    finally:
        stale.shutdown()
        stale.server_close()
        line.write()
    assert first.state == "failed" and first.task_states["restore_staging"] == "success", first.task_states

    second = line.run(W6)

    assert second.state == "success", second.task_states
    version = candidate_version(line, W6)
    assert line.registry.aliases(LINE) == {"staging": version, "production": version, "previous_production": previous}
    [run] = line.runs_with_key(W6)
    tags = line.registry.version_tags(LINE, version)
    log = events(tags)
    assert [e["event"] for e in log] == ["staged", "staging_withdrawn", "staged", "promoted"]
    staged_first, withdrawn, staged_again, promoted = log
    assert staged_first["by"] == f"airflow:{DAG_ID}/{first.run_id}" == withdrawn["by"]
    assert staged_again["by"] == f"airflow:{DAG_ID}/{second.run_id}" == promoted["by"]
    assert staged_first["from"] == withdrawn["to"] == staged_again["from"] == previous
    assert "verify_serving failed" in withdrawn["because"]
    assert staged_first["at"] <= withdrawn["at"] <= staged_again["at"] <= promoted["at"]
    auto = "auto_approve (model-line config)"
    assert promoted["approved_by"] == [auto] and promoted["from"] == previous and promoted["to"] == version
    # the facts, written once
    assert tags["audit.run_id"] == run.info.run_id and tags["audit.run_key"] == run.data.tags["lifecycle.run_key"]
    assert tags["audit.data_window"] == "2024-11-09..2026-11-09" and tags["audit.gate_verdict"] == "passed"
    assert tags["audit.code_revision"] == run.data.tags["lifecycle.code_revision"]
    assert json.loads(tags["audit.metrics"])["mape"] == pytest.approx(run.data.metrics["mape"])
    # the promotion, as it happened in the run that made it
    assert tags["audit.approved_by"] == auto and json.loads(run.data.tags["review.approval"])["approved_by"] == [auto]
    assert tags["audit.promoted_by"] == promoted["by"] and tags["audit.previous_production_version"] == previous
    assert tags["audit.merge_commit"] == promoted["merge_commit"]
    assert tags["audit.review_id"] == f"review/{LINE}/v{version}"
    # nothing that contradicts the aliases: withdrawal and staging live only in the event log
    assert not [k for k in tags if k.startswith(("audit.staging_withdrawn", "audit.staged_"))]
    entry = line.changelog().split(f"## {LINE} v{version}: promoted to production")[1]
    assert f"Approved by {auto} at" in entry and f"Previous production: v{previous}" in entry
    assert line.served_version() == version


W7 = window(16, 11)


class GoldenSetSaboteur(threading.Thread):
    """After training and before approval: the candidate's run gets a golden set its model does not reproduce.

    The package step copies it into the model package, and the new service refuses to start (its golden-set
    check at start-up). Then it approves the review, so the lifecycle goes on to deploy.
    """

    def __init__(self, line: Line, logical_date: datetime) -> None:
        super().__init__(daemon=True)
        self.line, self.logical_date = line, logical_date
        self.error: BaseException | None = None
        self.reviewer = Reviewer(DAG_ID, "Approve")

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                runs = self.line.runs_with_key(self.logical_date)
                if runs and runs[0].info.status == "FINISHED":
                    break
                time.sleep(0.5)
            [run] = runs
            client = self.line.registry.client
            golden = json.loads(Path(client.download_artifacts(run.info.run_id, "golden_set.json")).read_text())
            golden["predictions"] = [p + 1.0 for p in golden["predictions"]]
            client.log_dict(run.info.run_id, golden, "golden_set.json")
        except BaseException as exc:  # reported by the test
            self.error = exc
            return
        self.reviewer.run()  # in this thread: approval comes only after the golden set is wrong


def test_a_new_version_that_cannot_come_up_leaves_the_old_one_serving_and_the_registry_untouched(line):
    """Blue/green: the new service starts beside the old one and fails its golden-set check; the old one
    answers on the stable port throughout (not one failed request), the run fails saying so, nothing moves."""
    from mlops_lifecycle.adapters.local_service import LocalServiceDeployer

    previous = line.served_version()
    line.write(review={"auto_approve": False}, deploy={"verify_timeout_seconds": 120, "poll_interval_seconds": 0.5})
    before = line.registry_state()
    saboteur, hammer = GoldenSetSaboteur(line, W7), Hammer(line.port, pause=0.01)
    saboteur.start()
    hammer.start()
    try:
        result = line.run(W7)
    finally:
        hammer.stop()
        saboteur.reviewer.stop()
        line.write()
    assert saboteur.error is None and saboteur.reviewer.error is None, saboteur.error or saboteur.reviewer.error
    version = candidate_version(line, W7)
    assert result.state == "failed"
    assert result.task_states["deploy"] == "failed"
    assert result.task_states["verify_serving"] == result.task_states["promote"] == "upstream_failed"
    assert result.task_states["restore_staging"] == "success"
    assert_untouched(before, line.registry_state(), version, withdrawn_because="deploy failed")
    assert f"## {LINE} v{version}: promoted to production" not in line.changelog()

    # the old version answered on the stable port all along, and still does
    assert hammer.errors == [] and hammer.runs() and {v for v, _ in hammer.runs()} == {previous}, hammer.errors[:5]
    assert line.served_version() == previous
    state = LocalServiceDeployer(paths.local_home()).state(LINE)
    assert state.serving.model_version == previous and state.starting is None
    # the run says why, and what still serves
    alerts = [json.loads(x) for x in (paths.local_home() / "alerts" / f"{LINE}.jsonl").read_text().splitlines()]
    [alert] = [a for a in alerts if a["task_id"] == "deploy" and a["run_id"] == result.run_id]
    new_log = paths.local_home() / "services" / f"{LINE}-v{version}.log"
    assert alert["error"].startswith(f"DeploymentFailed: v{version} did not come up: the service process"), alert
    assert f"v{previous} still serving on http://127.0.0.1:{line.port}" in alert["error"], alert
    assert str(new_log) in alert["error"]
    failures = [json.loads(x) for x in new_log.read_text().splitlines() if '"startup_failed"' in x]
    assert failures and "golden row" in failures[-1]["error"], failures
