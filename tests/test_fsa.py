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
