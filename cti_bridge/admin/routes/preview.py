"""``POST .../event-uri-mappings/preview``: render a mapping against a sample event, send nothing.

Body: ``{"mapping": {...}}`` (a mapping in the manual's shape) or ``{"xelionEvent": "..."}`` (the
context's stored mappings for that event), plus ``"event"`` (a notification object or a whole
websocket frame) and optionally ``"xelionUsername"`` (the party the delivery is for). The answer
shows, per mapping, the exact request (method, URL, headers, body), whether the condition holds,
and warnings for names the event does not carry. Values drawn from the user's token are masked, in
a mapping's render error too (render.py masks every value of the token in the error's text).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from sqlmodel import Session, col, select

from cti_bridge.admin.app import AdminDeps, get_deps
from cti_bridge.admin.auth import Principal, require_principal
from cti_bridge.admin.body import read_json_body
from cti_bridge.admin.mappings import mapping_spec_from_json
from cti_bridge.admin.schemas import XELION_EVENTS
from cti_bridge.clock import xelion_time
from cti_bridge.el import TemplateError
from cti_bridge.errors import ApiError, ErrorCode, invalid_request, not_found
from cti_bridge.events import CALL_EVENT_TYPES
from cti_bridge.render import RESERVED_HEADERS, MappingSpec, RenderContext, compile_mapping, request_preview
from cti_bridge.routing import spec_of
from cti_bridge.store.crypto import SecretBox
from cti_bridge.store.models import CrmContext, EventUriMapping, UserCredentials

router = APIRouter(tags=["event-uri-mappings"])

TOKEN_PLACEHOLDER = "preview-access-token"  # noqa: S105 - shown masked, never sent


def _load(
    session: Session, box: SecretBox, x: int, c: int, event_type: str | None, username: str | None
) -> tuple[CrmContext, list[EventUriMapping], UserCredentials | None, dict[str, object]]:
    ctx = session.get(CrmContext, c)
    if ctx is None or ctx.xelion_context_id != x:
        raise not_found("crm context", c)
    rows: list[EventUriMapping] = []
    if event_type is not None:
        rows = list(
            session.exec(
                select(EventUriMapping).where(
                    col(EventUriMapping.crm_context_id) == c,
                    col(EventUriMapping.retired).is_(False),
                    col(EventUriMapping.xelion_event) == event_type,
                )
            ).all()
        )
    cred = None
    extra: dict[str, object] = {}
    if username is not None:
        cred = session.exec(
            select(UserCredentials).where(
                col(UserCredentials.crm_context_id) == c, col(UserCredentials.xelion_username) == username
            )
        ).first()
        if cred is not None and cred.token_extra_enc:
            loaded = json.loads(box.decrypt(cred.token_extra_enc))
            if isinstance(loaded, dict):
                extra = loaded
    return ctx, rows, cred, extra


@router.post(
    "/api/crm-integrations/{xelion_context_id}/crm-contexts/{crm_context_id}/event-uri-mappings/preview",
    summary="Render a mapping for a sample event and show the exact request (nothing is sent)",
)
async def preview(
    xelion_context_id: int,
    crm_context_id: int,
    request: Request,
    deps: Annotated[AdminDeps, Depends(get_deps)],
    principal: Annotated[Principal, Depends(require_principal)],
) -> dict[str, Any]:
    principal.ensure_context(xelion_context_id)
    body = await read_json_body(request)
    if not isinstance(body, dict):
        raise invalid_request(
            "body: must be a JSON object", "expected {mapping|xelionEvent, event, xelionUsername}"
        )
    event = body.get("event")
    if not isinstance(event, dict):
        raise invalid_request(
            "event: field required (an object)", "event must be a notification object or frame"
        )
    event_type = body.get("xelionEvent")
    if isinstance(event.get("notification"), dict):
        event_type = event_type or event.get("notificationType")
        event = event["notification"]
    username = body.get("xelionUsername")
    if username is not None and not isinstance(username, str):
        raise invalid_request("xelionUsername: must be a string")
    mapping_json = body.get("mapping")
    if mapping_json is None and not isinstance(event_type, str):
        raise invalid_request(
            "mapping: field required", "give a mapping, or xelionEvent to preview the stored mappings"
        )
    if mapping_json is None and event_type not in CALL_EVENT_TYPES:
        # As in a mapping: a 422 naming the field (it was a 404 "no mapping" for any other name).
        raise invalid_request("xelionEvent: must be a call event type: one of " + ", ".join(XELION_EVENTS))

    ctx, rows, cred, extra = await deps.database.run(
        lambda s: _load(
            s,
            deps.secret_box,
            xelion_context_id,
            crm_context_id,
            None if mapping_json is not None else event_type,
            username,
        )
    )
    if username is not None and cred is None:
        raise not_found("user credentials", username)
    specs: list[tuple[int | None, MappingSpec]] = []
    if mapping_json is not None:
        specs.append((None, mapping_spec_from_json(mapping_json, "mapping")))
    else:
        specs.extend((row.id, spec_of(row)) for row in rows)
        if not specs:
            raise not_found("event uri mapping", event_type)

    role = "callee"
    if username is not None and event.get("callerUser") == username:
        role = "caller"
    user = (
        {"xelionUsername": cred.xelion_username, "xelionOid": cred.xelion_oid, "role": role}
        if cred is not None
        else None
    )
    token = {**extra, "accessToken": TOKEN_PLACEHOLDER}
    render_ctx = RenderContext(
        event=event,
        xelion_event=str(event_type or specs[0][1].xelion_event),
        user=user,
        token=token,
        delivery_id="00000000-0000-0000-0000-000000000000",
        now=xelion_time(deps.clock.now()),
    )
    results: list[dict[str, object]] = []
    for mapping_id, spec in specs:
        try:
            compiled = compile_mapping(spec)
            if mapping_id is None:  # a mapping about to be saved: held to what saving it checks
                compiled.check_for_saving()
        except TemplateError as exc:
            raise ApiError(422, ErrorCode.INVALID_TEMPLATE, "invalid template", str(exc)) from None
        try:
            holds = compiled.condition_holds(render_ctx)
            rendered = compiled.render(render_ctx)
        except TemplateError as exc:
            results.append({"mappingId": mapping_id, "xelionEvent": spec.xelion_event, "error": str(exc)})
            continue
        shown = request_preview(rendered)
        headers = shown.get("headers")
        if isinstance(headers, dict):
            # As the request goes out (delivery/http1.py merges names case-insensitively, the
            # worker's last, and writes the connection's own): a stored mapping's own
            # Authorization, Idempotency-Key, Content-Length, ... is not sent.
            for name in [n for n in headers if n.lower() in RESERVED_HEADERS]:
                del headers[name]
            headers["Authorization"] = ctx.authorization_header_prefix + "***"
            headers["Idempotency-Key"] = "<delivery id>"
        shown["condition"] = holds
        warnings = list(shown.get("warnings") or [])  # type: ignore[call-overload]
        shown["warnings"] = warnings
        shown["mappingId"] = mapping_id
        shown["xelionEvent"] = spec.xelion_event
        results.append(shown)
    return {"requests": results}
