"""The production-shaped lifecycle DAG end to end: BigQuery, Databricks, GitLab and its CI, all stand-ins.

The same DAG factory builds the line from the production example YAML (only addresses changed);
every cloud call goes through the real client libraries (google-cloud-bigquery and the Google
provider, the Databricks provider, python-gitlab) to local stand-ins that speak the REST contracts.
The Databricks stand-in checks the package out of git at the recorded code revision and runs the
real training entrypoint, which reads the BigQuery snapshot and logs to the real MLflow server. The
GitLab stand-in plays the reviewer and the CI: on the production deployment it starts the real
model service from the merged pin file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
import yaml

import devstack
from conftest import MODEL_LINES, REPO
from mlops_lifecycle import paths
from mlops_lifecycle.audit import events
from standins.base import Fault
from standins.bigquery import BigQueryStandIn
from standins.databricks import DatabricksStandIn
from standins.gitlab import AutoReview, CIPlan, GitLabStandIn

LINE = "prod_demand"
DAG_ID = f"{LINE}__lifecycle"
PROJECT = "platform/model-deployments"
SOURCE_TABLE = "acme-sales-prod.sales.daily_demand"
SNAPSHOTS = "acme-mlops-prod.mlops_snapshots"
EXAMPLE = yaml.safe_load((paths.include_dir() / "examples" / "production" / "demand_forecast.yaml").read_text())
# a secret in every connection the line uses: none of them may show up anywhere people or other tools read
CANARIES = {
    "gitlab": "CANARY-gitlab-token-5f1c",
    "databricks": "CANARY-dapi-token-9b2e",
    "mlflow": "CANARY-mlflow-password-77aa",
}


def window(day: int, month: int) -> datetime:
    return datetime(2026, month, day, 3, tzinfo=UTC)


class ProductionStack:
    """The stand-ins, the line's YAML pointing at them, and what a test asserts on."""

    def __init__(self, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from mlops_lifecycle.adapters.sample_data import SAMPLE_EPOCH, generate_daily_demand

        self.home = home
        self.service_port = devstack.free_port()
        self.service_url = f"http://127.0.0.1:{self.service_port}"
        self.code_repo, self.revision = self._code_repository(home / "code")
        monkeypatch.setenv("MLOPS_CODE_REVISION", self.revision)

        self.bigquery = BigQueryStandIn(project="acme-mlops-prod", job_seconds=0.5).start()
        key = self.bigquery.service_account_file(home / "gcp-key.json")
        self.bigquery.create_dataset("sales", location="EU", project="acme-sales-prod")
        self.bigquery.load_table(SOURCE_TABLE, generate_daily_demand(SAMPLE_EPOCH, date(2026, 12, 31)))
        self.bigquery.create_dataset("mlops_snapshots", location="EU")
        bq_env = {"BIGQUERY_EMULATOR_HOST": self.bigquery.emulator_host, "GOOGLE_APPLICATION_CREDENTIALS": str(key)}
        for name, value in bq_env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", self.bigquery.airflow_connection_json(key_path=key))

        self.databricks = DatabricksStandIn(
            home / "databricks", base_env={**bq_env, "OMP_NUM_THREADS": "1"}, token=CANARIES["databricks"]
        ).start()
        monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_DEFAULT", self.databricks.airflow_connection_json())

        self.deployed: list[tuple[str, str]] = []
        self.serve_version_override: str | None = None
        self.gitlab = GitLabStandIn(
            {CANARIES["gitlab"]: "mlops-bot", "alice-token": "alice", "bob-token": "bob"},
            project_path=PROJECT,
            initial_files={"README.md": "Model deployments\n"},
            ci=CIPlan(environments=["dev", "staging", "production"], step_seconds=0.1, on_deploy=self._on_deploy),
            auto_review=AutoReview(approver="alice", delay_seconds=0.2),
        ).start()
        monkeypatch.setenv(
            "AIRFLOW_CONN_GITLAB_DEFAULT",
            json.dumps({"conn_type": "http", "host": self.gitlab.url, "password": CANARIES["gitlab"]}),
        )
        # MLflow's UI address with credentials in it (a browser would use them): links must drop them
        mlflow = json.loads(os.environ["AIRFLOW_CONN_MLFLOW_DEFAULT"])
        ui = mlflow["extra"]["ui_url"].replace("://", f"://viewer:{CANARIES['mlflow']}@", 1)
        monkeypatch.setenv(
            "AIRFLOW_CONN_MLFLOW_DEFAULT", json.dumps({**mlflow, "extra": {**mlflow["extra"], "ui_url": ui}})
        )
        self.write()

    @staticmethod
    def _code_repository(folder: Path) -> tuple[Path, str]:
        """The package as Databricks sees it: a git repository holding include/ at one commit."""
        shutil.copytree(REPO / "include", folder / "include", ignore=shutil.ignore_patterns("__pycache__"))
        env = {
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@x",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@x",
        }
        for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "package"]):
            subprocess.run(["git", "-C", str(folder), *args], check=True, env={**env, "PATH": "/usr/bin:/bin"})
        sha = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        return folder, sha.stdout.strip()

    def _on_deploy(self, environment: str, sha: str, files: dict[str, str]) -> None:
        """The deployment repository's CI: production runs the real service from the merged pin."""
        self.deployed.append((environment, sha))
        if environment != "production":
            return
        from mlops_lifecycle.adapters.local_service import LocalServiceDeployer
        from mlops_lifecycle.hooks.mlflow_registry import MlflowRegistryHook

        pin = {key: str(value) for key, value in yaml.safe_load(files[f"models/{LINE}.yaml"]).items()}
        registry = MlflowRegistryHook()
        if self.serve_version_override:
            other = registry.client.get_model_version(pin["model_name"], self.serve_version_override)
            pin.update(model_version=other.version, run_id=other.run_id)
        LocalServiceDeployer(self.home).deploy(
            pin=pin, port=self.service_port, env=registry.process_env(), revision=sha
        )

    def write(self, **changes: object) -> None:
        data = json.loads(json.dumps(EXAMPLE, default=str))
        data.update(model_line=LINE, retries=1, retry_delay_seconds=1)
        data["registry"] = {"model_name": LINE, "experiment": f"/e2e/{LINE}"}
        data["extract"].update(poll_interval_seconds=0.2)
        data["train"].update(
            parameters={"max_iter": 60, "learning_rate": 0.1},
            poll_interval_seconds=0.5,
            source={"git_url": f"file://{self.code_repo}", "git_provider": "gitLab", "include_path": "include"},
            cluster={"spark_version": "15.4.x-cpu-ml-scala2.12", "node_type_id": "local", "num_workers": 0},
            libraries=[],
        )
        data["train"].pop("mlflow_token_secret")
        data["review"].update(project=PROJECT, reviewers=["alice"], poll_interval_seconds=0.2, timeout_hours=0.05)
        data["deploy"].update(
            service_url=self.service_url,
            poll_interval_seconds=0.2,
            pipeline_timeout_minutes=2,
            deployment_timeout_minutes=2,
            verify_timeout_seconds=60,
        )
        for key, value in changes.items():
            data[key] = value
        (MODEL_LINES / f"{LINE}.yaml").write_text(yaml.safe_dump(data))

    def run(self, logical_date: datetime) -> devstack.LifecycleResult:
        return devstack.run_lifecycle(DAG_ID, logical_date)

    def registry_state(self) -> dict:
        from mlops_lifecycle.hooks.mlflow_registry import MlflowRegistryHook

        hook = MlflowRegistryHook()
        versions = hook.client.search_model_versions(f"name='{LINE}'")
        return {
            "aliases": hook.aliases(LINE) if versions else {},
            "versions": {v.version: dict(hook.client.get_model_version(LINE, v.version).tags) for v in versions},
        }

    def requests(self) -> dict[str, int]:
        return {
            "bigquery": len(self.bigquery.log),
            "databricks": len(self.databricks.log),
            "gitlab": len(self.gitlab.log),
        }

    def stop(self) -> None:
        from mlops_lifecycle.adapters.local_service import LocalServiceDeployer

        LocalServiceDeployer(self.home).stop(LINE)
        for standin in (self.gitlab, self.databricks, self.bigquery):
            standin.stop()
        (MODEL_LINES / f"{LINE}.yaml").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def prod(stack, tmp_path_factory):  # noqa: ANN001, ANN201
    monkeypatch = pytest.MonkeyPatch()
    production = ProductionStack(tmp_path_factory.mktemp("production"), monkeypatch)
    yield production
    production.stop()
    monkeypatch.undo()


