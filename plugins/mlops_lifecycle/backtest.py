"""Backtests: what a backfill of the lifecycle DAG computes instead of changing production. Plain functions.

For each backfilled window the line is trained exactly as the lifecycle trains it (same entrypoint, same
split, same holdout metrics), then evaluated out of time on the ``horizon`` that follows the window. The
gate is then applied window by window, in order, against the **champion of that time**: the last model
this backtest would have promoted (``chain``, the default), or the version that really served production
at the window's end (``served``, from the audit events). So the report answers "how would this line, with
this gate, have performed, and would it have promoted the right models?".

A backtest is identified by what it computes (``backtest_id``): the variant, its training parameters and
entrypoint, the window, horizon, gate and champion settings, and the training code revision. Its runs
live in ``<experiment>-backtests``, tagged with that id, the variant and the window; nothing is
registered. A re-run of a window finds its run instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from mlops_lifecycle.config import BASELINE_VARIANT, ModelLineConfig
from mlops_lifecycle.gate import GateVerdict, evaluate_gate

HORIZON_PREFIX = "horizon."  # metrics of a backtest run on its horizon (its holdout metrics keep their names)
CONF_KEYS = ("variant",)


class BacktestConfError(ValueError):
    """A backfill's run conf asks for something the line's YAML does not declare."""


def variant_from_conf(config: ModelLineConfig, conf: Mapping[str, Any] | None) -> str:
    """The variant a backfill asked for in its run conf (``{"variant": NAME}``); the baseline by default."""
    conf = dict(conf or {})
    unknown = sorted(set(conf) - set(CONF_KEYS))
    if unknown:
        raise BacktestConfError(f"run conf: unknown key(s) {unknown}; a backtest accepts {list(CONF_KEYS)}")
    variant = conf.get("variant", BASELINE_VARIANT)
    known = [BASELINE_VARIANT, *sorted(config.backtest.variants)]
    if not isinstance(variant, str) or variant not in known:
        raise BacktestConfError(
            f"run conf: variant {variant!r} is not declared in {config.model_line}.yaml (backtest.variants); "
            f"known: {known}"
        )
    return variant


def horizon_days(config: ModelLineConfig, interval_start: datetime, interval_end: datetime) -> int:
    """``backtest.horizon_days``, or one schedule period (the run's data interval), at least a day."""
    if config.backtest.horizon_days is not None:
        return config.backtest.horizon_days
    return max(1, round((interval_end - interval_start) / timedelta(days=1)))


def backtest_id(config: ModelLineConfig, variant: str, code_revision: str) -> str:
    """``<variant>-<digest>``: the same id exactly when the same computation would be repeated."""
    entrypoint, parameters = config.backtest_variant(variant)
    basis = {
        "variant": variant,
        "entrypoint": entrypoint,
        "parameters": parameters,
        "target": config.train.target,
        "window": config.window.model_dump(),
        "gate": config.gate.model_dump(),
        "horizon_days": config.backtest.horizon_days,
        "champion": config.backtest.champion,
        "sql": config.extract.sql,
        "code_revision": code_revision,
    }
    digest = hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{variant}-{digest}"


@dataclass(frozen=True)
class WindowResult:
    """One backtested window: the challenger trained on it and its metrics on the horizon after it."""

    window_end: str  # ISO date, exclusive end of the training window = start of the horizon
    horizon_end: str
    run_id: str
    holdout: Mapping[str, float]
    horizon: Mapping[str, float]  # empty when the horizon is not in the data yet
    horizon_status: str  # complete | missing
    model_uri: str = ""  # the model trained on the window (a later window may score it as its champion)
    snapshot: str = ""  # holds the window and its horizon

    @property
    def evaluable(self) -> bool:
        return self.horizon_status == "complete" and bool(self.horizon)


@dataclass(frozen=True)
class Judgement:
    """The gate applied to one window against the champion of that time."""

    window: WindowResult
    champion_model: str | None  # the champion's model URI (None: no champion yet)
    champion_label: str | None  # for people: "window 2026-10-05" or "production v3"
    champion_horizon: Mapping[str, float]  # the champion's metrics on this window's horizon
    verdict: GateVerdict | None  # None: the horizon is not in the data yet
    baseline_horizon: Mapping[str, float] = field(default_factory=dict)  # the baseline's, for a variant

    @property
    def would_promote(self) -> bool | None:
        return None if self.verdict is None else self.verdict.passed


#: scores a champion (its model URI) on a window's horizon: metrics by name, or {} if it cannot
ScoreFn = Callable[[str, WindowResult], Mapping[str, float]]
#: the champion that really served production at a window's end: (model URI, label), or None
ServedFn = Callable[[WindowResult], tuple[str, str] | None]


def judge(
    config: ModelLineConfig,
    windows: list[WindowResult],
    score: ScoreFn,
    served: ServedFn | None = None,
) -> list[Judgement]:
    """Apply the gate window by window, in order, against the champion of each window's time."""
    judgements: list[Judgement] = []
    champion: tuple[str, str] | None = None  # (model URI, label) in chain mode
    for result in sorted(windows, key=lambda w: w.window_end):
        current = served(result) if config.backtest.champion == "served" and served else champion
        model, label = current if current else (None, None)
        if not result.evaluable:
            judgements.append(Judgement(result, model, label, {}, None))
            continue
        champion_metrics = dict(score(model, result)) if model else {}
        verdict = evaluate_gate(config.gate.metrics, dict(result.horizon), champion_metrics, label)
        judgements.append(Judgement(result, model, label, champion_metrics, verdict))
        if verdict.passed:
            champion = (result.model_uri or f"runs:/{result.run_id}/model", f"window to {result.window_end}")
    return judgements


def summary_rows(judgements: list[Judgement]) -> list[dict[str, Any]]:
    """The report's table, one row per window: JSON-ready (NaN and infinities become None)."""

    def clean(values: Mapping[str, float]) -> dict[str, float | None]:
        return {k: (float(v) if v is not None and math.isfinite(v) else None) for k, v in sorted(values.items())}

    rows = []
    for j in judgements:
        rows.append(
            {
                "window_end": j.window.window_end,
                "horizon_end": j.window.horizon_end,
                "horizon": j.window.horizon_status,
                "challenger_run": j.window.run_id,
                "challenger": clean(j.window.horizon),
                "challenger_holdout": clean(j.window.holdout),
                "champion": j.champion_label,
                "champion_model": j.champion_model,
                "champion_metrics": clean(j.champion_horizon),
                "baseline": clean(j.baseline_horizon),
                "would_promote": j.would_promote,
                "reasons": []
                if j.verdict is None
                else [
                    r.reason.replace(f"production v{j.champion_label}", f"champion ({j.champion_label})")
                    for r in j.verdict.results
                ],
            }
        )
    return rows
