"""Both wire formats end to end: envelopes, text answers, parallel calls, long calls over
several canvases, and the errors a user sees for bad tools or tokenizers."""

from __future__ import annotations

import pytest
import torch

from agentloop.errors import ParseError, SchemaError, VocabularyError, WireFormatError
from agentloop.grammar import ToolCall, compile_schema, compile_tools, load_wire_format
from agentloop.protocol import Protocol
from conftest import word_tokenizer

WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
NOTE = {
    "name": "add_note",
    "parameters": {"type": "object", "properties": {"text": {"type": "string", "minLength": 30}}, "required": ["text"]},
}


def encode(tok, g, text: str) -> list[int]:
    return tok.encode(text).ids


@pytest.mark.parametrize("wire_format,calls_text,final_text", [
    ("gemma4",
     '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>'
     '<|tool_call>call:add_note{text:<|"|>a note that is long enough, "quoted" \\ é<|"|>}<tool_call|><|tool_response>',
     "It is 18C in Paris.<turn|>"),
    ("json",
     '[{"name":"get_weather","arguments":{"city":"Paris","days":3}},'
     '{"name":"add_note","arguments":{"text":"a note that is long enough, \\"quoted\\" \\\\ é"}}]<eos>',
     '{"answer":"It is 18C in Paris."}<eos>'),
])
def test_parallel_calls_and_final_text_parse(btok, wire_format, calls_text, final_text):
    g = compile_tools([WEATHER, NOTE], btok, wire_format)
    ids = encode(btok, g, calls_text)
    assert g.accepts(ids)
    out = g.parse(ids + [g.vocab.pad_id] * 3)
    assert out.text is None
    assert out.calls == [ToolCall("get_weather", {"city": "Paris", "days": 3}),
                         ToolCall("add_note", {"text": 'a note that is long enough, "quoted" \\ é'})]
    ids = encode(btok, g, final_text)
    assert g.accepts(ids)
    assert g.parse(ids).text == "It is 18C in Paris."
    assert g.accepts_json("It is 18C in Paris.")
    assert g.accepts_json([{"name": "get_weather", "arguments": {"days": 3, "city": "Paris"}}])
    assert not g.accepts_json([{"name": "get_weather", "arguments": {"city": "Paris", "days": 8}}])
    assert not g.accepts_json([{"name": "nope", "arguments": {}}])


def test_allow_text_false_and_single_call(btok):
    g = compile_tools([WEATHER, NOTE], btok, "gemma4", allow_text=False, parallel_calls=False)
    assert not g.accepts(encode(btok, g, "Hello<turn|>"))
    two = ('<|tool_call>call:get_weather{city:<|"|>A<|"|>}<tool_call|>'
           '<|tool_call>call:get_weather{city:<|"|>B<|"|>}<tool_call|><|tool_response>')
    assert not g.accepts(encode(btok, g, two))
    for seed in range(5):
        ids = g.sample(torch.randn(40, g.vocab.size, generator=torch.Generator().manual_seed(seed)))
        assert len(g.parse(ids).calls) == 1


@pytest.mark.parametrize("wire_format", ["gemma4", "json"])
def test_a_call_longer_than_one_canvas_continues_from_the_carried_state(btok, wire_format):
    """minLength 30 cannot fit in a 12-token canvas: canvases chain through their state."""
    g = compile_tools([NOTE], btok, wire_format, allow_text=False)
    gen = torch.Generator().manual_seed(0)
    state = None
    content: list[int] = []
    for i in range(10):
        logits = torch.randn(12, g.vocab.size, generator=gen)
        try:
            ids = g.sample(logits, generator=gen, state=state)  # complete if it can ...
        except Exception:
            ids = g.sample(logits, generator=gen, state=state, partial=True)  # ... else continue
        content += ids
        state = g.state_after(ids, state)
        assert state >= 0
        if g.is_complete(state):
            break
    assert i >= 2, "the call should have needed several canvases"
    assert g.accepts(content)
    (call,) = g.parse(content).calls
    assert len(call.arguments["text"]) >= 30


