"""The token automaton against its definition: every token walked through the symbol DFA
from every state, by brute force."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from agentloop.grammar import compile_tools
from agentloop.grammar import token_automaton as ta_module

ROOT = Path(__file__).resolve().parents[1]
TOOLS = json.loads((ROOT / "agentloop/data/tool_schemas.json").read_text())


def _walk_every_token(dfa, vocab) -> np.ndarray:
    """(S, V): the DFA state after each token's symbols from each state, -1 where it dies
    (numpy over all states at once, token after token)."""
    S = dfa.trans.shape[0]
    out = np.full((S, vocab.size), -1, np.int64)
    for t, symbols in enumerate(vocab.token_symbols):
        if not symbols:
            continue
        cur = np.arange(S)
        for sym in symbols:
            nxt = np.full(S, -1, np.int64)
            ok = cur >= 0
            nxt[ok] = dfa.trans[cur[ok], dfa.sym_class[sym]]
            cur = nxt
        out[:, t] = cur
    return out


def _automaton_steps(ta) -> np.ndarray:
    """(S, V): the token automaton's next state for each (state, token), -1 where none."""
    dense = np.full((ta.n_states, ta.n_atoms + 1), -1, np.int64)  # last column: never allowed
    for e in range(ta.edge_src.shape[0]):
        g = ta.edge_group[e]
        dense[ta.edge_src[e], ta.group_atoms[ta.group_offsets[g]:ta.group_offsets[g + 1]]] = ta.edge_dst[e]
    return dense[:, np.where(ta.atom_of_token >= 0, ta.atom_of_token, ta.n_atoms)]


@pytest.mark.parametrize("n_tools,wide_table", [(1, False), (3, False), (3, True)])
def test_atoms_and_edges_are_the_dfa_walked_token_by_token(n_tools, wide_table, monkeypatch):
    """Each (state, token) step of the automaton is the DFA's walk of the token's symbols,
    and the atoms are exactly the classes of tokens that every state sends alike (no two
    atoms do the same everywhere). The bundled model's BPE tokenizer has tokens of many
    symbols, so the walk shares prefixes and skips dead ones, and the states outnumber
    the lanes walked side by side many times over."""
    if wide_table:  # the walk's table in int32, as for automata of 65k states or more
        monkeypatch.setattr(ta_module, "_UINT16_STATES", 0)
    tok = Tokenizer.from_file(str(ROOT / "agentloop/model/tokenizer.json"))
    g = compile_tools(TOOLS[:n_tools], tok, "gemma4")
    dfa, vocab = g.dfa, g.vocab
    ta = ta_module.build_token_automaton(dfa, vocab)  # (not the cached one)
    assert ta_module._walk_table(dfa)[0].dtype == (np.int32 if wide_table else np.uint16)
    assert ta.n_states > 4 * ta_module._LANES
    assert max(len(s) for s in vocab.token_symbols) > 4
    want = _walk_every_token(dfa, vocab)
    np.testing.assert_array_equal(_automaton_steps(ta), want)
    # atoms: the distinct columns of tokens some state takes
    alive = (want >= 0).any(axis=0)
    assert np.array_equal(ta.atom_of_token >= 0, alive)
    assert ta.n_atoms == np.unique(want[:, alive], axis=1).shape[1]
    # one edge per (state, next state), in that order; a group lists its atoms ascending
    pair = ta.edge_src.astype(np.int64) * ta.n_states + ta.edge_dst
    assert (np.diff(pair) > 0).all()
    for g in range(ta.group_offsets.shape[0] - 1):
        assert (np.diff(ta.group_atoms[ta.group_offsets[g]:ta.group_offsets[g + 1]]) > 0).all()
    members = {ta.group_atoms[a:b].tobytes() for a, b in zip(ta.group_offsets[:-1], ta.group_offsets[1:])}
    assert len(members) == ta.group_offsets.shape[0] - 1  # no two groups alike


