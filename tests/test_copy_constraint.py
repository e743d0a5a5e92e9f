"""The copy constraint: x-copy strings are exactly the copies (word-aligned substrings) of the
context texts, x-copy numbers exactly the numbers written there."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentloop import Agent, Copied, CopiedNumbers, tool
from agentloop.grammar import SchemaOptions, compile_schema, compile_tools
from agentloop.grammar.copy import copies_node, is_copied
from agentloop.grammar.fsa import to_dfa
from agentloop.grammar.wireformat import load_wire_format


@settings(max_examples=80, deadline=None, derandomize=True)
@given(text=st.text(alphabet="ab \"\\é.", max_size=12), probe=st.text(alphabet="ab \"\\é.", max_size=5))
def test_copy_automaton_accepts_exactly_the_copies(text, probe):
    wf = load_wire_format("json")
    d = to_dfa(copies_node([text], wf), wf.n_symbols)
    # brute force: a substring starting and ending at word boundaries, no outer whitespace
    def word(c):
        return c.isalnum() or c == "_"

    want = probe == "" or any(
        text[i:i + len(probe)] == probe and not probe[0].isspace() and not probe[-1].isspace()
        and (i == 0 or not (word(text[i - 1]) and word(probe[0])))
        and (i + len(probe) == len(text) or not (word(probe[-1]) and word(text[i + len(probe)])))
        and not (probe[-1] in ".,;:!?" and (i + len(probe) == len(text) or text[i + len(probe)].isspace()))
        for i in range(len(text) - len(probe) + 1))
    assert d.accepts(wf.spell_string_content(probe)) == want
    assert is_copied(probe, [text]) == want


def test_copies_are_whole_words():
    assert is_copied("Belri", ["Weather in Belri, please"]) and is_copied("in Belri", ["Weather in Belri, please"])
    assert not is_copied("Belr", ["Weather in Belri, please"]) and not is_copied("Belri ", ["in Belri now"])
    assert is_copied("nijor.txt", ["Write nijor.txt now"]) and is_copied("nijor", ["Write nijor.txt now"])
    # clause punctuation is not part of a copy; inner punctuation is
    assert is_copied("recipe.txt", ["I want to see recipe.txt."]) and not is_copied("recipe.txt.", ["see recipe.txt."])
    assert not is_copied("Oslo,", ["Oslo, then Rome"]) and is_copied("Oslo, then Rome", ["Oslo, then Rome"])


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



@pytest.mark.parametrize("wire_format", ["json", "gemma4"])
def test_without_copy_sources_the_marks_are_not_enforced(btok, wire_format):
    # compiled outside a conversation (copy_sources left None) a copied parameter is what
    # its other keywords say; an empty conversation (sources ()) has nothing to copy
    schema = {"type": "object", "properties": {"city": {"type": "string", "x-copy": True, "minLength": 2},
                                               "n": {"type": "integer", "x-copy": True}}, "required": ["city"]}
    tool_ = {"name": "get_weather", "parameters": schema}
    free = compile_tools([tool_], btok, wire_format)
    assert free.accepts_json([{"name": "get_weather", "arguments": {"city": "Paris", "n": 4}}])
    assert not free.accepts_json([{"name": "get_weather", "arguments": {"city": "P"}}])  # minLength holds
    assert compile_schema(schema, btok, wire_format).accepts_json({"city": "Paris"})
    empty = compile_tools([tool_], btok, wire_format, options=SchemaOptions(copy_sources=()))
    assert not empty.accepts_json([{"name": "get_weather", "arguments": {"city": "Paris"}}])
    assert empty.accepts_json("no call")  # (the tool waits for a conversation; the text answer stays)
    grounded = compile_tools([tool_], btok, wire_format, options=SchemaOptions(grounded_text_numbers=True))
    assert grounded.accepts_json([{"name": "get_weather", "arguments": {"city": "Paris"}}])  # (marks unenforced too)
    plain = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string",
                                                                                           "x-copy": True}}}}
    holed = compile_tools([plain], btok, wire_format, options=SchemaOptions(grounded_text_numbers=True))
    assert holed.accepts_json([{"name": "get_weather", "arguments": {"city": "Paris"}}])  # (the holed envelope)
    some = compile_tools([tool_], btok, wire_format, options=SchemaOptions(copy_sources=("Paris in 4 days",)))
    assert some.accepts_json([{"name": "get_weather", "arguments": {"city": "Paris", "n": 4}}])
    assert not some.accepts_json([{"name": "get_weather", "arguments": {"city": "Rome"}}])


# ---- numbers ---------------------------------------------------------------------------------------

_NUM = {"type": "object", "properties": {"v": {"type": "number", "x-copy": True}}, "required": ["v"]}


@settings(max_examples=40, deadline=None, derandomize=True)
@given(text=st.text(alphabet="12.-e x", max_size=14), probe=st.from_regex(r"-?[0-9]{1,3}(\.[0-9]{1,2})?", fullmatch=True))
def test_copied_number_is_a_whole_number_written_in_the_context(btok, text, probe):
    from agentloop.grammar.copy import copied_number_spellings

    from agentloop.errors import SchemaError

    spellings = copied_number_spellings([text])
    try:
        g = compile_schema(_NUM, btok, "json", options=SchemaOptions(copy_sources=(text,)))
    except SchemaError:  # no number in the text: the required value has none to take
        assert not any(_is_json_number(s) for s in spellings)
        return
    from agentloop.grammar.vocabulary import encode_text

    ids = encode_text(btok, f'{{"v":{probe}}}') + encode_text(btok, "<eos>")
    assert g.accepts(ids) == (probe in spellings and _is_json_number(probe))


def _is_json_number(s: str) -> bool:
    import re

    return re.fullmatch(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?", s) is not None


@pytest.mark.parametrize("wire_format", ["json", "gemma4"])
def test_copied_numbers_sampled_are_in_the_context_and_valid(btok, wire_format):
    import torch
    import jsonschema

    sources = ("Convert 12.5 km to miles", "result: 7.76714 mi, -4 C")
    g = compile_schema(_NUM, btok, wire_format, options=SchemaOptions(copy_sources=sources))
    seen = set()
    for seed in range(12):
        ids = g.sample(torch.randn(24, g.vocab.size, generator=torch.Generator().manual_seed(seed)))
        v = g.parse(ids)["v"]
        jsonschema.validate({"v": v}, _NUM)
        assert v in {12.5, 7.76714, -4, 4}  # whole numbers only: never "2.5" out of "12.5"
        seen.add(v)
    assert len(seen) > 1
    assert not g.accepts_json({"v": 2.5}) and not g.accepts_json({"v": 12})


def test_copy_sources_do_not_reach_the_disk_cache(btok, tmp_path, monkeypatch):
    from agentloop.grammar import cache

    monkeypatch.setattr(cache, "save", lambda *a, **k: pytest.fail("a per-conversation grammar was persisted"))
    compile_schema(_NUM, btok, "json", options=SchemaOptions(copy_sources=("private 42",)))


# ---- tools and the agent ---------------------------------------------------------------------------


def test_copied_annotation_marks_the_schema():
    @tool
    def convert(value: Copied[float], unit: str, city: Copied[str] = "Oslo") -> str:
        """Convert."""
        return ""

    props = convert.parameters["properties"]
    assert props["value"] == {"type": "number", "x-copy": True}
    assert props["city"]["x-copy"] is True and "x-copy" not in props["unit"]
    assert convert(3.0, "km") == ""


def _weather_agent(script, **kw):
    from agentloop.testing import ScriptedEngine

    @tool
    def get_weather(city: Copied[str]) -> str:
        """Weather in a city."""
        return f"{city}: sunny; try also Bergen"

    return Agent(ScriptedEngine(script), [get_weather], **kw)


def test_agent_allows_copied_values_from_the_prompt_and_from_tool_results():
    from agentloop.testing import call

    agent = _weather_agent([call("get_weather", city="Oslo"), call("get_weather", city="Bergen"), "done"])
    r = agent.run_sync("Weather in Oslo?")
    assert [c.call.arguments["city"] for c in r.calls] == ["Oslo", "Bergen"]  # Bergen came from a tool result
    # the next run continues the conversation: its texts are still sources
    agent2 = _weather_agent([call("get_weather", city="Bergen"), "ok"])
    assert agent2.run_sync("And there?", message_history=r.messages).calls[0].call.arguments["city"] == "Bergen"


def test_agent_rejects_a_copied_value_the_conversation_does_not_have():
    from agentloop.errors import ScriptError
    from agentloop.testing import call

    with pytest.raises(ScriptError, match="not valid for the tools' grammar"):
        _weather_agent([call("get_weather", city="Paris"), "x"]).run_sync("Weather in Oslo?")
    # without the copy constraint the schema alone holds
    r = _weather_agent([call("get_weather", city="Paris"), "x"], copy_constraint=False).run_sync("Weather in Oslo?")
    assert r.calls[0].call.arguments == {"city": "Paris"}


def test_agent_grammar_per_step_is_cached_by_its_sources():
    from agentloop.agent import UserMessage
    from agentloop.testing import call

    agent = _weather_agent([call("get_weather", city="Oslo"), "ok"])
    a = agent.constraint_for([UserMessage("Weather in Oslo?")])
    assert agent.constraint_for([UserMessage("Weather in Oslo?")]) is a
    assert agent.constraint_for([UserMessage("Weather in Rome?")]) is not a
    # with no conversation yet, a copied parameter has no value to take
    assert not agent.constraint.accepts_json([{"name": "get_weather", "arguments": {"city": "Oslo"}}])
    assert a.accepts_json([{"name": "get_weather", "arguments": {"city": "Oslo"}}])


# ---- the per-turn splice: the envelope compiled once, each turn's copies spliced in ---------

_SPLICE_TOOLS = [
    {"name": "weather", "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "x-copy": True}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}}},
    {"name": "convert", "parameters": {"type": "object", "required": ["value", "unit"], "properties": {
        "value": {"type": "number", "x-copy": True}, "times": {"type": "integer", "minimum": 0, "x-copy": True},
        "unit": {"enum": ["km", "mi"]}, "note": {"type": "string", "x-copy": True}}}},
    {"name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
    {"name": "calc", "parameters": {"type": "object", "required": ["expr"], "properties": {
        "expr": {"type": "string", "x-copy": "numbers"}}}},
    {"name": "sum", "parameters": {"type": "object", "required": ["expr"], "properties": {
        "expr": {"type": "string", "x-copy": "numbers", "pattern": "^[0-9.]+( ?[+*] ?[0-9.]+)*$", "maxLength": 9}}}},
]


def _full_and_spliced(btok, wire_format, texts, tools=_SPLICE_TOOLS, grounded=False):
    from unittest import mock

    import agentloop.grammar as grammar
    from agentloop.grammar import clear_caches, compile_tools

    opt = SchemaOptions(copy_sources=tuple(texts), grounded_text_numbers=grounded)
    clear_caches()
    spliced = compile_tools(tools, btok, wire_format, options=opt)
    clear_caches()
    with mock.patch.object(grammar, "holes_fit", lambda schema: False):  # force the full compile
        full = compile_tools(tools, btok, wire_format, options=opt)
    clear_caches()
    return full, spliced


@settings(max_examples=15, deadline=None, derandomize=True)
@given(texts=st.lists(st.text(alphabet='ab 1.2-"\\é', max_size=10), min_size=1, max_size=3))
def test_spliced_copies_are_exactly_the_full_compile(btok, texts):
    from agentloop.grammar.copy import HOLE_SYMBOLS
    from agentloop.grammar.fsa import product

    for wire_format, grounded in (("json", False), ("gemma4", False), ("json", True), ("gemma4", True)):
        full, spliced = _full_and_spliced(btok, wire_format, texts, grounded=grounded)
        assert product(full.dfa, spliced.dfa, "xor").is_empty()  # the same language
        d = spliced.dfa
        assert not any((d.trans[:, d.sym_class[h]] >= 0).any() for h in HOLE_SYMBOLS)  # no hole survives


def test_splice_reuses_the_envelope_and_falls_back_where_a_hole_cannot_stand(btok):
    import agentloop.grammar as grammar
    from agentloop.grammar import compile_tools

    envelopes = []
    for text in ("Weather in Oslo, 3 km", "Weather in Rome, 4 mi"):
        g = compile_tools(_SPLICE_TOOLS, btok, "gemma4", options=SchemaOptions(copy_sources=(text,)))
        assert g.accepts_json([{"name": "weather", "arguments": {"city": text.split()[2].rstrip(",")}}])
        envelopes.append(dict(grammar._holed))
    assert envelopes[0] == envelopes[1]  # one envelope, compiled once, for both turns
    # a copied string with a length bound is no plain hole: compiled in full, still exact
    bounded = [{"name": "w", "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "maxLength": 4, "x-copy": True}}}}]
    g = compile_tools(bounded, btok, "json", options=SchemaOptions(copy_sources=("Weather in Oslo or Bergen",)))
    assert g.accepts_json([{"name": "w", "arguments": {"city": "Oslo"}}])
    assert not g.accepts_json([{"name": "w", "arguments": {"city": "Bergen"}}])  # too long
    assert not g.accepts_json([{"name": "w", "arguments": {"city": "Rome"}}])  # not in the text


def test_substitute_refuses_a_splice_that_is_not_deterministic():
    from agentloop.grammar.fsa import alt, literal, seq, substitute, sym

    d = to_dfa(seq(sym(0xFF), literal(b"b")), 256)
    s = substitute(d, {0xFF: to_dfa(alt(literal(b"a"), literal(b"ac")), 256)})
    assert s.accepts(b"ab") and s.accepts(b"acb") and not s.accepts(b"b")
    # after "b" the filler may go on with "b" while the hole's successor also reads "b"
    assert substitute(d, {0xFF: to_dfa(alt(literal(b"b"), literal(b"bb")), 256)}) is None


def test_compile_falls_back_when_every_number_hole_is_taken(btok, monkeypatch):
    from agentloop.grammar import clear_caches, compile_tools
    from agentloop.grammar import copy as copy_mod

    taken = {f"other language {i}".encode(): (h, "number", None) for i, h in enumerate(copy_mod.HOLE_SYMBOLS[1:])}
    monkeypatch.setattr(copy_mod, "_number_holes", taken)
    clear_caches()
    tools = [{"name": "n", "parameters": {"type": "object", "required": ["v"], "properties": {
        "v": {"type": "number", "minimum": -77, "x-copy": True}}}}]
    g = compile_tools(tools, btok, "gemma4", options=SchemaOptions(copy_sources=("about 12.5 km",)))
    assert g.accepts_json([{"name": "n", "arguments": {"v": 12.5}}])
    assert not g.accepts_json([{"name": "n", "arguments": {"v": 12}}])
    clear_caches()


# ---- the numbers rule: free text whose numbers are copied ------------------------------------------


@settings(max_examples=120, deadline=None, derandomize=True)
@given(texts=st.lists(st.text(alphabet="12. a-", max_size=9), max_size=2),
       probe=st.text(alphabet="12. a\"", max_size=8))
def test_numbers_automaton_accepts_exactly_texts_whose_numbers_are_written(texts, probe):
    import re

    from agentloop.grammar import charset as cs
    from agentloop.grammar.copy import numbers_are_copied, numbers_copied_node

    # brute force: each greedy digits[.digits] run of the probe occurs as such a run in a text
    runs = {m for t in texts for m in re.findall(r"[0-9]+(?:\.[0-9]+)?", t)}
    want = all(m in runs for m in re.findall(r"[0-9]+(?:\.[0-9]+)?", probe))
    assert numbers_are_copied(probe, texts) == want
    wf = load_wire_format("json")
    in_string = to_dfa(numbers_copied_node(texts, wf.spell_char), wf.n_symbols)
    assert in_string.accepts(wf.spell_string_content(probe)) == want
    raw = to_dfa(numbers_copied_node(texts, cs.utf8_node, nonempty=True), 256)
    assert raw.accepts(probe.encode()) == (want and probe != "")


_CALC = {"type": "object", "properties": {"expression": {"type": "string", "x-copy": "numbers"}},
         "required": ["expression"]}


@pytest.mark.parametrize("wire_format", ["json", "gemma4"])
def test_numbers_rule_on_a_string_parameter(btok, wire_format):
    import torch

    from agentloop.grammar.copy import numbers_are_copied

    sources = ("what's 327 times 848", "6.83 m")
    g = compile_schema(_CALC, btok, wire_format, options=SchemaOptions(copy_sources=sources))
    assert g.accepts_json({"expression": "327 * 848"}) and g.accepts_json({"expression": "(6.83 + 327) / 848"})
    assert g.accepts_json({"expression": "sqrt(x)"})  # no number: free
    assert not g.accepts_json({"expression": "327 * 888"})
    assert not g.accepts_json({"expression": "32 * 848"})  # a number is whole: not "32" out of "327"
    assert not g.accepts_json({"expression": "6.8 * 2"})
    for seed in range(6):
        ids = g.sample(torch.randn(30, g.vocab.size, generator=torch.Generator().manual_seed(seed)) * 3)
        assert numbers_are_copied(g.parse(ids)["expression"], sources)


def test_copied_numbers_annotation_and_bad_x_copy_values(btok):
    from agentloop.errors import SchemaError

    @tool
    def calc(expression: CopiedNumbers[str]) -> str:
        """Compute."""
        return expression

    assert calc.parameters["properties"]["expression"] == {"type": "string", "x-copy": "numbers"}
    bad = {"type": "object", "properties": {"s": {"type": "string", "x-copy": "yes"}}}
    with pytest.raises(SchemaError, match='x-copy must be true, false or "numbers"') as err:
        compile_schema(bad, btok, "json")
    assert err.value.pointer == "/properties/s/x-copy"


def _grounded_agent(script, **kw):
    from agentloop.testing import ScriptedEngine

    @tool
    def convert(value: Copied[float]) -> str:
        """cm to m."""
        return f"{value} cm = {value / 100} m"

    return Agent(ScriptedEngine(script), [convert], grounded_numbers=True, **kw)


def test_grounded_numbers_hold_the_answer_to_numbers_the_run_wrote():
    from agentloop.errors import ScriptError
    from agentloop.testing import call

    r = _grounded_agent([call("convert", value=683), "683 cm is 6.83 m; plus 40 is 46.83."]).run_sync(
        "683 cm in m, plus 40? The tool may say 46.83")
    assert r.output == "683 cm is 6.83 m; plus 40 is 46.83."
    with pytest.raises(ScriptError, match="not valid for the tools' grammar"):
        _grounded_agent([call("convert", value=683), "That makes 46883."]).run_sync("683 cm in m, plus 40?")
    # off by default: the answer's numbers are free
    from agentloop.testing import ScriptedEngine

    free = Agent(ScriptedEngine(["That makes 46883."]), [])
    assert free.run_sync("683 cm in m, plus 40?").output == "That makes 46883."


def test_a_patterned_string_under_the_numbers_rule_is_a_hole(btok):
    """The calculator's case: a pattern and the numbers rule together still splice (the
    envelope is not recompiled each turn), and the splice holds both."""
    import agentloop.grammar as grammar
    from agentloop.grammar import compile_tools
    from agentloop.grammar.copy import holes_fit

    tools = _SPLICE_TOOLS[-1:]
    assert holes_fit(tools[0]["parameters"])
    envelopes = []
    for text in ("add 12 and 30", "add 7.5 and 1"):
        g = compile_tools(tools, btok, "gemma4", options=SchemaOptions(copy_sources=(text,)))
        a, b = text.split()[1], text.split()[3]
        assert g.accepts_json([{"name": "sum", "arguments": {"expr": f"{a} + {b}"}}])
        assert not g.accepts_json([{"name": "sum", "arguments": {"expr": f"{a} + 5"}}])  # 5 is not written
        assert not g.accepts_json([{"name": "sum", "arguments": {"expr": f"{a} - {b}"}}])  # the pattern has no "-"
        envelopes.append(dict(grammar._holed))
    assert envelopes[0] == envelopes[1]


def test_fsa_helpers_match_their_plain_numpy_definitions():
    """The splice's and minimize's hot helpers give what their plain numpy definitions
    give: symbol classes from one bit matrix (same partition, same order: class numbering
    feeds cache keys), a table's rows taken and renamed, and its equal columns grouped
    (each group's first column; minimize's ``_canonical`` renumbers the groups)."""
    import numpy as np

    from agentloop.grammar.fsa import _distinct_columns, _rows_renamed, _symbol_classes

    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.choice([8, 64, 270]))
        masks = [int(sum(1 << int(s) for s in rng.choice(n, size=rng.integers(1, n), replace=False)))
                 for _ in range(rng.integers(0, 12))]
        distinct = sorted(set(m for m in masks if m))
        keys = [tuple(i for i, m in enumerate(distinct) if m >> s & 1) for s in range(n)]
        first_seen = list(dict.fromkeys(keys))
        sym_class, class_masks = _symbol_classes(masks, n)
        assert sym_class.tolist() == [first_seen.index(k) for k in keys]
        assert class_masks == [sum(1 << s for s in range(n) if keys[s] == k) for k in first_seen]
        S, C = int(rng.integers(1, 20)), int(rng.integers(1, 40))
        t = rng.integers(-1, S, size=(S, C)).astype(np.int32)
        t[:, -1] = t[:, 0]  # (at least one pair of equal columns)
        if S > 1 and C > 2:
            t[:, 1] = t[:, 0]
            t[-1, 1] = -1 if t[-1, 0] >= 0 else 0  # equal but in the last entry: never merged
        firsts, col_of = _distinct_columns(t)
        cols = [tuple(t[:, c]) for c in range(C)]
        assert firsts.tolist() == sorted({cols.index(col) for col in cols})
        assert [cols[firsts[k]] for k in col_of] == cols
        rows = rng.integers(0, S, size=int(rng.integers(0, 10)))
        name = rng.permutation(S)
        assert (_rows_renamed(t, rows, name) == np.where(t[rows] >= 0, name[t[rows]], -1)).all()
