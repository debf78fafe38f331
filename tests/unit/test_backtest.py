"""Backtest judging: the gate applied window by window against the champion of each window's time."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from mlops_lifecycle import paths
from mlops_lifecycle.backtest import (
    BacktestConfError,
    WindowResult,
    backtest_id,
    horizon_days,
    judge,
    summary_rows,
    variant_from_conf,
)
from mlops_lifecycle.backtest_report import render_csv, render_html, render_plot, render_table
from mlops_lifecycle.config import ModelLineConfig
from mlops_lifecycle.exceptions import ModelLineConfigError

BASE = yaml.safe_load((paths.include_dir() / "model_lines" / "demand_forecast.yaml").read_text())


def config(**backtest: object) -> ModelLineConfig:
    data = copy.deepcopy(BASE)
    data["backtest"] = backtest
    return ModelLineConfig.model_validate(data)


def window(end: str, mape: float | None, r2: float = 0.9, rmse: float = 5.0) -> WindowResult:
    horizon = {} if mape is None else {"mape": mape, "r2": r2, "rmse": rmse}
    return WindowResult(
        window_end=end,
        horizon_end="2099-01-01",
        run_id=f"run-{end}",
        holdout={"mape": 0.1},
        horizon=horizon,
        horizon_status="missing" if mape is None else "complete",
        model_uri=f"models:/m-{end}",
        snapshot=f"snap-{end}",
    )


def scorer(table: dict[tuple[str, str], dict[str, float]]):  # noqa: ANN201
    """Champion metrics from a table keyed by (champion model, window end), recording what was asked."""
    asked: list[tuple[str, str]] = []

    def score(model: str, result: WindowResult) -> dict[str, float]:
        asked.append((model, result.window_end))
        return table[(model, result.window_end)]

    score.asked = asked  # type: ignore[attr-defined]
    return score


def test_the_chain_judges_each_window_against_the_last_model_it_would_have_promoted() -> None:
    windows = [
        window("2026-01-05", 0.10),  # first: no champion, thresholds only -> promoted
        window("2026-01-12", 0.20),  # much worse than the 01-05 model on this horizon -> rejected
        window("2026-01-19", None),  # horizon not in the data: reported, not judged, champion unchanged
        window("2026-01-26", 0.09),  # better than the 01-05 model -> promoted
        window("2026-02-02", 0.095),  # within 10% of the 01-26 model -> promoted
    ]
    score = scorer(
        {
            ("models:/m-2026-01-05", "2026-01-12"): {"mape": 0.11, "r2": 0.9, "rmse": 5.0},
            ("models:/m-2026-01-05", "2026-01-26"): {"mape": 0.12, "r2": 0.9, "rmse": 5.0},
            ("models:/m-2026-01-26", "2026-02-02"): {"mape": 0.09, "r2": 0.9, "rmse": 5.0},
        }
    )

    judged = judge(config(), list(reversed(windows)), score)  # any order in, window order out

    assert [j.window.window_end for j in judged] == [w.window_end for w in windows]
    assert [j.would_promote for j in judged] == [True, False, None, True, True]
    assert [j.champion_label for j in judged] == [
        None,
        "window to 2026-01-05",
        "window to 2026-01-05",
        "window to 2026-01-05",
        "window to 2026-01-26",
    ]
    assert score.asked == [  # the champion is scored on the window's own horizon, only when judged
        ("models:/m-2026-01-05", "2026-01-12"),
        ("models:/m-2026-01-05", "2026-01-26"),
        ("models:/m-2026-01-26", "2026-02-02"),
    ]
    rows = summary_rows(judged)
    assert rows[1]["would_promote"] is False
    assert any("champion (window to 2026-01-05)" in reason and "exceeds" in reason for reason in rows[1]["reasons"])
    assert rows[2]["horizon"] == "missing" and rows[2]["reasons"] == []
    assert rows[0]["champion"] is None and rows[0]["champion_metrics"] == {}


def test_served_mode_compares_with_what_production_served_then() -> None:
    served = {"2026-01-05": None, "2026-01-12": ("models:/prod/3", "production v3")}
    windows = [window("2026-01-05", 0.10), window("2026-01-12", 0.10)]
    score = scorer({("models:/prod/3", "2026-01-12"): {"mape": 0.05, "r2": 0.95, "rmse": 2.0}})

    judged = judge(config(champion="served"), windows, score, lambda w: served[w.window_end])

    assert [j.champion_label for j in judged] == [None, "production v3"]
    assert [j.would_promote for j in judged] == [True, False], "v3 was much better on that horizon"


def test_a_threshold_failure_is_a_rejection_even_without_a_champion() -> None:
    [judged] = judge(config(), [window("2026-01-05", 0.40)], scorer({}))
    assert judged.would_promote is False
    assert "mape 0.4 violates <= 0.25" in " ".join(summary_rows([judged])[0]["reasons"])


def test_variants_come_from_the_run_conf_and_unknown_ones_are_named() -> None:
    cfg = config(variants={"shallow": {"parameters": {"max_iter": 10}}})
    assert variant_from_conf(cfg, None) == "baseline" and variant_from_conf(cfg, {}) == "baseline"
    assert variant_from_conf(cfg, {"variant": "shallow"}) == "shallow"
    assert cfg.backtest_variant("shallow")[1]["max_iter"] == 10
    assert cfg.backtest_variant("shallow")[1]["learning_rate"] == BASE["train"]["parameters"]["learning_rate"]
    with pytest.raises(BacktestConfError, match=r"variant 'deep' is not declared .* known: \['baseline', 'shallow'\]"):
        variant_from_conf(cfg, {"variant": "deep"})
    with pytest.raises(BacktestConfError, match=r"unknown key\(s\) \['windows'\]"):
        variant_from_conf(cfg, {"windows": 3})


def test_the_backtest_id_changes_exactly_with_what_is_computed() -> None:
    cfg = config(variants={"shallow": {"parameters": {"max_iter": 10}}})
    same = backtest_id(cfg, "baseline", "abc")
    assert same == backtest_id(config(variants={"other": {}}), "baseline", "abc"), "another variant changes nothing"
    assert same.startswith("baseline-")
    assert len({same, backtest_id(cfg, "shallow", "abc"), backtest_id(cfg, "baseline", "abd")}) == 3
    stricter = copy.deepcopy(BASE)
    stricter["gate"]["metrics"]["mape"]["threshold"] = 0.2
    assert backtest_id(ModelLineConfig.model_validate(stricter), "baseline", "abc") != same


def test_the_horizon_is_one_schedule_period_unless_configured() -> None:
    start, end = datetime(2026, 1, 5, 3, tzinfo=UTC), datetime(2026, 1, 12, 3, tzinfo=UTC)
    assert horizon_days(config(), start, end) == 7
    assert horizon_days(config(horizon_days=28), start, end) == 28


@pytest.mark.parametrize(
    ("backtest", "message"),
    [
        ({"variants": {"baseline": {}}}, "'baseline' is the line's own training"),
        ({"variants": {"x1y": {"entrypoint": "training/nope.py"}}}, "backtest.variants.x1y.entrypoint: file"),
        ({"champion": "best"}, "backtest.champion: Input should be 'chain' or 'served'"),
        ({"horizon_days": 0}, "backtest.horizon_days: Input should be greater than or equal to 1"),
        ({"variants": {"shallow": {"params": {}}}}, "backtest.variants.shallow.params: unknown key"),
    ],
)
def test_bad_backtest_sections_name_the_field(tmp_path: Path, backtest: dict, message: str) -> None:
    from mlops_lifecycle.config import load_model_line

    data = copy.deepcopy(BASE)
    data["backtest"] = backtest
    path = tmp_path / "demand_forecast.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ModelLineConfigError) as raised:
        load_model_line(path)
    assert message in str(raised.value)


def test_the_report_renders_every_window(tmp_path: Path) -> None:
    judged = judge(config(), [window("2026-01-05", 0.1), window("2026-01-12", None)], scorer({}))
    rows = summary_rows(judged)
    header = {
        "model_line": "demand_forecast",
        "variant": "baseline",
        "backtest_id": "baseline-x",
        "champion_mode": "chain",
        "horizon_days": 7,
        "code_revision": "abc",
    }
    page = render_html(header, rows, ["mape", "r2"])
    assert "would promote" in page and "horizon not in the data yet" in page and 'src="mape.png"' in page
    assert render_plot(rows, "mape", "t")[:8] == b"\x89PNG\r\n\x1a\n"
    lines = render_csv(rows, ["mape"]).splitlines()
    assert len(lines) == 3 and lines[1].startswith("2026-01-05,2099-01-01,complete,True")
    assert "PROMOTE" in render_table(rows, ["mape"])
