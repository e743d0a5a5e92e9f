"""The copy constraint: x-copy strings are exactly the substrings of the context texts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentloop.grammar import SchemaOptions, compile_schema
from agentloop.grammar.copy import substring_node
from agentloop.grammar.fsa import to_dfa
from agentloop.grammar.wireformat import load_wire_format


@settings(max_examples=60, deadline=None, derandomize=True)
@given(text=st.text(alphabet="ab\"\\é", max_size=12), probe=st.text(alphabet="ab\"\\é", max_size=5))
def test_suffix_automaton_accepts_exactly_the_substrings(text, probe):
    wf = load_wire_format("json")
    d = to_dfa(substring_node([text], wf), wf.n_symbols)
    assert d.accepts(wf.spell_string_content(probe)) == (probe in text)


@pytest.mark.parametrize("wire_format", ["json", "gemma4"])
def test_copied_parameter_only_takes_values_from_the_context(btok, wire_format):
    sources = ("Weather in Reykjavik tomorrow?", 'tool said: "Oslo, 3C"')
    schema = {"type": "object", "properties": {"city": {"type": "string", "x-copy": True, "minLength": 2}},
              "required": ["city"]}
    g = compile_schema(schema, btok, wire_format, options=SchemaOptions(copy_sources=sources))
    assert g.accepts_json({"city": "Reykjavik"})
    assert g.accepts_json({"city": "Oslo"})
    assert not g.accepts_json({"city": "Paris"})
    assert not g.accepts_json({"city": "R"})  # minLength still applies
    import torch

    for seed in range(5):
        ids = g.sample(torch.randn(40, g.vocab.size, generator=torch.Generator().manual_seed(seed)))
        city = g.parse(ids)["city"]
        assert any(city in s for s in sources) and len(city) >= 2

