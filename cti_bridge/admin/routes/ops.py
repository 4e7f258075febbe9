"""``api/metrics``: Prometheus text (reliability.md §21). Open like ``api/health``, so a scraper
needs no token; it carries counts and states, never an id of a person or a secret."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from cti_bridge.errors import not_found
from cti_bridge.metrics import CONTENT_TYPE, Metrics

ops_router = APIRouter(tags=["operations"])


@ops_router.get("/api/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    registry: Metrics | None = getattr(request.app.state, "metrics", None)
    if registry is None:
        raise not_found("resource", "api/metrics")
    deps = request.app.state.deps
    body = await deps.database.run(lambda _s: registry.render())
    return Response(content=body, media_type=CONTENT_TYPE)
