"""The line's training entrypoint loaded as a module in this task's process, for what it defines once for
training and everything after: its features, its metrics (``LINE.metrics``) and its model output.

Only in tasks that need them (it imports scikit-learn and the shared ``lifecycle_training`` beside it);
the DAG file reads the entrypoint's literals with ``config.module_literals`` instead.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlops_lifecycle.config import ModelLineConfig

_LOADED: dict[str, ModuleType] = {}


def load_entrypoint(config: ModelLineConfig) -> ModuleType:
    """The line's ``train.entrypoint`` as a module (loaded once per process)."""
    entrypoint = config.entrypoint_path
    if str(entrypoint) in _LOADED:
        return _LOADED[str(entrypoint)]
    if str(entrypoint.parent) not in sys.path:
        sys.path.insert(0, str(entrypoint.parent))  # the entrypoint imports lifecycle_training beside it
    spec = importlib.util.spec_from_file_location(f"mlops_entrypoint_{config.model_line}", entrypoint)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {entrypoint}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _LOADED[str(entrypoint)] = module
    return module
