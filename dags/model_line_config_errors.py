"""Shows invalid model-line configs in the Airflow UI (Import Errors), naming file, field and hint.

It defines no DAG. The valid lines keep running: their DAGs come from ``model_lines.py``.
"""

from __future__ import annotations

from mlops_lifecycle.dag_factory import build_all

_, _errors = build_all(register=False)  # invalid files, and lines whose DAG Airflow refused to build
if _errors:
    raise ValueError(
        f"{len(_errors)} invalid model-line config(s); their DAGs are not loaded (airflow DAG factory):\n\n"
        + "\n\n".join(str(e) for e in _errors)
    )
