"""Model-line config validation: every rule has a failing case whose message names file, field and hint."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from mlops_lifecycle import paths
from mlops_lifecycle.config import load_model_line, load_model_lines
from mlops_lifecycle.exceptions import ModelLineConfigError

BASE = yaml.safe_load((paths.include_dir() / "model_lines" / "demand_forecast.yaml").read_text())


def write(folder: Path, name: str, data: object) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def mutate(edit) -> dict:  # noqa: ANN001
    data = copy.deepcopy(BASE)
    edit(data)
    return data


def test_shipped_model_lines_are_valid_and_different():
    configs, errors = load_model_lines(paths.include_dir() / "model_lines")
    assert errors == []
    by_name = {c.model_line: c for c in configs}
    assert {"demand_forecast", "high_demand_alert"} <= set(by_name)
    a, b = by_name["demand_forecast"], by_name["high_demand_alert"]
    assert a.train.entrypoint != b.train.entrypoint and a.extract.sql != b.extract.sql
    assert set(a.gate.metrics).isdisjoint(b.gate.metrics)
    assert a.schedule.cron != b.schedule.cron


CASES = {
    "unknown_key": (
        lambda d: d["train"].update(paramters={}),
        "train.paramters: unknown key (allowed keys here: backend, entrypoint,",
    ),
    "missing_section": (lambda d: d.pop("gate"), "gate: required field is missing"),
    "bad_name": (lambda d: d.update(model_line="Demand Forecast"), "model_line: String should match pattern"),
    "bad_cron": (
        lambda d: d["schedule"].update(cron="every monday"),
        "schedule.cron: 'every monday' is not a five-field cron expression",
    ),
    "preset_cron": (lambda d: d["schedule"].update(cron="@daily"), "schedule.cron: '@daily' is not a five-field cron"),
    "bad_date": (
        lambda d: d["schedule"].update(start_date="yesterday"),
        "schedule.start_date: Input should be a valid date",
    ),
    "lookback_too_short": (
        lambda d: d["window"].update(training_lookback_days=7),
        "window.training_lookback_days: Input should be greater than or equal to 28 (got 7)",
    ),
    "holdout_too_long": (
        lambda d: d["window"].update(holdout_days=300, training_lookback_days=400),
        "window: holdout_days (300) must be at most half of training_lookback_days (400)",
    ),
    "parallel_lifecycle_runs": (
        lambda d: d["schedule"].update(max_active_runs=2),
        "schedule: max_active_runs is not configurable: a line runs one lifecycle run at a time",
    ),
    "unknown_warehouse": (
        lambda d: d["extract"].update(warehouse="snowflake"),
        "extract.warehouse: Input should be one of 'duckdb', 'bigquery' (got 'snowflake')",
    ),
    "missing_sql": (lambda d: d["extract"].update(sql="sql/nope.sql"), "extract.sql: file"),
    "sql_table_undeclared": (
        lambda d: d["extract"].update(tables={"other": "other"}),
        "extract.tables: the SQL uses {{ tables.X }} for ['daily_demand']",
    ),
    "missing_entrypoint": (lambda d: d["train"].update(entrypoint="training/nope.py"), "train.entrypoint: file"),
    "gate_empty": (lambda d: d["gate"].update(metrics={}), "gate.metrics: Dictionary should have at least 1 item"),
    "gate_rule_without_limit": (
        lambda d: d["gate"]["metrics"].update(mape={"direction": "minimize"}),
        "gate.metrics.mape: a gate metric needs 'threshold', 'max_regression' or both",
    ),
    "gate_bad_direction": (
        lambda d: d["gate"]["metrics"]["mape"].update(direction="lower"),
        "gate.metrics.mape.direction: Input should be 'minimize' or 'maximize' (got 'lower')",
    ),
    "gate_threshold_not_number": (
        lambda d: d["gate"]["metrics"]["mape"].update(threshold="low"),
        "gate.metrics.mape.threshold: Input should be a valid number",
    ),
    "gate_regression_out_of_range": (
        lambda d: d["gate"]["metrics"]["mape"].update(max_regression=5),
        "gate.metrics.mape.max_regression: Input should be less than or equal to 1 (got 5)",
    ),
    "same_aliases": (
        lambda d: d["registry"].update(staging_alias="production"),
        "registry: staging, production and previous-production aliases must differ",
    ),
    "bad_alias": (
        lambda d: d["registry"].update(production_alias="prod alias"),
        "registry.production_alias: String should match pattern",
    ),
    "environments_order": (
        lambda d: d["deploy"].update(environments=["production", "dev"]),
        "deploy.environments: the last environment must be 'production'",
    ),
    "environments_duplicate": (
        lambda d: d["deploy"].update(environments=["dev", "dev", "production"]),
        "deploy.environments: environments must be unique",
    ),
    "port_range": (
        lambda d: d["deploy"].update(port=80),
        "deploy.port: Input should be greater than or equal to 1024 (got 80)",
    ),
    "bad_email": (
        lambda d: d["alerting"].update(emails=["not-an-email"]),
        "alerting.emails.0: String should match pattern",
    ),
    "review_backend": (
        lambda d: d["review"].update(backend="github"),
        "review.backend: Input should be one of 'local_git', 'gitlab' (got 'github')",
    ),
    "retries_negative": (
        lambda d: d.update(retries=-1),
        "retries: Input should be greater than or equal to 0 (got -1)",
    ),
}


PRODUCTION = yaml.safe_load((paths.include_dir() / "examples" / "production" / "demand_forecast.yaml").read_text())

PRODUCTION_CASES = {
    "bq_table_not_qualified": (
        lambda d: d["extract"]["tables"].update(daily_demand="daily_demand"),
        "extract.tables: BigQuery tables must be fully qualified as project.dataset.table",
    ),
    "bq_missing_location": (lambda d: d["extract"].pop("location"), "extract.location: required field is missing"),
    "bq_unknown_key_lists_bigquery_keys": (
        lambda d: d["extract"].update(region="EU"),
        "extract.region: unknown key (allowed keys here: dataset, gcp_conn_id, location,",
    ),
    "duckdb_key_on_bigquery": (
        lambda d: d["extract"].update(project="Bad_Project"),
        "extract.project: String should match pattern",
    ),
    "databricks_job_and_cluster": (
        lambda d: d["train"].update(job_id=42),
        "train: job_id runs an existing job: drop cluster, existing_cluster_id, source and wheel",
    ),
    "databricks_no_cluster": (
        lambda d: d["train"].pop("cluster"),
        "train: a one-time run needs exactly one of 'cluster' (a job cluster) or 'existing_cluster_id'",
    ),
    "databricks_no_source": (
        lambda d: d["train"].pop("source"),
        "train: task 'python_file' needs 'source' (git_url, git_provider)",
    ),
    "databricks_bad_provider": (
        lambda d: d["train"]["source"].update(git_provider="gitlab"),
        "train.source.git_provider: Input should be 'gitHub', 'gitHubEnterprise', 'gitLab'",
    ),
    "databricks_secret_shape": (
        lambda d: d["train"].update(mlflow_token_secret="just-a-token-value"),
        "train.mlflow_token_secret: String should match pattern",
    ),
    "gitlab_project_path": (
        lambda d: d["review"].update(project="model-deployments"),
        "review.project: String should match pattern",
    ),
    "gitlab_auto_approve_not_allowed": (
        lambda d: d["review"].update(auto_approve=True),
        "review.auto_approve: unknown key (allowed keys here: backend, gitlab_conn_id, labels, min_approvals,",
    ),
    "gitlab_ci_needs_service_url": (
        lambda d: d["deploy"].update(service_url="demand-forecast.models.example.com"),
        "deploy.service_url: String should match pattern",
    ),
    "gitlab_review_with_local_deploy": (
        lambda d: d.update(deploy={"backend": "local_process", "port": 8601}),
        "review.backend 'gitlab' and deploy.backend 'local_process' do not go together",
    ),
}


def test_production_example_is_valid():
    config = load_model_line(paths.include_dir() / "examples" / "production" / "demand_forecast.yaml")
    assert (config.extract.warehouse, config.train.backend) == ("bigquery", "databricks")
    assert (config.review.backend, config.deploy.backend) == ("gitlab", "gitlab_ci")


@pytest.mark.parametrize("case", sorted(PRODUCTION_CASES))
def test_each_production_rule_fails_with_a_message_naming_file_and_field(tmp_path, case):
    edit, expected = PRODUCTION_CASES[case]
    data = copy.deepcopy(PRODUCTION)
    edit(data)
    path = write(tmp_path, "demand_forecast", data)
    with pytest.raises(ModelLineConfigError) as info:
        load_model_line(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value), str(info.value)


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_rule_fails_with_a_message_naming_file_and_field(tmp_path, case):
    edit, expected = CASES[case]
    path = write(tmp_path, "demand_forecast", mutate(edit))
    with pytest.raises(ModelLineConfigError) as info:
        load_model_line(path)
    message = str(info.value)
    assert str(path) in message
    assert expected in message, message


def test_file_name_must_match_model_line(tmp_path):
    path = write(tmp_path, "other_name", BASE)
    with pytest.raises(
        ModelLineConfigError, match="model_line: 'demand_forecast' must equal the file name 'other_name'"
    ):
        load_model_line(path)


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = write(tmp_path, "broken", "model_line: broken\nowner: {team: x\n")
    with pytest.raises(ModelLineConfigError, match=r"line \d+, column \d+: not valid YAML"):
        load_model_line(path)


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "listy", "- a\n- b\n")
    with pytest.raises(ModelLineConfigError, match="expected a mapping at the top level, got list"):
        load_model_line(path)


def test_several_problems_are_all_reported(tmp_path):
    data = mutate(lambda d: (d["deploy"].update(port=1), d["schedule"].update(cron="nope")))
    with pytest.raises(ModelLineConfigError) as info:
        load_model_line(write(tmp_path, "demand_forecast", data))
    assert "deploy.port" in str(info.value) and "schedule.cron" in str(info.value)


def test_one_bad_file_does_not_hide_the_good_ones(tmp_path):
    write(tmp_path, "demand_forecast", BASE)
    write(tmp_path, "broken_line", mutate(lambda d: d.update(model_line="broken_line", retries="many")))
    configs, errors = load_model_lines(tmp_path)
    assert [c.model_line for c in configs] == ["demand_forecast"]
    assert len(errors) == 1 and "broken_line.yaml" in str(errors[0]) and "retries" in str(errors[0])


def test_lines_may_not_share_a_registered_model_or_port(tmp_path):
    """Files are read in name order: the first keeps the name and port, the later one is reported."""
    write(tmp_path, "demand_forecast", BASE)
    write(tmp_path, "demand_later", mutate(lambda d: d.update(model_line="demand_later")))
    configs, errors = load_model_lines(tmp_path)
    assert [c.model_line for c in configs] == ["demand_forecast"]
    message = str(errors[0])
    assert "registry.model_name: 'demand_forecast' is already used by model line 'demand_forecast'" in message
    assert "deploy.port: 8601 is already used" in message
