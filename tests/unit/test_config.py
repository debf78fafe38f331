"""Model-line config validation: every rule has a failing case whose message names file, field and hint."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
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
        "train.paramters: unknown key; did you mean 'parameters'? (allowed keys here: backend, entrypoint,",
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
    # accepted before, but wrong: no coercion, finite numbers, names and paths that stay where they belong
    "retries_boolean": (lambda d: d.update(retries=True), "retries: expected an integer, got the boolean true"),
    "retries_string": (lambda d: d.update(retries="3"), "retries: Input should be a valid integer (got '3')"),
    "threshold_infinite": (
        lambda d: d["gate"]["metrics"]["mape"].update(threshold=float("inf")),
        "gate.metrics.mape.threshold: Input should be a finite number",
    ),
    "gate_metric_never_logged": (
        lambda d: d["gate"]["metrics"].update(accuracy={"direction": "maximize", "threshold": 0.9}),
        "gate.metrics: ['accuracy'] not computed by training/demand_forecast.py (its METRICS: "
        "['mae', 'mape', 'r2', 'rmse'])",
    ),
    "six_field_cron": (
        lambda d: d["schedule"].update(cron="0 0 3 * * 1"),
        "schedule.cron: '0 0 3 * * 1' is not a five-field cron expression",
    ),
    "timezone_yaml_boolean": (
        lambda d: d["schedule"].update(timezone=False),
        "schedule.timezone: expected a string, got the boolean false (YAML reads unquoted yes/no/on/off",
    ),
    "timezone_unknown": (
        lambda d: d["schedule"].update(timezone="Mars/Olympus_Mons"),
        "schedule.timezone: 'Mars/Olympus_Mons' is not an IANA time zone",
    ),
    "impossible_date": (
        lambda d: d["schedule"].update(start_date="2026-02-30"),
        "schedule.start_date: Input should be a valid date",
    ),
    "tag_too_long": (lambda d: d.update(tags=["x" * 101]), "tags.0: String should match pattern"),
    "sql_absolute": (lambda d: d["extract"].update(sql="/etc/passwd"), "extract.sql: '/etc/passwd' is absolute"),
    "sql_outside_include": (
        lambda d: d["extract"].update(sql="../README.md"),
        "extract.sql: '../README.md' leads outside include/",
    ),
    "entrypoint_outside_include": (
        lambda d: d["train"].update(entrypoint="training/../../scripts/demo.py"),
        "train.entrypoint: 'training/../../scripts/demo.py' leads outside include/",
    ),
    "variant_entrypoint_outside_include": (
        lambda d: d["backtest"]["variants"]["shallow"].update(entrypoint="/tmp/x.py"),
        "backtest.variants.shallow.entrypoint: '/tmp/x.py' is absolute",
    ),
    "review_repository_path": (
        lambda d: d["review"].update(repository="../../elsewhere"),
        "review.repository: String should match pattern",
    ),
    "duckdb_table_is_a_path": (
        lambda d: d["extract"]["tables"].update(daily_demand="../../secrets/table"),
        "extract.tables: local sample tables are plain names (letters, digits, _), not paths, got",
    ),
    "port_of_airflow": (lambda d: d["deploy"].update(port=8080), "deploy.port: 8080 is Airflow's port on this stack"),
    "port_of_mlflow": (lambda d: d["deploy"].update(port=5000), "deploy.port: 5000 is MLflow's port on this stack"),
    "monitor_cron": (
        lambda d: d["monitoring"].update(cron="@hourly"),
        "monitoring.cron: '@hourly' is not a five-field cron expression",
    ),
    "monitor_timezone": (
        lambda d: d["monitoring"].update(timezone="Mars/Olympus"),
        "monitoring.timezone: 'Mars/Olympus' is not an IANA time zone",
    ),
    "monitor_psi_not_positive": (
        lambda d: d["monitoring"]["limits"].update(psi=0),
        "monitoring.limits.psi: Input should be greater than 0",
    ),
    "monitor_p_value_range": (
        lambda d: d["monitoring"]["limits"].update(p_value=1.5),
        "monitoring.limits.p_value: Input should be less than 1",
    ),
    "monitor_unknown_limit": (
        lambda d: d["monitoring"]["limits"].update(ks=0.1),
        "monitoring.limits.ks: unknown key (allowed keys here: min_rows, null_rate_increase, out_of_range_rate,",
    ),
    "monitor_key_not_a_feature": (
        lambda d: d["monitoring"]["ground_truth"].update(key=["store_id"]),
        "monitoring.ground_truth.key: ['store_id'] are not features of training/demand_forecast.py",
    ),
    "monitor_truth_sql_missing": (
        lambda d: d["monitoring"]["ground_truth"].update(sql="sql/actuals.sql"),
        "monitoring.ground_truth.sql: file",
    ),
    "monitor_negative_cooldown": (
        lambda d: d["monitoring"].update(cooldown_hours=-1),
        "monitoring.cooldown_hours: Input should be greater than or equal to 0",
    ),
    "monitor_bigquery_needs_its_table": (
        lambda d: d["monitoring"].update(served="bigquery"),
        "monitoring.served_table: required with served: bigquery",
    ),
    "monitor_bigquery_needs_a_bigquery_warehouse": (
        lambda d: d["monitoring"].update(served="bigquery", served_table="acme-ml-prod.monitoring.prediction_log"),
        "monitoring.served: 'bigquery' snapshots the shipped logs into extract's BigQuery dataset, but "
        "extract.warehouse is 'duckdb'",
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
    "monitoring_reads_the_local_log_only": (
        lambda d: d.update(monitoring={"cron": "0 5 * * *"}),
        "monitoring.served: 'prediction_log' reads the local service's log, but deploy.backend is 'gitlab_ci'",
    ),
    "production_alerts_need_smtp": (
        lambda d: d["alerting"].pop("smtp_conn_id"),
        "alerting.smtp_conn_id: required for a line deployed to production with alerting.emails",
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


SHIPPED_TEXT = (paths.include_dir() / "model_lines" / "demand_forecast.yaml").read_text()

# what only the file's text can show (the dict cases above go through yaml.safe_dump)
TEXT_CASES = {
    "impossible_date_unquoted": (
        SHIPPED_TEXT.replace("start_date: 2026-01-05", "start_date: 2026-02-30"),
        "schedule.start_date: Input should be a valid date",
    ),
    "duplicate_key": (
        SHIPPED_TEXT.replace("retries: 2\n", "retries: 2\nretries: 5\n"),
        "duplicate key 'retries' (first at line",
    ),
    "alias_expansion": (
        "base: &b {a: [1, 2, 3]}\n" + SHIPPED_TEXT.replace("  parameters:", "  parameters: {x: *b}\n  _:", 1),
        "YAML aliases (*name) are not allowed",
    ),
    "merge_key": ("a: &a {x: 1}\nb:\n  <<: *a\n", "YAML merge keys (<<) are not allowed"),
    "too_big": ("# " + "x" * 300_000 + "\n" + SHIPPED_TEXT, "a model-line file is at most 262144 bytes"),
}


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_each_text_problem_names_the_file_line_and_column(tmp_path, case):
    text, expected = TEXT_CASES[case]
    path = tmp_path / "demand_forecast.yaml"
    path.write_text(text)
    with pytest.raises(ModelLineConfigError) as info:
        load_model_line(path)
    message = str(info.value)
    assert str(path) in message and expected in message, message


def test_errors_give_the_line_and_column_of_the_value(tmp_path):
    path = tmp_path / "demand_forecast.yaml"
    path.write_text(SHIPPED_TEXT.replace("retries: 2\n", "retries: true\n"))
    line = 1 + SHIPPED_TEXT.splitlines().index("retries: 2")
    with pytest.raises(ModelLineConfigError, match=rf"line {line}, column 10: retries: expected an integer"):
        load_model_line(path)


def test_non_utf8_bytes_are_named_with_their_line(tmp_path):
    path = tmp_path / "demand_forecast.yaml"
    path.write_bytes(SHIPPED_TEXT.replace("description:", "description: caf\xe9", 1).encode("latin-1"))
    with pytest.raises(ModelLineConfigError, match=r"line \d+: not UTF-8 \(byte 0xe9"):
        load_model_line(path)


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
    """The line that had the name and port first keeps them; the newcomer is refused, naming both files."""
    import os

    first = write(tmp_path, "demand_forecast", BASE)
    os.utime(first, (1_700_000_000, 1_700_000_000))  # in the folder long before the newcomer
    write(tmp_path, "aaa_newcomer", mutate(lambda d: d.update(model_line="aaa_newcomer")))  # sorts first
    configs, errors = load_model_lines(tmp_path)
    assert [c.model_line for c in configs] == ["demand_forecast"], "adding a file took a running line away"
    message = str(errors[0])
    assert "aaa_newcomer.yaml" in message.splitlines()[0]
    assert (
        f"registry.model_name: 'demand_forecast' is already used by model line 'demand_forecast' ({first})" in message
    )
    assert "deploy.port: 8601 is already used" in message


def test_yml_files_are_model_lines_too_and_hidden_files_are_not(tmp_path):
    write(tmp_path, "demand_forecast", BASE)
    (tmp_path / "high_demand_alert.yml").write_text(
        (paths.include_dir() / "model_lines" / "high_demand_alert.yaml").read_text()
    )
    (tmp_path / ".#demand_forecast.yaml").symlink_to(tmp_path / "nowhere")  # an editor's lock file
    (tmp_path / ".demand_forecast.yaml.swp").write_bytes(b"\x00\x01")
    configs, errors = load_model_lines(tmp_path)
    assert [c.model_line for c in configs] == ["demand_forecast", "high_demand_alert"] and errors == []


def test_a_broken_symlink_is_its_own_error(tmp_path):
    write(tmp_path, "demand_forecast", BASE)
    (tmp_path / "gone_line.yaml").symlink_to(tmp_path / "moved_away.yaml")
    configs, errors = load_model_lines(tmp_path)
    assert [c.model_line for c in configs] == ["demand_forecast"]
    assert "gone_line.yaml" in str(errors[0]) and "a broken symbolic link?" in str(errors[0])


def test_one_line_in_two_files_is_refused_once(tmp_path):
    write(tmp_path, "demand_forecast", BASE)
    (tmp_path / "demand_forecast.yml").write_text(yaml.safe_dump(BASE))
    configs, errors = load_model_lines(tmp_path)
    assert [c.model_line for c in configs] == ["demand_forecast"]
    assert "model_line: 'demand_forecast' is also defined by" in str(errors[0])


# -- the same validation outside Airflow, and the JSON Schema for editors --------------------------------
def validate_command(*args: str) -> subprocess.CompletedProcess:
    script = paths.REPO_ROOT / "scripts" / "validate_model_lines.py"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)


def test_the_validate_command_passes_the_shipped_lines_and_names_a_bad_file(tmp_path):
    done = validate_command(str(paths.include_dir() / "model_lines"))
    assert done.returncode == 0 and "2 valid model line(s): demand_forecast, high_demand_alert" in done.stdout
    for shipped in (paths.include_dir() / "model_lines").glob("*.yaml"):
        (tmp_path / shipped.name).write_text(shipped.read_text())
    bad = tmp_path / "demand_forecast.yaml"
    bad.write_text(bad.read_text().replace("timezone: UTC", "timezone: NO"))

    done = validate_command(str(tmp_path))

    assert done.returncode == 1
    assert f"Invalid model-line config {bad}" in done.stderr
    assert "schedule.timezone: expected a string, got the boolean false" in done.stderr
    assert "1 valid model line(s): high_demand_alert; 1 invalid file(s)" in done.stdout


def test_the_json_schema_accepts_the_shipped_lines_and_refuses_an_unknown_key(tmp_path):
    import jsonschema

    from mlops_lifecycle import yaml_source

    assert validate_command("--json-schema", str(tmp_path / "schema.json")).returncode == 0
    schema = json.loads((tmp_path / "schema.json").read_text())
    for shipped in (paths.include_dir() / "model_lines").glob("*.yaml"):
        jsonschema.validate(yaml_source.read(shipped).data, schema)  # editors complete from it
    misspelt = {**yaml_source.read(paths.include_dir() / "model_lines" / "demand_forecast.yaml").data, "retires": 3}
    with pytest.raises(jsonschema.ValidationError, match="retires"):
        jsonschema.validate(misspelt, schema)


def test_a_port_the_running_stack_uses_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW__API__PORT", "8601")  # make up on another port: the line's port now
    with pytest.raises(ModelLineConfigError, match="deploy.port: 8601 is Airflow API's port on this stack"):
        load_model_line(write(tmp_path, "demand_forecast", BASE))
    monkeypatch.setenv("AIRFLOW__API__PORT", "8080")
    monkeypatch.setenv("MLFLOW_PORT", "8601")
    with pytest.raises(ModelLineConfigError, match="deploy.port: 8601 is MLflow's port on this stack"):
        load_model_line(write(tmp_path, "demand_forecast", BASE))
