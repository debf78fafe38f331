"""Where things live on disk. Environment variables only: safe at DAG-parse time.

- ``MLOPS_INCLUDE_DIR``: the ``include/`` folder (SQL, training entrypoints, service).
- ``MLOPS_MODEL_LINES_DIR``: the folder of model-line YAML files (default ``include/model_lines``).
- ``MLOPS_LOCAL_HOME``: state of the embedded local adapters (warehouse, deployment repository,
  services); default ``.local/`` at the repository root, which git ignores.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def include_dir() -> Path:
    return Path(os.environ.get("MLOPS_INCLUDE_DIR", REPO_ROOT / "include")).resolve()


def deployment_dir() -> Path:
    """The deployment repository template: model service, Dockerfile, Kubernetes manifests, CI."""
    return include_dir() / "deployment"


def model_lines_dir() -> Path:
    return Path(os.environ.get("MLOPS_MODEL_LINES_DIR", include_dir() / "model_lines")).resolve()


def local_home() -> Path:
    return Path(os.environ.get("MLOPS_LOCAL_HOME", REPO_ROOT / ".local")).resolve()
