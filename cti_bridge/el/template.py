"""Compiled templates and expressions: what the rest of cti-bridge holds and evaluates.

``compile_template`` takes a composite string (``"calls?to=${calleePhoneNumber}"``) and
``compile_expression`` a bare condition (``duration > 0``, or the same inside ``${...}``). Both parse
once; ``render``/``evaluate`` only run the compiled closures against a context mapping of names
(the event's fields, ``xelionEvent``, ``user``, ``token``, ``deliveryId``, ``now``). An identifier the
context does not carry is null.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

import simpleeval

from cti_bridge.el.compiler import (
    _SLIPS,
    Context,
    Engine,
    Evaluator,
    names_of,
    slipped,
    to_closure,
    to_simpleeval,
)
from cti_bridge.el.errors import TemplateError, TemplateEvalError, TemplateSyntaxError
from cti_bridge.el.parser import Node, parse
from cti_bridge.el.scanner import MAX_EXPRESSION_LENGTH, ExprSource, split_composite
from cti_bridge.el.semantics import to_bool, to_str

MAX_TEMPLATE_LENGTH = 65536


class Expression:
    """One compiled ``${...}`` expression."""

    __slots__ = ("_fn", "column", "engine", "names", "node", "start_column", "text")

    def __init__(
        self,
        text: str,
        column: int,
        node: Node,
        engine: Engine,
        start_column: int | None = None,
        tainted: frozenset[str] = frozenset(),
    ):
        self.text = text
        self.column = column  # template column of the expression's first character
        self.start_column = column if start_column is None else start_column  # column of '${'
        self.node = node
        self.engine = engine
        self.names: frozenset[str] = frozenset(names_of(node))
        self._fn: Evaluator = to_closure(node) if engine == "closures" else to_simpleeval(node)
        reads = tuple(sorted(self.names & tainted))
        if reads:
            self._fn = _tainted(self._fn, reads)

    def evaluate(self, ctx: Context) -> object:
        """The expression's value, with its EL type."""
        try:
            return self._fn(ctx)
        except TemplateError:
            raise
        except simpleeval.InvalidExpression as exc:
            raise TemplateEvalError(f"evaluation refused: {exc}", column=self.column) from None
        except _SLIPS as exc:
            raise slipped(exc, self.column) from None

    def holds(self, ctx: Context) -> bool:
        """The expression coerced to a boolean with EL's rules (a number is an error)."""
        value = self.evaluate(ctx)
        try:
            return to_bool(value)
        except TemplateError as err:
            if err.column is None:
                err.column = self.column
            raise

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"


class Template:
    """A compiled composite template: literal text and expressions, in order."""

    __slots__ = ("_render", "names", "parts", "text")

    def __init__(self, text: str, parts: tuple[str | Expression, ...]) -> None:
        self.text = text
        self.parts = parts
        names: set[str] = set()
        for part in parts:
            if isinstance(part, Expression):
                names |= part.names
        self.names: frozenset[str] = frozenset(names)
        self._render = self._make_render()

    @property
    def single(self) -> Expression | None:
        """The expression, when the template is exactly one expression and nothing else."""
        if len(self.parts) == 1 and isinstance(self.parts[0], Expression):
            return self.parts[0]
        return None

    @property
    def is_constant(self) -> bool:
        return all(isinstance(p, str) for p in self.parts)

    def _make_render(self) -> Callable[[Context], str]:
        # Specialise once so that rendering does no per-part type tests.
        parts = self.parts
        if not parts:
            return lambda ctx: ""
        if self.is_constant:
            constant = "".join(p for p in parts if isinstance(p, str))
            return lambda ctx: constant
        single = self.single
        if single is not None:
            fn = single._fn
            return lambda ctx: to_str(fn(ctx))
        steps: list[Callable[[Context], str]] = []
        for part in parts:
            steps.append(_literal_step(part) if isinstance(part, str) else _expr_step(part._fn))

        def render(ctx: Context) -> str:
            out = [step(ctx) for step in steps]
            # Counted before the join: one long event value repeated in many parts made a string of
            # gigabytes before the caller's 64 KiB check (each part itself is the value, not a copy).
            if sum(map(len, out)) > MAX_RENDERED_CHARS:
                raise TemplateEvalError(f"rendered string longer than {MAX_RENDERED_CHARS} characters")
            return "".join(out)

        return render

    def render(self, ctx: Context) -> str:
        """The template rendered to a string (null is "", numbers as EL prints them)."""
        try:
            return self._render(ctx)
        except TemplateError:
            raise
        except simpleeval.InvalidExpression as exc:
            raise TemplateEvalError(f"evaluation refused: {exc}") from None
        except _SLIPS as exc:
            raise slipped(exc, None) from None

    def evaluate(self, ctx: Context) -> object:
        """Like ``render``, but a template that is exactly one expression keeps the value's type."""
        single = self.single
        if single is not None:
            return single.evaluate(ctx)
        return self.render(ctx)

    def __repr__(self) -> str:
        return f"Template({self.text!r})"


