"""Compiling: an expression tree becomes something that evaluates without ever parsing again.

Two engines evaluate the same tree with the same EL semantics; nothing but ``semantics``' operators
and ``functions``' ``fn:`` helpers is reachable from either:

``closures`` (the default, the hot path)
    Each node becomes a Python closure that calls only our EL helpers. Names are looked up in the
    context mapping with ``Mapping.get`` and nowhere else; property access goes through
    ``semantics.get_property``, which reads only maps and lists. There is no ``getattr``, no builtin,
    no import: a template cannot reach a Python attribute, a dunder, a module, a file or the network.

``simpleeval``
    The tree is translated to a restricted Python AST (only ``Constant``, ``Name``, ``Call`` and
    ``IfExp`` nodes; every operator is a ``Call`` to an EL helper; ``&&``/``||``/``?:`` become ``IfExp``
    so they stay lazy) and evaluated by a ``simpleeval.SimpleEval`` subclass whose node table holds
    only those four node types, whose ``functions`` are only our helpers, and whose names resolve only
    in the context (never to a function or builtin). It serves as the independent reference evaluator
    (the property tests check both engines agree on random templates and events) and evaluates mapping
    conditions in production (``cti_bridge.render``), where one evaluation per delivery costs nothing.

Why the hot path is not simpleeval: measured with ``bench/bench_templates.py`` (a URI with three
substitutions and a ten-field payload, one core), closures render about 98,000 requests/s and the
simpleeval engine about 13,000. simpleeval's per-node overhead (a dict dispatch, a bound-method call
and ``_check_disallowed_items`` on every intermediate result) plus one evaluator object per
evaluation (its ``names`` are per-instance state) keeps it far below the 50,000 renders/s target, so
URI, header and payload templates use closures.
"""

from __future__ import annotations

import ast
import threading
from collections.abc import Callable, Mapping
from typing import Final, Literal

import simpleeval

from cti_bridge.el import functions, semantics
from cti_bridge.el.errors import TemplateError, TemplateEvalError
from cti_bridge.el.parser import Binary, Call, Conditional, Name, Node, Property, Unary
from cti_bridge.el.parser import Literal as Lit

Context = Mapping[str, object]
Evaluator = Callable[[Context], object]
Engine = Literal["closures", "simpleeval"]

# Python exceptions a helper could let slip on a hostile value; each becomes a TemplateEvalError so that
# the only errors a template raises are TemplateErrors.
_SLIPS: Final = (ValueError, TypeError, ArithmeticError, LookupError, RecursionError, AttributeError)


def at(err: TemplateError, column: int) -> None:
    """Record the column of the innermost node that failed."""
    if err.column is None:
        err.column = column


def slipped(exc: BaseException, column: int | None) -> TemplateEvalError:
    return TemplateEvalError(f"internal evaluation error ({type(exc).__name__})", column=column)


def names_of(node: Node) -> set[str]:
    """Top-level identifiers a tree reads."""
    out: set[str] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, Name):
            out.add(n.name)
        elif isinstance(n, Property):
            stack += (n.base, n.key)
        elif isinstance(n, Unary):
            stack.append(n.operand)
        elif isinstance(n, Binary):
            stack += (n.left, n.right)
        elif isinstance(n, Conditional):
            stack += (n.test, n.then, n.otherwise)
        elif isinstance(n, Call):
            stack += n.args
    return out


# -- engine 1: closures ---------------------------------------------------------------------------------

_UNARY: Final[Mapping[str, Callable[[object], object]]] = {
    "-": semantics.neg,
    "!": semantics.not_,
    "empty": semantics.empty,
}


