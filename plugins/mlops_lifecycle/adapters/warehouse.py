"""Extract, embedded local adapter: DuckDB over generated sample data, one parquet snapshot per window.

The feature SQL, rendered for the window (``mlops_lifecycle.sql``), is transpiled from BigQuery's
dialect to DuckDB's with sqlglot. Source tables are folders of parquet files under the warehouse
root; DuckDB runs in memory, so parallel backfill runs never contend for a database lock. The
snapshot is written to a temporary file and renamed into place: it exists complete or not at all,
and a retry of the same window finds it instead of querying again.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from mlops_lifecycle.exceptions import SnapshotError
from mlops_lifecycle.sql import render_sql

log = logging.getLogger(__name__)

SAMPLE_TABLE = "daily_demand"


@dataclass(frozen=True)
class ParquetSnapshot:
    uri: str  # where training reads it: a parquet path locally, a table id on BigQuery
    rows: int
    reused: bool


def transpile_to_duckdb(bigquery_sql: str) -> str:
    import sqlglot

    return sqlglot.transpile(bigquery_sql, read="bigquery", write="duckdb")[0]


def _count_rows(con: Any, parquet: Path) -> int:
    (rows,) = con.execute(f"SELECT count(*) FROM read_parquet('{parquet}')").fetchone()
    return int(rows)


class LocalWarehouse:
    """Parquet tables under ``root`` queried with in-memory DuckDB."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def table_dir(self, name: str) -> Path:
        return self.root / "tables" / name

    def ensure_sample_data(self, through: date) -> None:
        """Generate the sample ``daily_demand`` table, one parquet file per year, up to ``through``'s year.

        Generation is deterministic and window-independent, so files written by concurrent runs
        are identical; each is written to a temporary name and renamed atomically.
        """
        from mlops_lifecycle.adapters.sample_data import SAMPLE_EPOCH, generate_daily_demand

        folder = self.table_dir(SAMPLE_TABLE)
        folder.mkdir(parents=True, exist_ok=True)
        for year in range(SAMPLE_EPOCH.year, through.year + 1):
            target = folder / f"{year}.parquet"
            if target.exists():
                continue
            frame = generate_daily_demand(max(SAMPLE_EPOCH, date(year, 1, 1)), date(year, 12, 31))
            tmp = target.with_suffix(f".{os.getpid()}.tmp")
            frame.to_parquet(tmp, index=False)
            os.replace(tmp, target)
            log.info("Generated sample data %s: %d rows", target, len(frame))

    def snapshot(
        self, sql_template: str, tables: dict[str, str], window_start: date, window_end: date, name: str
    ) -> ParquetSnapshot:
        """Materialise the feature query for the window as ``snapshots/<name>.parquet`` (once)."""
        import duckdb

        target = self.root / "snapshots" / f"{name}.parquet"
        if target.exists():
            with duckdb.connect(":memory:") as con:
                rows = _count_rows(con, target)
            log.info("Snapshot %s already exists (%d rows): reusing it, no query run", target, rows)
            return ParquetSnapshot(uri=str(target), rows=rows, reused=True)

        sql = transpile_to_duckdb(render_sql(sql_template, tables, window_start, window_end))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        started = time.monotonic()
        with duckdb.connect(":memory:") as con:
            for physical in tables.values():
                source = self.table_dir(physical)
                if not any(source.glob("*.parquet")):
                    raise SnapshotError(f"Local warehouse table '{physical}' ({source}) has no data")
                con.execute(f"CREATE VIEW {physical} AS SELECT * FROM read_parquet('{source}/*.parquet')")
            log.info("Running feature query (DuckDB, transpiled from BigQuery):\n%s", sql)
            con.execute(f"COPY ({sql}) TO '{tmp}' (FORMAT parquet)")
            rows = _count_rows(con, tmp)
        if rows == 0:
            tmp.unlink(missing_ok=True)
            raise SnapshotError(f"Feature query for {name} returned no rows for window {window_start}..{window_end}")
        os.replace(tmp, target)
        log.info("Snapshot %s: %d rows in %.1f s", target, rows, time.monotonic() - started)
        return ParquetSnapshot(uri=str(target), rows=rows, reused=False)
