"""extract: what both warehouse backends share. XCom: :class:`mlops_lifecycle.contract.Snapshot`.

A backend materialises the line's SQL, rendered for the run's window, as one snapshot per window
that training reads by its ``uri``; no data passes through Airflow. A retry finds the snapshot (or the
query) the first try made.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

from mlops_lifecycle.operators.base import LifecycleOperator

if TYPE_CHECKING:
    from mlops_lifecycle.contract import Snapshot
    from mlops_lifecycle.window import DataWindow


class ExtractOperator(LifecycleOperator):
    """Base of the extract backends (``extract.warehouse``).

    ``with_horizon``: a backtest's snapshot, which runs on past the window to the end of the horizon
    (``backtest.horizon_days`` after it) so the model can be evaluated out of time.
    """

    ui_color = "#fff3d6"

    def __init__(self, *, with_horizon: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.with_horizon = with_horizon

    def data_end(self, window: DataWindow) -> date:
        """Exclusive end of the data to extract: the window's end, or the horizon's in a backtest."""
        if not self.with_horizon:
            return window.window_end
        from mlops_lifecycle.backtest import horizon_days

        return window.window_end + timedelta(days=horizon_days(self.config, window.interval_start, window.interval_end))

    def snapshot_suffix(self, window: DataWindow) -> str:
        return f"__to{self.data_end(window):%Y%m%d}" if self.with_horizon else ""

    def log_window(self, window: DataWindow) -> None:
        self.log.info(
            "Run key %s; training window %s, holdout from %s", window.run_key, window.label, window.holdout_start
        )

    @staticmethod
    def snapshot(window: DataWindow, uri: str, rows: int, reused: bool, **backend: Any) -> Snapshot:
        """The stage's output; ``backend`` adds the contract's optional fields (``table``, ``job_id``)."""
        w = window.as_dict()
        out: Snapshot = {
            "uri": uri,
            "rows": int(rows),
            "reused": reused,
            "model_line": w["model_line"],
            "run_key": w["run_key"],
            "interval_start": w["interval_start"],
            "interval_end": w["interval_end"],
            "train_start": w["train_start"],
            "holdout_start": w["holdout_start"],
            "window_end": w["window_end"],
        }
        out.update(backend)  # type: ignore[typeddict-item]
        return out

    def backtest_fields(self, window: DataWindow) -> dict[str, str]:
        return {"data_end": self.data_end(window).isoformat()} if self.with_horizon else {}