def to_closure(node: Node) -> Evaluator:
    """A closure evaluating ``node`` against a context mapping."""
    col = node.column
    if isinstance(node, Lit):
        value = node.value
        return lambda ctx: value
    if isinstance(node, Name):
        name = node.name
        return lambda ctx: ctx.get(name)
    if isinstance(node, Property):
        return _property(node)
    if isinstance(node, Unary):
        operand = to_closure(node.operand)
        uop = _UNARY[node.op]

        def unary(ctx: Context) -> object:
            try:
                return uop(operand(ctx))
            except TemplateError as err:
                at(err, col)
                raise

        return unary
    if isinstance(node, Binary):
        return _binary(node)
    if isinstance(node, Conditional):
        test = to_closure(node.test)
        then = to_closure(node.then)
        otherwise = to_closure(node.otherwise)
        to_bool = semantics.to_bool

        def conditional(ctx: Context) -> object:
            try:
                cond = to_bool(test(ctx))
            except TemplateError as err:
                at(err, col)
                raise
            return then(ctx) if cond else otherwise(ctx)

        return conditional
    if isinstance(node, Call):
        impl = functions.FUNCTIONS[node.function].impl
        args = tuple(to_closure(a) for a in node.args)

        def call(ctx: Context) -> object:
            values = [a(ctx) for a in args]
            try:
                return impl(*values)
            except TemplateError as err:
                at(err, col)
                raise
            except _SLIPS as exc:
                raise slipped(exc, col) from None

        return call
    raise AssertionError(f"unknown node {node!r}")


def _property(node: Property) -> Evaluator:
    col = node.column
    base = to_closure(node.base)
    get_property = semantics.get_property
    if isinstance(node.key, Lit) and type(node.key.value) is str:
        key = node.key.value

        def dotted(ctx: Context) -> object:
            b = base(ctx)
            if type(b) is dict:  # the common case: an event or user map; a str key is hashable
                return b.get(key)
            try:
                return get_property(b, key)
            except TemplateError as err:
                at(err, col)
                raise

        return dotted
    keyf = to_closure(node.key)

    def indexed(ctx: Context) -> object:
        b = base(ctx)
        k = keyf(ctx)
        try:
            return get_property(b, k)
        except TemplateError as err:
            at(err, col)
            raise

    return indexed


def _binary(node: Binary) -> Evaluator:
    col = node.column
    left = to_closure(node.left)
    right = to_closure(node.right)
    to_bool = semantics.to_bool
    if node.op == "&&":

        def and_(ctx: Context) -> object:
            try:
                return to_bool(left(ctx)) and to_bool(right(ctx))
            except TemplateError as err:
                at(err, col)
                raise

        return and_
    if node.op == "||":

        def or_(ctx: Context) -> object:
            try:
                return to_bool(left(ctx)) or to_bool(right(ctx))
            except TemplateError as err:
                at(err, col)
                raise

        return or_
    op = semantics.OPERATORS[node.op]

    def binary(ctx: Context) -> object:
        a = left(ctx)
        b = right(ctx)
        try:
            return op(a, b)
        except TemplateError as err:
            at(err, col)
            raise

    return binary


# -- engine 2: simpleeval -------------------------------------------------------------------------------

_BINARY_NAMES: Final = {
    "+": "op_add",
    "-": "op_sub",
    "*": "op_mul",
    "/": "op_div",
    "%": "op_mod",
    "==": "op_eq",
    "!=": "op_ne",
    "<": "op_lt",
    ">": "op_gt",
    "<=": "op_le",
    ">=": "op_ge",
}
_UNARY_NAMES: Final = {"-": "op_neg", "!": "op_not", "empty": "op_empty"}

#: The complete set of callables a simpleeval-evaluated template can reach.
SIMPLEEVAL_FUNCTIONS: Final[dict[str, Callable[..., object]]] = {
    "op_add": semantics.add,
    "op_sub": semantics.sub,
    "op_mul": semantics.mul,
    "op_div": semantics.div,
    "op_mod": semantics.mod,
    "op_eq": semantics.eq,
    "op_ne": semantics.ne,
    "op_lt": semantics.lt,
    "op_gt": semantics.gt,
    "op_le": semantics.le,
    "op_ge": semantics.ge,
    "op_neg": semantics.neg,
    "op_not": semantics.not_,
    "op_empty": semantics.empty,
    "op_bool": semantics.to_bool,
    "op_get": semantics.get_property,
    **{"fn_" + name: spec.impl for name, spec in functions.FUNCTIONS.items()},
}


