r"""Scanning: splits a composite template into literal text and ``${...}`` sources, and turns one
expression source into tokens.

Both run only at compile time. Columns are 1-based positions in the whole template string, so an
error names the character an operator sees in the mapping.

Choices where EL/Java would differ: identifiers are letters (Unicode), digits and ``_`` (Java would
also allow ``$``); string literals know only the escapes ``\\``, ``\'`` and ``\"`` (anything else
after a backslash is a syntax error, never guessed at); an integer literal beyond a Java ``long`` or a
decimal literal that overflows a double is a syntax error. A backslash in literal text escapes only a
following ``${``/``#{``; otherwise it is an ordinary character.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cti_bridge.el.errors import TemplateSyntaxError

#: Jakarta EL reserved words (spec §1.17): never identifiers.
RESERVED: Final = frozenset(
    {
        "and",
        "or",
        "not",
        "eq",
        "ne",
        "lt",
        "gt",
        "le",
        "ge",
        "div",
        "mod",
        "empty",
        "true",
        "false",
        "null",
        "instanceof",
    }
)

MAX_EXPRESSION_LENGTH: Final = 4096


@dataclass(frozen=True, slots=True)
class ExprSource:
    """The text between ``${`` and ``}``; ``column`` is the column of its first character."""

    text: str
    column: int
    start_column: int  # column of the ``$`` / ``#`` that opened it


# Token kinds
INT: Final = "int"
FLOAT: Final = "float"
STRING: Final = "string"
IDENT: Final = "ident"
KEYWORD: Final = "keyword"
OP: Final = "op"
EOF: Final = "eof"


@dataclass(frozen=True, slots=True)
class Token:
    kind: str
    value: str
    column: int
    literal: object = None  # the decoded value of INT/FLOAT/STRING tokens


def split_composite(text: str) -> list[str | ExprSource]:
    """Literal text and expression sources of a composite template, in order.

    ``\\${`` and ``\\#{`` are literal; inside an expression the scanner honours quotes so that
    ``${'}'}`` ends at the second ``}``. ``${`` and ``#{`` may not be mixed in one template.
    """
    parts: list[str | ExprSource] = []
    literal: list[str] = []
    kind: str | None = None
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and text.startswith(("${", "#{"), i + 1):
            literal.append(text[i + 1 : i + 3])
            i += 3
            continue
        if ch in "$#" and i + 1 < n and text[i + 1] == "{":
            if kind is None:
                kind = ch
            elif kind != ch:
                raise TemplateSyntaxError(
                    "a template may not mix ${...} and #{...} expressions", column=i + 1
                )
            end = _find_close(text, i + 2, i + 1)
            if literal:
                parts.append("".join(literal))
                literal = []
            src = text[i + 2 : end]
            if len(src) > MAX_EXPRESSION_LENGTH:
                raise TemplateSyntaxError(
                    f"expression longer than {MAX_EXPRESSION_LENGTH} characters", column=i + 1
                )
            parts.append(ExprSource(src, i + 3, i + 1))
            i = end + 1
            continue
        literal.append(ch)
        i += 1
    if literal:
        parts.append("".join(literal))
    return parts


def _find_close(text: str, i: int, open_column: int) -> int:
    """Index of the ``}`` closing the expression that starts at ``i``, skipping quoted strings."""
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "}":
            return i
        if ch in "'\"":
            quote = ch
            start = i
            i += 1
            while i < n and text[i] != quote:
                i += 2 if text[i] == "\\" else 1
            if i >= n:
                raise TemplateSyntaxError("unterminated string literal", column=start + 1)
        i += 1
    raise TemplateSyntaxError("unterminated expression: missing '}'", column=open_column)


_TWO_CHAR_OPS: Final = frozenset({"==", "!=", "<=", ">=", "&&", "||"})
_ONE_CHAR_OPS: Final = frozenset("()[].,?:+-*/%<>!")
# Characters that begin constructs EL 3.0 has but this subset refuses, with a reason.
_REFUSED: Final = {
    "=": "assignment is not supported",
    ";": "';' (several expressions) is not supported",
    "{": "collection literals are not supported",
    "}": "unexpected '}'",
    "&": "unexpected '&' (did you mean '&&'?)",
    "|": "unexpected '|' (did you mean '||'?)",
}
_DIGITS: Final = "0123456789"


def _is_ident_start(ch: str) -> bool:
    return ch == "_" or ch.isalpha()


def _is_ident_part(ch: str) -> bool:
    return ch == "_" or ch.isalpha() or ch in _DIGITS


def tokenize(src: str, column: int) -> list[Token]:
    """Tokens of one expression; ``column`` is the template column of ``src[0]``."""
    tokens: list[Token] = []
    i = 0
    n = len(src)
    while i < n:
        ch = src[i]
        col = column + i
        if ch in " \t\r\n":
            i += 1
            continue
        if ch in _DIGITS or (ch == "." and i + 1 < n and src[i + 1] in _DIGITS):
            i = _number(src, i, col, tokens)
            continue
        if ch in "'\"":
            i = _string(src, i, col, tokens)
            continue
        if _is_ident_start(ch):
            j = i + 1
            while j < n and _is_ident_part(src[j]):
                j += 1
            word = src[i:j]
            tokens.append(Token(KEYWORD if word in RESERVED else IDENT, word, col))
            i = j
            continue
        two = src[i : i + 2]
        if two in _TWO_CHAR_OPS:
            tokens.append(Token(OP, two, col))
            i += 2
            continue
        if two in ("+=", "-=", "*=", "/=", "%="):
            raise TemplateSyntaxError(f"assignment '{two}' is not supported", column=col)
        if two == "->":
            raise TemplateSyntaxError("lambda expressions are not supported", column=col)
        if ch in _ONE_CHAR_OPS:
            tokens.append(Token(OP, ch, col))
            i += 1
            continue
        reason = _REFUSED.get(ch)
        raise TemplateSyntaxError(reason or f"unexpected character {ch!r}", column=col)
    tokens.append(Token(EOF, "", column + n))
    return tokens


def _number(src: str, i: int, col: int, tokens: list[Token]) -> int:
    n = len(src)
    j = i
    while j < n and src[j] in _DIGITS:
        j += 1
    is_float = False
    if j < n and src[j] == "." and not (j + 1 < n and _is_ident_start(src[j + 1])):
        # "1." is a float literal in EL; "a.1" never reaches here, and "1.x" stays an error below.
        is_float = True
        j += 1
        while j < n and src[j] in _DIGITS:
            j += 1
    if j < n and src[j] in "eE":
        k = j + 1
        if k < n and src[k] in "+-":
            k += 1
        if k < n and src[k] in _DIGITS:
            is_float = True
            j = k
            while j < n and src[j] in _DIGITS:
                j += 1
    if j < n and (_is_ident_start(src[j]) or src[j] == "."):
        raise TemplateSyntaxError(f"malformed number {src[i : j + 1]!r}", column=col)
    text = src[i:j]
    if is_float:
        value = float(text)
        if value in (float("inf"), float("-inf")):
            raise TemplateSyntaxError(f"number {text!r} is out of range", column=col)
        tokens.append(Token(FLOAT, text, col, value))
    else:
        ivalue = int(text)
        # EL integer literals are Java longs.
        if ivalue > 2**63 - 1:
            raise TemplateSyntaxError(f"integer {text!r} is out of range", column=col)
        tokens.append(Token(INT, text, col, ivalue))
    return j


def _string(src: str, i: int, col: int, tokens: list[Token]) -> int:
    quote = src[i]
    out: list[str] = []
    j = i + 1
    n = len(src)
    while j < n:
        ch = src[j]
        if ch == quote:
            tokens.append(Token(STRING, src[i : j + 1], col, "".join(out)))
            return j + 1
        if ch == "\\":
            nxt = src[j + 1] if j + 1 < n else ""
            if nxt not in ("\\", "'", '"'):
                raise TemplateSyntaxError(
                    "invalid escape in string literal (only \\\\, \\' and \\\" are allowed)",
                    column=col + (j - i),
                )
            out.append(nxt)
            j += 2
            continue
        out.append(ch)
        j += 1
    raise TemplateSyntaxError("unterminated string literal", column=col)
