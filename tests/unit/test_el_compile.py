"""Compiling templates: error positions and messages, limits, names, conditions, compile-once."""

from __future__ import annotations

import uuid

import pytest

from cti_bridge.el import (
    RenderError,
    TemplateError,
    TemplateEvalError,
    TemplateSyntaxError,
    compile_expression,
    compile_template,
)
from cti_bridge.el import parser as el_parser
from cti_bridge.el.functions import UUID5_NAMESPACE


@pytest.mark.parametrize(
    ("template", "column", "fragment"),
    [
        ("${a +}", 6, "unexpected end of expression"),
        ("abc ${a + )}", 11, "unexpected token ')'"),
        ("${a = 1}", 5, "assignment"),
        ("${a.b()}", 5, "method calls"),
        ("${x -> x}", 5, "lambda"),
        ("${[1]}", 3, "unexpected token '['"),
        ("${a; b}", 4, "';'"),
        ("x ${'abc}", 5, "unterminated string"),
        ("x ${abc", 3, "missing '}'"),
        ("${1}#{2}", 5, "mix"),
        ("${fn:nope()}", 6, "unknown function 'fn:nope'"),
        ("${fn:length(1, 2)}", 3, "fn:length takes 1 argument, got 2"),
        ("${os:system('x')}", 3, "namespace"),
        (r"${'a\x'}", 5, "invalid escape"),
        ("${and}", 3, "reserved word"),
        ("${a += 1}", 5, "'+='"),
    ],
)
def test_syntax_errors_name_the_column(template: str, column: int, fragment: str) -> None:
    with pytest.raises(TemplateSyntaxError) as info:
        compile_template(template)
    assert info.value.column == column, str(info.value)
    assert fragment in info.value.message


def test_error_text_names_every_known_part() -> None:
    err = TemplateSyntaxError("unexpected token ')'", column=7, where="crmResourcePayload/to")
    err.locate(xelion_event="newCallEvent")
    assert str(err) == "newCallEvent: crmResourcePayload/to: column 7: unexpected token ')'"
    err.locate(where="elsewhere", xelion_event="other")  # inner information wins
    assert err.where == "crmResourcePayload/to"
    assert str(TemplateEvalError("boom")) == "boom"


def test_evaluation_error_names_the_operator_column() -> None:
    template = compile_template("calls/${'a' + 1}")
    with pytest.raises(TemplateEvalError) as info:
        template.render({})
    assert info.value.column == 13
    assert "cannot coerce the string 'a' to a number" in str(info.value)


def test_evaluation_error_inside_a_function_names_the_call() -> None:
    with pytest.raises(TemplateEvalError) as info:
        compile_template("${fn:mmss(callId)}").render({"callId": "x.y"})
    assert info.value.column == 3


def test_expression_length_limit() -> None:
    compile_template("${" + "1" + " " * 4000 + "}")
    with pytest.raises(TemplateSyntaxError, match="longer than 4096"):
        compile_template("${" + "1" + " " * 4096 + "}")
    with pytest.raises(TemplateSyntaxError, match="longer than 4096"):
        compile_expression("1" + " " * 4096)


@pytest.mark.parametrize(
    "text",
    [
        "${" + "(" * 200 + "1" + ")" * 200 + "}",
        "${" + "-" * 500 + "1}",
        "${" + "!" * 500 + "true}",
        "${" + "+".join(["1"] * 1000) + "}",
        "${" + "a" + ".b" * 300 + "}",
        "${" + "true?" * 100 + "1" + ":2" * 100 + "}",
        "${" + "fn:trim(" * 100 + "'x'" + ")" * 100 + "}",
    ],
    ids=["parens", "minus", "not", "chain", "dots", "ternary", "calls"],
)
def test_nesting_deeper_than_64_is_refused_not_a_recursion_error(text: str) -> None:
    with pytest.raises(TemplateSyntaxError, match="nested deeper than 64"):
        compile_template(text)


