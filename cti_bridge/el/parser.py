"""Parsing: tokens of one ``${...}`` expression to an abstract syntax tree.

A recursive-descent parser over the grammar of el-templates.md §2 (Jakarta EL's precedence, highest
first: property/index access; parentheses and ``fn:`` calls; unary ``- ! not empty``; ``* / div % mod``;
``+ -``; relational; equality; ``&& and``; ``|| or``; ``?:`` right-associative). Whatever EL 3.0 has
beyond that subset (method calls, assignment, ``;``, lambdas, collection literals) is a
``TemplateSyntaxError`` naming the column.

Every node records its height; a tree higher than ``MAX_DEPTH`` is refused while it is being built, so
that neither the parser, the compiler nor an evaluator can recurse without bound (a chain of 1,000
``+`` is as deep as 1,000 nested parentheses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from cti_bridge.el import functions
from cti_bridge.el.errors import TemplateSyntaxError
from cti_bridge.el.scanner import EOF, FLOAT, IDENT, INT, KEYWORD, OP, STRING, Token, tokenize

MAX_DEPTH: Final = 64


@dataclass(frozen=True, slots=True)
class Node:
    column: int
    height: int = field(default=1, kw_only=True)


@dataclass(frozen=True, slots=True)
class Literal(Node):
    value: object


@dataclass(frozen=True, slots=True)
class Name(Node):
    name: str


@dataclass(frozen=True, slots=True)
class Property(Node):
    base: Node
    key: Node


@dataclass(frozen=True, slots=True)
class Unary(Node):
    op: str  # "-", "!", "empty"
    operand: Node


@dataclass(frozen=True, slots=True)
class Binary(Node):
    op: str  # canonical: + - * / % == != < > <= >= && ||
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Conditional(Node):
    test: Node
    then: Node
    otherwise: Node


@dataclass(frozen=True, slots=True)
class Call(Node):
    function: str  # name without the fn: prefix
    args: tuple[Node, ...]


_WORD_OPS: Final = {
    "div": "/",
    "mod": "%",
    "eq": "==",
    "ne": "!=",
    "lt": "<",
    "gt": ">",
    "le": "<=",
    "ge": ">=",
    "and": "&&",
    "or": "||",
    "not": "!",
}
_MUL: Final = frozenset({"*", "/", "%"})
_ADD: Final = frozenset({"+", "-"})
_REL: Final = frozenset({"<", ">", "<=", ">="})
_EQ: Final = frozenset({"==", "!="})


def parse(src: str, column: int) -> Node:
    """The tree of one expression; ``column`` is the template column of ``src[0]``."""
    if not src.strip():
        raise TemplateSyntaxError("empty expression", column=max(column - 2, 1))
    return _Parser(tokenize(src, column)).parse()


def _height(*nodes: Node) -> int:
    return 1 + max(n.height for n in nodes)


class _Parser:
    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    # -- token helpers -------------------------------------------------------------------------
    def peek(self) -> Token:
        return self.tokens[self.pos]

    def op(self) -> str | None:
        """The canonical operator of the current token, or None."""
        tok = self.tokens[self.pos]
        if tok.kind == OP:
            return tok.value
        if tok.kind == KEYWORD:
            return _WORD_OPS.get(tok.value)
        return None

    def advance(self) -> Token:
        tok = self.tokens[self.pos]
        if tok.kind != EOF:
            self.pos += 1
        return tok

    def expect(self, value: str) -> Token:
        tok = self.peek()
        if tok.kind != OP or tok.value != value:
            raise self.unexpected(tok, f"expected '{value}'")
        return self.advance()

    @staticmethod
    def unexpected(tok: Token, hint: str | None = None) -> TemplateSyntaxError:
        what = "end of expression" if tok.kind == EOF else f"token {tok.value!r}"
        msg = f"unexpected {what}"
        if hint:
            msg += f" ({hint})"
        return TemplateSyntaxError(msg, column=tok.column)

    def check(self, node: Node) -> Node:
        if node.height > MAX_DEPTH:
            raise TemplateSyntaxError(f"expression nested deeper than {MAX_DEPTH} levels", column=node.column)
        return node

    # -- grammar ---------------------------------------------------------------------------------
    def parse(self) -> Node:
        node = self.expression()
        tok = self.peek()
        if tok.kind != EOF:
            raise self.unexpected(tok)
        return node

    def expression(self) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise TemplateSyntaxError(
                f"expression nested deeper than {MAX_DEPTH} levels", column=self.peek().column
            )
        test = self.binary(0)
        if self.op() == "?":
            self.advance()
            then = self.expression()
            self.expect(":")
            otherwise = self.expression()
            test = self.check(
                Conditional(test.column, test, then, otherwise, height=_height(test, then, otherwise))
            )
        self.depth -= 1
        return test

    # Binary levels, loosest first; each is left-associative.
    _LEVELS: Final = (frozenset({"||"}), frozenset({"&&"}), _EQ, _REL, _ADD, _MUL)

    def binary(self, level: int) -> Node:
        if level == len(self._LEVELS):
            return self.unary()
        ops = self._LEVELS[level]
        left = self.binary(level + 1)
        while (op := self.op()) in ops:
            tok = self.advance()
            right = self.binary(level + 1)
            assert op is not None
            left = self.check(Binary(tok.column, op, left, right, height=_height(left, right)))
        return left

    def unary(self) -> Node:
        tok = self.peek()
        op = self.op()
        if op in ("-", "!") or (tok.kind == KEYWORD and tok.value == "empty"):
            self.advance()
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise TemplateSyntaxError(
                    f"expression nested deeper than {MAX_DEPTH} levels", column=tok.column
                )
            operand = self.unary()
            self.depth -= 1
            return self.check(
                Unary(tok.column, "empty" if op is None else op, operand, height=_height(operand))
            )
        return self.value()

    def value(self) -> Node:
        node = self.primary()
        while True:
            tok = self.peek()
            if tok.kind == OP and tok.value == ".":
                self.advance()
                name = self.peek()
                if name.kind != IDENT:
                    raise self.unexpected(name, "expected a property name after '.'")
                self.advance()
                if self.peek().kind == OP and self.peek().value == "(":
                    raise TemplateSyntaxError("method calls are not supported", column=name.column)
                key: Node = Literal(name.column, name.value)
                node = self.check(Property(tok.column, node, key, height=_height(node)))
            elif tok.kind == OP and tok.value == "[":
                self.advance()
                key = self.expression()
                self.expect("]")
                node = self.check(Property(tok.column, node, key, height=_height(node, key)))
            elif tok.kind == OP and tok.value == "(":
                raise TemplateSyntaxError("only fn: functions can be called", column=tok.column)
            else:
                return node

    def primary(self) -> Node:
        tok = self.advance()
        kind = tok.kind
        if kind in (INT, FLOAT, STRING):
            return Literal(tok.column, tok.literal)
        if kind == KEYWORD:
            if tok.value == "true":
                return Literal(tok.column, True)
            if tok.value == "false":
                return Literal(tok.column, False)
            if tok.value == "null":
                return Literal(tok.column, None)
            raise self.unexpected(tok, f"'{tok.value}' is a reserved word")
        if kind == OP and tok.value == "(":
            node = self.expression()
            self.expect(")")
            return node
        if kind == IDENT:
            nxt = self.peek()
            if nxt.kind == OP and nxt.value == ":" and self._is_call():
                return self.call(tok)
            if nxt.kind == OP and nxt.value == "(":
                raise TemplateSyntaxError(
                    f"unknown function {tok.value!r} (functions are called as fn:name(...))",
                    column=tok.column,
                )
            return Name(tok.column, tok.value)
        raise self.unexpected(tok)

    def _is_call(self) -> bool:
        """``ns:name(`` ahead? Otherwise the ':' belongs to a ``?:``."""
        toks = self.tokens
        p = self.pos
        # Not ``KEYWORD`` at p + 1: in ``c ? a : empty(b)`` or ``c ? a : not(b)`` the ':' is the
        # conditional's, and a function is never named by a reserved word.
        return (
            p + 2 < len(toks)
            and toks[p + 1].kind == IDENT
            and toks[p + 2].kind == OP
            and toks[p + 2].value == "("
        )

    def call(self, prefix: Token) -> Node:
        self.advance()  # ':'
        name = self.advance()
        if prefix.value != "fn":
            raise TemplateSyntaxError(
                f"unknown function namespace {prefix.value!r} (only fn: is available)", column=prefix.column
            )
        spec = functions.FUNCTIONS.get(name.value)
        if spec is None:
            raise TemplateSyntaxError(f"unknown function 'fn:{name.value}'", column=name.column)
        self.expect("(")
        args: list[Node] = []
        if not (self.peek().kind == OP and self.peek().value == ")"):
            while True:
                args.append(self.expression())
                if self.peek().kind == OP and self.peek().value == ",":
                    self.advance()
                    continue
                break
        self.expect(")")
        if not spec.min_args <= len(args) <= spec.max_args:
            if spec.min_args == spec.max_args:
                want = str(spec.min_args)
            elif spec.max_args >= functions.VARIADIC:
                want = f"at least {spec.min_args}"
            else:
                want = f"{spec.min_args} to {spec.max_args}"
            raise TemplateSyntaxError(
                f"fn:{name.value} takes {want} argument{'s' if want != '1' else ''}, got {len(args)}",
                column=prefix.column,
            )
        height = _height(*args) if args else 1
        return self.check(Call(prefix.column, name.value, tuple(args), height=height))
