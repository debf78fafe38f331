"""Changelog rendering: the entries a reviewer and a compliance reader see."""

from __future__ import annotations

from mlops_lifecycle.changelog import Proposal, md_text, render_pin, render_promotion, render_proposal
from mlops_lifecycle.config import MetricRule
from mlops_lifecycle.gate import evaluate_gate


def proposal(**overrides) -> Proposal:  # noqa: ANN003
    verdict = evaluate_gate(
        {"mape": MetricRule(direction="minimize", threshold=0.2, max_regression=0.1)},
        {"mape": 0.12},
        {"mape": 0.125},
        "2",
    )
    fields = dict(
        model_line="demand_forecast",
        model_name="demand_forecast",
        model_version="3",
        run_id="abc123",
        run_url="http://mlflow/#/experiments/1/runs/abc123",
        run_key="demand_forecast/20261116T0300-20261123T0300",
        window_label="2024-11-23..2026-11-23",
        holdout_start="2026-10-26",
        snapshot="/data/snap.parquet",
        code_revision="1234567890ab",
        verdict=verdict,
        airflow_dag_id="demand_forecast__lifecycle",
        airflow_run_id="manual__2026-11-23",
    )
    fields.update(overrides)
    return Proposal(**fields)


def test_proposal_has_model_version_run_window_and_metrics_against_gates():
    text = render_proposal(proposal())
    assert text.splitlines()[0] == "## demand_forecast v3: proposed for production"
    assert "[abc123](http://mlflow/#/experiments/1/runs/abc123)" in text
    assert "2024-11-23..2026-11-23 (holdout from 2026-10-26)" in text
    assert "Current production: v2" in text
    assert "| mape | threshold | 0.12 | - | 0.2 | pass |" in text
    assert "| mape | regression | 0.12 | 0.125 | 0.1375 | pass |" in text
    assert "Gate: PASSED" in text


def test_failed_rule_is_marked():
    verdict = evaluate_gate({"mape": MetricRule(direction="minimize", threshold=0.1)}, {"mape": 0.3}, {}, None)
    text = render_proposal(proposal(verdict=verdict))
    assert "| mape | threshold | 0.3 | - | 0.1 | **FAIL** |" in text
    assert "Current production: none (first version)" in text


def test_outside_text_cannot_break_the_table_or_issue_quick_actions():
    assert md_text("/merge now") == "\\/merge now"
    assert md_text("a|b\n/approve") == "a\\|b /approve"  # joined: no longer at a line start
    text = render_proposal(proposal(code_revision="x`y", airflow_run_id="/close"))
    assert not any(line.lstrip().startswith("/") for line in text.splitlines())
    assert "`x'y`" in text


def test_promotion_names_approvers_deployments_and_rollback_target():
    text = render_promotion(
        model_line="demand_forecast",
        model_version="3",
        previous_version="2",
        approvers=["alice"],
        approved_at="2026-11-27T10:00:00+00:00",
        review_ref="review/demand_forecast/v3",
        merge_commit="deadbeef",
        deployments={"production": "local-process:42@http://127.0.0.1:8601"},
        served_by="http://127.0.0.1:8601",
        promoted_by="airflow:demand_forecast__lifecycle/manual__1",
        promoted_at="2026-11-27T10:05:00+00:00",
    )
    assert text.startswith("## demand_forecast v3: promoted to production\n")
    assert "Approved by alice at 2026-11-27T10:00:00+00:00" in text
    assert "Deployed to production: `local-process:42@http://127.0.0.1:8601`" in text
    assert "Previous production: v2 (kept as the rollback target)" in text


def test_pin_file_quotes_the_version():
    assert 'model_version: "3"' in render_pin("demand_forecast", "demand_forecast", "3", "abc")


def test_credentials_in_a_url_never_reach_the_changelog_or_the_merge_request():
    from mlops_lifecycle.changelog import render_merge_request

    p = proposal(run_url="https://user:CANARY-secret@mlflow.example.com/#/experiments/1/runs/abc")
    for text in (render_proposal(p), render_merge_request(p, ["alice"], 1)):
        assert "CANARY" not in text and "user:" not in text
        assert "https://mlflow.example.com/#/experiments/1/runs/abc" in text