def test_first_promotion_through_bigquery_databricks_and_gitlab(prod):
    result = prod.run(window(5, 10))
    assert result.state == "success", result.task_states

    state = prod.registry_state()
    assert state["aliases"] == {"production": "1", "staging": "1"}
    tags = state["versions"]["1"]
    # one snapshot job, one Databricks run, one branch, one MR, one promotion
    assert prod.bigquery.query_executions == 1 and len(prod.bigquery.jobs) == 1
    (job,) = prod.bigquery.jobs.values()
    assert job.labels["model-line"] == "prod_demand" and job.labels["airflow-run"].startswith("manual")
    assert tags["audit.snapshot"].startswith("bq://acme-mlops-prod.mlops_snapshots.prod_demand__")
    assert prod.databricks.launches == 1
    (run,) = prod.databricks.runs.values()
    assert tags["audit.code_revision"] == prod.revision[:12] or tags["audit.code_revision"] == prod.revision
    (mr,) = prod.gitlab.merge_requests
    assert mr["state"] == "merged" and mr["source_branch"] == f"review/{LINE}/v1"
    assert tags["audit.review_id"] == f"{PROJECT}!{mr['iid']}" and tags["audit.review_url"] == mr["web_url"]
    assert tags["audit.approved_by"] == "alice"
    assert tags["audit.merge_commit"] == mr["merge_commit_sha"]
    (pipeline,) = prod.gitlab.pipelines
    assert tags["audit.pipeline_id"] == str(pipeline["id"])
    deployments = json.loads(tags["audit.deployments"])
    assert list(deployments) == ["dev", "staging", "production"]
    assert [env for env, _ in prod.deployed] == ["dev", "staging", "production"]
    # the production changelog is on main, committed without triggering another deployment
    changelog = prod.gitlab.file_at("main", f"changelog/{LINE}.md")
    assert f"## {LINE} v1: promoted to production" in changelog
    assert prod.gitlab.commits_on("main")[0]["message"].endswith("[skip ci]")
    assert len(prod.gitlab.pipelines) == 1
    assert devstack.service_version(prod.service_url)["model_version"] == "1"
    print("\nrequests per lifecycle:", prod.requests())


