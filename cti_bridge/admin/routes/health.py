"""``api/health`` (liveness: the process answers) and ``api/ready`` (readiness: it can do its work).

Both are unauthenticated: orchestrators probe them without credentials. Readiness comes from
``AdminDeps.readiness`` (the composition root checks the database and every source); without one it
is a database ping. Neither answer carries a secret.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from cti_bridge.admin import schemas
from cti_bridge.admin.deps import AdminDeps, get_deps

router = APIRouter(prefix="/api", tags=["health"])

Deps = Annotated[AdminDeps, Depends(get_deps)]


@router.get("/health", summary="Liveness", responses={200: {"model": schemas.StatusOut}})
async def health() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get(
    "/ready",
    summary="Readiness: 200 when the database (and every source) is fine, else 503",
    responses={200: {"model": schemas.StatusOut}, 503: {"model": schemas.StatusOut}},
)
async def ready(deps: Deps) -> JSONResponse:
    if deps.readiness is not None:
        ok, details = await deps.readiness()
    else:
        # The ping blocks (it may wait for a connection): keep it off the event loop.
        db_ok = await asyncio.to_thread(deps.database.ping)
        ok, details = db_ok, {"database": "ok" if db_ok else "unavailable"}
    return JSONResponse({"status": "ok" if ok else "unavailable", **details}, status_code=200 if ok else 503)