def test_groups_found_by_hash_equal_the_exact_ones(monkeypatch):
    """Edges' atom sets are matched into groups by a hash and then checked member by
    member; where hashes collide (forced here: every hash 0) the exact path takes over
    and builds the same groups."""
    tok = Tokenizer.from_file(str(ROOT / "agentloop/model/tokenizer.json"))
    g = compile_tools(TOOLS[:3], tok, "gemma4")
    want = ta_module.build_token_automaton(g.dfa, g.vocab)
    rng = np.random.default_rng(0)
    atoms = np.sort(rng.integers(0, 6, size=(50, 3)), axis=1).ravel().astype(np.int32)
    starts = np.arange(0, 150, 3, dtype=np.int64)
    hashed = ta_module._groups(atoms, starts, starts + 3)
    monkeypatch.setattr(ta_module, "_segment_hashes", lambda values, s, e: np.zeros(s.shape[0], np.uint64))
    exact = ta_module._groups(atoms, starts, starts + 3)
    for a, b in zip(hashed, exact):
        np.testing.assert_array_equal(a, b)
    got = ta_module.build_token_automaton(g.dfa, g.vocab)
    for field in ("group_atoms", "group_offsets", "edge_src", "edge_dst", "edge_group", "atom_groups"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))


@pytest.mark.parametrize("targets", [5, 300])
def test_edges_by_destination_order_every_states_triples_by_next_state(targets):
    """A state's (state, atom, next state) triples come out sorted by (state, next state,
    atom), one edge per next state: gathered by scanning where a state has few next states
    (as every real grammar's have), sorted where it has more than ``_FEW_TARGETS``."""
    rng = np.random.default_rng(targets)
    src = np.sort(rng.integers(0, 40, 5000)).astype(np.int32)
    atom = np.concatenate([np.arange(c) for c in np.bincount(src)]).astype(np.int32)  # ascending in each state
    dst = rng.integers(0, targets, src.shape[0]).astype(np.int32)
    atoms, starts, ends, edge_src, edge_dst = ta_module._edges_by_destination(src, atom, dst)
    order = np.lexsort((atom, dst, src))
    assert np.array_equal(atoms, atom[order])
    pairs = np.unique(np.stack([src, dst], axis=1), axis=0)
    assert np.array_equal(edge_src, pairs[:, 0]) and np.array_equal(edge_dst, pairs[:, 1])
    assert starts[0] == 0 and np.array_equal(starts[1:], ends[:-1]) and ends[-1] == src.shape[0]
    assert all((src[order][s:e] == q).all() and (dst[order][s:e] == d).all()
               for s, e, q, d in zip(starts, ends, edge_src, edge_dst))
    many = np.array([len(np.unique(dst[src == s])) for s in np.unique(src)])
    assert (many > ta_module._FEW_TARGETS).all() if targets > 100 else (many <= ta_module._FEW_TARGETS).all()


def test_edges_lead_only_where_the_tokens_can_complete_a_value():
    """The symbol DFA is trimmed, but a tokenizer need not spell every path through it:
    with tokens '"', 'a', 'ab"' the value "ab" is '"' + 'ab"', and '"' + 'a' leaves 'b"',
    which no token spells. Partial canvases ended there (an uncased WordPiece did so on a
    capital letter), and no later canvas could go on. Edges into such states are dropped:
    the automaton is the DFA walked token by token, restricted to the states from which
    tokens reach an accepting one; and a language the tokens cannot complete at all is
    refused when compiled."""
    import torch
    from conftest import word_tokenizer

    from agentloop.errors import VocabularyError
    from agentloop.grammar import compile_schema

    tok = word_tokenizer(['"', "a", 'ab"', "x"])
    g = compile_schema({"enum": ["ab", "x"]}, tok)
    want = _walk_every_token(g.dfa, g.vocab)  # (S, V)
    completable = g.dfa.accept.copy()
    while True:  # (backwards to a fixed point, by brute force)
        grown = completable | ((want >= 0) & completable[np.maximum(want, 0)]).any(axis=1)
        if (grown == completable).all():
            break
        completable = grown
    assert not completable.all()
    leads_on = completable[np.maximum(want, 0)] & (want >= 0)
    np.testing.assert_array_equal(_automaton_steps(g.automaton), np.where(leads_on, want, -1))
    quote, a = tok.token_to_id('"'), tok.token_to_id("a")
    assert g.state_after([quote, a]) == -1
    x = torch.zeros(2, g.vocab.size)
    x[1, a] = 10.0
    for ids in (g.viterbi(x, partial=True), *g.sample(x.expand(50, 2, -1).contiguous(), partial=True,
                                                      generator=torch.Generator().manual_seed(0))):
        q = g.state_after(ids)
        assert q >= 0 and completable[q], ids
    assert g.marginals(x, partial=True).exp()[1, a] == 0.0
    with pytest.raises(VocabularyError, match="cannot spell any complete value"):
        compile_schema({"enum": ["ab"]}, word_tokenizer(['"', "a"]))


