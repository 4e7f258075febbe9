"""Reading JSON request bodies so that bad input is always a 400 or a 422, never a 500.

The routes read their bodies here rather than through FastAPI's body parameters, because a client
of the manual needs to know *where* its JSON broke: the manual's own ``callHungUpEvent`` example
(an unescaped ``"`` inside a JSON string) is malformed, and the answer names its line and column
(400/10200). A well-formed body whose field is missing or has the wrong type is 422/10201 naming the
field's path (``xelionContext.host: field required``).

Beyond JSON syntax the reader refuses what the database could not store or what could only come
from a hostile client: bytes not in the body's charset (UTF-8 unless ``Content-Type`` names
another), ``NaN``/``Infinity`` and numbers beyond a double, nesting deeper than ``MAX_DEPTH``, NUL
characters and lone surrogates in strings (PostgreSQL cannot store either), bodies over
``MAX_BODY_BYTES``.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections.abc import Sequence
from email.message import Message
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, TypeAdapter, ValidationError

from cti_bridge.errors import ApiError, ErrorCode

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

MAX_BODY_BYTES = 1024 * 1024
MAX_DEPTH = 64


def malformed(message: str, info: str) -> ApiError:
    return ApiError(400, ErrorCode.MALFORMED_JSON, message, info)


def too_large() -> ApiError:
    return ApiError(
        413, ErrorCode.BODY_TOO_LARGE, "The body is too large", f"the limit is {MAX_BODY_BYTES} bytes"
    )


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return line, col


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def loc_text(loc: Sequence[int | str]) -> str:
    """A pydantic location as a path: ``userCredentials[0].clientId``; the root is ``body``.

    A key is the client's text: a lone surrogate in it is written as its escape (``\\udfff``),
    since the error answer naming it must be encodable (it was a 500)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part.encode("utf-8", "backslashreplace").decode("utf-8")
    return out or "body"