def test_missing_special_tokens_are_named(btok):
    tok = word_tokenizer(["a", "b"])
    with pytest.raises(VocabularyError, match=r"<\|turn>.*<\|tool_call>.*aliases="):
        compile_tools([WEATHER], tok, "gemma4")
    with pytest.raises(WireFormatError, match="unknown wire format 'nope'"):
        compile_tools([WEATHER], btok, "nope")


def test_aliases_map_protocol_tokens_onto_unused_ones():
    specials = ["<pad>", "<eos>"] + [f"<unused{i}>" for i in range(9)]
    tok = word_tokenizer(["call:get_weather", "{", "}", "city:", "Paris"], specials=specials)
    wf = load_wire_format("gemma4")
    aliases = {name: f"<unused{i}>" for i, name in enumerate(t for t in wf.special_tokens if t != "<eos>")}
    aliases["<eos>"] = "<eos>"
    g = compile_tools([WEATHER], tok, "gemma4", aliases=aliases, allow_text=False)
    ids = g.viterbi(torch.randn(10, g.vocab.size, generator=torch.Generator().manual_seed(1)))
    assert g.parse(ids).calls[0].name == "get_weather"


def test_bad_tools_and_schemas_fail_at_definition_with_pointer(btok):
    with pytest.raises(SchemaError, match=r"'\$recursiveRef' is not supported.*at '/properties/x/\$recursiveRef'"):
        compile_schema({"type": "object", "properties": {"x": {"$recursiveRef": "#"}}}, btok)
    with pytest.raises(SchemaError, match=r"tool 'f'.*'\$dynamicRef'.* at '/tools/0/parameters/properties/a/\$dynamicRef'$"):
        compile_tools([{"name": "f", "parameters": {"type": "object", "properties": {"a": {"$dynamicRef": "#x"}}}}], btok)
    with pytest.raises(SchemaError, match="tool name 'bad name'"):
        compile_tools([{"name": "bad name", "parameters": {}}], btok)
    with pytest.raises(SchemaError, match="two tools are named"):
        compile_tools([WEATHER, WEATHER], btok)
    with pytest.raises(SchemaError, match="cannot be spelled as an unquoted gemma4 key"):
        compile_tools([{"name": "f", "parameters": {"type": "object", "properties": {"a b": {"type": "string"}}}}], btok)
    with pytest.raises(SchemaError, match="not a valid JSON Schema"):
        compile_schema({"type": "strnig"}, btok)
    with pytest.raises(SchemaError, match="admits no value"):
        compile_schema({"type": "integer", "minimum": 5, "maximum": 1}, btok)
    with pytest.raises(SchemaError, match=r"says it is .*draft-07.*reads draft 2020-12.* at '/items'"):
        compile_schema({"$schema": "http://json-schema.org/draft-07/schema#", "items": [{"type": "integer"}]}, btok)
    with pytest.raises(SchemaError, match=r"is not a 'regex' \(a pattern must compile with Python's re"):
        compile_schema({"type": "string", "pattern": "\\p{L}+"}, btok)


def test_a_tool_that_admits_no_call_is_named_not_dropped(btok):
    contradiction = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 1}},
                     "required": ["n"]}
    with pytest.raises(SchemaError, match=r"tool 'g' admits no arguments.* at '/tools/1/parameters'"):
        compile_tools([WEATHER, {"name": "g", "parameters": contradiction}], btok)  # (allow_text: it would vanish)
    with pytest.raises(SchemaError, match=r"tool 'f': parameters must be a JSON Schema.*NoneType"):
        compile_tools([{"name": "f", "parameters": None}], btok)

    def get_weather(city: str) -> str:
        return city

    with pytest.raises(TypeError, match=r"function 'get_weather'.*agentloop.tool"):
        compile_tools([get_weather], btok)


def test_infinite_bounds(btok):
    # pydantic's Field(le=float("inf")) writes "maximum": Infinity: no bound
    g = compile_schema({"type": "number", "maximum": float("inf"), "exclusiveMinimum": float("-inf")}, btok)
    assert g.accepts_json(1e300) and g.accepts_json(-3)
    with pytest.raises(SchemaError, match=r"minimum inf admits no finite number.* at '/minimum'"):
        compile_schema({"type": "number", "minimum": float("inf")}, btok)
    with pytest.raises(SchemaError, match=r"maximum nan .* at '/properties/x/maximum'"):
        compile_schema({"type": "object", "properties": {"x": {"type": "integer", "maximum": float("nan")}}}, btok)


