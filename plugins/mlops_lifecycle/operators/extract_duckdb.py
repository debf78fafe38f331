"""extract, ``extract.warehouse: duckdb`` (the embedded local adapter): DuckDB over generated sample data.

The snapshot is a parquet file per window under the local warehouse (``adapters.warehouse``).
"""

from __future__ import annotations

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
        warehouse.ensure_sample_data(through=window.window_end)
        # history before the window is needed for lag features: the SQL reads it itself
        made = warehouse.snapshot(
            sql_template=self.config.sql_path.read_text(),
            tables=dict(self.config.extract.tables),
            window_start=window.train_start,
            window_end=window.window_end,
            name=window.run_key.replace("/", "__"),
        )
        return self.snapshot(window, made.uri, made.rows, made.reused)