def test_closed_merge_request_leaves_the_registry_as_it_was(prod):
    before = prod.registry_state()
    prod.gitlab.auto_review = AutoReview(approver="bob", merge=False, close=True, delay_seconds=0.2)
    try:
        result = prod.run(window(12, 10))
    finally:
        prod.gitlab.auto_review = AutoReview(approver="alice", delay_seconds=0.2)
    assert result.state == "failed"
    assert result.task_states["await_merge"] == "failed" and result.task_states["promote"] != "success"
    after = prod.registry_state()
    assert after["aliases"] == before["aliases"]
    [withdrawn] = [e for e in events(after["versions"]["2"]) if e["event"] == "staging_withdrawn"]
    assert "await_merge failed" in withdrawn["because"]
    assert len(prod.gitlab.pipelines) == 1, "nothing was merged, so nothing was deployed"


def test_failed_staging_deployment_leaves_the_registry_as_it_was(prod):
    before = prod.registry_state()
    prod.gitlab.ci.deployment_status = {"staging": "failed"}
    try:
        result = prod.run(window(19, 10))
    finally:
        prod.gitlab.ci.deployment_status = {}
    assert result.state == "failed"
    assert result.task_states["await_pipeline"] == "failed" or result.task_states["await_deployments"] == "failed"
    assert prod.registry_state()["aliases"] == before["aliases"]
    assert devstack.service_version(prod.service_url)["model_version"] == "1"