def test_nesting_within_the_limit_compiles_and_evaluates() -> None:
    depth = el_parser.MAX_DEPTH - 4
    template = compile_template("${" + "(" * depth + "1+1" + ")" * depth + "}")
    assert template.evaluate({}) == 2
    chain = compile_template("${" + "+".join(["1"] * 60) + "}")
    assert chain.evaluate({}) == 60


def test_names_are_the_top_level_identifiers() -> None:
    template = compile_template("${user.role}/${callId}?x=${fn:coalesce(a, token['k'])}${'literal'}")
    assert template.names == frozenset({"user", "callId", "a", "token"})
    assert compile_template("plain text").names == frozenset()


def test_single_expression_keeps_type_and_composite_is_string() -> None:
    ctx = {"duration": 89, "list": [1]}
    assert compile_template("${duration}").evaluate(ctx) == 89
    assert compile_template(" ${duration}").evaluate(ctx) == " 89"
    assert compile_template("${duration}").render(ctx) == "89"
    assert compile_template("${list}").evaluate(ctx) == [1]


@pytest.mark.parametrize("engine", ["closures", "simpleeval"])
@pytest.mark.parametrize(
    "text", ["${duration > 0}", "duration > 0", "  #{duration gt 0} ", "duration>0&&true"]
)
def test_conditions_accept_both_forms(text: str, engine: str) -> None:
    expr = compile_expression(text, engine=engine)  # type: ignore[arg-type]
    assert expr.holds({"duration": 89}) is True
    assert expr.holds({"duration": 0}) is False
    assert expr.holds({}) is False  # null > 0 is false
    assert expr.names == frozenset({"duration"})


def test_condition_must_be_one_expression_and_boolean() -> None:
    with pytest.raises(TemplateSyntaxError):
        compile_expression("${a} and ${b}")
    with pytest.raises(TemplateSyntaxError):
        compile_expression("x${a}")
    with pytest.raises(TemplateSyntaxError):
        compile_expression("")
    with pytest.raises(TemplateEvalError, match="boolean"):
        compile_expression("duration").holds({"duration": 3})
    assert compile_expression("initiation").holds({"initiation": "True"}) is True


def test_evaluation_does_not_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    template = compile_template("a${x + 1}b${fn:toUpperCase(y)}")
    expr = compile_expression("x > 1", engine="simpleeval")

    def no_parsing(*args: object, **kwargs: object) -> object:
        raise AssertionError("parsed at evaluation time")

    monkeypatch.setattr(el_parser, "parse", no_parsing)
    monkeypatch.setattr(el_parser, "tokenize", no_parsing)
    monkeypatch.setattr("ast.parse", no_parsing)
    assert template.render({"x": 1, "y": "q"}) == "a2bQ"
    assert expr.holds({"x": 2}) is True


def test_replace_cannot_blow_up() -> None:
    big = "a" * 40000
    with pytest.raises(RenderError, match="64 KiB"):
        compile_template("${fn:replace(s, 'a', 'aa')}").render({"s": big})
    # nesting a growing function is bounded by the same rule at every step
    nested = "${" + "fn:replace(" * 20 + "s" + ", 'a', 'aa')" * 20 + "}"
    with pytest.raises(RenderError):
        compile_template(nested).render({"s": "a" * 100})
    sixteen = "${" + "fn:replace(" * 16 + "s" + ", 'a', 'aa')" * 16 + "}"
    assert len(compile_template(sixteen).render({"s": "a"})) == 65536  # exactly at the limit


def test_uuid5_namespace_is_documented_and_fixed() -> None:
    assert uuid.uuid5(uuid.NAMESPACE_URL, "https://cti-bridge.invalid/el/fn/uuid5") == UUID5_NAMESPACE
    t = compile_template("${fn:uuid5(callId)}")
    assert t.render({"callId": "c1"}) == t.render({"callId": "c1"}) != t.render({"callId": "c2"})


def test_only_template_errors_escape() -> None:
    # A huge integer string from an event: no ValueError from Python's int limits leaks out.
    with pytest.raises(TemplateError):
        compile_template("${x + 1}").render({"x": "9" * 5000})
    with pytest.raises(TemplateEvalError, match="overflow"):
        compile_template("${x * x}").render({"x": 2**40})
