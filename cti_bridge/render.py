"""Rendering: one event-URI mapping plus one event (and the user and token it is for) becomes the exact
HTTP request to send: method, URL, headers and body.

A mapping is compiled once (``compile_mapping``: every template parsed, the payload's JSON tree turned
into a tree of closures, the output rules checked as far as they can be before an event exists) and
then rendered per delivery (``CompiledMapping.render``), which is pure and fast: no parsing, no regular
expression on the common path, one JSON encoder built once. Output rules (el-templates.md §6):

- URI: every substituted value is percent-encoded as a URI component (``quote(value, safe="")``),
  except an expression at the very start, which may supply the base URL; the result must be an
  absolute http(s) URL.
- Payload: keys literal; a leaf that is exactly one expression keeps its type; any other leaf is a
  string; serialised by the JSON encoder (compact, UTF-8), or as a form when ``contentType`` is
  ``application/x-www-form-urlencoded`` (then the payload must be a flat object).
- Headers: values are composite templates and may not contain CR or LF.
- Every rendered string is at most 64 KiB.

``Authorization`` and ``Idempotency-Key`` are the delivery worker's business, not this module's. Values
read from ``token`` are reported in ``RenderedRequest.secret_values`` so that logs can mask them. A
template error may quote the value it failed on, so an error raised with a token in the context has
every string of that token masked in its text before it leaves this module (``mask_message``): the
worker's attempt records and log lines, the preview's answer and ``cti-bridge render`` all show that
text (el-templates.md §4, reliability.md §14). The mask helpers live here, beside the encodings
they must know, and the worker uses them too.
"""

from __future__ import annotations

import contextlib
import functools
import html
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Final
from urllib.parse import quote, quote_plus, urlencode, urlsplit

from cti_bridge import jsontext
from cti_bridge.el import (
    Expression,
    RenderError,
    Template,
    TemplateError,
    TemplateEvalError,
    TemplateSyntaxError,
    compile_expression,
    compile_template,
)
from cti_bridge.el.compiler import _SLIPS, Engine, slipped
from cti_bridge.el.parser import Binary, Literal, Name
from cti_bridge.el.semantics import to_str
from cti_bridge.el.template import MIN_SECRET
from cti_bridge.events import KNOWN_FIELDS, read_json

__all__ = [
    "CompiledMapping",
    "MappingFileError",
    "MappingSpec",
    "RenderContext",
    "RenderError",
    "RenderedRequest",
    "TemplateEvalError",
    "TemplateSyntaxError",
    "compile_mapping",
    "mapping_spec_from_json",
    "mask",
    "mask_message",
    "mask_order",
    "mask_ordered",
    "now_text",
    "render_command",
    "request_preview",
    "token_secrets",
]

METHODS: Final = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
JSON_TYPE: Final = "application/json"
FORM_TYPE: Final = "application/x-www-form-urlencoded"
MAX_RENDERED_BYTES: Final = 65536
#: The whole rendered request's strings (header values and the payload's) and its encoded body, at
#: most. Each string's own bound let a mapping of 7,000 leaves, each within it, build a 459 MB body
#: (an integrator review's finding: 1.4 GB of memory, and the event loop held for seconds, in a
#: preview or a delivery alike). A CRM call log is a few KB.
MAX_REQUEST_BYTES: Final = 1024 * 1024
#: Where a render keeps what is left of MAX_REQUEST_BYTES: a key of its names that no identifier
#: can spell.
_BUDGET: Final = "\x00request budget"
#: Headers cti-bridge writes itself (the token, the delivery's key, and the connection's own): a
#: mapping's were dropped at the request without a word, while the preview showed them. (``Host``
#: is not among them: a mapping's replaces the URL's, which a CRM reached by address may need.)
RESERVED_HEADERS: Final = frozenset(
    {"authorization", "idempotency-key", "content-length", "transfer-encoding", "connection"}
)
# Below this many characters a string cannot exceed 64 KiB in UTF-8 (at most 4 bytes a character),
# so the common case skips encoding it.
_CHEAP_LENGTH: Final = MAX_RENDERED_BYTES // 4

_HEADER_NAME_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL_RE: Final = re.compile(r"[\x00-\x20\x7f]")
_URI_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")
_URI_LITERAL_RE: Final = re.compile(r"[^\x21-\x7e]")
_NOT_IN_CONDITIONS: Final = frozenset({"token", "deliveryId"})
_STATIC_BASE_RE: Final = re.compile(r"https?://[^/?#\s]+", re.IGNORECASE)
_ASCII_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False)

Names = dict[str, object]


