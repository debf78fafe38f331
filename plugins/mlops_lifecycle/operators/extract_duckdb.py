"""extract, ``extract.warehouse: duckdb`` (the embedded local adapter): DuckDB over generated sample data.

The snapshot is a parquet file per window under the local warehouse (``adapters.warehouse``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from mlops_lifecycle import paths
from mlops_lifecycle.operators.extract import ExtractOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from mlops_lifecycle.contract import Snapshot


class DuckDBExtractOperator(ExtractOperator):
    """Materialise the feature snapshot of the run's window as a parquet file; returns its URI."""

    def execute(self, context: Context) -> Snapshot:
        from mlops_lifecycle.adapters.warehouse import LocalWarehouse

        window = self.window(context)
        self.log_window(window)
        warehouse = LocalWarehouse(paths.local_home() / "warehouse")
        # the sample data is generated for whole years: a backtest's horizon never reaches past today,
        # as it would not in a real warehouse
        end = min(self.data_end(window), datetime.now(UTC).date())
        warehouse.ensure_sample_data(through=end)
        # history before the window is needed for lag features: the SQL reads it itself
        made = warehouse.snapshot(
            sql_template=self.config.sql_path.read_text(),
            tables=dict(self.config.extract.tables),
            window_start=window.train_start,
            window_end=end,
            name=window.run_key.replace("/", "__") + self.snapshot_suffix(window),
        )
        return self.snapshot(window, made.uri, made.rows, made.reused, **self.backtest_fields(window))
