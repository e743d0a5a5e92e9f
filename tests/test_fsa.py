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
