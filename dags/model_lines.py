"""One Airflow DAG factory for every model line: each valid include/model_lines/*.yaml becomes its DAGs.

Invalid files are left out here (so they cannot take the other lines down) and reported by
``model_line_config_errors.py`` as import errors in the Airflow UI.
"""

from __future__ import annotations

from mlops_lifecycle.dag_factory import build_all

_dags, _errors = build_all()
globals().update(_dags)