def test_stop_and_pad_tokens_given_explicitly_are_checked(btok):
    with pytest.raises(VocabularyError, match="stop_token id 99999 is outside the vocabulary"):
        compile_tools([WEATHER], btok, stop_token=99999)
    with pytest.raises(VocabularyError, match="pad_token id -1 is outside"):
        compile_tools([WEATHER], btok, pad_token=-1)
    # a token the wire format writes cannot end the canvas: no string could be written
    with pytest.raises(VocabularyError, match=r"stop token \(id \d+\) is also the wire format's <\|\"\|>"):
        compile_tools([WEATHER], btok, stop_token='<|"|>')


def test_the_protocols_end_token_is_the_stop_token_where_the_tokenizer_spells_it_otherwise():
    wf = load_wire_format("gemma4")
    names = [t for t in wf.special_tokens if t != "<eos>"]
    tok = word_tokenizer(["call:get_weather", "{", "}", "city:", "Paris"], specials=["[PAD]", "[SEP]"] + names)
    g = compile_tools([WEATHER], tok, "gemma4", allow_text=False)
    assert g.vocab.stop_id == tok.token_to_id("[SEP]")
    ids = g.viterbi(torch.randn(10, g.vocab.size, generator=torch.Generator().manual_seed(1)))
    assert g.parse(ids).calls[0].name == "get_weather"


def test_tokens_that_spell_nothing_are_never_accepted(btok):
    from agentloop.errors import ParseError

    specials = ["<pad>", "<eos>", "<bos>"] + list(load_wire_format("gemma4").special_tokens[:-1])
    tok = word_tokenizer(["call:get_weather", "{", "}", "city:", "Paris"], specials=specials)
    g = compile_tools([WEATHER], tok, "gemma4")
    ids = [tok.token_to_id(t) for t in ("<|tool_call>", "call:get_weather", "{", "city:", '<|"|>', "Paris", '<|"|>',
                                        "}", "<tool_call|>", "<|tool_response>")]
    assert g.accepts(ids) and g.parse(ids).calls[0].arguments == {"city": "Paris"}
    bos = tok.token_to_id("<bos>")  # a special token gemma4 does not use
    bad = ids[:3] + [bos] + ids[3:]
    assert g.state_after(bad) == -1
    assert not g.accepts(bad)
    with pytest.raises(ParseError, match=r"token 3 \(id 2\) spells nothing in wire format 'gemma4'"):
        g.parse(bad)


def test_tool_specs_of_other_formats_and_misspelt_ones(btok):
    """Anthropic's input_schema and MCP's inputSchema are the parameters too; a key that
    is none of them, where no parameters are given, is refused rather than leaving the
    tool without arguments; the parameters must describe an object."""
    args = WEATHER["parameters"]
    for key in ("input_schema", "inputSchema"):
        g = compile_tools([{"name": "w", key: args}], btok, allow_text=False)
        assert g.accepts_json([{"name": "w", "arguments": {"city": "Paris"}}])
        assert not g.accepts_json([{"name": "w", "arguments": {}}])
    with pytest.raises(SchemaError, match=r"tool 'w' has no parameters but a key 'parameter'.* at '/tools/1/param"):
        compile_tools([WEATHER, {"name": "w", "parameter": args}], btok)
    with pytest.raises(SchemaError, match="gives its parameters twice, as 'parameters' and 'input_schema'"):
        compile_tools([{"name": "w", "parameters": args, "input_schema": args}], btok)
    assert compile_tools([{"name": "w", "description": "d", "strict": True}], btok).accepts_json(
        [{"name": "w", "arguments": {}}])  # no parameters at all: a tool without arguments
    with pytest.raises(SchemaError, match=r"parameters must be a JSON Schema object .* got bool True at '/tools/0/par"):
        compile_tools([{"name": "w", "parameters": True}], btok)
    with pytest.raises(SchemaError, match=r"need \"type\": \"object\", got 'string' at '/tools/0/parameters/type'"):
        compile_tools([{"name": "w", "parameters": {"type": "string"}}], btok)
    with pytest.raises(SchemaError, match=r"a tool's name must be a string, got int 5 at '/tools/0/name'"):
        compile_tools([{"name": 5}], btok)
    with pytest.raises(TypeError, match="tools must be a list of tool schemas, got a dict"):
        compile_tools(WEATHER, btok)
    untyped = compile_tools([{"name": "w", "parameters": {"properties": {"n": {"type": "integer"}}}}], btok, "json",
                            allow_text=False)  # the type left out: the arguments are an object all the same
    assert untyped.accepts_json([{"name": "w", "arguments": {"n": 1}}])
    assert not untyped.accepts_json([{"name": "w", "arguments": 1}])


