"""Run a trigger to its first event outside the triggerer (the unit-test view of a deferred wait)."""

from __future__ import annotations

import asyncio
from typing import Any


def first_event(trigger: Any, timeout: float = 10.0) -> dict[str, Any]:
    """The payload of the first event ``trigger.run()`` yields, within ``timeout`` seconds."""

    async def run() -> dict[str, Any]:
        events = trigger.run()
        event = await asyncio.wait_for(anext(events), timeout)
        await events.aclose()
        return event.payload

    return asyncio.run(run())