def test_lost_answers_and_retries_make_each_side_effect_once(prod):
    """Every side-effecting request is answered by a dropped connection once; clients and task retries
    recover, and there is still one snapshot job, one Databricks run, one branch, one MR, one promotion."""
    jobs, launches, mrs = len(prod.bigquery.jobs), prod.databricks.launches, len(prod.gitlab.merge_requests)
    prod.bigquery.inject("POST", r".*/jobs", Fault.drop_after())
    prod.databricks.inject("POST", r".*/runs/submit", Fault.drop_after())
    for path in (r".*/repository/branches", r".*/repository/commits", r".*/merge_requests"):
        prod.gitlab.inject("POST", path, Fault.drop_after())

    result = prod.run(window(26, 10))

    assert result.state == "success", result.task_states
    assert len(prod.bigquery.jobs) == jobs + 1
    assert prod.databricks.launches == launches + 1
    new_mrs = prod.gitlab.merge_requests[mrs:]
    assert len(new_mrs) == 1 and new_mrs[0]["state"] == "merged"
    branch = new_mrs[0]["source_branch"]
    state = prod.registry_state()
    version = state["aliases"]["production"]
    title = f"{LINE}: propose v{version} for production"
    proposals = [c for c in prod.gitlab.commits_on(branch) if c["title"] == title]
    assert len(proposals) == 1
    assert state["versions"][version]["audit.previous_production_version"] == "1"
    changelog = prod.gitlab.file_at("main", f"changelog/{LINE}.md")
    assert changelog.count(f"## {LINE} v{version}: promoted to production") == 1


def test_production_serving_another_version_leaves_the_registry_as_it_was(prod):
    """The CI reports success but production serves the previous version: verify_serving stops the run."""
    before = prod.registry_state()
    serving = before["aliases"]["production"]
    prod.serve_version_override = serving
    prod.write(
        deploy={
            **EXAMPLE["deploy"],
            "service_url": prod.service_url,
            "poll_interval_seconds": 0.2,
            "verify_timeout_seconds": 6,
        }
    )
    try:
        result = prod.run(window(2, 11))
    finally:
        prod.serve_version_override = None
        prod.write()
    assert result.state == "failed"
    assert result.task_states["await_deployments"] == "success"
    assert result.task_states["verify_serving"] == "failed" and result.task_states["promote"] != "success"
    after = prod.registry_state()
    assert after["aliases"] == before["aliases"]
    candidate = max(after["versions"], key=int)
    [withdrawn] = [e for e in events(after["versions"][candidate]) if e["event"] == "staging_withdrawn"]
    assert "verify_serving failed" in withdrawn["because"]
    assert devstack.service_version(prod.service_url)["model_version"] == serving


def test_no_connection_secret_appears_in_logs_xcom_mlflow_changelogs_merge_requests_or_links(prod, capfd):
    """Every connection carries a canary secret; after a lifecycle run nothing anyone reads holds one."""
    capfd.readouterr()
    result = prod.run(window(9, 11))
    logs = "".join(capfd.readouterr())
    assert result.state == "success", result.task_states
    assert "Candidate:" in logs, "the task logs were not captured: the check below would prove nothing"

    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    from mlops_lifecycle.hooks.mlflow_registry import MlflowRegistryHook

    with create_session() as session:
        xcoms = session.query(XComModel.key, XComModel.value).filter(XComModel.dag_id == DAG_ID).all()
    links = [value for key, value in xcoms if key.startswith("_link_")]
    assert links and any("#/experiments/" in str(v) for v in links), links
    client = MlflowRegistryHook().client
    experiment = client.get_experiment_by_name(f"/e2e/{LINE}")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    versions = client.search_model_versions(f"name='{LINE}'")
    gitlab = [
        *(json.dumps(mr) for mr in prod.gitlab.merge_requests),
        *(json.dumps(prod.gitlab.notes(mr["iid"])) for mr in prod.gitlab.merge_requests),
        *(json.dumps(prod.gitlab.commits_on(branch)) for branch in prod.gitlab.branches),
        *(prod.gitlab.file_at("main", path) or "" for path in (f"changelog/{LINE}.md", f"models/{LINE}.yaml")),
    ]
    where = {
        "task logs": logs,
        "XCom (links included)": json.dumps([(k, v) for k, v in xcoms], default=str),
        "MLflow run tags and params": json.dumps([(r.data.tags, r.data.params) for r in runs]),
        "MLflow model version tags": json.dumps([dict(v.tags) for v in versions]),
        "GitLab merge requests, notes, commits, changelog, pin": "\n".join(gitlab),
        "Databricks run requests": json.dumps([run.spec for run in prod.databricks.runs.values()], default=str),
    }
    assert all(where.values()), {k: bool(v) for k, v in where.items()}
    leaks = {place: name for place, text in where.items() for name, canary in CANARIES.items() if canary in text}
    assert leaks == {}, f"connection secrets leaked: {leaks}"
