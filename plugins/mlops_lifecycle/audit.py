"""The audit record's event log: every alias move and decision about a model version, appended once.

Facts fixed when a version is staged (run, code revision, data window, metrics and gate) are plain
``audit.*`` tags written once. What happens to the version afterwards (staged, staging withdrawn,
promoted, replaced) is an *event*: one JSON tag ``audit.event.NNNN`` per event, numbered in order,
never rewritten. An event names the run that made it (``by``). A retry of a step finds its own event as
the latest one and does not append it twice; once anything else happened to the version (a withdrawal,
a later run, the same run cleared and run again), the step's next event is a new one. So the record keeps
the whole history, and the current state is read from the aliases, never from stale tags.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

EVENT_PREFIX = "audit.event."


def events(tags: Mapping[str, str]) -> list[dict[str, Any]]:
    """The version's events, oldest first."""
    keys = sorted(k for k in tags if k.startswith(EVENT_PREFIX))
    return [json.loads(tags[k]) for k in keys]


def find_event(tags: Mapping[str, str], event: str, by: str) -> dict[str, Any] | None:
    """The latest ``event`` made by run ``by``, if that run recorded one."""
    found = [e for e in events(tags) if e.get("event") == event and e.get("by") == by]
    return found[-1] if found else None


def retried_event(tags: Mapping[str, str], event: str, by: str) -> dict[str, Any] | None:
    """The version's latest event if it is ``event`` by run ``by``: what a retry of that step recorded first."""
    recorded = events(tags)
    last = recorded[-1] if recorded else None
    return last if last is not None and last.get("event") == event and last.get("by") == by else None


def latest_event(tags: Mapping[str, str], event: str) -> dict[str, Any] | None:
    found = [e for e in events(tags) if e.get("event") == event]
    return found[-1] if found else None


def next_event_tag(tags: Mapping[str, str]) -> str:
    """The tag key of the next event: one past the highest number recorded."""
    numbers = [int(k.removeprefix(EVENT_PREFIX)) for k in tags if k.startswith(EVENT_PREFIX)]
    return f"{EVENT_PREFIX}{max(numbers, default=0) + 1:04d}"