def now_text() -> str:
    """The current UTC time as templates see it: ``YYYY-MM-DD HH:MM:SS``."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True, slots=True)
class MappingSpec:
    """One ``eventUriMapping`` as stored (the manual's fields plus cti-bridge's optional extensions)."""

    xelion_event: str
    crm_resource_uri: str
    crm_resource_payload: object  # the parsed JSON tree; None sends no body
    method: str = "POST"
    headers: Mapping[str, str] | None = None
    content_type: str | None = None  # None means application/json
    condition: str | None = None


@dataclass(frozen=True, slots=True)
class RenderContext:
    """What a template can name for one delivery (el-templates.md §4)."""

    event: Mapping[str, object]  # the notification's fields, top level
    xelion_event: str
    user: Mapping[str, object] | None = None  # xelionUsername, xelionOid, role
    token: Mapping[str, object] | None = None  # accessToken plus the token response's other fields
    delivery_id: str | None = None
    now: str = field(default_factory=now_text)


@dataclass(frozen=True, slots=True)
class RenderedRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None
    warnings: tuple[str, ...] = ()
    secret_values: tuple[str, ...] = ()


class MappingFileError(ValueError):
    """A mapping, event or token file that cannot be read or is not what it should be."""


# -- helpers -----------------------------------------------------------------------------------------------


def _check_size(text: str, where: str) -> str:
    if len(text) > _CHEAP_LENGTH and len(text.encode("utf-8", "surrogatepass")) > MAX_RENDERED_BYTES:
        raise RenderError("rendered string longer than 64 KiB", where=where)
    return text


def _spend(names: Names, text: str, where: str) -> str:
    """Take ``text``'s length from the render's budget (``_BUDGET``, set by ``render``): a
    RenderError at ``where`` once the request's strings together pass MAX_REQUEST_BYTES. (The
    payload's string leaves do the same inline: a call per leaf was a tenth of a render.)"""
    left: int = names[_BUDGET] - len(text)  # type: ignore[operator]
    if left < 0:
        raise _over_budget(where)
    names[_BUDGET] = left
    return text


def _over_budget(where: str) -> RenderError:
    return RenderError(
        f"the rendered request is larger than {MAX_REQUEST_BYTES // 1048576} MiB (header values and "
        "payload together)",
        where=where,
    )


def _pointer(parent: str, key: str | int) -> str:
    # RFC 6901 escaping, so that a key holding '/' still names one leaf.
    return parent + "/" + str(key).replace("~", "~0").replace("/", "~1")


class _SecretMap(Mapping[str, object]):
    """The token as templates see it: records every string read from it, so that the request's
    ``secret_values`` name exactly what was drawn from the token."""

    __slots__ = ("_data", "_seen")

    def __init__(self, data: Mapping[str, object], seen: list[str]) -> None:
        self._data = data
        self._seen = seen

    def __getitem__(self, key: str) -> object:
        return _track(self._data[key], self._seen)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    @property
    def taint_sink(self) -> list[str]:
        """Where an expression reading the token records the string it made (el.template's
        ``tainted`` names): ``fn:toUpperCase(token.accessToken)`` is as secret as the token."""
        return self._seen


#: Names whose values are secrets: every string an expression makes from them is one as well.
_SECRET_NAMES: Final = frozenset({"token"})


def _track(value: object, seen: list[str]) -> object:
    if type(value) is str:
        if value:
            seen.append(value)
        return value
    if isinstance(value, Mapping):
        return _SecretMap(value, seen)
    if isinstance(value, list | tuple):
        return [_track(v, seen) for v in value]
    return value


# -- secrets -------------------------------------------------------------------------------------------

MASK: Final = "***"
#: Shorter values are not masked: a one-to-three character value ("1", "id", "api") would star out
#: pieces of every text it met, while showing it gives nothing away (el.template.MIN_SECRET).
#: Where an error message's quoted value ends: ``repr``'s closing quote, after the ``...`` of a value
#: cut short (``semantics.describe`` keeps 37 characters of a string, a bad URL is quoted to 80).
_QUOTE_END_RE: Final = re.compile(r"\.\.\.['\"]|['\"]")


def _request_forms(raw: str, twice: bool) -> tuple[str, ...]:
    """The forms a secret takes in a rendered request, other than itself: a URI component
    (``_quote_component``; when ``twice``, also after ``fn:urlEncode``), a form field (``urlencode``)
    and a JSON string (``jsontext.compact``)."""
    once = quote(raw, safe="")
    forms = (once, quote_plus(raw), json.dumps(raw, ensure_ascii=False)[1:-1])
    return (*forms, quote(once, safe="")) if twice and once != raw else forms


def token_secrets(token: Mapping[str, object] | None) -> tuple[str, ...]:
    """Every string reachable from a token view (``token.accessToken`` and each extra field of the
    token answer, in maps and lists too), itself and in the forms of a request (``_request_forms``)
    and of a value an error message quotes (``repr``). Strings shorter than ``MIN_SECRET`` are left
    out; numbers and booleans are not secrets."""
    raws: dict[str, None] = {}
    stack: list[object] = [token]
    while stack:  # a loop, not recursion: a token answer may nest as deep as JSON allows
        value = stack.pop()
        if isinstance(value, str):
            if len(value) >= MIN_SECRET:
                raws[value] = None
        elif isinstance(value, Mapping):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
    out: dict[str, None] = {}
    for raw in raws:
        out[raw] = None
        out.update(dict.fromkeys(_request_forms(raw, twice=True)))
        out[repr(raw)[1:-1]] = None
    return tuple(out)


