"""Prefect events that contad sends (``contad.product.added``, ``contad.product.drift``, ``contad.feedback.recorded``).

One emitter for all of them: an ``Event`` on the resource ``resource_id`` with ``payload``, sent over
Prefect's events websocket to the server at ``url`` (a deployment trigger or an automation acts on it).
"""

from __future__ import annotations

import asyncio
from typing import Any

SEND_TIMEOUT_S = 30.0  # an unreachable server fails the send instead of hanging the caller


async def send_event(url: str, event: str, resource_id: str, payload: dict[str, Any], labels: dict[str, str] | None = None) -> None:
    """Emit ``event`` about ``resource_id`` (extra resource ``labels``, e.g. ``prefect.resource.name``) to the Prefect API at ``url``."""
    from prefect.events import Event
    from prefect.events.clients import PrefectEventsClient

    message = Event(event=event, resource={"prefect.resource.id": resource_id, **(labels or {})}, payload=payload)

    async def _send() -> None:
        async with PrefectEventsClient(api_url=url, reconnection_attempts=2) as client:
            await client.emit(message)

    await asyncio.wait_for(_send(), SEND_TIMEOUT_S)


def emit_event(url: str, event: str, resource_id: str, payload: dict[str, Any], labels: dict[str, str] | None = None) -> None:
    """``send_event`` from synchronous code (a thread without a running event loop)."""
    asyncio.run(send_event(url, event, resource_id, payload, labels))