#: No rendered string may exceed 64 KiB (el-templates.md §7); a character is at least one byte, so
#: more characters than that are too long whatever their encoding.
MAX_RENDERED_CHARS: Final = 65536


# -- values made from secrets ---------------------------------------------------------------------
#
# A name is "tainted" when its value is a secret (render.py: the token). The renderer records every
# string read from it, and masks those wherever the request is shown; but an expression can also
# make new strings from it (``fn:toUpperCase(token.accessToken)``, a substring from its middle),
# which no record of what was read would find. So the value of every expression that reads a
# tainted name counts as a secret too, recorded in the ``taint_sink`` list that name's value
# carries (render.py's token view), and its error messages do not quote values.


#: A quoted value in an error message (``describe`` uses repr's quotes), with repr's escapes.
_QUOTED_RE: Final = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")


#: Shorter values are shown: one to three characters ("api", "1") give nothing away, and masking
#: them would star out pieces of every text (render.py masks by the same length).
MIN_SECRET: Final = 4


def _withhold(match: re.Match[str]) -> str:
    quoted = match.group()
    inner = quoted[1:-1]
    cut = "..." if inner.endswith("...") else ""
    if len(inner) - len(cut) < MIN_SECRET:
        return quoted
    return f"{quoted[0]}***{cut}{quoted[0]}"


def _tainted(fn: Evaluator, reads: tuple[str, ...]) -> Evaluator:
    def run(ctx: Context) -> object:
        try:
            value = fn(ctx)
        except TemplateError as err:
            # The message may quote a value made from the secret on the way (cut at 37 characters,
            # upper-cased, ...): what no mask of the secret's own text would find.
            err.message = _QUOTED_RE.sub(_withhold, err.message)
            err.args = (err.message,)
            raise
        if type(value) is str and value:  # numbers and booleans are not secrets (render.py)
            for name in reads:
                sink = getattr(ctx.get(name), "taint_sink", None)
                if sink is not None:
                    sink.append(value)
                    break
        return value

    return run


def _literal_step(text: str) -> Callable[[Context], str]:
    return lambda ctx: text


def _expr_step(fn: Evaluator) -> Callable[[Context], str]:
    return lambda ctx: to_str(fn(ctx))


def compile_template(
    text: str, *, engine: Engine = "closures", tainted: frozenset[str] = frozenset()
) -> Template:
    """Compile a composite template; raises ``TemplateSyntaxError`` with the column of the fault.

    ``tainted``: names whose values are secrets (carrying a ``taint_sink`` list): an expression reading one
    records its string value in that name's sink, and quotes no value in its error messages.
    """
    if len(text) > MAX_TEMPLATE_LENGTH:
        raise TemplateSyntaxError(f"template longer than {MAX_TEMPLATE_LENGTH} characters", column=1)
    parts: list[str | Expression] = []
    for part in split_composite(text):
        if isinstance(part, str):
            parts.append(part)
        else:
            parts.append(_compile_source(part, engine, tainted))
    return Template(text, tuple(parts))


def _compile_source(src: ExprSource, engine: Engine, tainted: frozenset[str]) -> Expression:
    node = parse(src.text, src.column)
    return Expression(src.text, src.column, node, engine, src.start_column, tainted)


def compile_expression(text: str, *, engine: Engine = "closures") -> Expression:
    """Compile a bare expression (``duration > 0``) or one written as ``${duration > 0}``."""
    if "${" in text or "#{" in text:
        template = compile_template(text, engine=engine)
        exprs = [p for p in template.parts if isinstance(p, Expression)]
        others = [p for p in template.parts if isinstance(p, str) and p.strip()]
        if len(exprs) != 1 or others:
            raise TemplateSyntaxError("a condition must be one expression", column=1)
        return exprs[0]
    if len(text) > MAX_EXPRESSION_LENGTH:
        raise TemplateSyntaxError(f"expression longer than {MAX_EXPRESSION_LENGTH} characters", column=1)
    node = parse(text, 1)
    return Expression(text, 1, node, engine)