def test_forced_prefix_takes_no_token_that_leads_nowhere():
    """forced_prefix covers the text every value starts with by the longest tokens the
    automaton takes: '"a' is the longest start of '"ab"', but after it no token spells
    'b"'. With the edges into such states dropped it takes '"', then 'ab"'."""
    from conftest import word_tokenizer

    from agentloop.grammar import compile_schema

    tok = word_tokenizer(['"a', '"', 'ab"'])
    g = compile_schema({"const": "ab"}, tok)
    prefix = g.forced_prefix()
    assert [tok.id_to_token(i) for i in prefix[:2]] == ['"', 'ab"']
    assert g.is_complete(g.state_after(prefix))


def test_partial_canvases_prune_where_some_states_are_cut_off():
    """A state that no token enters or leaves (the edges into it dropped: the tokens
    cannot finish from it) is on no canvas. Pruning's table of the fewest tokens to
    finish required every state to step on for partial canvases, so such a state turned
    pruning off for every partial step (an uncased WordPiece's grammars: all of them).
    It is left out now; pruned and whole steps agree, and a canvas started at such a state
    is refused as before. (A character-level tokenizer without 'Q'.)"""
    import string

    import torch
    from conftest import word_tokenizer

    from agentloop.errors import NoValidCanvasError

    tok = word_tokenizer([c for c in string.printable if c != "Q"], _gemma4_specials())
    g = compile_tools(TOOLS[:3], tok, "gemma4")
    ta = g.automaton
    isolated = np.flatnonzero((np.bincount(ta.edge_dst, minlength=ta.n_states) == 0) & (np.diff(ta.src_offsets) == 0))
    assert isolated.size and g._to_finish(True) is not None
    L = 64
    x = torch.randn(2, L, g.vocab.size, generator=torch.Generator().manual_seed(5))
    for partial in (True, False):
        whole = g.denoise_step(x, torch.Generator().manual_seed(0), partial=partial, prune=False)
        kept = g.denoise_step(x, torch.Generator().manual_seed(0), partial=partial)
        assert kept.pruned == [True, True]
        assert kept.argmax == whole.argmax and kept.sample == whole.sample
        torch.testing.assert_close(kept.log_marginals.exp(), whole.log_marginals.exp(), rtol=0, atol=1e-9)
    with pytest.raises(NoValidCanvasError):
        g.viterbi(x[0], state=int(isolated[0]), partial=True)


def _gemma4_specials() -> tuple[str, ...]:
    import inspect

    from agentloop.grammar import byte_tokenizer

    return inspect.signature(byte_tokenizer).parameters["special_tokens"].default