@pytest.mark.parametrize("device_passes", [False, True], ids=["host", "device"])
def test_bad_arguments_to_the_compilers_and_grammars_are_named(btok, device_passes, monkeypatch):
    """(``device_passes``: the path CUDA logits take, which once skipped the dtype checks.)"""
    from agentloop.errors import GrammarInputError
    from agentloop.grammar.compiled import CompiledGrammar

    monkeypatch.setattr(CompiledGrammar, "_device_passes_on_cpu", device_passes)

    with pytest.raises(TypeError, match=r"not a str \('tok.json'\): load it first, e.g. tokenizers.Tokenizer"):
        compile_schema({}, "tok.json")
    with pytest.raises(TypeError, match="options must be a SchemaOptions, got dict"):
        compile_schema({}, btok, options={"strict": False})
    with pytest.raises(VocabularyError, match="aliases maps '<\\|turn>' onto '<nope>', which is not in"):
        compile_tools([WEATHER], btok, aliases={"<|turn>": "<nope>"})
    for schema, where in (({"enum": [1, float("nan")]}, "/enum/1"), ({"const": {"a": float("inf")}}, "/const/a"),
                          ({"enum": [b"x"]}, "/enum/0")):
        with pytest.raises(SchemaError, match=f"at '{where}'$"):
            compile_schema(schema, btok)
    g = compile_tools([WEATHER], btok, "gemma4")
    x = torch.randn(12, g.vocab.size, generator=torch.Generator().manual_seed(0))
    for bad, match in ((None, "tensor or array, got None"), (x.to(torch.complex64), "real numbers"),
                       (x > 0, "real numbers, got a torch.bool"),
                       (torch.empty(12, g.vocab.size, device="meta"), "meta")):
        with pytest.raises(GrammarInputError, match=match):
            g.viterbi(bad)
    g.viterbi(x, partial=True), g.forced_tokens(3)  # (the caches these fill are keyed by the arguments: 1 == True)
    for partial in ("no", 1, None):
        with pytest.raises(GrammarInputError, match=f"partial must be True or False, got {partial!r}"):
            g.viterbi(x, partial=partial)
    for length in (-1, 3.0):
        with pytest.raises(GrammarInputError, match=f"a canvas length is an int >= 0, got {length!r}"):
            g.forced_tokens(length)
    for gen in (0, torch.Generator().manual_seed(0).manual_seed):
        with pytest.raises(GrammarInputError, match="generator must be a torch.Generator or None"):
            g.sample(x, generator=gen)
        with pytest.raises(GrammarInputError, match="generator must be a torch.Generator or None"):
            g.denoise_step(x, generator=gen)


def test_parse_errors_name_the_token_the_text_before_it_and_what_may_come(btok):
    g = compile_tools([WEATHER], btok, "gemma4")
    text = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:9}<tool_call|><|tool_response>'
    ids = btok.encode(text).ids
    with pytest.raises(ParseError) as e:
        g.parse(ids)
    n = next(i for i, t in enumerate(ids) if btok.decode([t]) == "9")
    assert str(e.value).startswith(f"token {n} (id {ids[n]}, '9') is not allowed after ")
    assert str(e.value).endswith(""",days:': at '9' the grammar expects '1'..'7'""")
    with pytest.raises(ParseError, match=r"ends with .*Paris<\|\"\|>}', where the grammar expects <tool_call\|>"):
        g.parse(btok.encode('<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}').ids)