def _check_tree(value: object) -> None:
    """Refuse nesting beyond MAX_DEPTH and strings the database cannot store (iteratively, so a
    hostile document cannot exhaust the stack)."""
    stack: list[tuple[object, tuple[int | str, ...]]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise ApiError(
                422,
                ErrorCode.INVALID_REQUEST,
                "The body is nested too deeply",
                f"{loc_text(path[:MAX_DEPTH])}: more than {MAX_DEPTH} levels of nesting",
            )
        if isinstance(node, str):
            _check_string(node, path)
        elif isinstance(node, dict):
            for key, item in node.items():
                _check_string(key, (*path, key))
                stack.append((item, (*path, key)))
        elif isinstance(node, list):
            stack.extend((item, (*path, i)) for i, item in enumerate(node))


def _check_string(text: str, path: tuple[int | str, ...]) -> None:
    where = loc_text(path)
    if "\x00" in text:
        raise ApiError(422, ErrorCode.INVALID_REQUEST, f"{where}: NUL characters are not allowed", where)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(
            422, ErrorCode.INVALID_REQUEST, f"{where}: a lone UTF-16 surrogate is not allowed", where
        ) from None


#: The charsets a body may declare, as ``codecs.lookup`` names them.
_CHARSETS = re.compile(r"utf-8|utf-8-sig|utf-16(-[bl]e)?|utf-32(-[bl]e)?|ascii|iso8859-\d{1,2}|cp125\d")


def parse_json(raw: bytes, charset: str | None = None) -> object:
    """Parse a request body, or raise 400/10200 (line and column in ``info``) / 413 / 422.

    ``charset``: the one the ``Content-Type`` declares; UTF-8 when it declares none. A body in
    Latin-1 that says so (``application/json; charset=ISO-8859-1``, as a Windows script may send
    it) is read as Latin-1 rather than refused for not being UTF-8."""
    if len(raw) > MAX_BODY_BYTES:
        raise too_large()
    codec, name = "utf-8-sig", "UTF-8"
    if charset:
        try:
            found = codecs.lookup(charset).name
        except LookupError:
            found = ""
        if not _CHARSETS.fullmatch(found):
            # Only text charsets a client may really send: Python's codecs include transforms
            # (base64, zlib, rot13) that are no text encoding at all, and UTF-7 or IDNA, which
            # no JSON client uses and which spell the same text in other bytes.
            raise malformed(
                "Malformed JSON: unsupported charset",
                f"Content-Type names charset {charset[:40]!r}; UTF-8, UTF-16, UTF-32, ISO-8859-n or "
                "windows-125n are read",
            )
        if found != "utf-8":
            codec, name = found, charset[:40]
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as exc:
        line, col = _line_col(raw[: exc.start].decode(codec, "replace"), exc.start)
        raise malformed(f"Malformed JSON: the body is not {name}", f"line {line} column {col}") from None
    if not text.strip():
        raise malformed("Malformed JSON: the body is empty", "line 1 column 1: expected a JSON value")
    try:
        value: object = json.loads(text, parse_constant=_reject_constant, parse_float=_parse_float)
    except json.JSONDecodeError as exc:
        raise malformed(
            f"Malformed JSON: {exc.msg}", f"line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:
        raise malformed("Malformed JSON: nested too deeply", f"more than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        # parse_constant/parse_float above, or an integer beyond Python's digit limit.
        msg = str(exc).splitlines()[0][:120]
        raise malformed("Malformed JSON: a number is not acceptable", msg) from None
    _check_tree(value)
    return value


def validation_error(exc: ValidationError, prefix: Sequence[int | str] = ()) -> ApiError:
    """422/10201 naming every failing field (never echoing its value: it may be a secret)."""
    problems: list[str] = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = [p for p in (*prefix, *err["loc"]) if isinstance(p, int | str)]
        msg = str(err["msg"]).removeprefix("Value error, ")
        msg = msg[:1].lower() + msg[1:]
        problems.append(f"{loc_text(loc)}: {msg}")
    first = problems[0] if problems else "the body is invalid"
    return ApiError(422, ErrorCode.INVALID_REQUEST, f"Invalid request: {first}", "; ".join(problems[:10]))


def validate(adapter: TypeAdapter[T], value: object) -> T:
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        raise validation_error(exc) from None


async def read_body(request: Request) -> object:
    """The request's JSON body, checked as described in the module docstring.

    The size limit is enforced while streaming, so a huge body is never held in memory whole.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large()
        chunks.append(chunk)
    return parse_json(b"".join(chunks), declared_charset(request.headers.get("content-type")))


def declared_charset(content_type: str | None) -> str | None:
    """The ``charset`` parameter of a ``Content-Type`` header, if it has one."""
    if not content_type:
        return None
    message = Message()
    message["content-type"] = content_type
    charset = message.get_param("charset")
    if not isinstance(charset, str):  # an RFC 2231 triple: no script sends one
        return None
    return charset.strip() or None


async def read_model(request: Request, model: type[M]) -> M:
    """The body validated as ``model`` (400 for bad JSON, 422 naming a bad field)."""
    return validate(TypeAdapter(model), await read_body(request))


async def read_models(request: Request, model: type[M], *, single_ok: bool = True) -> tuple[list[M], bool]:
    """A body that is an array of ``model`` (the manual) or, if ``single_ok``, one object.

    Returns the items and whether the body was a single object.
    """
    value = await read_body(request)
    if single_ok and isinstance(value, dict):
        return [validate(TypeAdapter(model), value)], True
    if not isinstance(value, list):
        raise ApiError(422, ErrorCode.INVALID_REQUEST, "Invalid request: body: must be a JSON array", "body")
    return validate(TypeAdapter(list[model]), value), False  # type: ignore[valid-type]


# The name other route modules (the lead's preview) use for ``read_body``.
read_json_body = read_body