@pytest.mark.parametrize("wire_format", ["gemma4", "json"])
def test_a_tool_the_tokenizer_cannot_spell_is_refused_by_name(wire_format):
    """A tool whose calls no token sequence spells used to vanish unseen: the automaton
    trims the states the tokens cannot finish from, the other tools keep the language
    non-empty, and the model never calls it (an uncased WordPiece and a ticker pattern
    ``^[A-Z]{1,5}$``: ``accepts_json`` said yes, as the symbols allow it). It is refused
    when compiled, naming the tool and whether its name or its values cannot be spelled,
    as one tool alone was refused already."""
    import string

    from conftest import word_tokenizer

    from agentloop.errors import VocabularyError
    from agentloop.grammar import compile_tools

    weather = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"], "additionalProperties": False}}
    ticker = {"name": "get_price", "parameters": {"type": "object", "properties": {
        "symbol": {"type": "string", "pattern": "^[A-Z]{1,5}$"}}, "required": ["symbol"], "additionalProperties": False}}
    uncased = word_tokenizer([c for c in string.printable if not c.isupper()], _gemma4_specials())
    g = compile_tools([weather], uncased, wire_format)  # (a tool it can spell)
    assert g.accepts_json([{"name": "get_weather", "arguments": {"city": "lima"}}])
    with pytest.raises(VocabularyError, match=r"tool 'get_price' \(/tools/1\): its tokens can begin a call but "
                                              r"never finish one"):
        compile_tools([weather, ticker], uncased, wire_format)
    # a name the tokens cannot spell ('Q' missing), and one they can, through tokens that
    # run past the name's end ('g{}': the prefix is checked token by token, not symbol by symbol)
    no_q = word_tokenizer([c for c in string.printable if c != "Q"], _gemma4_specials())
    quote = {**weather, "name": "getQuote"}
    call = "<|tool_call>call:getQuote{" if wire_format == "gemma4" else '[{"name":"getQuote"'
    with pytest.raises(VocabularyError, match=rf"tool 'getQuote' \(/tools/1\): no sequence of its tokens spells "
                                              rf"'{re.escape(call)}'"):
        compile_tools([weather, quote], no_q, wire_format)
    ping = {"name": "ping", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}
    if wire_format == "gemma4":
        straddling = word_tokenizer(["call:pin", "g{}"], _gemma4_specials())
        g = compile_tools([ping], straddling, wire_format, allow_text=False)
        ids = [straddling.token_to_id(t) for t in ("<|tool_call>", "call:pin", "g{}", "<tool_call|>",
                                                      "<|tool_response>")]
        assert g.parse(ids).calls[0].name == "ping"
        with pytest.raises(VocabularyError, match=r"tool 'pong' \(/tools/1\): no sequence"):
            compile_tools([ping, {**ping, "name": "pong"}], straddling, wire_format, allow_text=False)


def test_the_tool_check_finds_what_the_automaton_allows(monkeypatch):
    """``spells_prefix`` against a brute force: over tiny vocabularies of pieces of two
    tools' calls (some running past a name's end), a tool passes the check exactly where
    some sequence of up to four tokens spells a whole call of it (the grammar compiled
    with the check off, each call parsed)."""
    import itertools
    import random

    from conftest import word_tokenizer

    import agentloop.grammar as grammar
    from agentloop.errors import VocabularyError
    from agentloop.grammar.token_automaton import spells_prefix

    monkeypatch.setattr(grammar, "spells_prefix", lambda *args: (True, True))
    monkeypatch.setenv("AGENTLOOP_CACHE_DIR", "off")  # (unchecked grammars stay out of the caches)
    pieces = ["call:", "ab", "a", "b{", "{", "}", "b{}", "ac{", "c", "call:a", "{}"]
    tools = [{"name": n, "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}
             for n in ("ab", "ac")]
    rng = random.Random(0)
    seen = set()
    for _ in range(60):
        vocab = rng.sample(pieces, rng.randint(2, len(pieces)))
        tok = word_tokenizer(vocab, _gemma4_specials())
        grammar._grammar_cache.clear()
        try:
            g = grammar.compile_tools(tools, tok, "gemma4", allow_text=False, parallel_calls=False)
        except VocabularyError:  # (neither tool: nothing at all to spell)
            g = None
        ids = [tok.token_to_id(t) for t in vocab]
        head = tok.token_to_id("<|tool_call>")
        tail = [tok.token_to_id("<tool_call|>"), tok.token_to_id("<|tool_response>")]
        called = {g.parse([head, *seq, *tail]).calls[0].name for n in range(1, 5)
                  for seq in itertools.product(ids, repeat=n) if g is not None and g.accepts([head, *seq, *tail])}
        for tool in tools:
            prefix = grammar._call_prefix(grammar.load_wire_format("gemma4"), tool["name"])
            completes = g is not None and spells_prefix(g.automaton, g.dfa, g.vocab, prefix)[0]
            assert completes == (tool["name"] in called), (vocab, tool["name"])
            seen.add(completes)
    grammar._grammar_cache.clear()
    assert seen == {True, False}
