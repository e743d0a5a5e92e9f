"""The expression -> DFA compiler's building blocks (``grammar/fsa.py``)."""

from __future__ import annotations

import itertools

import pytest

from agentloop.grammar import fsa
from agentloop.grammar.fsa import alt, embed, literal, rep, separated, seq, to_dfa


@pytest.mark.parametrize("item", [literal(b"a"), alt(literal(b"a"), literal(b"bc")), rep(literal(b"ab"), 1, 2)])
def test_separated_is_the_list_language_built_with_one_copy_of_the_item(item, monkeypatch):
    walked: list[int] = []  # the subset construction's states, before minimising
    minimize = fsa.minimize

    def recording(trans, *args, **kwargs):
        walked.append(trans.shape[0])
        return minimize(trans, *args, **kwargs)

    monkeypatch.setattr(fsa, "minimize", recording)
    embedded = embed(to_dfa(seq(item, rep(literal(b"x"), 0, 3)), 256))  # a whole automaton, as a tool's arguments
    for part in (item, embedded):
        comma = literal(b",")
        walked.clear()
        ours = to_dfa(separated(part, comma), 256)
        theirs = to_dfa(seq(part, rep(seq(comma, part))), 256)
        assert ours.n_states == theirs.n_states
        for n in range(8):
            for word in itertools.product(b"abcx,", repeat=n):
                assert ours.accepts(word) == theirs.accepts(word), bytes(word)
        assert walked[0] < walked[1]  # the item's states walked once, not twice


def test_unicode_classes_are_those_of_pythons_re():
    """jsonschema checks patterns with Python's ``re``, whose \\d \\w \\s are Unicode-wide:
    the wide sets are every code point those match, and a negated escape leaves them all
    out of what a canvas may spell."""
    import unicodedata

    from agentloop.grammar import byte_tokenizer, charset, compile_schema

    def by_code_point(pred):
        cps = [cp for cp in range(charset.MAX_CP + 1)
               if not charset.SURROGATES[0] <= cp <= charset.SURROGATES[1] and pred(chr(cp))]
        return charset.normalize([(cp, cp) for cp in cps])

    assert charset.python_digit() == by_code_point(lambda c: unicodedata.category(c) == "Nd")
    assert charset.python_word() == by_code_point(lambda c: c.isalnum() or c == "_")
    assert charset.python_space() == by_code_point(str.isspace)
    tok = byte_tokenizer()
    for escape, inside, outside in (("D", "a", "\u0663"), ("W", "-", "\u00e9"), ("S", "x", "\u3000")):
        g = compile_schema({"type": "string", "pattern": f"^\\{escape}+$"}, tok, "json")
        assert g.accepts_json(inside) and not g.accepts_json(outside), escape


def test_hopcroft_gives_the_coarsest_partition_moores_refinement_gives():
    """Hopcroft never splits by the sink's block (dead transitions are not listed): its
    partition of random partial DFAs is still exactly the states no suffix tells apart,
    as Moore's refinement of the completed table finds it, including a table with no
    accepting state."""
    import numpy as np

    rng = np.random.default_rng(1)
    for _ in range(300):
        S, C = int(rng.integers(1, 12)), int(rng.integers(1, 4))
        t = rng.integers(-1, S, size=(S, C)).astype(np.int32)
        t[rng.random((S, C)) < 0.4] = -1
        accept = rng.random(S) < (0.0 if _ % 10 == 0 else 0.4)
        blk, sink_block = fsa._hopcroft(t, accept)
        full = np.where(t >= 0, t, S)  # the sink S completes the table
        full = np.vstack([full, np.full((1, C), S)])
        label = np.append(accept, False).astype(np.int64)
        while True:  # Moore: split by (own class, the successors' classes) until stable
            keys = [(label[q], *label[full[q]]) for q in range(S + 1)]
            new = np.unique(keys, axis=0, return_inverse=True)[1].ravel()
            if len(set(new.tolist())) == len(set(label.tolist())):
                break
            label = new
        ours = np.append(blk, sink_block)
        same = ours[:, None] == ours[None, :]
        assert (same == (label[:, None] == label[None, :])).all()


def _random_expression(rng, depth):
    """A random expression over the bytes a, b, c: literals, classes, unions, sequences
    and bounded or open repeats, with automata embedded now and then."""
    from agentloop.grammar import charset

    kind = rng.integers(0, 6) if depth > 0 else rng.integers(0, 2)
    if kind == 0:
        return literal(bytes(rng.choice(list(b"abc"), size=int(rng.integers(1, 3)))))
    if kind == 1:
        lo = int(rng.integers(0, 3))
        return charset.utf8_node(((97 + lo, 97 + int(rng.integers(lo, 3))),))
    if kind == 2:
        return alt(*(_random_expression(rng, depth - 1) for _ in range(int(rng.integers(2, 4)))))
    if kind == 3:
        return seq(*(_random_expression(rng, depth - 1) for _ in range(int(rng.integers(2, 4)))))
    if kind == 4:
        lo = int(rng.integers(0, 3))
        hi = None if rng.random() < 0.3 else lo + int(rng.integers(0, 4))
        return rep(_random_expression(rng, depth - 1), lo, hi)
    return embed(to_dfa(_random_expression(rng, depth - 1), 256))


