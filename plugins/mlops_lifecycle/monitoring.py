"""The drift monitor's decisions, as plain functions: intervals, the label join, live performance
against the served version's holdout, the retrain cool-down, and the keys that make every write once.

A monitor run checks its data interval: what production served in it, split by the model version that
served each row (a deploy inside the interval gives each version its own check), against that version's
training reference. Live performance needs actuals, which arrive late: a row served on day D predicts
day D + ``prediction_offset_days``, whose actuals are complete ``label_delay_days`` later. So the run
for [start, end) scores the rows served in the same interval shifted back by offset + delay days, whose
actuals are all in by ``end``; consecutive runs score every served row exactly once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from mlops_lifecycle.config import GroundTruth, MetricRule, Monitoring

KEY_TIME = "%Y%m%dT%H%M%S"  # seconds: a manual check may cover any stretch
MONITOR_KEY_TAG = "monitor.key"
RETRAIN_TAG = "monitor.retrain"  # requested | cooldown | not requested (backfill) | off
RETRAIN_AT_TAG = "monitor.retrain_requested_at"


def interval_label(start: datetime, end: datetime) -> str:
    return f"{start.astimezone(UTC):{KEY_TIME}}-{end.astimezone(UTC):{KEY_TIME}}"


def monitor_key(model_line: str, version: str, start: datetime, end: datetime) -> str:
    """Identity of one monitoring run: one per served version and interval (a retry finds it)."""
    return f"{model_line}/v{version}/{interval_label(start, end)}"


def monitor_interval(
    monitoring: Monitoring, start: datetime | None, end: datetime | None, run_after: datetime | None
) -> tuple[datetime, datetime]:
    """The interval a monitor run checks: its data interval, or (a manual run without one) the last
    complete period of the monitor's cron before it was triggered."""
    if start is not None and end is not None and end > start:
        return plain_utc(start), plain_utc(end)
    from mlops_lifecycle.window import last_complete_interval

    first, last = last_complete_interval(monitoring.cron, monitoring.timezone, run_after or datetime.now(UTC))
    return plain_utc(first), plain_utc(last)


def plain_utc(moment: datetime | str) -> datetime:
    """A standard-library UTC datetime from a datetime or ISO text. Airflow hands tasks pendulum DateTimes,
    whose arithmetic with a timedelta after ``astimezone(UTC)`` drops the zone (pendulum 3.3): every later
    step would be naive."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    return datetime.fromtimestamp(moment.timestamp(), UTC)


MAX_CHECKED_DAYS = 31


class IntervalRequestInvalid(ValueError):
    """A manual monitor run's ``since``/``until`` that cannot be checked."""


def requested_check(conf: Mapping[str, Any] | None, now: datetime) -> tuple[datetime, datetime] | None:
    """The interval a manual run asks to check (run conf ``{"since": ISO, "until": ISO}``, ``until`` default
    now), or None when it asks for none. Only a past interval can be checked: what it served is final."""
    if not conf or (conf.get("since") is None and conf.get("until") is None):
        return None
    unknown = sorted(set(conf) - {"since", "until"})
    if unknown:
        raise IntervalRequestInvalid(f"unknown run conf keys {unknown}: a monitor run takes since and until")
    if conf.get("since") is None:
        raise IntervalRequestInvalid("run conf: 'since' is required with 'until' (ISO 8601 times)")
    try:
        since = datetime.fromisoformat(str(conf["since"]))
        until = datetime.fromisoformat(str(conf["until"])) if conf.get("until") else now
    except ValueError as exc:
        raise IntervalRequestInvalid(f"run conf: {exc} (since/until are ISO 8601 times with a zone)") from None
    if since.tzinfo is None or until.tzinfo is None:
        raise IntervalRequestInvalid("run conf: since/until need a time zone (e.g. 2026-12-01T10:00:00+00:00)")
    if not since < until <= now:
        raise IntervalRequestInvalid(
            f"run conf: since {since.isoformat()} must be before until {until.isoformat()}, and until not after now "
            f"({now.isoformat(timespec='seconds')}): only what has been served can be checked"
        )
    if until - since > timedelta(days=MAX_CHECKED_DAYS):
        raise IntervalRequestInvalid(f"run conf: at most {MAX_CHECKED_DAYS} days can be checked in one run")
    # whole seconds: an interval's snapshot and monitoring runs are named by its ends to the second
    return since.astimezone(UTC).replace(microsecond=0), until.astimezone(UTC).replace(microsecond=0)


IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def served_sql(table: str, model_line: str, start: datetime, end: datetime, kinds: Mapping[str, str]) -> str:
    """BigQuery SQL of the served rows of ``model_line`` in [start, end) from the shipped prediction-log
    table (one row per served row: ts, request_id, model_line, model_version, row_index, features as a
    JSON object, prediction; include/deployment/README.md), one column per feature: categorical as
    strings, numeric as FLOAT64 (a value that is not a number reads as NULL)."""
    bad = [name for name in kinds if not IDENTIFIER.match(name)]
    if bad:
        raise ValueError(f"feature names {bad} cannot be read from the shipped JSON as columns")
    columns = []
    for name, kind in kinds.items():
        value = f"JSON_VALUE(features, '$.{name}')"
        columns.append(f"{value} AS {name}" if kind == "categorical" else f"SAFE_CAST({value} AS FLOAT64) AS {name}")
    return (
        "SELECT ts, request_id, model_version, row_index, "
        + ", ".join(columns)
        + f", prediction\nFROM `{table}`\nWHERE model_line = '{model_line}'"
        f"\n  AND ts >= TIMESTAMP '{start.astimezone(UTC):%Y-%m-%d %H:%M:%S}+00'"
        f"\n  AND ts < TIMESTAMP '{end.astimezone(UTC):%Y-%m-%d %H:%M:%S}+00'"
    )


def labelled_interval(truth: GroundTruth, start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """The served days whose actuals are all complete by ``end``, in whole UTC days.

    A row served on day S predicts day D = S + offset; D's actuals are complete ``label_delay_days`` after D
    ends. So rows served before ``day(end) - (offset + delay)`` are complete by ``day(end)`` <= ``end``; the
    check of [start, end) scores the served days [day(start), day(end)) moved back by offset + delay. Checks
    of consecutive intervals score consecutive days, each once (several checks within one day: the first
    that crosses midnight scores it; the others score nothing).
    """
    lag = timedelta(days=truth.prediction_offset_days + truth.label_delay_days)

    def day(moment: datetime) -> datetime:
        return plain_utc(moment).replace(hour=0, minute=0, second=0, microsecond=0)

    return day(start) - lag, day(end) - lag


def join_actuals(served: pd.DataFrame, actuals: pd.DataFrame, truth: GroundTruth) -> pd.DataFrame:
    """Served rows with the actual of what they predicted: ``date`` = serving day + offset, joined on
    the key columns and ``date``. Rows whose actual is missing are dropped (counted by the caller)."""
    import pandas as pd

    rows = served.copy()
    day = pd.to_datetime(rows["ts"], utc=True).dt.tz_convert(None).dt.normalize()
    rows["date"] = day + pd.Timedelta(days=truth.prediction_offset_days)
    facts = actuals[[*truth.key, "date", "actual"]].copy()
    facts["date"] = pd.to_datetime(facts["date"]).dt.tz_localize(None).dt.normalize()
    for column in truth.key:  # served values were JSON; the warehouse's may be typed differently
        rows[column] = rows[column].astype(str)
        facts[column] = facts[column].astype(str)
    facts = facts.drop_duplicates([*truth.key, "date"], keep="last")
    return rows.merge(facts, on=[*truth.key, "date"], how="inner")


def performance_breaches(
    live: Mapping[str, float], holdout: Mapping[str, float], rules: Mapping[str, MetricRule], max_regression: float
) -> list[str]:
    """Gate metrics that are live worse than the served version's holdout value by more than ``max_regression``
    (a fraction of the holdout value), each as a readable reason."""
    reasons = []
    for name, rule in rules.items():
        now, then = live.get(name), holdout.get(name)
        if now is None or then is None or not (math.isfinite(now) and math.isfinite(then)):
            continue
        worse = (now - then) if rule.direction == "minimize" else (then - now)
        allowed = max_regression * max(abs(then), 1e-12)
        if worse > allowed:
            reasons.append(
                f"live {name} {now:.4g} vs {then:.4g} on the holdout: {worse / max(abs(then), 1e-12):.0%} worse "
                f"(> {max_regression:.0%})"
            )
    return reasons


def cooldown_until(last_request: datetime | None, cooldown_hours: float) -> datetime | None:
    """When the next retrain request may be made, or None if it may be made now."""
    if last_request is None or cooldown_hours <= 0:
        return None
    return last_request + timedelta(hours=cooldown_hours)


def summary(findings: Mapping[str, Any], limit: int = 3) -> str:
    """One line for alerts and the asset event: which versions breached, and the first reasons."""
    parts = []
    for version, found in findings.items():
        breaches = found.get("breaches", [])
        if breaches:
            more = f"; and {len(breaches) - limit} more" if len(breaches) > limit else ""
            shown = "; ".join(breaches[:limit]) + more
            parts.append(f"v{version}: {shown}")
    return " | ".join(parts) or "no breach"
