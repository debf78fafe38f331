"""Deferred work outside Airflow: defer, rebuild the trigger as the triggerer does, run it to its event.

Also the few things the providers' operators touch on a task context (``ti.xcom_push``,
``ti.stats_tags``, ``task_state_store``), for executing them directly in unit tests.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred


def first_event(trigger: Any, timeout: float = 10.0) -> dict[str, Any]:
    """The payload of the first event ``trigger.run()`` yields, within ``timeout`` seconds."""

    async def run() -> dict[str, Any]:
        events = trigger.run()
        event = await asyncio.wait_for(anext(events), timeout)
        await events.aclose()
        return event.payload

    return asyncio.run(run())


def rebuilt(trigger: Any, **override: Any) -> Any:
    """The trigger re-created from ``serialize()``, as the triggerer does (``override`` changes kwargs)."""
    classpath, kwargs = trigger.serialize()
    module, _, name = classpath.rpartition(".")
    return getattr(importlib.import_module(module), name)(**{**kwargs, **override})


def deferral(execute: Callable[[], Any]) -> TaskDeferred:
    """``execute()`` must defer to ``execute_complete``; the deferral."""
    with pytest.raises(TaskDeferred) as deferred:
        execute()
    assert deferred.value.method_name == "execute_complete"
    return deferred.value


def event_of(deferred: TaskDeferred, timeout: float = 15.0, **override: Any) -> dict[str, Any]:
    """The deferred trigger, rebuilt from its serialised form, run to its first event."""
    return first_event(rebuilt(deferred.trigger, **override), timeout=timeout)


class ProviderTaskInstance:
    """What the providers' operators touch on ``context["ti"]``."""

    stats_tags: dict[str, str] = {}

    def __init__(self, try_number: int = 1) -> None:
        self.try_number = try_number
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


class TaskStateStore(dict):
    """Airflow 3.3's ``task_state_store`` (resumable operators persist their external job id there)."""

    def set(self, key: str, value: Any) -> None:
        self[key] = value


def provider_context(try_number: int = 1, store: TaskStateStore | None = None) -> dict[str, Any]:
    return {
        "ti": ProviderTaskInstance(try_number),
        "task_state_store": store if store is not None else TaskStateStore(),
    }
