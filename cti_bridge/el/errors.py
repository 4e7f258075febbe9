"""The template language's errors: one small tree, each error knowing where in which mapping it arose.

``TemplateError`` carries a message and, as far as known, the 1-based column within the template
string, the place in the mapping (``crmResourceUri``, ``condition``, ``headers/X-Foo`` or the JSON
pointer of a payload leaf) and the Xelion event of the mapping. The compiler fills in the column; the
mapping compiler and renderer (``cti_bridge.render``) fill in the place and the event, so that an
operator reads ``newCallEvent: crmResourcePayload/to: column 7: unexpected token ')'``.
"""

from __future__ import annotations


class TemplateError(Exception):
    """A template could not be compiled, evaluated or rendered."""

    def __init__(
        self,
        message: str,
        *,
        column: int | None = None,
        where: str | None = None,
        xelion_event: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.column = column
        self.where = where
        self.xelion_event = xelion_event

    def locate(self, *, where: str | None = None, xelion_event: str | None = None) -> None:
        """Fill in the place and the event unless an inner layer already did."""
        if self.where is None:
            self.where = where
        if self.xelion_event is None:
            self.xelion_event = xelion_event

    def __str__(self) -> str:
        parts: list[str] = []
        if self.xelion_event:
            parts.append(self.xelion_event)
        if self.where:
            parts.append(self.where)
        if self.column is not None:
            parts.append(f"column {self.column}")
        parts.append(self.message)
        return ": ".join(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


class TemplateSyntaxError(TemplateError):
    """A template does not compile (raised when a mapping is saved or compiled)."""


class TemplateEvalError(TemplateError):
    """A template failed while being evaluated against one event (e.g. ``"a" + 1``)."""


class RenderError(TemplateError):
    """The rendered request breaks an output rule: a relative URI, a string over 64 KiB, a header
    value with CR/LF, a form payload that is not flat."""
