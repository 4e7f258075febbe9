"""``api/metrics``: Prometheus text (reliability.md §21). Open like ``api/health``, so a scraper
needs no token; it carries counts and states, never an id of a person or a secret."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request, Response

from cti_bridge.errors import not_found
from cti_bridge.metrics import CONTENT_TYPE, DATABASE_DOWN, Metrics

log = logging.getLogger(__name__)

ops_router = APIRouter(tags=["operations"])

#: How long a scrape waits for the store's gauges (seconds).
STORE_WAIT = 5.0


@ops_router.get("/api/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    registry: Metrics | None = getattr(request.app.state, "metrics", None)
    if registry is None:
        raise not_found("resource", "api/metrics")
    deps = request.app.state.deps
    body = registry.render_process()
    try:
        # A database that does not answer (a lock, an outage) must not take the other metrics
        # with it: the scrape hung or answered 500, and every series vanished when it mattered.
        store = await asyncio.wait_for(deps.database.run(lambda _s: registry.render_store()), STORE_WAIT)
    except Exception as exc:
        log.warning(
            "api/metrics: the database did not answer (%s); store metrics left out", type(exc).__name__
        )
        store = DATABASE_DOWN
    return Response(content=body + store, media_type=CONTENT_TYPE)