def test_states_ids_and_batches_given_to_a_grammar_are_checked(btok):
    from agentloop.errors import GrammarInputError

    g = compile_tools([WEATHER], btok, "gemma4")
    x = torch.randn(12, g.vocab.size, generator=torch.Generator().manual_seed(0))
    for method in (g.forced_prefix, g.allowed_tokens, g.is_complete, lambda s: g.forced_tokens(12, s),
                   lambda s: g.viterbi(x, state=s)):
        with pytest.raises(GrammarInputError, match="state 1000000 does not exist"):
            method(10**6)
    with pytest.raises(GrammarInputError, match="state -1 is state_after's answer"):
        g.forced_tokens(12, -1)  # (no wrap-around to the last state)
    assert not g.is_complete(-1) and g.state_after([1], -1) == -1 and not g.accepts([1], state=-1)
    assert g.viterbi(x, state=torch.tensor(g.start_state)) == g.viterbi(x)
    with pytest.raises(GrammarInputError, match="state must be an int or one int per canvas, got '0'"):
        g.viterbi(x, state="0")
    with pytest.raises(GrammarInputError, match="a state is an int .* got 0.5"):
        g.allowed_tokens(0.5)
    with pytest.raises(GrammarInputError, match=r"one flat sequence, got shape \(1, 2\)"):
        g.accepts(torch.tensor([[1, 2]]))
    with pytest.raises(GrammarInputError, match="token ids must be ints: item 1"):
        g.state_after([1, 2.5])
    empty = torch.zeros(0, 12, g.vocab.size)  # an empty batch gives empty results, as torch ops do
    step = g.denoise_step(empty)
    assert step.argmax == [] and step.log_marginals.shape == (0, 12, g.vocab.size) and step.entropy.shape == (0, 12)
    assert g.marginals(empty).shape == (0, 12, g.vocab.size) and g.sample(empty) == [] and g.viterbi(empty) == []


def test_encoding_ignores_the_tokenizers_padding_and_truncation(btok):
    import copy

    from agentloop.grammar.vocabulary import encode_text

    padded = copy.deepcopy(btok)
    padded.enable_padding(length=64, pad_id=0, pad_token="<pad>")
    padded.enable_truncation(max_length=8)
    text = "a sentence longer than eight tokens, by far"
    assert len(padded.encode(text, add_special_tokens=False).ids) == 64
    assert encode_text(padded, text) == encode_text(btok, text) and len(encode_text(btok, text)) > 8
    assert padded.padding is not None  # (the caller's tokenizer is left as it was)
    padded.add_special_tokens(["<x>"])  # (a token added later is in the copy too)
    assert encode_text(padded, "a<x>") == [padded.token_to_id("a"), padded.token_to_id("<x>")]


def test_compiled_grammars_are_cached(btok):
    a = compile_tools([WEATHER], btok, "gemma4")
    b = compile_tools([dict(WEATHER)], btok, "gemma4")
    assert a is b
    assert compile_tools([WEATHER], btok, "json") is not a


@pytest.mark.parametrize("wire_format", ["gemma4", "json"])
def test_schemas_differing_only_in_key_order_get_their_own_grammars(btok, tmp_path, monkeypatch, wire_format):
    """The grammar writes properties in schema order, so a cache key that sorted the
    schema's keys served one tool's order to another: compiled after {a, b}, a schema
    listing {b, a} took only "a" first, in memory and from the disk cache of an earlier run."""
    import agentloop.grammar as grammar

    monkeypatch.setenv("AGENTLOOP_CACHE_DIR", str(tmp_path))
    props = {"a": {"type": "integer"}, "b": {"type": "integer"}}
    flipped = dict(reversed(props.items()))
    spell = load_wire_format(wire_format)
    for fresh_process in (False, True):
        grammars = []
        for p in (props, flipped):
            if fresh_process:
                grammar.clear_caches()
            schema = {"type": "object", "properties": p, "required": ["a", "b"]}
            tools = compile_tools([{"name": "f", "parameters": schema}], btok, wire_format)
            grammars.append((compile_schema(schema, btok, wire_format), tools, list(p)))
        for value_grammar, tools, order in grammars:
            ids = spell.spell_value({"a": 1, "b": 2}, key_order=order) + spell.lit("end")
            swapped = spell.spell_value({"a": 1, "b": 2}, key_order=order[::-1]) + spell.lit("end")
            assert value_grammar.dfa.run(ids) >= 0 and value_grammar.dfa.accept[value_grammar.dfa.run(ids)], order
            assert value_grammar.dfa.run(swapped) < 0 or not value_grammar.dfa.accept[value_grammar.dfa.run(swapped)]
            call = ToolCall("f", {"a": 1, "b": 2})
            assert tools.accepts_json([call])
            text = Protocol(wire_format).render_calls([call], {"f": {"properties": dict.fromkeys(order)}})
            assert tools.accepts(btok.encode(text + Protocol(wire_format).calls_stop).ids), (order, text)


