"""extract: what both warehouse backends share. XCom: :class:`mlops_lifecycle.contract.Snapshot`.

A backend materialises the line's SQL, rendered for the run's window, as one snapshot per window
that training reads by its ``uri``; no data passes through Airflow. A retry finds the snapshot (or the
query) the first try made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlops_lifecycle.operators.base import LifecycleOperator

if TYPE_CHECKING:
    from mlops_lifecycle.contract import Snapshot
    from mlops_lifecycle.window import DataWindow


class ExtractOperator(LifecycleOperator):
    """Base of the extract backends (``extract.warehouse``)."""

    ui_color = "#fff3d6"

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
