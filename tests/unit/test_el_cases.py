"""The EL case table (tests/unit/el_cases.py), run through both engines."""

from __future__ import annotations

import pytest

from cti_bridge.el import TemplateError, TemplateSyntaxError, compile_template

try:  # tests/unit may or may not be a package
    from .el_cases import CASES, CONTEXT
except ImportError:
    from el_cases import CASES, CONTEXT  # type: ignore[no-redef]

ENGINES = ["closures", "simpleeval"]


def test_the_table_is_large_and_has_no_duplicates() -> None:
    assert len(CASES) >= 150
    templates = [t for t, _ in CASES]
    assert len(templates) == len(set(templates))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("template", "expected"), CASES, ids=[t[:60] for t, _ in CASES])
def test_case(template: str, expected: object, engine: str) -> None:
    if isinstance(expected, type) and issubclass(expected, TemplateError):
        with pytest.raises(expected) as info:
            compile_template(template, engine=engine).evaluate(CONTEXT)  # type: ignore[arg-type]
        if expected is TemplateSyntaxError:
            assert info.value.column is not None, "a syntax error names its column"
        return
    got = compile_template(template, engine=engine).evaluate(CONTEXT)  # type: ignore[arg-type]
    assert type(got) is type(expected), f"{got!r} is a {type(got).__name__}, expected {expected!r}"
    assert got == expected
