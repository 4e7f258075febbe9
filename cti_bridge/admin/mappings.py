"""Checking event-uri mappings before they are saved: every template must compile.

The one place the admin API calls the template compiler (``cti_bridge.render.compile_mapping``),
imported lazily so that the admin API does not load the template engine until a mapping is saved.
A template that does not compile is 422/10202 naming the mapping (its ``xelionEvent``), the place
(``crmResourceUri``, ``condition``, ``headers/X-Foo`` or the payload leaf) and the column, so an
operator can fix the exact spot (el-templates.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import TypeAdapter, ValidationError

from cti_bridge.admin.body import validation_error
from cti_bridge.admin.schemas import EventUriMappingIn
from cti_bridge.errors import ApiError, ErrorCode
from cti_bridge.store.integrations import MappingInput

if TYPE_CHECKING:
    from cti_bridge.render import MappingSpec

log = logging.getLogger(__name__)


def invalid_template(index: int, message: str, info: str) -> ApiError:
    return ApiError(422, ErrorCode.INVALID_TEMPLATE, message, f"eventUriMappings[{index}]: {info}")


def mapping_input(m: EventUriMappingIn) -> MappingInput:
    """A validated request mapping as the store takes it."""
    return MappingInput(
        xelion_event=m.xelionEvent,
        crm_resource_uri=m.crmResourceUri,
        crm_resource_payload=m.crmResourcePayload,
        method=m.method,
        headers=m.headers,
        content_type=m.contentType,
        condition=m.condition,
    )


def to_spec(m: MappingInput) -> MappingSpec:
    """The template language's view of a mapping (``cti_bridge.render.MappingSpec``)."""
    from cti_bridge.render import MappingSpec

    return MappingSpec(
        xelion_event=m.xelion_event,
        crm_resource_uri=m.crm_resource_uri,
        crm_resource_payload=m.crm_resource_payload,
        method=m.method or "POST",
        headers=m.headers,
        content_type=m.content_type,
        condition=m.condition,
    )


def mapping_spec_from_json(value: object, where: str) -> MappingSpec:
    """A mapping given as JSON (e.g. in a preview request) validated like a PUT's element; 422/10201
    naming ``where.<field>`` if it is not one. Its templates are not compiled here."""
    try:
        parsed = TypeAdapter(EventUriMappingIn).validate_python(value)
    except ValidationError as exc:
        raise validation_error(exc, prefix=(where,)) from None
    return to_spec(mapping_input(parsed))


#: Names a mapping's save warns of one by one; the rest in one line.
MAX_NAME_WARNINGS = 5


def _warn_unknown_names(index: int, xelion_event: str, unknown: Sequence[tuple[str, str]]) -> None:
    """Log a warning for each name no call event is known to carry (el-templates.md §3: reported by
    validation and by the preview). Not refused: Xelion may send fields no document lists, and a
    template may name any of them; but a misspelt ``${calleNumber}`` rendered "" for ever while the
    PUT answered 200 without a word (an integrator review's finding)."""
    # A few lines per mapping at most: one PUT of 60,000 unknown names was 60,000 lines (a second
    # reading's finding), and any session token may PUT.
    for name, where in unknown[:MAX_NAME_WARNINGS]:
        log.warning(
            "mapping %d (%s): %s names %r, which no call event is known to carry: it renders as "
            "null unless Xelion sends such a field (the preview shows it with an event)",
            index,
            xelion_event,
            where,
            name,
        )
    if len(unknown) > MAX_NAME_WARNINGS:
        log.warning(
            "mapping %d (%s): %d more names no call event is known to carry",
            index,
            xelion_event,
            len(unknown) - MAX_NAME_WARNINGS,
        )


def validate_mappings(mappings: Sequence[MappingInput]) -> None:
    """Compile every mapping's templates; raise 422/10202 for the first that does not compile."""
    from cti_bridge.el.errors import TemplateError
    from cti_bridge.render import compile_mapping

    for index, m in enumerate(mappings):
        try:
            compiled = compile_mapping(to_spec(m))
            compiled.check_for_saving()
            _warn_unknown_names(index, m.xelion_event, compiled.unknown_names())
        except TemplateError as exc:
            exc.locate(xelion_event=m.xelion_event)
            place = exc.where or "template"
            column = f" column {exc.column}" if exc.column is not None else ""
            raise invalid_template(
                index,
                f"Invalid template in mapping {exc.xelion_event}: {place}{column}: {exc.message}",
                str(exc),
            ) from None
        except Exception:
            # Bad input must never be a 500 (DESIGN.md §4): an unexpected failure of the compiler on
            # some input is still the mapping's fault from the client's side; the log keeps the bug.
            log.exception("the template compiler failed on mapping %d (%s)", index, m.xelion_event)
            raise invalid_template(
                index,
                f"Invalid template in mapping {m.xelion_event}: it could not be compiled",
                f"{m.xelion_event}: the template could not be compiled",
            ) from None