def _call(name: str, args: list[ast.expr], column: int) -> ast.Call:
    return ast.Call(
        func=ast.Name(id=name, ctx=ast.Load()), args=args, keywords=[], lineno=1, col_offset=column
    )


def to_python_ast(node: Node) -> ast.expr:
    """The restricted Python AST the simpleeval engine evaluates."""
    col = node.column
    if isinstance(node, Lit):
        return ast.Constant(value=node.value)  # type: ignore[arg-type]  # only str/int/float/bool/None
    if isinstance(node, Name):
        return ast.Name(id=node.name, ctx=ast.Load())
    if isinstance(node, Property):
        return _call("op_get", [to_python_ast(node.base), to_python_ast(node.key)], col)
    if isinstance(node, Unary):
        return _call(_UNARY_NAMES[node.op], [to_python_ast(node.operand)], col)
    if isinstance(node, Binary):
        left = to_python_ast(node.left)
        right = to_python_ast(node.right)
        if node.op == "&&":
            return ast.IfExp(
                test=_call("op_bool", [left], col),
                body=_call("op_bool", [right], col),
                orelse=ast.Constant(value=False),
            )
        if node.op == "||":
            return ast.IfExp(
                test=_call("op_bool", [left], col),
                body=ast.Constant(value=True),
                orelse=_call("op_bool", [right], col),
            )
        return _call(_BINARY_NAMES[node.op], [left, right], col)
    if isinstance(node, Conditional):
        return ast.IfExp(
            test=_call("op_bool", [to_python_ast(node.test)], col),
            body=to_python_ast(node.then),
            orelse=to_python_ast(node.otherwise),
        )
    if isinstance(node, Call):
        return _call("fn_" + node.function, [to_python_ast(a) for a in node.args], col)
    raise AssertionError(f"unknown node {node!r}")


class ELSimpleEval(simpleeval.SimpleEval):  # type: ignore[misc]
    """simpleeval, narrowed to the four node types the translator emits and to our helpers."""

    def __init__(self, names: Context) -> None:
        super().__init__(operators={}, functions=SIMPLEEVAL_FUNCTIONS, names=names)
        # Replace the default node table: no Attribute, Subscript, BinOp, comprehension or anything
        # else simpleeval would otherwise interpret.
        self.nodes = {
            ast.Constant: self._eval_constant,
            ast.Name: self._eval_name,
            ast.Call: self._eval_call,
            ast.IfExp: self._eval_ifexp,
        }

    def _eval_name(self, node: ast.Name) -> object:
        # Only the context: simpleeval's fallback would hand out a helper function by its name.
        names: Context = self.names
        return names.get(node.id)

    def _eval_call(self, node: ast.Call) -> object:
        try:
            return super()._eval_call(node)
        except TemplateError as err:
            at(err, node.col_offset)
            raise


_evaluators = threading.local()


def _evaluator(ctx: Context) -> ELSimpleEval:
    """One evaluator per thread, its names swapped per call: building a SimpleEval (operator and
    function tables) cost more than evaluating a typical condition. Per thread, because conditions
    are evaluated in the database threads (the pipeline) and on the event loop (the preview)."""
    found: ELSimpleEval | None = getattr(_evaluators, "instance", None)
    if found is None:
        found = ELSimpleEval(ctx)
        _evaluators.instance = found
    else:
        found.names = ctx
    return found


def to_simpleeval(node: Node) -> Evaluator:
    tree = to_python_ast(node)

    def evaluate(ctx: Context) -> object:
        return _evaluator(ctx).eval("", previously_parsed=tree)

    return evaluate
