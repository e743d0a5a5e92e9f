"""The protocol spells calls exactly as the grammar expects, and parses free text back."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agentloop.errors import ParseError, SchemaError, WireFormatError
from agentloop.grammar import ToolCall, byte_tokenizer, compile_tools
from agentloop.protocol import Protocol

TOOLS = json.loads((Path(__file__).parents[1] / "agentloop" / "data" / "tool_schemas.json").read_text("utf-8"))


@pytest.mark.parametrize("wire_format", ["gemma4", "json"])
def test_rendered_calls_match_the_grammar(wire_format: str) -> None:
    """Calls sampled from the grammar, re-rendered by the protocol, are accepted and parse back."""
    tok = byte_tokenizer()
    p = Protocol(wire_format)
    schemas = {t["name"]: t["parameters"] for t in TOOLS}
    gen = torch.Generator().manual_seed(0)
    for t in TOOLS[:12]:
        g = compile_tools([t], tok, wire_format, allow_text=False, parallel_calls=False)
        for _ in range(3):
            ids = g.sample(torch.randn(160, g.vocab.size, generator=gen) * 2, generator=gen)
            calls = g.parse(ids).calls
            text = p.render_calls(calls, schemas)
            again = tok.encode(text + p.calls_stop).ids
            assert g.accepts(again), (t["name"], text)
            assert g.parse(again).calls == calls
            assert p.parse_output(text).calls == calls


@pytest.mark.parametrize("wire_format", ["gemma4", "json"])
def test_numbers_are_rendered_as_the_grammar_spells_them(wire_format: str) -> None:
    """A bounded number has no exponent in the grammar (0.0000001), an integer none
    either (10000000000000000), and no -0: the protocol writes prior calls the same way
    (a bound inside allOf, a type list too), and the grammar takes its parse
    (``ParsedOutput`` or ``ToolCall``s) back."""
    tok = byte_tokenizer()
    p = Protocol(wire_format)
    params = {"type": "object", "required": ["x", "n", "y", "z", "m"], "properties": {
        "x": {"type": "number", "minimum": 0}, "n": {"type": "integer"}, "y": {"type": "number"},
        "z": {"type": "number", "allOf": [{"minimum": -1}]},  # (a bound one level down)
        "m": {"type": ["integer", "null"]}}}
    g = compile_tools([{"name": "f", "parameters": params}], tok, wire_format)
    for x, n, y, z, m in [(1e-07, 1e16, 1e-07, 1e-07, 1e16), (2.5e20, 3.0, 1e300, -0.0, None),
                          (0.1, -12.0, float("inf"), 0.5, 7.0)]:
        calls = [ToolCall("f", {"x": x, "n": n, "y": y, "z": z, "m": m})]
        text = p.render_calls(calls, {"f": params})
        ids = tok.encode(text + p.calls_stop).ids
        assert g.accepts(ids), text
        assert g.accepts_json(g.parse(ids)) and g.accepts_json(g.parse(ids).calls) and g.accepts_json(calls)



@pytest.mark.parametrize("wire_format", ["gemma4", "json"])
def test_huge_integers_at_a_bound_are_spelled_as_the_grammar_takes_them(wire_format: str) -> None:
    """Past 2**53 an integer-valued float's exact digits and its shortest decimal differ
    (1e23: 99999999999999991611392 and 100000000000000000000000), and the grammar reads
    digits exactly, within each bound under both its readings: at "maximum": 1e23 only
    the exact digits fit, at "maximum": 1e308 only the shortest, and at a minimum the other
    way round. The protocol writes the one that fits."""
    tok = byte_tokenizer()
    p = Protocol(wire_format)
    for kw, b in [("maximum", 1e23), ("maximum", 1e308), ("minimum", 1e23), ("minimum", 1e308),
                  ("exclusiveMaximum", -1e23), ("minimum", -1e23)]:
        for typ in ("integer", "number"):
            params = {"type": "object", "required": ["n"], "properties": {"n": {"type": typ, kw: b}}}
            g = compile_tools([{"name": "f", "parameters": params}], tok, wire_format)
            v = -1.0000000000000001e23 if kw == "exclusiveMaximum" else b  # (the float below -1e23)
            calls = [ToolCall("f", {"n": v})]
            assert g.accepts_json(calls), (kw, b, typ)
            text = p.render_calls(calls, {"f": params})
            assert g.accepts(tok.encode(text + p.calls_stop).ids), (kw, b, typ, text)


@pytest.mark.parametrize("wire_format", ["gemma4", "json"])
def test_numbers_under_refs_and_unions_are_spelled_as_the_grammar_takes_them(wire_format: str) -> None:
    """Bounds reached through an ``allOf`` member's ``$ref``, and an integer-valued float
    choosing an ``anyOf`` branch of type integer (1.0 is an integer in JSON Schema): the
    protocol wrote 0.0, 1e+23 and -1e+23 there, which the grammar refuses."""
    tok = byte_tokenizer()
    p = Protocol(wire_format)
    defs = {"b": {"type": "integer", "maximum": 1e23, "exclusiveMinimum": -1}}
    cases = [({"allOf": [{"$ref": "#/$defs/b"}]}, 0.0), ({"allOf": [{"$ref": "#/$defs/b"}]}, 1e23),
             ({"anyOf": [{"type": "integer", "maximum": 0}, {"type": "string"}]}, -1e23)]
    for prop, v in cases:
        params = {"type": "object", "required": ["n"], "properties": {"n": prop}, "$defs": defs}
        g = compile_tools([{"name": "f", "parameters": params}], tok, wire_format)
        calls = [ToolCall("f", {"n": v})]
        assert g.accepts_json(calls), (prop, v)
        text = p.render_calls(calls, {"f": params})
        assert g.accepts(tok.encode(text + p.calls_stop).ids), (prop, v, text)

_INT, _NUM = {"type": "integer"}, {"type": "number"}


@pytest.mark.parametrize("params, value", [
    # a union under allOf + $ref: the integer branch -1e23 is valid under (digits)
    ({"properties": {"n": {"allOf": [{"$ref": "#/$defs/d"}]}},
      "$defs": {"d": {"anyOf": [_INT, {"type": "integer", "exclusiveMinimum": 0.5}]}}}, {"n": -1e23}),
    # 5.0 is valid under the first branch only (integer: "5", not "5.0")
    ({"properties": {"n": {"$ref": "#/$defs/d"}}, "$defs": {"d": {"anyOf": [
        {"type": "integer", "maximum": 2.5e20}, {"type": "number", "maximum": 1e23, "exclusiveMinimum": 1e16}]}}},
     {"n": 5.0}),
    # a typeless first branch that 1e23 fails lent it bounds it does not meet
    ({"properties": {"n": {"minimum": 0, "allOf": [{"$ref": "#/$defs/d"}]}}, "$defs": {"d": {"anyOf": [
        {"minimum": 1e308, "exclusiveMaximum": -1e308}, {"maximum": 1e23, "exclusiveMinimum": 0}]}}}, {"n": 1e23}),
    # inside oneOf / not each value has one spelling: no exponent
    ({"properties": {"n": {"oneOf": [{}]}}}, {"n": -1e23}),
    ({"properties": {"n": {"type": "number", "not": {"minimum": 2.5e20}}}}, {"n": 1e16}),
    ({"properties": {"n": {"type": "number", "not": {"maximum": -5}}}}, {"n": 1e-07}),
    # ... and past 2**53 not the digits another oneOf branch may hold (10**308 is below
    # the bound 1e308 as a decimal, so the grammar takes only 1e308's exact digits here)
    ({"properties": {"n": {"oneOf": [{"type": ["integer", "string"]}, {"type": "integer", "exclusiveMaximum": 1e308}]}}},
     {"n": 1e308}),
    # ... and objects there list their keys in the document's order of first mention
    ({"properties": {"x": {"oneOf": [{"properties": {"b": _NUM, "a": _NUM}}, {"required": ["c"]}]}, "a": _NUM}},
     {"x": {"a": 1.5, "b": 2.5}}),
    # the branch the grammar writes the object under names all its keys
    ({"properties": {"x": {"anyOf": [{"type": "object", "properties": {"d": _NUM}},
                                     {"type": "object", "properties": {"b": _INT}}]}}}, {"x": {"b": 7.0}}),
    # a property's schema is every facet's: here `then` makes b an integer
    ({"properties": {"a": _NUM, "b": _NUM}, "if": {"required": ["a"]},
      "then": {"properties": {"b": {"type": "integer", "maximum": 100}}}}, {"a": 1e-07, "b": 7.0}),
    # an enum / const member is written as the grammar spells it (as given; canonically
    # inside a negation)
    ({"properties": {"n": {"enum": [5.0]}}}, {"n": 5.0}),
    ({"properties": {"n": {"enum": [1e-07], "maximum": 1}}}, {"n": 1e-07}),
    ({"properties": {"n": {"const": {"b": 1, "a": 2}}}}, {"n": {"a": 2, "b": 1}}),
    ({"properties": {"n": {"not": {"type": "string"}, "enum": [{"b": 1e23, "a": "x"}]}}}, {"n": {"a": "x", "b": 1e23}}),
    # a $ref's siblings hold too
    ({"properties": {"n": {"$ref": "#/$defs/d", "type": "integer"}}, "$defs": {"d": {"minimum": 0}}}, {"n": 2.0}),
])
@pytest.mark.parametrize("wire_format", ["gemma4", "json"])
def test_values_under_unions_conditions_and_negations_are_spelled_as_the_grammar_takes_them(
        params: dict, value: dict, wire_format: str) -> None:
    """The protocol picks the union branch a value is valid under (not the first whose
    type fits), merges a property's schema over all facets, and inside a negation writes
    the canonical spelling; each case here was written in a spelling the grammar refuses."""
    params = {"type": "object", **params}
    assert jsonschema.Draft202012Validator(params).is_valid(value)
    tok = byte_tokenizer()
    g = compile_tools([{"name": "f", "parameters": params}], tok, wire_format)
    calls = [ToolCall("f", value)]
    assert g.accepts_json(calls)
    p = Protocol(wire_format)
    text = p.render_calls(calls, {"f": params})
    assert g.accepts(tok.encode(text + p.calls_stop).ids), text
    (back,) = p.parse_output(text + p.calls_stop).calls  # (digits read back as an int: valid all the same)
    assert back.name == "f" and jsonschema.Draft202012Validator(params).is_valid(back.arguments)


def test_a_union_that_names_itself_renders_without_recursing_forever() -> None:
    """The branch a value goes under is found by validating it, and jsonschema recurses
    without end on {"anyOf": [..., {"$ref": <itself>}]} for a value no branch takes:
    the protocol then falls back to the first branch whose type fits."""
    params = {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}},
              "$defs": {"a": {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/a"}]}}}
    tok = byte_tokenizer()
    g = compile_tools([{"name": "f", "parameters": params}], tok, "json")
    p = Protocol("json")
    text = p.render_calls([ToolCall("f", {"x": "hi"})], {"f": params})
    assert g.accepts(tok.encode(text + p.calls_stop).ids), text
    assert p.render_calls([ToolCall("f", {"x": {"k": 1.5}})], {"f": params}) == \
        '[{"name":"f","arguments":{"x":{"k":1.5}}}]'


_NUMBERS = st.sampled_from([1e23, -1e23, 1e308, 9007199254740994.0, 1e16, 3e25, 5.0, 1e-07, 2.5, 0.0])
_BOUNDS_AT = st.sampled_from([1e23, -1e23, 1e308, -1e308, 0.5, 1e16, 5, -5, 0])


@st.composite
def _number_schemas(draw: st.DrawFn, depth: int = 0) -> dict:
    """Number schemas with bounds, types, unions, allOf, if/then/else and not."""
    schema: dict = {}
    t = draw(st.sampled_from([None, "number", "integer", ["integer", "string"]]))
    if t is not None:
        schema["type"] = t
    for kw in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        if draw(st.integers(0, 9)) < 3:
            schema[kw] = draw(_BOUNDS_AT)
    if depth < 2:
        for kw in ("anyOf", "oneOf", "allOf"):
            if draw(st.integers(0, 9)) < 2:
                schema[kw] = draw(st.lists(_number_schemas(depth + 1), min_size=1, max_size=3))
        if draw(st.integers(0, 9)) < 1:
            schema["not"] = draw(_number_schemas(2))
        if draw(st.integers(0, 9)) < 1:
            schema["if"], schema["then"] = draw(_number_schemas(2)), draw(_number_schemas(2))
    return schema


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(prop=_number_schemas(), defs=_number_schemas(), ref=st.sampled_from(["none", "ref", "allOf"]),
       v=_NUMBERS, wire_format=st.sampled_from(["gemma4", "json"]))
def test_a_number_any_schema_takes_renders_as_the_grammar_takes_it(prop: dict, defs: dict, ref: str, v: float,
                                                                   wire_format: str) -> None:
    """Property: wherever the grammar takes a valid number under unions, allOf, $ref,
    conditions and negations, the protocol writes it in a spelling the grammar takes."""
    if ref == "ref":
        prop = {"$ref": "#/$defs/d"}
    elif ref == "allOf":
        prop = {**prop, "allOf": [*prop.get("allOf", []), {"$ref": "#/$defs/d"}]}
    params = {"type": "object", "required": ["n"], "properties": {"n": prop}, "$defs": {"d": defs}}
    assume(jsonschema.Draft202012Validator(params).is_valid({"n": v}))
    tok = byte_tokenizer()
    try:
        g = compile_tools([{"name": "f", "parameters": params}], tok, wire_format)
    except SchemaError:
        assume(False)
    calls = [ToolCall("f", {"n": v})]
    assume(g.accepts_json(calls))  # (where none of its spellings is in the grammar's language, none can be written)
    p = Protocol(wire_format)
    text = p.render_calls(calls, {"f": params})
    assert g.accepts(tok.encode(text + p.calls_stop).ids), text


_BOUND = st.one_of(st.floats(min_value=-1e30, max_value=1e30, allow_nan=False), st.integers(-(10**25), 10**25),
                   st.sampled_from([1e23, -1e23, 1e308, -1e308, 9007199254740993.0, 0.1, 1e16, 2.5e20]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_a_number_the_schema_takes_renders_as_the_grammar_takes_it(data: st.DataObject) -> None:
    """Property: a number jsonschema finds within a schema's bounds (huge, tiny, at a
    bound, an integer-valued float) is written by the protocol in a spelling the grammar
    accepts. (Where the lower and upper bound are the same double, the grammar may take no
    spelling of a huge one: its bounds hold under both readings of the schema's text.)"""
    typ = data.draw(st.sampled_from(["number", "integer"]), label="type")
    lo_kw = data.draw(st.sampled_from(["minimum", "exclusiveMinimum", None]), label="lower")
    hi_kw = data.draw(st.sampled_from(["maximum", "exclusiveMaximum", None]), label="upper")
    lo, hi = data.draw(_BOUND, label="lo"), data.draw(_BOUND, label="hi")
    assume(lo_kw is None or hi_kw is None or lo < hi)
    prop: dict[str, object] = {"type": typ}
    if lo_kw:
        prop[lo_kw] = lo
    if hi_kw:
        prop[hi_kw] = hi
    a = float(lo) if lo_kw else min(-1e30, float(hi))
    b = float(hi) if hi_kw else max(1e30, a)
    v = data.draw(st.one_of(st.floats(min_value=a, max_value=b, allow_nan=False), st.sampled_from([a, b])),
                  label="value")
    if typ == "integer":
        v = float(math.floor(v))
    params = {"type": "object", "required": ["n"], "properties": {"n": prop}}
    assume(jsonschema.Draft202012Validator(params).is_valid({"n": v}))
    wire_format = data.draw(st.sampled_from(["gemma4", "json"]), label="wire format")
    tok = byte_tokenizer()
    g = compile_tools([{"name": "f", "parameters": params}], tok, wire_format)
    p = Protocol(wire_format)
    calls = [ToolCall("f", {"n": v})]
    text = p.render_calls(calls, {"f": params})
    assert g.accepts(tok.encode(text + p.calls_stop).ids), text
    assert g.accepts_json(calls)

def test_text_answers_and_parse_errors() -> None:
    p = Protocol("gemma4")
    assert p.parse_output("Hello there").text == "Hello there"
    with pytest.raises(ParseError, match="unterminated string"):
        p.parse_output('<|tool_call>call:get_weather{city:<|"|>Paris}<tool_call|>')
    with pytest.raises(ParseError, match="expected"):
        p.parse_output('<|tool_call>call:get_weather{city:3<tool_call|>')
    j = Protocol("json")
    assert j.parse_output(j.render_text('say "hi"')).text == 'say "hi"'
    assert j.parse_output('[{"name":"f","arguments":{"a":[1,2]}}]').calls == [ToolCall("f", {"a": [1, 2]})]
    with pytest.raises(ParseError):
        j.parse_output('[{"name":"f","arguments":{"a":[1,2}}]')


def test_turns_and_declarations() -> None:
    p = Protocol("gemma4")
    decl = p.render_declaration("f", "Does f.", {"type": "object", "properties": {"x": {"type": "integer"}}})
    assert decl == ('<|tool>declaration:f{description:<|"|>Does f.<|"|>,parameters:{'
                    'properties:{x:{type:<|"|>INTEGER<|"|>}},type:<|"|>OBJECT<|"|>}}<tool|>')
    assert p.system_turn("Be brief.", [decl]).startswith("<|turn>system\nBe brief.<|tool>declaration:f")
    # agentloop's own keywords steer the grammar and stay out of the prompt, at any depth;
    # a property named like one is the tool's and stays
    copied = {"type": "object", "properties": {
        "city": {"type": "string", "x-copy": True},
        "x-copy": {"type": "array", "items": {"anyOf": [{"type": "string", "x-copy": "numbers"}]}}}}
    decl = Protocol("json").render_declaration("g", "Does g.", copied)  # the whole schema, keywords and all
    assert decl.count("x-copy") == 1 and '"x-copy":{"type":' in decl and copied["properties"]["city"]["x-copy"] is True


def test_gemma4_declares_parameters_as_its_chat_template_does() -> None:
    """Gemma 4's checkpoints read tool parameters in their chat template's shape: per
    property (sorted) description, enum (strings), items (arrays), nullable, nested
    properties and required (objects) and the type in capitals, last; bounds, patterns,
    defaults and additionalProperties are not shown."""
    p = Protocol("gemma4")
    s = '<|"|>'
    params = {"type": "object", "additionalProperties": False, "required": ["unit", "city"], "properties": {
        "unit": {"type": "string", "enum": ["C", "F"], "description": "Scale."},
        "city": {"type": "string", "pattern": "^[A-Z]", "maxLength": 40, "x-copy": True},
        "days": {"type": "integer", "minimum": 1, "default": 1, "nullable": True},
        "description": {"type": "string"},  # a parameter named like a keyword is still declared
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}},
        "where": {"type": "object", "required": ["lat"], "properties": {"lat": {"type": "number"}}}}}
    assert p.render_declaration("w", "Weather.", params) == (
        f"<|tool>declaration:w{{description:{s}Weather.{s},parameters:{{properties:{{"
        f"city:{{type:{s}STRING{s}}},"
        f"days:{{nullable:true,type:{s}INTEGER{s}}},"
        f"description:{{type:{s}STRING{s}}},"
        f"tags:{{items:{{maxLength:8,type:{s}STRING{s}}},type:{s}ARRAY{s}}},"
        f"unit:{{description:{s}Scale.{s},enum:[{s}C{s},{s}F{s}],type:{s}STRING{s}}},"
        f"where:{{properties:{{lat:{{type:{s}NUMBER{s}}}}},required:[{s}lat{s}],type:{s}OBJECT{s}}}}},"
        f"required:[{s}unit{s},{s}city{s}],type:{s}OBJECT{s}}}}}<tool|>")
    wf = p.wire_format
    bad = Protocol(dataclasses.replace(wf, turns={**wf.turns, "declared_schema": "html"}))
    with pytest.raises(WireFormatError, match="declared_schema"):
        bad.render_declaration("w", "Weather.", params)
    assert p.render_response("f", 'a <|"|> b') == '<|tool_response>response:f{value:<|"|>a  b<|"|>}<tool_response|>'
    with pytest.raises(ValueError, match="identifiers"):
        p.render_value({"not an id": 1})