def test_disk_cache_round_trip(btok, tmp_path, monkeypatch):
    import agentloop.grammar as grammar

    monkeypatch.setenv("AGENTLOOP_CACHE_DIR", str(tmp_path))
    tools = [dict(WEATHER, description="disk cache test")]
    a = compile_tools(tools, btok, "gemma4")
    assert list((tmp_path / "grammars").glob("*.npz"))
    grammar._grammar_cache.clear()
    b = compile_tools(tools, btok, "gemma4")
    assert b is not a
    logits = torch.randn(30, a.vocab.size, generator=torch.Generator().manual_seed(0))
    assert a.viterbi(logits) == b.viterbi(logits)
    assert b.accepts_json([{"name": "get_weather", "arguments": {"city": "Oslo"}}])


def test_allowed_tokens_keep_a_bounded_number_of_masks(btok, monkeypatch):
    """``allowed_tokens`` caches a (V,) mask per state; it kept 4096 of them, 1 GB at
    Gemma's 262k tokens for a token-by-token decoder that visits that many states. The
    cache now keeps ``ALLOWED_CACHE_BYTES`` (at least 64 masks), and a mask it dropped is
    made again alike."""
    import numpy as np

    from agentloop.grammar import compiled

    g = compile_tools([WEATHER], btok, "gemma4")
    V, S = g.vocab.size, g.automaton.n_states
    assert S > 20
    monkeypatch.setattr(compiled, "_ALLOWED_CACHE_MIN", 5)
    monkeypatch.setattr(compiled, "ALLOWED_CACHE_BYTES", 20 * V)
    first = g.allowed_tokens(g.start_state).copy()
    for q in range(S):
        g.allowed_tokens(q)
        assert len(g._allowed_cache) <= 20
    assert len(g._allowed_cache) == 20
    np.testing.assert_array_equal(g.allowed_tokens(g.start_state), first)
    monkeypatch.setattr(compiled, "ALLOWED_CACHE_BYTES", 0)  # (masks larger than it: the fewest kept)
    g._allowed_cache.clear()
    for q in range(S):
        g.allowed_tokens(q)
    assert len(g._allowed_cache) == 5


def test_supports_kept_are_bounded_in_bytes(btok, monkeypatch):
    """A grammar keeps the support of each canvas length and start state it was asked for
    (16 MB each at 20 tools, 16 of them): now at most ``SUPPORT_CACHE_BYTES`` of them, and
    at least two (an engine's canvas reuses one at every step); a support made again
    gives the same answers."""
    from agentloop.grammar import compiled

    g = compile_tools([WEATHER], btok, "gemma4")
    x = torch.randn(40, g.vocab.size, generator=torch.Generator().manual_seed(0))
    want = {L: g.viterbi(x[:L], prune=False) for L in range(30, 40)}
    assert len(g._support_cache) == 10
    monkeypatch.setattr(compiled, "SUPPORT_CACHE_BYTES", 0)
    g._support_cache.clear()
    for L in range(30, 40):
        assert g.viterbi(x[:L], prune=False) == want[L]
        assert len(g._support_cache) <= compiled._SUPPORT_CACHE_MIN
    assert g.viterbi(x[:30], prune=False) == want[30]