def test_subset_construction_cut_by_simulation_reaches_the_same_minimal_dfa():
    """The sets cut to the states no other of theirs simulates (the path a blown-up
    construction takes) give the same minimal DFA as the plain construction, on random
    expressions, and never more sets."""
    import numpy as np

    rng = np.random.default_rng(7)
    cut_some = 0
    for _ in range(250):
        node = _random_expression(rng, 4)
        nfa = fsa._Nfa()
        start, end = nfa.new(), nfa.new()
        nfa.build(node, start, end)
        sym_class, class_masks = fsa._symbol_classes(
            itertools.chain(nfa.sym_mask, (m for _, d, _ in nfa.blocks for m in d.class_masks)), 256)
        arrays, C = nfa.arrays(class_masks), len(class_masks)
        below, important = fsa._simulation(*arrays, C, end, 4096)
        assert below.shape[0] > 0
        none = np.zeros((0, 0), np.bool_), np.zeros(0, np.int64)
        results = []
        for pruning in (none, (below, important)):
            trans, accept, D = fsa._subsets(*arrays, C, start, end, *pruning, 10**6)
            assert D == accept.shape[0] > 0
            results.append((D, fsa.minimize(trans.reshape(D, C), accept, 0, sym_class, class_masks)))
        (plain_states, plain), (cut_states, cut) = results
        assert cut_states <= plain_states
        cut_some += cut_states < plain_states
        assert plain.n_states == cut.n_states
        assert (plain.trans == cut.trans).all() and (plain.accept == cut.accept).all()
        assert (plain.sym_class == cut.sym_class).all()
    assert cut_some > 25  # (the cut is not idle: the test checks something)


def test_a_pattern_whose_subset_construction_blows_up_compiles_or_is_refused_in_bounds(monkeypatch):
    """'.{0,14}x.{0,14}' makes 2**14 sets for a DFA of a few hundred states: the cut
    construction reaches it. A pattern whose minimal DFA is itself exponential is refused
    with the pattern's pointer once the construction passes its budget (lowered here)."""
    import re

    from agentloop.errors import AutomatonTooLarge, SchemaError
    from agentloop.grammar import byte_tokenizer, compile_schema

    tok = byte_tokenizer()
    g = compile_schema({"type": "string", "pattern": "^.{0,14}x.{0,14}$"}, tok, "json")
    for s in ("x", "é" * 14 + "x" + "b" * 14, "ab" * 7 + "x" + "b" * 15, "a" * 15 + "x", "abc", "x" * 29, "x" * 30):
        assert g.accepts_json(s) == bool(re.search("^.{0,14}x.{0,14}$", s)), s
    monkeypatch.setattr(fsa, "MAX_SUBSET_STATES", 20_000)
    monkeypatch.setattr(fsa, "_BLOWUP_STATES", 5_000)
    refused = r"pattern '\^\(a\|b\)\*a\(a\|b\)\{16\}\$'.* at '/properties/k/pattern'"
    with pytest.raises(AutomatonTooLarge, match=refused):
        compile_schema({"type": "object", "properties": {"k": {"type": "string", "pattern": "^(a|b)*a(a|b){16}$"}}},
                       tok, "json")
    assert issubclass(AutomatonTooLarge, SchemaError)


@pytest.mark.parametrize("as_tool", [False, True])
def test_an_automaton_too_large_names_the_nest_of_counted_repeats_that_grew_it(monkeypatch, as_tool):
    """A list of bounded strings is maxItems x maxLength counted characters, each several
    states: past the budget (lowered here) the error names that nest, outermost first,
    where it had named the root and blamed patterns the schema does not have."""
    from agentloop.errors import AutomatonTooLarge
    from agentloop.grammar import byte_tokenizer, compile_schema, compile_tools

    monkeypatch.setattr(fsa, "MAX_SUBSET_STATES", 20_000)
    monkeypatch.setattr(fsa, "_BLOWUP_STATES", 5_000)
    schema = {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 60},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "notes": {"type": "array", "items": {"type": "string", "maxLength": 60}, "maxItems": 40}}}
    where = "/tools/0/parameters" if as_tool else ""
    with pytest.raises(AutomatonTooLarge) as caught:
        if as_tool:
            compile_tools([{"name": "log", "parameters": schema}], byte_tokenizer(), "json")
        else:
            compile_schema(schema, byte_tokenizer(), "json")
    e = caught.value
    assert (e.keyword, e.pointer) == ("maxItems", f"{where}/properties/notes/maxItems")
    assert "maxItems 40 at '/properties/notes', maxLength 60 at '/properties/notes/items' (2,400 counted" in str(e)
    assert "grows past 20,000 states" in str(e) and "pattern" not in str(e)


def test_a_tools_pattern_too_large_keeps_its_own_pointer(monkeypatch):
    """A pattern's own blow-up is named where its DFA is built, with its pointer: a
    tool's compile took it for its value's too and blamed the string's maxLength."""
    from agentloop.errors import AutomatonTooLarge
    from agentloop.grammar import byte_tokenizer, compile_tools

    monkeypatch.setattr(fsa, "MAX_SUBSET_STATES", 20_000)
    monkeypatch.setattr(fsa, "_BLOWUP_STATES", 5_000)
    notes = {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 50}  # (2,000 counted)
    k = {"type": "string", "pattern": "^(a|b)*a(a|b){16}$"}
    parameters = {"type": "object", "properties": {"notes": notes, "k": k}}
    with pytest.raises(AutomatonTooLarge) as caught:
        compile_tools([{"name": "t", "parameters": parameters}], byte_tokenizer(), "json")
    assert caught.value.pointer == "/tools/0/parameters/properties/k/pattern", caught.value
