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
