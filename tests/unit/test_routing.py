"""Choosing the mappings an event applies to: ``routing.EventMappings`` must pick exactly the mappings,
in the same order and with the same condition errors, as evaluating every mapping's condition one by
one, whatever the values; its lookup of ``name == 'text'`` conditions is only a shortcut."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cti_bridge.el import TemplateError
from cti_bridge.render import MappingSpec, RenderContext, compile_mapping, context_names
from cti_bridge.routing import EventMappings, MappingRoute

CONDITIONS = [
    None,
    "${calleePhoneNumber == '+3115'}",
    "calleePhoneNumber == '+3116'",
    "'+3115' == calleePhoneNumber",
    "${calleePhoneNumber eq '89'}",
    "${duration == '89'}",
    "${duration > 0}",
    "${callerUser == 'anne'}",
    "${calleePhoneNumber == '+3115' && duration > 0}",
    "${calleePhoneNumber != '+3115'}",
    "${xelionEvent == 'callHungUpEvent'}",
    "${duration == 'true'}",
    "${calleePhoneNumber == ''}",
]


def routes(conditions: list[str | None]) -> list[MappingRoute]:
    out = []
    for i, condition in enumerate(conditions):
        spec = MappingSpec(
            xelion_event="callHungUpEvent",
            crm_resource_uri=f"https://crm.example.org/{i}",
            crm_resource_payload=None,
            condition=condition,
        )
        out.append(MappingRoute(i + 1, compile_mapping(spec)))
    return out


def one_by_one(rs: list[MappingRoute], names: dict[str, object]) -> list[tuple[int, str | None]]:
    out: list[tuple[int, str | None]] = []
    for r in rs:
        try:
            if r.compiled.condition_holds_in(names):
                out.append((r.mapping_id, None))
        except TemplateError as exc:
            out.append((r.mapping_id, str(exc)))
    return out


def chosen(rs: list[MappingRoute], names: dict[str, object]) -> list[tuple[int, str | None]]:
    return [(r.mapping_id, None if e is None else str(e)) for r, e in EventMappings(rs).applicable(names)]


def names_for(event: dict[str, Any]) -> dict[str, object]:
    ctx = RenderContext(event=event, xelion_event="callHungUpEvent", now="2026-11-24 09:14:03")
    return context_names(ctx)


def test_equality_conditions_are_recognised_both_ways_round() -> None:
    rs = routes(CONDITIONS)
    assert rs[1].compiled.condition_equals == ("calleePhoneNumber", "+3115")
    assert rs[3].compiled.condition_equals == ("calleePhoneNumber", "+3115")
    assert rs[4].compiled.condition_equals == ("calleePhoneNumber", "89")
    assert rs[0].compiled.condition_equals is None
    assert rs[6].compiled.condition_equals is None  # not an equality
    assert rs[8].compiled.condition_equals is None  # an equality inside a larger condition


@pytest.mark.parametrize(
    "value",
    ["+3115", "+3116", "89", "", None, 89, 89.0, True, False, ["+3115"], {"a": "+3115"}, "true"],
)
def test_the_same_mappings_as_one_by_one(value: object) -> None:
    rs = routes(CONDITIONS)
    names = names_for({"calleePhoneNumber": value, "duration": value, "callerUser": "anne"})
    assert chosen(rs, names) == one_by_one(rs, names)


def test_many_numbers_one_lookup() -> None:
    rs = routes([f"${{calleePhoneNumber == '+31{i:04d}'}}" for i in range(500)] + [None])
    names = names_for({"calleePhoneNumber": "+310042"})
    assert chosen(rs, names) == [(43, None), (501, None)]
    assert chosen(rs, names_for({})) == [(501, None)]  # a missing field is null: no number matches


values = st.one_of(
    st.none(),
    st.sampled_from(["+3115", "+3116", "89", "", "true", "anne", "0"]),
    st.integers(-3, 100),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.booleans(),
    st.lists(st.sampled_from(["+3115", "89"]), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(
    picks=st.lists(st.sampled_from(CONDITIONS), min_size=1, max_size=12),
    phone=values,
    duration=values,
    caller=values,
    drop=st.sampled_from([None, "calleePhoneNumber", "duration"]),
)
def test_property_same_as_one_by_one(
    picks: list[str | None], phone: object, duration: object, caller: object, drop: str | None
) -> None:
    event: dict[str, Any] = {"calleePhoneNumber": phone, "duration": duration, "callerUser": caller}
    if drop is not None:
        del event[drop]
    rs = routes(picks)
    names = names_for(event)
    assert chosen(rs, names) == one_by_one(rs, names)
