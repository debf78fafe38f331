"""The line's feature SQL: written once, in BigQuery dialect, as a Jinja template. Plain functions.

Every extract backend renders it for the run's window here; the DuckDB adapter then transpiles the
result (``adapters.warehouse``), BigQuery runs it as written.
"""

from __future__ import annotations

from datetime import date

import jinja2


def render_sql(template: str, tables: dict[str, str], window_start: date, window_end: date) -> str:
    """Render the BigQuery-dialect template for a window (StrictUndefined: typos fail loudly)."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
    return env.from_string(template).render(
        tables=tables, window_start=window_start.isoformat(), window_end=window_end.isoformat()
    )