def echo_forms(raw: str) -> tuple[str, ...]:
    """``raw`` (an access token, a password) and the forms a server may quote it back in, as a
    CRM's error page or answer does: a request's (``_request_forms``), percent-encoded with ``/`` kept
    (``quote``'s default, as most URL builders) and with lower-case hex digits (.NET's
    ``UrlEncode``), a JSON string with ``/`` escaped (PHP's ``json_encode``) and HTML-escaped.

    A token of URL-safe characters only (most: JWTs, hex, base64url) has no other form, found with
    one match; the others are built once per token and cached. Building them for every delivery
    cost 37 us each, and a cache of the tokens in use missed with every user once a tenant had
    more users than it held (1,000 users: 12 % more CPU per event than 1 user)."""
    if _URL_SAFE.fullmatch(raw):
        return (raw,) if len(raw) >= MIN_SECRET else ()
    return _echo_forms(raw)


_URL_SAFE: Final = re.compile("[A-Za-z0-9_.~-]*")


@functools.lru_cache(maxsize=1024)
def _echo_forms(raw: str) -> tuple[str, ...]:
    json_form = json.dumps(raw, ensure_ascii=False)[1:-1]
    encoded = (quote(raw, safe=""), quote(raw))
    forms = (
        raw,
        *_request_forms(raw, twice=True),
        *encoded,
        *(_PERCENT_HEX.sub(lambda m: m.group(0).lower(), form) for form in encoded),
        json_form.replace("/", "\\/"),
        json.dumps(raw)[1:-1],
        html.escape(raw),
    )
    return tuple(dict.fromkeys(f for f in forms if len(f) >= MIN_SECRET))


_PERCENT_HEX: Final = re.compile("%[0-9A-F]{2}")


def mask_order(secrets: Iterable[str]) -> tuple[str, ...]:
    """The secret values worth masking, longest first (so no secret is half-masked)."""
    return tuple(sorted({s for s in secrets if len(s) >= MIN_SECRET}, key=len, reverse=True))


def mask_ordered(text: str, ordered: tuple[str, ...]) -> str:
    """Replace every secret value of ``ordered`` (``mask_order``) in ``text``."""
    for secret in ordered:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def mask_excerpt(text: str, ordered: tuple[str, ...]) -> str:
    """``mask_ordered``, for a text cut at a length (an excerpt): the start of a secret that the cut
    left at its end (``MIN_SECRET`` characters or more) is masked too, as the whole secret no
    longer matches there."""
    text = mask_ordered(text, ordered)
    end = len(text)
    cut = min((_head_at(text, 0, end, secret) for secret in ordered), default=end)
    return text[:cut] + MASK if end - cut >= MIN_SECRET else text


def mask(text: str, secrets: Iterable[str]) -> str:
    """Replace every secret value in ``text``."""
    return mask_ordered(text, mask_order(secrets))


def mask_message(text: str, secrets: Iterable[str]) -> str:
    """``mask``, and a secret an error message cut short: a quoted value is cut to its first
    characters (``describe``: 37 and ``...``; a URL: 80), so a secret can end it half-shown, which
    the whole secret does not match. A quoted value ending in the first ``MIN_SECRET`` or more
    characters of a secret has them masked too. For error texts only (slower than ``mask``)."""
    ordered = mask_order(secrets)
    text = mask_ordered(text, ordered)
    if not ordered:
        return text
    parts: list[str] = []
    start = 0  # where the text not yet copied to parts starts
    for found in _QUOTE_END_RE.finditer(text):
        end = found.start()
        cut = min((_head_at(text, start, end, secret) for secret in ordered), default=end)
        if end - cut >= MIN_SECRET:
            parts += [text[start:cut], MASK]
            start = end
    return "".join(parts) + text[start:] if parts else text


def _head_at(text: str, start: int, end: int, secret: str) -> int:
    """Where the longest start of ``secret`` (``MIN_SECRET`` characters or more) that ends
    ``text[start:end]`` begins; ``end`` if none does."""
    head = secret[:MIN_SECRET]
    at = text.find(head, max(start, end - len(secret)), end)
    while at != -1:
        if secret.startswith(text[at:end]):
            return at
        at = text.find(head, at + 1, end)
    return end


def _mask_error(err: TemplateError, token: Mapping[str, object] | None) -> None:
    """Mask, in the error itself, every value of ``token`` that its message may quote."""
    if token is None:
        return
    masked = mask_message(err.message, token_secrets(token))
    if masked != err.message:
        err.message = masked
        err.args = (masked,)  # what pickling and a plain Exception's str would show


