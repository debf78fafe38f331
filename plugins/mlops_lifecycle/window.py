"""The data window of a run and the run key derived from it.

The window is the Airflow data interval: the run for interval [start, end) trains on
``training_lookback_days`` of data ending at ``end`` and holds out the last ``holdout_days``.
A run without a logical date (a manual trigger in Airflow 3 may have none) gets the last complete
cron period before it was triggered, so it still has a real, reproducible window. A retrain that the
drift monitor requested (an asset-triggered run) trains on data up to the moment it was requested:
its interval runs from the last cron boundary to its ``run_after``, so it has a run key of its own
instead of finding the scheduled run's model of the same period again.

The run key (model line + window) identifies every side effect of the run: the snapshot, the MLflow
run tag, the review branch. A retry, or a re-run of the same window, finds what the first made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta

from mlops_lifecycle.config import ModelLineConfig

RUN_KEY_TIME = "%Y%m%dT%H%M"  # the interval's ends in a run key, UTC


@dataclass(frozen=True)
class DataWindow:
    model_line: str
    interval_start: datetime
    interval_end: datetime
    train_start: date
    holdout_start: date
    window_end: date  # exclusive

    @property
    def run_key(self) -> str:
        return f"{self.model_line}/{self.interval_start:{RUN_KEY_TIME}}-{self.interval_end:{RUN_KEY_TIME}}"

    @property
    def label(self) -> str:
        """Short, human-readable window: training data [train_start, window_end)."""
        return f"{self.train_start.isoformat()}..{self.window_end.isoformat()}"

    def as_dict(self) -> dict[str, str]:
        """XCom-friendly form (ISO strings), including the run key."""
        out = {k: v.isoformat() for k, v in asdict(self).items() if k != "model_line"}
        return {"model_line": self.model_line, "run_key": self.run_key, **out}


def run_key_interval(run_key: str) -> tuple[datetime, datetime]:
    """The data interval (UTC) a run key names: ``<line>/<start>-<end>`` as ``DataWindow.run_key`` writes it."""
    _, _, interval = run_key.rpartition("/")
    start, sep, end = interval.partition("-")
    if not sep:
        raise ValueError(f"'{run_key}' is not a run key (<line>/<start>-<end>)")
    return (
        datetime.strptime(start, RUN_KEY_TIME).replace(tzinfo=UTC),
        datetime.strptime(end, RUN_KEY_TIME).replace(tzinfo=UTC),
    )


def last_complete_interval(cron: str, tz: str, before: datetime) -> tuple[datetime, datetime]:
    """The last complete cron period ending at or before ``before``."""
    from zoneinfo import ZoneInfo

    from croniter import croniter

    local = before.astimezone(ZoneInfo(tz))
    itr = croniter(cron, local + timedelta(seconds=1))
    end = itr.get_prev(datetime)
    start = itr.get_prev(datetime)
    return start.astimezone(UTC), end.astimezone(UTC)


def requested_interval(cron: str, tz: str, run_after: datetime) -> tuple[datetime, datetime]:
    """The interval of a requested retrain: from the last cron boundary before ``run_after`` (to the minute)."""
    end = run_after.astimezone(UTC).replace(second=0, microsecond=0)
    _, boundary = last_complete_interval(cron, tz, end - timedelta(seconds=1))  # the last boundary before end
    return boundary, end


def resolve_window(
    config: ModelLineConfig,
    interval_start: datetime | None,
    interval_end: datetime | None,
    run_after: datetime | None,
    requested: bool = False,
) -> DataWindow:
    """Window of a run from its data interval; falls back to the last cron period before ``run_after``,
    or, for a requested retrain (``requested``), to the time since the last cron boundary."""
    if requested and run_after is not None:
        interval_start, interval_end = requested_interval(config.schedule.cron, config.schedule.timezone, run_after)
    elif interval_start is None or interval_end is None or interval_end <= interval_start:
        anchor = run_after or datetime.now(UTC)
        interval_start, interval_end = last_complete_interval(config.schedule.cron, config.schedule.timezone, anchor)
    window_end = interval_end.date()
    return DataWindow(
        model_line=config.model_line,
        interval_start=interval_start.astimezone(UTC),
        interval_end=interval_end.astimezone(UTC),
        train_start=window_end - timedelta(days=config.window.training_lookback_days),
        holdout_start=window_end - timedelta(days=config.window.holdout_days),
        window_end=window_end,
    )