def _jsonable(value: object) -> object:
    """Plain JSON types for a value that is not one already (a token map, a tuple)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


_PLAIN: Final = frozenset({str, int, float, bool, type(None)})


def _form_pairs(tree: dict[str, object]) -> list[tuple[str, str]]:
    """A flat payload's fields as form text (null is empty); the place of a nested value is only
    named when there is one (no JSON pointer built per field and render)."""
    pairs: list[tuple[str, str]] = []
    for key, value in tree.items():
        if value is None:
            pairs.append((key, ""))
        elif type(value) in _PLAIN:
            pairs.append((key, to_str(value)))
        else:
            raise RenderError(
                "a form payload must be a flat object (this value is a list or map)",
                where=_pointer("crmResourcePayload", key),
            )
    return pairs


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _const(value: object) -> Callable[[Names], object]:
    return lambda names: value


def _const_str(value: str) -> Callable[[Names], str]:
    return lambda names: value


def _raw_step(expr: Expression) -> Callable[[Names], str]:
    fn = expr._fn
    return lambda names: to_str(fn(names))


#: What ``quote(text, safe="")`` leaves as it is (RFC 3986 unreserved characters).
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")


def _quote_component(text: str) -> str:
    """``quote(text, safe="")``, without urllib's byte-by-byte path for the many values (ids,
    numbers, user names) that need no escaping at all."""
    return text if _UNRESERVED.fullmatch(text) else quote(text, safe="")


def _encoded_step(expr: Expression) -> Callable[[Names], str]:
    fn = expr._fn
    return lambda names: _quote_component(to_str(fn(names)))


#: The names cti-bridge adds to an event's fields (``context_names``; el-templates.md §4).
OWN_NAMES: Final = frozenset({"xelionEvent", "now", "user", "token", "deliveryId"})


def context_names(ctx: RenderContext, seen: list[str] | None = None) -> Names:
    """The names a template sees: the event's fields, then cti-bridge's own names (which win)."""
    names: Names = dict(ctx.event)
    names["xelionEvent"] = ctx.xelion_event
    names["now"] = ctx.now
    if ctx.user is not None:
        names["user"] = ctx.user
    if ctx.token is not None:
        names["token"] = ctx.token if seen is None else _SecretMap(ctx.token, seen)
    if ctx.delivery_id is not None:
        names["deliveryId"] = ctx.delivery_id
    return names


def _name_equals_string(condition: Expression | None) -> tuple[str, str] | None:
    """``(name, text)`` when the condition is exactly ``name == 'text'`` (either way round).

    The commonest routing condition (by number, by queue). For a value that is a string, EL's
    ``==`` is plain string equality and cannot fail; for null it is false. So the pipeline can look
    such mappings up by the value instead of evaluating each condition (``routing.EventMappings``).
    """
    node = condition.node if condition is not None else None
    if not isinstance(node, Binary) or node.op != "==":
        return None
    for a, b in ((node.left, node.right), (node.right, node.left)):
        if isinstance(a, Name) and isinstance(b, Literal) and type(b.value) is str:
            return a.name, b.value
    return None


# -- compiling ---------------------------------------------------------------------------------------------

PayloadFn = Callable[[Names], object]


class CompiledMapping:
    """A mapping ready to render. Build with ``compile_mapping``."""

    def __init__(self, spec: MappingSpec, engine: Engine = "closures") -> None:
        self.spec = spec
        self.engine: Engine = engine
        self.xelion_event = spec.xelion_event
        self._places: list[tuple[str, str]] = []  # (name, where) for warnings

        method = spec.method.strip().upper() if isinstance(spec.method, str) else ""
        if method not in METHODS:
            raise TemplateSyntaxError(
                f"method must be one of {', '.join(sorted(METHODS))}, not {spec.method!r}", where="method"
            )
        self.method = method

        content_type = JSON_TYPE if spec.content_type is None else spec.content_type.strip().lower()
        if content_type not in (JSON_TYPE, FORM_TYPE):
            raise TemplateSyntaxError(
                f"contentType must be {JSON_TYPE} or {FORM_TYPE}, not {spec.content_type!r}",
                where="contentType",
            )
        self.content_type = content_type

        self.uri = self._compile_uri(spec.crm_resource_uri)
        self._headers = self._compile_headers(spec.headers)
        self._payload = self._compile_payload(spec.crm_resource_payload)

        self.condition: Expression | None = None
        if spec.condition is not None and spec.condition.strip():
            try:
                # Conditions run once per delivery, off the hot path: the simpleeval engine.
                self.condition = compile_expression(spec.condition, engine="simpleeval")
            except TemplateError as err:
                err.locate(where="condition")
                raise
            self._places += [(n, "condition") for n in sorted(self.condition.names)]
        # Conditions are evaluated when the event is stored (pipeline.py), before any token is
        # fetched and before the delivery exists: these names are null there, and in the previews.
        self._condition_notes: tuple[str, ...] = tuple(
            f"the condition names {n!r}, which is null there: conditions are evaluated when the event "
            "arrives, before any token or delivery id"
            for n in sorted(self.condition.names if self.condition is not None else ())
            if n in _NOT_IN_CONDITIONS
        )
        self.condition_equals = _name_equals_string(self.condition)

        self.names: frozenset[str] = frozenset(n for n, _ in self._places)
        self._uses_token = "token" in self.names

    # URI ---------------------------------------------------------------------------------------------
    def _template(self, text: object, where: str) -> Template:
        if not isinstance(text, str):
            raise TemplateSyntaxError(f"must be a string, not {type(text).__name__}", where=where)
        try:
            template = compile_template(text, engine=self.engine, tainted=_SECRET_NAMES)
        except TemplateError as err:
            err.locate(where=where)
            raise
        self._places += [(n, where) for n in sorted(template.names)]
        return template

    def _compile_uri(self, text: str) -> Callable[[Names], str]:
        where = "crmResourceUri"
        template = self._template(text, where)
        bad = _URI_CONTROL_RE.search(text)
        if bad is not None:
            raise TemplateSyntaxError("control character in the URI", column=bad.start() + 1, where=where)
        for part in template.parts:
            # White space and non-ASCII text outside ``${...}``: no request line can carry them, and
            # after a literal base the rendered URL is not parsed again (a space was refused only
            # when the CRM request was made).
            if not isinstance(part, str):
                continue
            odd = _URI_LITERAL_RE.search(part)
            if odd is not None:
                at = text.find(part)
                raise TemplateSyntaxError(
                    f"{odd.group()!r} in the URI: percent-encode it (a space is %20)",
                    column=None if at < 0 else at + odd.start() + 1,
                    where=where,
                )
        steps: list[Callable[[Names], str]] = []
        for index, part in enumerate(template.parts):
            if isinstance(part, str):
                steps.append(_const_str(part))
            elif index == 0:
                # An expression at the very start may supply the base URL: not encoded.
                steps.append(_raw_step(part))
            else:
                steps.append(_encoded_step(part))
        first = template.parts[0] if template.parts else ""
        self._uri_start = first if isinstance(first, str) else None
        if template.is_constant:
            url = "".join(p for p in template.parts if isinstance(p, str))
            try:
                self._check_url(url)
            except RenderError as err:
                raise TemplateSyntaxError(err.message, where=where) from None
        # When the literal start already fixes scheme and host, encoded substitutions cannot make the
        # URL relative: skip the runtime parse.
        base = _STATIC_BASE_RE.match(first) if isinstance(first, str) else None
        check = self._check_size_only if base is not None else self._check_url

        def render_uri(names: Names) -> str:
            try:
                pieces = [step(names) for step in steps]
            except TemplateError as err:
                err.locate(where=where)
                raise
            if sum(map(len, pieces)) > MAX_RENDERED_BYTES:  # before the join (see template.py)
                raise RenderError("rendered string longer than 64 KiB", where=where)
            return check("".join(pieces))

        return render_uri

    @staticmethod
    def _check_size_only(url: str) -> str:
        return _check_size(url, "crmResourceUri")

    @staticmethod
    def _check_url(url: str) -> str:
        _check_size(url, "crmResourceUri")
        if _CONTROL_RE.search(url):
            raise RenderError(
                f"the URI contains white space or a control character: {url[:80]!r}", where="crmResourceUri"
            )
        if not url.isascii():
            raise RenderError(f"the URI contains a non-ASCII character: {url[:80]!r}", where="crmResourceUri")
        try:
            parts = urlsplit(url)
            host = parts.hostname
        except ValueError:
            host = None
            parts = None
        if parts is None or parts.scheme.lower() not in ("http", "https") or not host:
            raise RenderError(
                f"the URI must be an absolute http or https URL, not {url[:80]!r}", where="crmResourceUri"
            )
        return url

    def unknown_names(self) -> list[tuple[str, str]]:
        """(name, place) of each top-level name the templates read that no call event is known to
        carry (``events.KNOWN_FIELDS``) and cti-bridge does not add (``OWN_NAMES``), once each."""
        return list(dict.fromkeys((n, w) for n, w in self._places if n not in KNOWN_FIELDS | OWN_NAMES))

    def check_for_saving(self) -> None:
        """What the admin API also refuses when a mapping is saved (or previewed before saving),
        beyond compiling: mistakes that could only end each delivery dead, found at once instead (an
        integrator review's findings). A stored mapping is not held to this when it is loaded: one
        saved by an earlier release renders as it did. Raises ``TemplateSyntaxError``, located."""
        start = self._uri_start
        base = _STATIC_BASE_RE.match(start) if start is not None else None
        if base is not None:
            # Only here, not when compiling: a stored mapping that does not compile fails the
            # ingest of its integration's every event (routing compiles them all), where a port
            # the transport cannot use only ends that mapping's deliveries dead (a second
            # reading's finding about this check's first version).
            try:
                urlsplit(base.group()).port  # noqa: B018 (ValueError on access: out of range)
            except ValueError:
                raise TemplateSyntaxError(
                    f"the URI's host or port is not valid: {base.group()[:80]!r}",
                    column=1,
                    where="crmResourceUri",
                ) from None
        if start is not None:
            lower = start.lower()
            if not lower.startswith(("http://", "https://")) and not any(
                scheme.startswith(lower) for scheme in ("http://", "https://")
            ):
                raise TemplateSyntaxError(
                    "the URI must start with http:// or https:// (or with an expression that gives "
                    f"the base URL), not {start[:40]!r}",
                    column=1,
                    where="crmResourceUri",
                )
        for name, where, template in self._headers:
            if name.lower() in RESERVED_HEADERS:
                raise TemplateSyntaxError(
                    f"{name} is a header cti-bridge writes itself (the user's token, the delivery id, "
                    "the connection's own); a mapping cannot set it",
                    where=where,
                )
            for part in template.parts:
                if isinstance(part, str) and ("\r" in part or "\n" in part or "\0" in part):
                    raise TemplateSyntaxError("a header value may not contain CR, LF or NUL", where=where)

    # headers -----------------------------------------------------------------------------------------
    def _compile_headers(self, headers: Mapping[str, str] | None) -> list[tuple[str, str, Template]]:
        out: list[tuple[str, str, Template]] = []
        if headers is None:
            return out
        if not isinstance(headers, Mapping):
            raise TemplateSyntaxError("headers must be an object of name: value", where="headers")
        for name, value in headers.items():
            where = f"headers/{name}"
            if not isinstance(name, str) or not _HEADER_NAME_RE.fullmatch(name):
                raise TemplateSyntaxError(f"invalid header name {name!r}", where=where)
            if name.lower() == "content-type":
                raise TemplateSyntaxError("set the content type with contentType, not a header", where=where)
            out.append((name, where, self._template(value, where)))
        return out

    # payload -----------------------------------------------------------------------------------------
    def _compile_payload(self, payload: object) -> PayloadFn | None:
        if payload is None:
            return None
        form = self.content_type == FORM_TYPE
        if form:
            if not isinstance(payload, dict):
                raise TemplateSyntaxError(
                    "a form payload must be a flat JSON object", where="crmResourcePayload"
                )
            for key, value in payload.items():
                if isinstance(value, dict | list):
                    raise TemplateSyntaxError(
                        "a form payload must be a flat object",
                        where=_pointer("crmResourcePayload", key),
                    )
        is_const, result = self._node(payload, "crmResourcePayload", 0)
        return _const(result) if is_const else result  # type: ignore[return-value]

    def _node(self, value: object, where: str, depth: int) -> tuple[bool, object]:
        """(True, value) for a constant subtree, else (False, closure building it)."""
        if depth > 64:
            raise TemplateSyntaxError("payload nested deeper than 64 levels", where=where)
        if isinstance(value, str):
            return self._leaf(value, where)
        if isinstance(value, dict):
            items = [(k, self._node(v, _pointer(where, k), depth + 1)) for k, v in value.items()]
            if all(c for _, (c, _) in items):
                # The leaves as rendered: a literal "\${" is "${" (the stored text was sent as it
                # was, backslash and all, when no sibling held an expression).
                return True, {k: v for k, (_, v) in items}
            keys = tuple(k for k, _ in items)
            fns: tuple[PayloadFn, ...] = tuple(
                _const(v) if c else v  # type: ignore[misc]
                for _, (c, v) in items
            )

            def build_object(names: Names) -> object:
                return dict(zip(keys, [f(names) for f in fns], strict=True))

            return False, build_object
        if isinstance(value, list):
            elems = [self._node(v, _pointer(where, i), depth + 1) for i, v in enumerate(value)]
            if all(c for c, _ in elems):
                return True, [v for _, v in elems]
            efns: tuple[PayloadFn, ...] = tuple(
                _const(v) if c else v  # type: ignore[misc]
                for c, v in elems
            )

            def build_list(names: Names) -> object:
                return [f(names) for f in efns]

            return False, build_list
        if value is None or isinstance(value, bool | int | float):
            return True, value
        raise TemplateSyntaxError(f"not a JSON value: {type(value).__name__}", where=where)

    def _leaf(self, text: str, where: str) -> tuple[bool, object]:
        template = self._template(text, where)
        if template.is_constant:
            return True, template.render({})
        single = template.single
        if single is not None:
            fn = single._fn

            def typed_leaf(names: Names) -> object:
                try:
                    value = fn(names)
                except TemplateError as err:
                    err.locate(where=where)
                    raise
                t = type(value)
                if t is str:
                    text: str = _check_size(value, where)  # type: ignore[arg-type]
                    left: int = names[_BUDGET] - len(text)  # type: ignore[operator]
                    if left < 0:
                        raise _over_budget(where)
                    names[_BUDGET] = left
                    return text
                if t in _PLAIN:
                    return value
                if t is list or t is dict:
                    # A list or map (an event's, a split's): counted as the JSON it becomes.
                    try:
                        text = jsontext.compact(value, allow_nan=False)
                    except (TypeError, ValueError):
                        return value  # not JSON: the body's encoding says so, as it did
                    _spend(names, text, where)
                    return value
                return _jsonable(value)

            return False, typed_leaf
        render = template._render

        def string_leaf(names: Names) -> object:
            try:
                text = _check_size(render(names), where)
            except TemplateError as err:
                err.locate(where=where)
                raise
            left: int = names[_BUDGET] - len(text)  # type: ignore[operator]
            if left < 0:
                raise _over_budget(where)
            names[_BUDGET] = left
            return text

        return False, string_leaf

    # rendering ---------------------------------------------------------------------------------------
    def context_names(self, ctx: RenderContext, seen: list[str] | None = None) -> Names:
        """The names a template sees: the event's fields, then cti-bridge's own names (which win)."""
        return context_names(ctx, seen)

    def condition_holds(self, ctx: RenderContext) -> bool:
        """Whether the mapping applies to this event (true when it has no condition), evaluated as
        the pipeline does: without ``token`` and ``deliveryId``, which do not exist yet then."""
        if self.condition is None:
            return True
        try:
            return self.condition_holds_in(context_names(replace(ctx, token=None, delivery_id=None)))
        except TemplateError as err:
            _mask_error(err, ctx.token)
            raise

    def condition_holds_in(self, names: Names) -> bool:
        """``condition_holds`` with the names already built (``context_names``): the pipeline builds
        them once per event and party and tries every mapping's condition on them."""
        if self.condition is None:
            return True
        try:
            return self.condition.holds(names)
        except TemplateError as err:
            err.locate(where="condition", xelion_event=self.xelion_event)
            raise

    def warnings_for(self, ctx: RenderContext) -> tuple[str, ...]:
        return self._warnings(self.context_names(ctx))

    def _warnings(self, names: Names) -> tuple[str, ...]:
        if all(n in names for n in self.names):
            return self._condition_notes
        unknown = tuple(f"unknown name {n!r} in {where}" for n, where in self._places if n not in names)
        return unknown + self._condition_notes

    def render(self, ctx: RenderContext, *, warnings: bool = True) -> RenderedRequest:
        """The request for this event. Raises ``TemplateEvalError`` or ``RenderError``, located.
        ``warnings=False``: none are listed (the worker, which shows them nowhere; a mapping with an
        unknown name built its lines for every delivery)."""
        seen: list[str] | None = [] if self._uses_token else None
        names = self.context_names(ctx, seen)
        names[_BUDGET] = MAX_REQUEST_BYTES
        try:
            url = self.uri(names)
            headers: dict[str, str] = {}
            for name, where, template in self._headers:
                try:
                    value = template._render(names)
                except TemplateError as err:
                    err.locate(where=where)
                    raise
                if "\r" in value or "\n" in value or "\0" in value:
                    raise RenderError("a header value may not contain CR, LF or NUL", where=where)
                headers[name] = _spend(names, _check_size(value, where), where)
            body: bytes | None = None
            if self._payload is not None:
                tree = self._payload(names)
                if self.content_type == JSON_TYPE:
                    try:
                        text = jsontext.compact(tree, allow_nan=False)
                    except ValueError:
                        raise RenderError(
                            "the payload holds a value JSON cannot carry", where="crmResourcePayload"
                        ) from None
                    try:
                        body = text.encode("utf-8")
                    except UnicodeEncodeError:
                        # A lone surrogate (an event's "\ud800"): raw, it made bytes that are not
                        # UTF-8; escaped, it is the same JSON string the event held.
                        body = _ASCII_ENCODER.encode(tree).encode("ascii")
                else:
                    body = self._form(tree).encode("utf-8")
                if len(body) > MAX_REQUEST_BYTES:  # the constants, and characters of several bytes
                    raise RenderError(
                        f"the rendered payload is larger than {MAX_REQUEST_BYTES // 1048576} MiB",
                        where="crmResourcePayload",
                    )
                headers["Content-Type"] = self.content_type
        except TemplateError as err:
            err.locate(xelion_event=self.xelion_event)
            _mask_error(err, ctx.token)
            raise
        except _SLIPS as exc:
            err2 = slipped(exc, None)
            err2.locate(xelion_event=self.xelion_event)
            _mask_error(err2, ctx.token)
            raise err2 from None
        secrets = _secret_values(seen, url, headers, body) if seen else ()
        notes = self._warnings(names) if warnings else ()
        return RenderedRequest(self.method, url, headers, body, notes, secrets)

    @staticmethod
    def _form(tree: object) -> str:
        if not isinstance(tree, dict):
            raise RenderError("a form payload must be a flat object", where="crmResourcePayload")
        pairs = _form_pairs(tree)
        try:
            return urlencode(pairs)
        except UnicodeEncodeError:
            # A lone surrogate has no UTF-8 form to percent-encode (it failed as an "internal
            # evaluation error"); JSON payloads escape it instead. Found here, not per value.
            bad = next(k for k, text in pairs if not (_utf8(k) and _utf8(text)))
            raise RenderError(
                "this value holds a lone surrogate, which a form cannot carry",
                where=_pointer("crmResourcePayload", bad),
            ) from None


def _secret_values(
    seen: list[str], url: str, headers: Mapping[str, str], body: bytes | None
) -> tuple[str, ...]:
    """Every string read from the token, plus each encoded form of it that appears in the request."""
    text = "\n".join([url, *headers.values(), body.decode("utf-8", "replace") if body else ""])
    out: dict[str, None] = {}
    twice = "%25" in text  # a value encoded twice shows its '%' as '%25'; saves a quote() per value
    for raw in seen:
        out[raw] = None
        for variant in _request_forms(raw, twice):
            if variant != raw and variant in text:
                out[variant] = None
    return tuple(out)


def compile_mapping(spec: MappingSpec, *, engine: Engine = "closures") -> CompiledMapping:
    """Compile every template of a mapping; ``TemplateSyntaxError`` names the event, place and column.

    ``engine`` selects the evaluator of the URI, header and payload templates (see
    ``cti_bridge.el.compiler``); the default is the fast one. Conditions always use simpleeval.
    """
    try:
        return CompiledMapping(spec, engine)
    except TemplateError as err:
        err.locate(xelion_event=spec.xelion_event)
        raise


# -- preview and the CLI's render command ---------------------------------------------------------------


def request_preview(req: RenderedRequest) -> dict[str, object]:
    """A JSON-able view of a request with every secret value replaced by ``***``."""
    # As the attempt log masks (``mask_order``): values under four characters stay, or a choice an
    # expression made from the token ('y', 'api') starred out every such piece of the preview.
    secrets = mask_order(req.secret_values)

    def mask(text: str) -> str:
        for secret in secrets:
            text = text.replace(secret, "***")
        return text

    def mask_tree(value: object) -> object:
        if isinstance(value, str):
            return mask(value)
        if isinstance(value, dict):
            return {mask(str(k)): mask_tree(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mask_tree(v) for v in value]
        return value

    body: object = None
    if req.body is not None:
        text = req.body.decode("utf-8", "replace")
        content_type = next((v for k, v in req.headers.items() if k.lower() == "content-type"), "")
        body = mask(text)
        if content_type.startswith(JSON_TYPE):
            with contextlib.suppress(ValueError):
                body = mask_tree(json.loads(text))
    return {
        "method": req.method,
        "url": mask(req.url),
        "headers": {k: mask(v) for k, v in req.headers.items()},
        "body": body,
        "warnings": list(req.warnings),
    }


def _load_json(path: str, what: str, *, as_event: bool = False) -> object:
    """A JSON file's content; ``as_event``: read as the daemon reads an event (``events.read_json``:
    ``1e400`` kept as text, as the README promises; read as a float it was refused here, so the
    command and the daemon rendered the same event differently)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise MappingFileError(f"{what} file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise MappingFileError(f"{what} file {path}: not UTF-8 text") from None
    try:
        return read_json(text) if as_event else json.loads(text)
    except json.JSONDecodeError as exc:
        raise MappingFileError(
            f"{what} file {path}: line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None


def mapping_spec_from_json(obj: object) -> MappingSpec:
    """A ``MappingSpec`` from one mapping object in the manual's JSON shape; ``ValueError`` if malformed."""
    if not isinstance(obj, dict):
        raise ValueError("a mapping must be a JSON object")

    def text(key: str, required: bool = False) -> str | None:
        value = obj.get(key)
        if value is None:
            if required:
                raise ValueError(f"mapping field {key!r} is required")
            return None
        if not isinstance(value, str):
            raise ValueError(f"mapping field {key!r} must be a string")
        return value

    headers = obj.get("headers")
    if headers is not None and not (
        isinstance(headers, dict) and all(isinstance(v, str) for v in headers.values())
    ):
        raise ValueError("mapping field 'headers' must be an object of string values")
    return MappingSpec(
        xelion_event=text("xelionEvent", True) or "",
        crm_resource_uri=text("crmResourceUri", True) or "",
        crm_resource_payload=obj.get("crmResourcePayload"),
        method=text("method") or "POST",
        headers=headers,
        content_type=text("contentType"),
        condition=text("condition"),
    )


def _party(ref: object) -> tuple[str | None, str | None]:
    """(user name, oid) of a callerUser/calleeUser, a name or an object reference."""
    if isinstance(ref, str):
        return ref, None
    if isinstance(ref, dict):
        name = ref.get("commonName") or ref.get("userName")
        oid = ref.get("oid")
        return (name if isinstance(name, str) else None), (str(oid) if oid is not None else None)
    return None, None


def render_command(
    mapping_path: str, event_path: str, user: str | None, token_path: str | None
) -> dict[str, object]:
    """``cti-bridge render``: the request a mapping makes for an event, previewed, sending nothing.

    The event file is a bare notification or a whole websocket frame; ``user`` picks the party
    (``caller`` when it is the event's ``callerUser``, else ``callee``); the token file is an OAuth2
    token response (``access_token`` becomes ``token.accessToken``). ``deliveryId`` is ``preview``.
    Raises ``MappingFileError`` (a ``ValueError``) for unreadable or malformed files and
    ``TemplateError`` subclasses for templates that do not compile or render.
    """
    try:
        spec = mapping_spec_from_json(_load_json(mapping_path, "mapping"))
    except MappingFileError:
        raise
    except ValueError as exc:
        raise MappingFileError(f"mapping file {mapping_path}: {exc}") from None
    raw_event = _load_json(event_path, "event", as_event=True)
    if not isinstance(raw_event, dict):
        raise MappingFileError(f"event file {event_path}: not a JSON object")
    extra_warnings: list[str] = []
    xelion_event = spec.xelion_event
    event: dict[str, object] = raw_event
    if isinstance(raw_event.get("notification"), dict):
        event = raw_event["notification"]
        frame_type = raw_event.get("notificationType")
        if isinstance(frame_type, str) and frame_type:
            if frame_type != spec.xelion_event:
                extra_warnings.append(f"the event is a {frame_type}, the mapping is for {spec.xelion_event}")
            xelion_event = frame_type
    user_map: dict[str, object] | None = None
    if user is not None:
        caller_name, caller_oid = _party(event.get("callerUser"))
        _callee_name, callee_oid = _party(event.get("calleeUser"))
        is_caller = user in (caller_name, caller_oid)
        user_map = {
            "xelionUsername": user,
            "xelionOid": caller_oid if is_caller else callee_oid,
            "role": "caller" if is_caller else "callee",
        }
    token_map: dict[str, object] | None = None
    if token_path is not None:
        raw_token = _load_json(token_path, "token")
        if not isinstance(raw_token, dict):
            raise MappingFileError(f"token file {token_path}: not a JSON object")
        token_map = {("accessToken" if k == "access_token" else k): v for k, v in raw_token.items()}
    compiled = compile_mapping(spec)
    ctx = RenderContext(
        event=event,
        xelion_event=xelion_event,
        user=user_map,
        token=token_map,
        delivery_id="preview",
        now=now_text(),
    )
    request = compiled.render(ctx)
    preview = request_preview(request)
    preview["warnings"] = extra_warnings + list(request.warnings)
    preview["condition"] = compiled.condition_holds(ctx)
    return preview
