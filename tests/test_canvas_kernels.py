"""The compiled pieces under the canvas DP, each against its definition: the float32 exp
and order keys, the Viterbi-only scan, token sampling inside a large atom, the edge
layout in runs and fans, the dense passes against the live-list ones, and the passes on
numba's threads (the same step on any number of them; concurrent calls under numba's
workqueue layer)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agentloop.grammar import canvas as dp
from agentloop.grammar import compile_tools
from agentloop.grammar.canvas_layout import MIN_RUN
from agentloop.grammar.float32_math import exp_nonpositive, key_to_bits, order_key

TOOLS = json.loads((Path(__file__).parents[1] / "agentloop/data/tool_schemas.json").read_text())


def test_exp_is_within_two_ulp_and_flushes_below_the_normal_range():
    d = np.concatenate([-np.random.default_rng(0).random(200_000) * 87.0, [0.0, -1e-30, -87.0]]).astype(np.float32)
    got = np.array([exp_nonpositive(v) for v in d[:2000]] + [exp_nonpositive(v) for v in d[-3:]], np.float64)
    want = np.exp(np.concatenate([d[:2000], d[-3:]]).astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 2 * 2.0**-23
    assert exp_nonpositive(np.float32(0.0)) == 1.0
    assert exp_nonpositive(np.float32(-87.5)) == 0.0 and exp_nonpositive(np.float32(-np.inf)) == 0.0
    assert np.isnan(exp_nonpositive(np.float32(np.nan))) and np.isnan(exp_nonpositive(np.float32(np.inf)))


def test_order_keys_sort_like_the_floats_and_put_nan_above_all():
    x = np.array([-np.inf, -3e38, -1.5, -1e-45, -0.0, 0.0, 1e-45, 2.0, 3e38, np.inf], np.float32)
    keys = [order_key(b) for b in x.view(np.int32)]
    assert all(a < b for a, b in zip(keys, keys[1:]))  # strictly: -0.0 just below 0.0
    assert [key_to_bits(k) for k in keys] == x.view(np.int32).tolist()
    assert all(order_key(b) > keys[-1] for b in np.array([np.nan, -np.nan], np.float32).view(np.int32))


def test_viterbi_scan_never_takes_a_nan_for_an_atom_best():
    """Both Viterbi scans: the gathered one (vocabularies under 8k) and the one in token
    order (``_max_atoms``, larger ones); atoms of one token and of several."""
    atom_of = np.array([0, 0, 1, 1, -1, 2], np.int32)
    x = np.array([[np.nan, 1.0, -np.nan, -np.inf, 9.0, np.nan], [2.0, 2.0, 3.0, np.nan, np.nan, 0.5]], np.float32)
    _, _, _, amax, aarg = dp.reduce_atoms(x, dp.sorted_atoms(atom_of, 3), False, False)
    in_order = np.full((2, 3), -np.inf, np.float32), np.full((2, 3), -1, np.int32)
    dp._max_atoms(x, atom_of, *in_order)
    for got, arg in ((amax, aarg), in_order):
        assert got.tolist() == [[1.0, -np.inf, -np.inf], [2.0, 3.0, 0.5]]
        assert arg.tolist() == [[1, -1, -1], [0, 2, 5]]  # ties: the lowest token; no usable logit: -1


def test_scan_of_one_token_atoms_equals_the_definition():
    """Atoms of one token skip the scan's loops: the same maxima, tokens and sums as the
    definition, 0 for a -inf logit, nan sums for a nan or +inf one (the caller names it)."""
    atom_of = np.array([0, 1, 2, 3, 3, -1, 4], np.int32)  # atom 3: two tokens, the others one
    x = np.array([[0.5, -np.inf, 2.0, 1.0, 1.0, 9.0, -3.0],
                  [np.nan, 1.0, np.inf, 0.0, -1.0, 0.0, 2.0]], np.float32)
    atoms = dp.sorted_atoms(atom_of, 5)
    block_sums = np.empty((2, atoms.blocks[-1]), np.float32)
    rowmax, asum, asumx, amax, aarg = dp.reduce_atoms(x, atoms, True, True, block_sums)
    assert rowmax.tolist() == [2.0, 2.0]  # the best finite allowed logit (token 5 is never allowed)
    assert amax[0].tolist() == [0.5, -np.inf, 2.0, 1.0, -3.0]
    assert aarg[0].tolist() == [0, -1, 2, 3, 6]
    assert aarg[1].tolist() == [0, 1, 2, 3, 6] and np.isnan(amax[1, 0]) and amax[1, 2] == np.inf
    e = np.exp
    assert asum[0] == pytest.approx([e(-1.5), 0.0, 1.0, 2 * e(-1.0), e(-5.0)], rel=1e-6)
    assert asumx[0] == pytest.approx([-1.5 * e(-1.5), 0.0, 0.0, -2 * e(-1.0), -5 * e(-5.0)], rel=1e-6)
    assert block_sums.shape == (2, 0)  # atoms of a few tokens (atom 3) have no blocks, nor have one-token atoms
    assert np.isnan(asum[1, [0, 2]]).all() and np.isnan(asumx[1, [0, 2]]).all()
    assert asum[1, [1, 3, 4]] == pytest.approx([e(-1.0), e(-2.0) + e(-3.0), 1.0], rel=1e-6)


def test_scan_of_few_token_atoms_near_and_far_below_the_row_best():
    """An atom of a few tokens adds up its float32 terms exp(x - rowmax) where its best
    lies within _FAR of the row's best (a term float32 flushes there is left out: < 2**-53
    of the atom's best); farther down its sums are taken around its own best, so an atom
    95 nats down (below float32's exp range) keeps its value."""
    atom_of = np.array([0, 0, 0, 1, 1, 2, 2, 3, 4, 4], np.int32)
    x = np.array([[0.0, -100.0, -1.0, -95.0, -96.5, -30.0, -120.0, 0.5, -np.inf, -np.inf]], np.float32)
    atoms = dp.sorted_atoms(atom_of, 5)
    assert atoms.n_few == 4 and atoms.singles.tolist() == [3]
    rowmax, asum, asumx, amax, aarg = dp.reduce_atoms(x, atoms, True, True)
    assert rowmax.tolist() == [0.5] and aarg[0].tolist() == [0, 3, 5, 7, -1] and amax[0, 4] == -np.inf
    d = x[0].astype(np.float64) - 0.5
    for k in range(4):
        terms = d[atom_of == k]
        assert asum[0, k] == pytest.approx(np.exp(terms).sum(), rel=1e-6, abs=0.0)
        assert asumx[0, k] == pytest.approx((np.exp(terms) * terms).sum(), rel=1e-6, abs=0.0)
    assert asum[0, 4] == 0.0 and asumx[0, 4] == 0.0


def test_scan_of_atoms_far_below_the_row_best_as_a_sure_model_puts_them():
    """One token far ahead of the rest (a model sure of it, or a low temperature): atoms
    of a few tokens 50-130 nats down add up float32 terms from a reference 80 nats lower
    (one loop for them all), those further down go around their own best, one-token
    atoms that float32 flushes are taken in float64 (to e^-708; 0 below). Every sum
    against float64's, to float32's rounding of x - ref (~|x - ref| * 6e-8)."""
    rng = np.random.default_rng(3)
    K1, n_few, size = 40, 30, 6  # one-token atoms 0..39, few-token atoms 40..69 of 6 tokens
    atom_of = np.concatenate([np.arange(K1), np.repeat(np.arange(K1, K1 + n_few), size)]).astype(np.int32)
    V = atom_of.shape[0]
    x = np.empty((3, V), np.float32)
    for r, (lo, hi) in enumerate([(-60.0, -135.0), (-150.0, -400.0), (-200.0, -760.0)]):
        x[r] = rng.uniform(hi, lo, V).astype(np.float32) + rng.normal(0.0, 0.3, V).astype(np.float32)
        x[r, rng.integers(K1)] = 3.25  # the sure token (a one-token atom's)
    atoms = dp.sorted_atoms(atom_of, K1 + n_few)
    assert atoms.n_few == n_few and atoms.singles.shape[0] == K1
    rowmax, asum, asumx, _, _ = dp.reduce_atoms(x, atoms, True, True)
    assert rowmax.tolist() == [3.25] * 3
    d = x.astype(np.float64) - 3.25
    for r in range(3):
        for k in range(K1 + n_few):
            terms = d[r, atom_of == k]
            terms = terms[terms > -708.0]  # (float64's exp ends there: an atom below it sums to 0)
            tol = 6e-8 * 90.0 * 2  # |x - ref| <= ~87 for a term that counts, two roundings
            assert asum[r, k] == pytest.approx(np.exp(terms).sum(), rel=tol, abs=0.0), (r, k)
            assert asumx[r, k] == pytest.approx((np.exp(terms) * terms).sum(), rel=tol, abs=0.0), (r, k)
    assert (asum[2, :K1] == 0.0).any() and (asum[2, :K1] > 0.0).any()  # some one-token atoms below e^-708


@pytest.mark.parametrize("want", [(False, False), (True, False), (True, True)])
def test_scan_writes_one_token_atoms_alike_in_either_numbering(want):
    """Token automata number their one-token atoms first, and the scan writes their
    statistics as runs; any other numbering takes the scattered stores. Both give the
    same values, atom for atom, terms float32 flushes (100-700 nats down) included."""
    rng = np.random.default_rng(5)
    V, K = 700, 120
    atom_of = np.full(V, -1, np.int32)
    atom_of[:90] = np.arange(90)  # atoms 0-89 of one token each (most, as in a tool grammar) ...
    several = rng.random(V - 90) < 0.5
    atom_of[90:][several] = rng.integers(90, K, several.sum())  # ... 90-119 of several
    atom_of = np.where(atom_of >= 0, rng.permutation(K)[atom_of], -1).astype(np.int32)  # numbered at random
    x = rng.normal(0.0, 3.0, (9, V)).astype(np.float32)
    x[:, rng.random(V) < 0.2] -= rng.uniform(100.0, 700.0)  # below float32's exp range
    x[4, 7] = -np.inf
    count = np.bincount(atom_of[atom_of >= 0], minlength=K)
    order = np.concatenate([np.flatnonzero(count == 1), np.flatnonzero(count != 1)])
    first = np.empty(K, np.int64)
    first[order] = np.arange(K)
    runs = dp.sorted_atoms(np.where(atom_of >= 0, first[atom_of], -1).astype(np.int32), K)
    scattered = dp.sorted_atoms(atom_of, K)
    assert (runs.singles == np.arange(runs.singles.size)).all() and not (
        scattered.singles == np.arange(scattered.singles.size)).all()
    a = dp.reduce_atoms(x, runs, *want)
    b = dp.reduce_atoms(x, scattered, *want)
    np.testing.assert_array_equal(a[0], b[0])
    for got, ref in zip(a[1:], b[1:]):
        if got.shape[1] == K:
            np.testing.assert_array_equal(got, ref[:, order])
    if want[0]:
        assert (a[1] > 0).sum() > (a[1] > 1e-38).sum()  # some one-token terms were taken in float64


def test_sorted_atoms_list_the_atoms_of_a_few_tokens_after_the_singles():
    """The scan takes the atoms of 2.._FEW tokens term by term: their tokens lie right
    after the one-token atoms' (perm[K1:terms]), and they have no blocks of sums."""
    rng = np.random.default_rng(8)
    sizes = [1] * 30 + [2, 5, dp._FEW, dp._FEW + 1, 300, 0] + list(rng.integers(2, 3 * dp._FEW, 20))
    atom_of = np.concatenate([np.full(n, k, np.int32) for k, n in enumerate(sizes)] + [np.full(7, -1, np.int32)])
    atom_of = atom_of[rng.permutation(atom_of.size)]
    K = len(sizes)
    atoms = dp.sorted_atoms(atom_of, K)
    count = np.bincount(atom_of[atom_of >= 0], minlength=K)
    few = atoms.others[:atoms.n_few]
    assert sorted(few.tolist()) == np.flatnonzero((count > 1) & (count <= dp._FEW)).tolist()
    assert ((count[atoms.others[atoms.n_few:]] == 0) | (count[atoms.others[atoms.n_few:]] > dp._FEW)).all()
    K1 = atoms.singles.size
    assert atoms.lo[few].min() == K1 and atoms.hi[few].max() == atoms.terms == K1 + count[few].sum()
    for k in range(K):
        assert (atom_of[atoms.perm[atoms.lo[k]:atoms.hi[k]]] == k).all() and atoms.hi[k] - atoms.lo[k] == count[k]
        assert atoms.blocks[k + 1] - atoms.blocks[k] == (0 if count[k] <= dp._FEW else -(-count[k] // dp._BLOCK))


@pytest.mark.parametrize("V", [40, 1500])
def test_token_sampling_inside_an_atom_follows_the_logits(V):
    """One atom of 1500 tokens (6 blocks of the scan's sums), or of 40 (few tokens: no
    block sums, its weights give the total): 200k draws at one position, total variation
    to exp(x) / sum < 0.03 (the expected TV of 200k draws over 1500 outcomes with this
    spread is ~0.02; a sampler off by one block is off by > 0.1)."""
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1.5, V).astype(np.float32)
    n = 200_000
    rows = np.repeat(x[None], n, axis=0)
    atoms = dp.sorted_atoms(np.zeros(V, np.int32), 1)
    block_sums = np.empty((1, atoms.blocks[-1]), np.float32)
    _, _, _, amax, aarg = dp.reduce_atoms(rows[:1], atoms, True, False, block_sums)
    rep = lambda a: np.repeat(a, n, axis=0)  # noqa: E731
    tokens = dp._sample_tokens(rows, rep(amax), rep(aarg), rep(block_sums), np.zeros(n, np.int32), atoms.perm,
                               atoms.lo, atoms.hi, atoms.blocks, rng.random((n, 3)))
    p = np.exp(x.astype(np.float64) - x.max())
    p /= p.sum()
    tv = 0.5 * np.abs(np.bincount(tokens, minlength=V) / n - p).sum()
    assert tv < 0.03, tv


@pytest.mark.parametrize("n_tools", [1, 5])
def test_layout_holds_every_edge_once_and_runs_and_fans_are_so(btok, n_tools):
    g = compile_tools(TOOLS[:n_tools], btok, "json")
    ta = g.automaton
    lay = g._layout
    S, E = ta.n_states, ta.n_edges
    assert np.array_equal(lay.rank[lay.state], np.arange(S))
    want = sorted(zip(ta.edge_src.tolist(), ta.edge_dst.tolist(), ta.edge_group.tolist()))
    got = sorted(zip(lay.state[lay.src].tolist(), lay.state[lay.dst].tolist(), lay.group.tolist()))
    assert got == want
    for r in range(len(lay.runs) - 1):  # a run: rows up by one on both ends, one group
        a, b = lay.runs[r], lay.runs[r + 1]
        assert b - a >= MIN_RUN
        assert np.all(np.diff(lay.src[a:b]) == 1) and np.all(np.diff(lay.dst[a:b]) == 1)
        assert np.all(lay.group[a:b] == lay.group[a])
    assert lay.fans[0] == lay.runs[-1]
    for f in range(len(lay.fans) - 1):  # a fan: consecutive source rows into one row, one group
        a, b = lay.fans[f], lay.fans[f + 1]
        assert b - a >= MIN_RUN
        assert np.all(np.diff(lay.src[a:b]) == 1)
        assert np.all(lay.dst[a:b] == lay.dst[a]) and np.all(lay.group[a:b] == lay.group[a])
    assert len(lay.fans) > 1  # (a string's closing quote, from each of its counts)
    single = np.arange(lay.fans[-1], E)
    # the single edges, by source row for the backward pass and by destination row for the
    # forward pass, dealt out in turns: each row's edges in the automaton's order, every
    # row's first, then every row's second...
    edge_id = {(s, g): e for e, (s, g) in enumerate(zip(ta.edge_src.tolist(), ta.edge_group.tolist()))}
    for rows, srcs, groups in ((lay.src[single], lay.src[single], lay.group[single]),
                               (lay.in_row, lay.in_other, lay.in_group)):
        ids = np.array([edge_id[s, g] for s, g in zip(lay.state[srcs].tolist(), groups.tolist())])
        turn = np.zeros(rows.shape[0], np.int64)
        seen: dict[int, int] = {}
        for i, r in enumerate(rows.tolist()):
            turn[i] = seen.get(r, 0)
            seen[r] = turn[i] + 1
        assert np.all(np.diff(turn) >= 0)
        same_turn = np.diff(turn) == 0
        assert np.all(np.diff(rows)[same_turn] > 0)
        for r in np.unique(rows):
            assert np.all(np.diff(ids[rows == r]) > 0)
    assert turn.max() > 0  # (some row has more than one single edge, or the check says little)
    by_dst = sorted(zip(lay.in_other.tolist(), lay.in_row.tolist(), lay.in_group.tolist()))
    assert by_dst == sorted(zip(lay.src[single].tolist(), lay.dst[single].tolist(), lay.group[single].tolist()))
    # the string counters (maxLength) are what runs are for: most edges lie on them
    assert lay.runs[-1] > 0.6 * E, (lay.runs[-1], E)


def test_counters_with_two_sources_per_step_still_lay_out_in_runs(btok):
    """A hostname label counts up to 63 characters, and each count is entered from two
    states (after a letter, after a hyphen) by the same letters: the counter's chain
    follows the longest path of them, so that its edges still form runs (before: every
    state a chain of its own, no edge in a run)."""
    from agentloop.grammar import compile_schema

    g = compile_schema({"type": "string", "format": "email"}, btok, "json")
    lay = g._layout
    chain_rows = np.flatnonzero(np.diff(lay.src[:lay.runs[-1]]) == 1)
    assert lay.runs[-1] > 0.7 * g.automaton.n_edges, (lay.runs[-1], g.automaton.n_edges)
    assert chain_rows.size > 60


@pytest.mark.parametrize("partial", [False, True])
def test_the_support_holds_exactly_the_states_on_some_valid_canvas(btok, partial):
    """The live states per position, from the layout's runs, fans and single edges,
    against their definition in sets: reached from the start in exactly l tokens, and
    reaching an end in exactly L - l more."""
    g = compile_tools(TOOLS[:3], btok, "gemma4")
    assert len(g._layout.fans) > 1
    ta = g.automaton
    edges = list(zip(ta.edge_src.tolist(), ta.edge_dst.tolist()))
    final = g._final(partial)
    mid = g.state_after(btok.encode("<|tool_call>call:get_weather{", add_special_tokens=False).ids)
    for start, L in ((g.start_state, 30), (mid, 12)):
        reach = [{start}]
        for _ in range(L):
            reach.append({d for s, d in edges if s in reach[-1]})
        live = [set() for _ in range(L + 1)]
        live[L] = {s for s in reach[L] if final[s]}
        for l in range(L - 1, -1, -1):
            live[l] = {s for s, d in edges if s in reach[l] and d in live[l + 1]}
        sup = dp.support(g._layout, start, final, L, "live")  # (lists are made for the live-list passes)
        assert sup.offsets.tolist() == [0] + np.cumsum([len(x) for x in live]).tolist()
        assert sup.states.tolist() == [s for x in live for s in sorted(x)]
        dense = dp.support(g._layout, start, final, L, "dense")
        assert dense.dense and not sup.dense and dense.states.size == 0
        for l in range(L + 1):
            for mask in (sup.live, dense.live):
                assert set(g._layout.state[np.flatnonzero(mask[l])].tolist()) == live[l]
        assert sum(map(len, live)) > 2 * (L + 1)  # (not a trivial support)
        # each run clipped, at each position, to its first and last edge live at both ends
        lay = g._layout
        clipped = 0
        for r in range(len(lay.runs) - 1):
            e = np.arange(lay.runs[r], lay.runs[r + 1])
            for l in range(L):
                ends = [j for j, (s, d) in enumerate(zip(lay.state[lay.src[e]], lay.state[lay.dst[e]]))
                        if s in live[l] and d in live[l + 1]]
                want = (ends[0], ends[-1] + 1) if ends else (0, 0)
                assert tuple(dense.clip[l, r]) == want, (r, l)
                clipped += want[1] - want[0] < len(e)
        assert clipped and sup.clip.size == 0  # (some runs are clipped; the live-list passes have none)


def test_the_dense_passes_run_where_they_pay(btok, monkeypatch):
    """Small automata always take the dense passes; large ones only where most of their
    (position, state) pairs live (measured: 66% live, dense faster; 17%, slower)."""
    from agentloop.grammar.compiled import CompiledGrammar

    S, L = dp.DENSE_MAX_STATES + 1, 9
    counts = lambda share: np.concatenate([[0], np.cumsum(np.full(L + 1, share * S))])  # noqa: E731
    assert dp.dense_pays(dp.DENSE_MAX_STATES, counts(0.0))
    assert dp.dense_pays(S, counts(dp.DENSE_MIN_LIVE)) and not dp.dense_pays(S, counts(dp.DENSE_MIN_LIVE - 0.01))
    g = compile_tools(TOOLS[:2], btok, "gemma4")
    assert g._support(24, g.start_state, False).dense
    monkeypatch.setattr(dp, "DENSE_MAX_STATES", 0)
    share = g._support(24, g.start_state, False).offsets[-1] / (g.automaton.n_states * 25)
    monkeypatch.setattr(dp, "DENSE_MIN_LIVE", share + 0.01)
    g._support_cache.clear()
    assert not g._support(24, g.start_state, False).dense
    monkeypatch.setattr(CompiledGrammar, "_canvas_pass_kind", "dense")
    assert g._support(24, g.start_state, False).dense


def test_the_dense_passes_agree_with_the_live_lists(btok, monkeypatch):
    """The dense passes pull most edges as slices of rows (runs and fans, see
    canvas_layout); the live-list passes pull every edge one by one from the automaton's
    own lists. On tools whose counted strings make both runs and fans, a step gives the
    same Viterbi canvas and sample either way, and the same marginals and entropies to
    rounding; so do the separate calls (on one thread, alpha and the factors come from one
    sweep; on more, from passes of their own: the threads test compares those). Over the
    whole support (``prune=False``: pruning runs the lists on the cells it keeps)."""
    import torch

    from agentloop.grammar.compiled import CompiledGrammar

    g = compile_tools(TOOLS[:3], btok, "gemma4")
    lay = g._layout
    assert lay.fans[-1] - lay.fans[0] > 100 and lay.runs[-1] > 0.6 * len(lay.src)
    # from inside a call, the canvas free to end mid-call: the strings open and close in
    # it (from the start, 48 byte tokens hold no whole call, only a text answer)
    mid = g.state_after(btok.encode("<|tool_call>call:get_weather{", add_special_tokens=False).ids)
    x = torch.randn(2, 48, g.vocab.size, generator=torch.Generator().manual_seed(3)) * 3
    # a canvas that closes its strings (by fans' edges), made the most likely one
    target = btok.encode('city:<|"|>Paris<|"|>,days:3}<tool_call|><|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}'
                         '<tool_call|><|tool_call>', add_special_tokens=False).ids
    assert len(target) == 48 and g.state_after(target, mid) >= 0
    likely = x.clone()
    likely[:, torch.arange(48), torch.tensor(target)] += 30.0
    got = {}
    for kind in ("dense", "live"):
        monkeypatch.setattr(CompiledGrammar, "_canvas_pass_kind", kind)
        assert g._support(48, mid, True).dense == (kind == "dense")
        step = g.denoise_step(x, torch.Generator().manual_seed(0), state=mid, partial=True, prune=False)
        got[kind] = (step.argmax, step.sample, step.log_marginals.numpy(), step.entropy.numpy(),
                     g.viterbi(likely, state=mid, partial=True, prune=False),
                     g.sample(x, torch.Generator().manual_seed(4), state=mid, partial=True, prune=False),
                     g.marginals(x, state=mid, partial=True, prune=False).numpy())
    dense, live = got["dense"], got["live"]
    quote = btok.token_to_id('<|"|>')
    assert np.exp(live[2][..., quote]).sum() > 1.0  # (strings close: the fans' edges carry weight)
    assert live[4] == [target, target]
    assert dense[0] == live[0] and dense[1] == live[1]
    np.testing.assert_allclose(dense[2], live[2], rtol=1e-5, atol=1e-5)  # (float32 log-probs; -inf alike)
    np.testing.assert_allclose(dense[3], live[3], rtol=1e-9, atol=1e-12)
    assert dense[4] == live[4] and dense[5] == live[5]
    np.testing.assert_allclose(dense[6], live[6], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device_passes", [False, True])
def test_an_infinite_logit_at_an_allowed_token_is_named_like_a_nan(btok, monkeypatch, device_passes):
    """+inf at an allowed token has no finite distribution to give: the host pass and the
    device passes (whose torch ops sum it to inf, not nan) refuse it with the position, as
    they do nan."""
    import torch

    from agentloop.errors import GrammarInputError
    from agentloop.grammar import compile_schema
    from agentloop.grammar.compiled import CompiledGrammar

    monkeypatch.setattr(CompiledGrammar, "_device_passes_on_cpu", device_passes)
    g = compile_schema({"enum": [1, 2]}, btok)
    x = torch.randn(2, 4, g.vocab.size)
    x[1, 0, btok.token_to_id("1")] = float("inf")
    with pytest.raises(GrammarInputError, match="nan or \\+inf at a token the grammar allows somewhere on a canvas "
                                                 r"\(at canvas 1 position 0; 1 position\(s\) in all; the first at token"):
        g.marginals(x)


def _step_outputs(g, x, seed=0, prune=True):
    import torch

    step = g.denoise_step(x, torch.Generator().manual_seed(seed), prune=prune)
    return step.argmax, step.sample, step.log_marginals.numpy().copy(), step.entropy.numpy().copy()


@pytest.mark.parametrize("prune", [False, True])
@pytest.mark.parametrize("messages", ["dense", "live lists"])
@pytest.mark.parametrize("scale", [3.0, 3000.0])
def test_the_step_is_the_same_on_any_number_of_threads(btok, monkeypatch, messages, scale, prune):
    """The vocabulary passes split their rows across numba's threads (each row computed
    alone), denoise_step runs the Viterbi pass beside the others, and the live-list
    passes cut each position's states into a fixed number of chunks whose sums are added
    in order: the step is the same to the bit with one thread or many (a batch of 3
    canvases makes the shares uneven), over the whole support and over the cells pruning
    keeps (lists, on threads here too). So are the log-space passes that logits
    N(0, 3000) take (log_canvas: chunks of states too)."""
    import numba
    import torch

    from agentloop.grammar import log_canvas
    from agentloop.grammar.compiled import CompiledGrammar

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread on this machine (NUMBA_NUM_THREADS)")
    monkeypatch.setattr(dp, "LIVE_THREADED_MIN", 0)  # (the lists' threaded kernels run from this many states)
    if messages == "live lists":
        monkeypatch.setattr(CompiledGrammar, "_canvas_pass_kind", "live")
    else:  # the dense log-space passes cut their rows into chunks for the threads from this size
        monkeypatch.setattr(log_canvas, "THREADED_MIN_STATES", 0)
    g = compile_tools(TOOLS[:3], btok, "gemma4")
    x = torch.randn(3, 40, g.vocab.size, generator=torch.Generator().manual_seed(1)) * scale
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _step_outputs(g, x, prune=prune)
        one_ops = (g.viterbi(x, prune=prune), g.sample(x, torch.Generator().manual_seed(2), prune=prune),
                   g.marginals(x, prune=prune).numpy())
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = _step_outputs(g, x, prune=prune)
        many_ops = (g.viterbi(x, prune=prune), g.sample(x, torch.Generator().manual_seed(2), prune=prune),
                    g.marginals(x, prune=prune).numpy())
    finally:
        numba.set_num_threads(before)
    assert g._support(40, g.start_state, False).dense == (messages == "dense")
    assert one[0] == many[0] and one[1] == many[1]
    np.testing.assert_array_equal(one[2], many[2])
    np.testing.assert_array_equal(one[3], many[3])
    assert one_ops[:2] == many_ops[:2]
    np.testing.assert_array_equal(one_ops[2], many_ops[2])


def test_the_passes_clear_the_message_buffers_they_reuse(btok):
    """A step's passes fill reused buffers (``MessageBuffers``) row by row: whatever the
    last step left there (nan here) changes nothing. (``prune=False``: the dense passes
    over the whole support, which use the buffers.)"""
    import torch

    g = compile_tools(TOOLS[:1], btok, "gemma4")
    x = torch.randn(40, g.vocab.size, generator=torch.Generator().manual_seed(1)) * 3
    want = g.denoise_step(x, torch.Generator().manual_seed(0), prune=False)

    def spoil() -> None:  # (the set the next op takes: the one the last gave back)
        with dp.MESSAGES.taken():
            for p in (dp.VITERBI, dp.ALPHA, dp.BETA):
                dp.MESSAGES.get(p, 41, g.automaton.n_states)[:] = np.nan

    for op in (lambda: g.viterbi(x, prune=False), lambda: g.sample(x, torch.Generator().manual_seed(0), prune=False),
               lambda: g.marginals(x, prune=False)):
        spoil()
        op()
    spoil()
    got = g.denoise_step(x, torch.Generator().manual_seed(0), prune=False)
    assert got.argmax == want.argmax == g.viterbi(x, prune=False) and got.sample == want.sample
    assert torch.equal(got.log_marginals, want.log_marginals) and torch.equal(got.entropy, want.entropy)


def test_threads_stepping_one_grammar_at_once_keep_their_own_messages(btok):
    """Each op takes a set of the dense passes' message buffers for as long as it runs
    (``MessageBuffers``): four threads stepping one grammar at once, each on its own
    logits, get what one thread gets, and the sets kept afterwards are no more than the
    ops that ran at once; one op after another reuses one set."""
    import threading

    import torch

    g = compile_tools(TOOLS[:2], btok, "gemma4")
    xs = [torch.randn(48, g.vocab.size, generator=torch.Generator().manual_seed(s)) * 3 for s in range(4)]
    want = [g.denoise_step(x, torch.Generator().manual_seed(0), prune=False) for x in xs]
    got: list[list] = [[] for _ in xs]

    def worker(i: int) -> None:
        for _ in range(8):
            got[i].append(g.denoise_step(xs[i], torch.Generator().manual_seed(0), prune=False))

    sets = len(dp.MESSAGES)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w, outs in zip(want, got):
        assert len(outs) == 8
        for o in outs:
            assert o.argmax == w.argmax and o.sample == w.sample
            assert torch.equal(o.log_marginals, w.log_marginals) and torch.equal(o.entropy, w.entropy)
    assert max(sets, 1) <= len(dp.MESSAGES) <= max(sets, 1) + 3  # (at most four ops ran at once)
    with dp.MESSAGES.taken():
        beta = dp.MESSAGES.get(dp.BETA, 49, g.automaton.n_states)
    for x in xs:  # one op after another: the same set, the same arrays
        g.denoise_step(x, torch.Generator().manual_seed(0), prune=False)
        with dp.MESSAGES.taken():
            assert np.shares_memory(dp.MESSAGES.get(dp.BETA, 49, g.automaton.n_states), beta)


_CONCURRENT_CALLS = """
import sys, threading
import numba, torch
from agentloop.grammar import byte_tokenizer, canvas, compile_tools
from agentloop.grammar.compiled import CompiledGrammar
from agentloop.engine.sampling import fused_draw
import json
tools = json.loads(open(sys.argv[1]).read())[:2]
dense = compile_tools(tools, byte_tokenizer(), "gemma4")
live = compile_tools(tools[::-1], byte_tokenizer(), "gemma4")  # another object (compiles are cached)
live._canvas_pass_kind = "live"  # the live-list passes
canvas.LIVE_THREADED_MIN = 0  # ... on numba's threads
x = torch.randn(32, dense.vocab.size, generator=torch.Generator().manual_seed(0)) * 3
step = lambda g: g.denoise_step(x, torch.Generator().manual_seed(0), prune=False)  # the whole support's passes
want = {id(g): step(g).argmax for g in (dense, live)}
errors = []
def worker():
    try:
        for _ in range(10):
            for g in (dense, live):
                assert step(g).argmax == want[id(g)]
            fused_draw(x[None].clone(), 0.7, torch.Generator().manual_seed(0))
    except Exception as e:  # reported below
        errors.append(repr(e))
threads = [threading.Thread(target=worker) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
assert dense is not live and live._support(32, live.start_state, False).states.size
assert not live._support(32, live.start_state, False).dense and dense._support(32, dense.start_state, False).dense
print(numba.threading_layer(), errors)
"""


def test_threads_may_call_the_passes_at_once_under_numba_s_workqueue_layer(tmp_path):
    """numba's fallback threading layer (no TBB, no OpenMP: a stock macOS) aborts the
    process when two threads launch a parallel kernel at once; ``parallel_launch`` takes
    turns there. Four threads here, in a process forced onto that layer, through the
    dense and the live-list passes and the engine's fused sampler."""
    import os
    import subprocess
    import sys

    script = tmp_path / "four_threads.py"
    script.write_text(_CONCURRENT_CALLS)
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue", "NUMBA_NUM_THREADS": "2"}
    schemas = Path(__file__).parents[1] / "agentloop/data/tool_schemas.json"
    done = subprocess.run([sys.executable, str(script), str(schemas)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["workqueue", "[]"], done.stdout


def test_a_draw_whose_weights_fall_out_of_float64_s_range_is_refused():
    """The sampler's draws check their weights' total against the largest group weight
    and the next backward row's total: a draw among weights of ~1e-320 (float64 keeps a
    few bits there, or none) says so, and the caller redoes the canvas in log space."""
    # one position: state 0 -> state 1 (group 0, atom 0) or -> state 2 (group 1, atom 1)
    out_offsets, out_dst, out_group = np.array([0, 2, 2, 2]), np.array([1, 2], np.int32), np.array([0, 1], np.int32)
    plan = dp.group_plan(np.array([0, 1], np.int32), np.array([0, 1, 2]), 2)
    rank = np.arange(3, dtype=np.int32)
    u = np.full((1, 3), 0.5)

    def draw(gsum, beta_next, live_lists):
        gsum = np.array([gsum])
        beta = np.array([[1.0, 0.0, 0.0], [0.0, *beta_next]])
        if live_lists:  # the live-list passes' rows each sum to 1: (offsets, states, beta) of live states
            offsets, states = np.array([0, 1, 3]), np.array([0, 1, 2], np.int32)
            flat = np.array([1.0, *beta_next])
            return dp._sample_atoms_live(gsum, gsum, offsets, states, flat, 0, out_offsets, out_dst, out_group,
                                         plan.base, plan.extra_offsets, plan.extra, u)
        return dp._sample_atoms(gsum, gsum, beta, np.array([1.0, sum(beta_next)]), rank, 0, out_offsets, out_dst,
                                out_group, plan.base, plan.extra_offsets, plan.extra, u)

    for live_lists in (False, True):
        atoms, ok = draw([0.3, 0.7], [0.5, 0.5], live_lists)
        assert ok and atoms.tolist() == [1]
        assert not draw([3e-320, 7e-320], [0.5, 0.5], live_lists)[1]  # the group weights
    assert not draw([0.3, 0.7], [3e-320, 7e-320], False)[1]  # the dense backward row's values


def test_an_atom_drawn_inside_a_group_along_its_plan_follows_the_atoms_weights():
    """The sampler draws the atom inside a group down the group plan's nodes (a node is
    its base plus other parts: nodes it contains, atoms): every atom as often as its
    weight says, none of weight 0, and u at the very top of the group's sum (rounding)
    still lands on an atom with weight."""
    # groups: 0 = {0, 1}, 1 = {0, 1, 2, 3}, 2 = {0, 1, 2, 3, 4, 5}; atoms 2 and 3 lie in
    # the same groups (1 and 2), so they are a block, node 3; group 1 is that block plus
    # group 0 (a node part, 6 + 0), group 2 is group 1 plus its atoms 4 and 5
    group_atoms = np.array([0, 1, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5], np.int32)
    group_offsets = np.array([0, 2, 6, 12])
    plan = dp.group_plan(group_atoms, group_offsets, 6)
    parts = [plan.extra[plan.extra_offsets[n]:plan.extra_offsets[n + 1]].tolist() for n in range(4)]
    assert plan.n_groups == 3 and plan.base.tolist() == [-1, 3, 1, -1] and parts == [[0, 1], [6], [4, 5], [2, 3]]
    asum = np.array([[0.5, 0.0, 2.0, 1.0, 0.0, 3.5]])
    gsum = dp.group_node_sums(asum, plan)
    w_edge = np.ones(1)
    out_group = np.array([2], np.int32)
    n = 40_000
    u = (np.arange(n) + 0.5) / n  # an even grid: the inverse CDF's exact shares
    counts = np.zeros(6)
    for x in u:
        _, k = dp._draw_edge_and_atom(w_edge, 0, 1, 1.0, 0, asum, gsum, out_group, plan.base, plan.extra_offsets,
                                      plan.extra, np.array([[0.0, x, 0.0]]))
        counts[k] += 1
    np.testing.assert_allclose(counts / n, asum[0] / asum[0].sum(), atol=1e-4)
    for weights in (asum, np.array([[0.5, 0.0, 0.0, 0.0, 0.0, 0.0]])):  # (the second: all weight in a base)
        for top in (1.0, 1.0 - 2.0**-53):
            nodes = dp.group_node_sums(weights, plan)
            _, k = dp._draw_edge_and_atom(w_edge, 0, 1, 1.0, 0, weights, nodes, out_group, plan.base,
                                          plan.extra_offsets, plan.extra, np.array([[0.0, top, 0.0]]))
            assert weights[0, k] > 0.0


def test_float64_exp_and_log_are_within_two_ulp_and_keep_their_edges():
    """The log-space passes' vectorised exp and log (float64_math) against numpy's."""
    from agentloop.grammar.float64_math import exp_nonpositive as exp64
    from agentloop.grammar.float64_math import key_to_double, log_positive, order_key

    rng = np.random.default_rng(0)
    d = np.concatenate([-rng.random(3000) * 708.0, -rng.random(1000), [0.0, -1e-300, -708.0]])
    got = np.array([exp64(v) for v in d])
    assert np.max(np.abs(got - np.exp(d)) / np.exp(d)) < 2 * 2.0**-52
    assert [exp64(v) for v in (-708.5, -1e9, -np.inf, np.nan)] == [0.0, 0.0, 0.0, 0.0]
    s = np.concatenate([np.exp(rng.uniform(-700, 700, 3000)), rng.uniform(1, 10, 1000),
                        [1.0, 2.0, np.sqrt(2), np.sqrt(0.5), np.nextafter(1.0, 2.0), np.finfo(np.float64).tiny]])
    got = np.array([log_positive(v) for v in s])
    assert np.max(np.abs(got - np.log(s)) / np.maximum(np.abs(np.log(s)), 1e-300)) < 2 * 2.0**-52
    assert log_positive(1.0) == 0.0
    x = np.array([-np.inf, -1e300, -2.5, -1e-300, 0.0, 1e-300, 3.0, 1e300])
    keys = [order_key(v) for v in x]
    assert all(a < b for a, b in zip(keys, keys[1:])) and [key_to_double(k) for k in keys] == x.tolist()


def test_the_host_log_atom_stats_agree_with_the_torch_ops():
    """The atoms' log sums and mean gaps for log space: the compiled host pass against the
    torch ops the device passes use, at logits far beyond float64's range (N(0, 300)),
    atoms of one token, of many, and without a finite logit."""
    from agentloop.grammar import log_canvas

    atom_of = np.array([0, 1, 1, 1, -1, 2, 2, 3, 1, 2], np.int32)
    x = (np.random.default_rng(1).standard_normal((6, 10)) * 300).astype(np.float32)
    x[2, [5, 6, 9]] = -np.inf  # atom 2 without a finite logit
    x[3, 1] = x[3, 2] = x[3, 3] - 80.0  # terms near float32's flush
    atoms = dp.sorted_atoms(atom_of, 4)
    rowmax, _, _, amax, _ = dp.reduce_atoms(x, atoms, True, True)
    want = log_canvas.log_atom_stats(x, atom_of, amax, rowmax)
    got = log_canvas.log_atom_stats_host(x, atoms, amax, rowmax)
    assert np.array_equal(np.isfinite(want[0]), np.isfinite(got[0])) and not np.isfinite(got[0][2, 2])
    finite = np.isfinite(want[0])
    np.testing.assert_allclose(got[0][finite], want[0][finite], rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[2][finite], want[2][finite], rtol=1e-6, atol=1e-6)
    assert not np.isfinite(got[2][~finite]).any() and not np.isfinite(want[2][~finite]).any()
    # (the atoms' own sums: the log sums less the gap from the row's best, and at least 0)
    np.testing.assert_allclose(got[2][finite], got[0][finite] - (amax - rowmax[:, None])[finite], atol=1e-6)
    assert (got[2][finite] >= 0).all()


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("partial", [False, True])
def test_the_dense_log_passes_agree_with_the_lists_by_state(btok, monkeypatch, partial, chunked):
    """Log space over dense messages (runs, fans and single edges in the layout's rows, a
    vectorised log-sum-exp per run; rows whole, or cut into chunks for numba's threads as
    large automata have them) against the passes over each state's edges, on tools whose
    counted strings make runs and fans, at logits N(0, 300): the same backward values
    and factors to rounding, the same supports."""
    from agentloop.grammar import log_canvas

    if chunked:
        monkeypatch.setattr(log_canvas, "THREADED_MIN_STATES", 0)
    g = compile_tools(TOOLS[:3], btok, "gemma4")
    lay, ta = g._layout, g.automaton
    assert lay.fans[-1] - lay.fans[0] > 100 and lay.runs[-1] > 0.6 * len(lay.src)
    mid = g.state_after(btok.encode("<|tool_call>call:get_weather{", add_special_tokens=False).ids)
    L = 40
    x = (np.random.default_rng(2).standard_normal((L, g.vocab.size)) * 300).astype(np.float32)
    sup = dp.support(lay, mid, g._final(partial), L, "dense")
    V = g.vocab.size
    rowmax, _, _, amax, _ = dp.reduce_atoms(x, g._sorted_atoms(V), True, False)
    log_asum = log_canvas.log_atom_stats_host(x, g._sorted_atoms(V), amax, rowmax)[0]
    log_gsum = log_canvas.log_sums_by_group(log_asum, *g._group_plan)
    live = np.ascontiguousarray(sup.live[:, lay.rank])
    want_lb = log_canvas.log_backward(log_gsum, live, *g._out_edges)
    want_f, ok = log_canvas.log_factors(log_gsum, want_lb, live, mid, *g._in_edges, ta.atom_groups,
                                        ta.atom_group_offsets)
    assert ok
    edges = (lay.src, lay.dst, lay.group, lay.runs, sup.clip, lay.fans)
    lb, ok = log_canvas.dense_log_backward(log_gsum, sup.live, *edges)
    assert ok
    lb_states = lb[:, lay.rank]
    assert np.array_equal(np.isfinite(lb_states), np.isfinite(want_lb))
    finite = np.isfinite(want_lb)
    np.testing.assert_allclose(lb_states[finite], want_lb[finite], rtol=1e-12, atol=1e-9)
    got_f, ok = log_canvas.dense_log_factors(log_gsum, lb, sup.live, *edges, lay.in_row, lay.in_other, lay.in_group,
                                             lay.rank[mid], ta.atom_groups, ta.atom_group_offsets)
    assert ok and np.array_equal(np.isfinite(got_f), np.isfinite(want_f))
    finite = np.isfinite(want_f)
    np.testing.assert_allclose(got_f[finite], want_f[finite], rtol=1e-12, atol=1e-9)
    # the group sums, against a plain log-sum-exp
    want_g = np.array([[np.logaddexp.reduce(log_asum[n, ta.group_atoms[ta.group_offsets[h]:ta.group_offsets[h + 1]]])
                        for h in range(len(ta.group_offsets) - 1)] for n in range(L)])
    np.testing.assert_allclose(log_gsum[np.isfinite(want_g)], want_g[np.isfinite(want_g)], rtol=1e-13, atol=1e-12)
    assert np.array_equal(np.isfinite(log_gsum), np.isfinite(want_g))


def test_the_log_passes_over_kept_cells_agree_with_the_lists_by_state(btok):
    """The log-space passes over a pruned canvas's kept lists (a value per kept cell,
    each position's looked up by state through a scratch row; the factors from the
    groups the kept edges carry alone) against the passes over each state's edges on
    the mask of the same cells, on the cells a log-space sweep keeps at logits
    N(0, 300): the same backward values and factors to rounding, and the sampler
    reading either draws the same atoms."""
    from agentloop.grammar import log_canvas, pruning

    g = compile_tools(TOOLS[:3], btok, "gemma4")
    ta, S, L = g.automaton, g.automaton.n_states, 40
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, L, g.vocab.size)) * 300).astype(np.float32)
    sc = g._scores(x)
    log_asum, log_gsum = g._log_sums(sc, slice(0, L))
    sup = pruning.probable_support(g._to_finish(False), g.start_state, g._out_edges, sc.rowmax, gsum=log_gsum,
                                   asum=sc.asum, in_logs=True)
    assert sup is not None and sup.offsets[-1] < 0.2 * g._support(L, g.start_state, False).offsets[-1]
    rows = np.repeat(np.arange(L + 1), np.diff(sup.offsets)[:L + 1])
    live = np.zeros((L + 1, S), np.uint8)
    live[rows, sup.states] = 1
    want_lb = log_canvas.log_backward(log_gsum, live, *g._out_edges)
    lb = log_canvas.kept_log_backward(log_gsum, sup.offsets, sup.states, *g._out_edges, S)
    assert np.isfinite(lb[0]) and np.array_equal(np.isfinite(lb), np.isfinite(want_lb[rows, sup.states]))
    finite = np.isfinite(lb)
    np.testing.assert_allclose(lb[finite], want_lb[rows, sup.states][finite], rtol=1e-12, atol=1e-9)
    want_f, ok = log_canvas.log_factors(log_gsum, want_lb, live, g.start_state, *g._in_edges, ta.atom_groups,
                                        ta.atom_group_offsets)
    got_f, got_ok = log_canvas.kept_log_factors(log_gsum, lb, sup.offsets, sup.states, *g._out_edges,
                                                ta.group_atoms, ta.group_offsets, ta.n_atoms, S)
    assert ok and got_ok and np.array_equal(np.isfinite(got_f), np.isfinite(want_f))
    finite = np.isfinite(want_f)
    np.testing.assert_allclose(got_f[finite], want_f[finite], rtol=1e-12, atol=1e-9)
    none = np.zeros(0, np.int64), np.zeros(0, np.int32)
    for seed in range(5):
        u = np.random.default_rng(seed).random((L, 3))
        want_atoms, ok = log_canvas.log_sample_atoms(log_asum, log_gsum, want_lb.reshape(-1), np.arange(S), *none,
                                                     g.start_state, *g._out_edges, ta.group_atoms, ta.group_offsets, u)
        got_atoms, got_ok = log_canvas.log_sample_atoms(log_asum, log_gsum, lb, np.zeros(0, np.int64), sup.offsets,
                                                        sup.states, g.start_state, *g._out_edges, ta.group_atoms,
                                                        ta.group_offsets, u)
        assert ok and got_ok and np.array_equal(got_atoms, want_atoms)


@pytest.mark.parametrize("n_tools", [1, 5, 20])
def test_the_group_plan_gives_each_group_the_sum_and_max_of_its_atoms(btok, n_tools):
    """Groups are built from parts (``canvas.GroupPlan``): groups they contain, blocks of
    atoms, atoms. Each node's parts, expanded, are its atoms once each, built before it;
    each group's sum and max are still those of its own atoms; and the plan takes far
    fewer row operations than one per (group, atom) pair."""
    g = compile_tools(TOOLS[:n_tools], btok, "gemma4")
    ta = g.automaton
    plan = g._group_plan
    K, G = ta.n_atoms, ta.group_offsets.shape[0] - 1
    N = plan.order.shape[0]
    assert plan.n_groups == G and sorted(plan.order.tolist()) == list(range(N))
    built_at = {n: a for a, n in enumerate(plan.order.tolist())}

    def atoms_of_node(n):
        parts = ([] if plan.base[n] < 0 else [K + plan.base[n]]) + \
            plan.extra[plan.extra_offsets[n]:plan.extra_offsets[n + 1]].tolist()
        out = []
        for e in parts:
            if e >= K:
                assert built_at[e - K] < built_at[n]
                out += atoms_of_node(e - K)
            else:
                out.append(e)
        return out

    atoms_of = [ta.group_atoms[ta.group_offsets[i]:ta.group_offsets[i + 1]] for i in range(G)]
    for n in range(G):
        assert sorted(atoms_of_node(n)) == sorted(atoms_of[n].tolist())
    wide = [set(a.tolist()) for a in atoms_of if len(a) >= 2]
    for n in range(G, N):  # a block: atoms in two groups or more; a group of two atoms or more holds all or none
        block = set(atoms_of_node(n))
        assert len(block) >= 2 and sum(block <= a for a in wide) >= 2
        assert all(block <= a or not block & a for a in wide)
    rng = np.random.default_rng(n_tools)
    asum = rng.random((7, K))
    amax = rng.normal(size=(7, K)).astype(np.float32)
    amax[:, ::5] = -np.inf  # (atoms without a usable logit)
    np.testing.assert_allclose(dp.group_sums(asum, plan), np.stack([asum[:, a].sum(1) for a in atoms_of], 1),
                               rtol=1e-13)
    nodes = dp.group_node_sums(asum, plan)
    assert nodes.shape == (7, N) and np.array_equal(nodes[:, :G], dp.group_sums(asum, plan))
    np.testing.assert_allclose(nodes[:, G:], np.stack([asum[:, atoms_of_node(n)].sum(1) for n in range(G, N)], 1)
                               if N > G else np.zeros((7, 0)), rtol=1e-13)
    assert np.array_equal(dp.group_max(amax, plan), np.stack([amax[:, a].max(1) for a in atoms_of], 1))
    # (a base, or a node's first part, is a copy; the plan before blocks and node parts
    # took 1.13 / 0.89 / 0.39 of the pairs, counting a copy or a fill for every group)
    row_ops = int((plan.base >= 0).sum()) + plan.extra.shape[0]
    assert row_ops < {1: 0.8, 5: 0.6, 20: 0.3}[n_tools] * ta.group_atoms.shape[0]


#: A batch's first calls after a lone canvas's, in a fresh process (the numba dispatchers'
#: signatures are the process's: other tests' batches would have compiled them already):
#: prints the kernels (``agentloop.precompile.package_dispatchers``) that gained one.
BATCH_AFTER_LONE_CANVAS = """
import json, sys
import torch
from agentloop.precompile import package_dispatchers
from agentloop.grammar import byte_tokenizer, compile_tools

def signatures():
    return {f"{module}.{name}[{key}]": {str(sig) for sig in d.signatures}
            for module, name, key, d in package_dispatchers()}

g = compile_tools(json.loads(sys.argv[1])[:5], byte_tokenizer(), "gemma4")
x = torch.randn(2, 64, g.vocab.size, generator=torch.Generator().manual_seed(0)) * 3  # (B, L, V)

def every_op(logits):
    g.viterbi(logits)
    g.sample(logits, torch.Generator().manual_seed(0))
    g.marginals(logits, return_entropy=True)
    for prune in (True, False):
        g.denoise_step(logits, torch.Generator().manual_seed(0), prune=prune)

every_op(x[0])
alone = signatures()
every_op(x)
print(json.dumps({k: sorted(v - alone.get(k, set())) for k, v in signatures().items() if v - alone.get(k, set())}))
"""


def test_a_batch_runs_the_kernels_compiled_for_a_lone_canvas():
    """Every op hands each canvas of a batch arrays of the layouts a lone canvas gets, so
    a batch compiles nothing more: a batch's group sums and maxima, once rows of one
    (B * L, G) Fortran array, were strided ('A' layout), and every DP kernel that read
    them compiled a second time, at its first batched call or in ``agentloop
    precompile``."""
    out = subprocess.run([sys.executable, "-c", BATCH_AFTER_LONE_CANVAS, json.dumps(TOOLS)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}


@pytest.mark.parametrize("n_tools", [1, 5])
def test_each_group_s_best_token_is_that_of_its_lowest_atom_at_the_best(btok, n_tools):
    """``group_best_tokens`` finds the lowest-numbered atom at the group's best logit
    across the row and falls back to the group's own list where that atom lies outside
    the group: ties, as a low-precision model's logits make, inside and outside it."""
    g = compile_tools(TOOLS[:n_tools], btok, "gemma4")
    ta = g.automaton
    G = ta.group_offsets.shape[0] - 1
    L = 3 * G
    rng = np.random.default_rng(n_tools)
    amax = rng.integers(-4, 4, size=(L, ta.n_atoms)).astype(np.float32)  # many ties
    aarg = rng.integers(0, 10_000, size=(L, ta.n_atoms)).astype(np.int32)
    groups = np.tile(np.arange(G, dtype=np.int32), 3)
    gmax = dp.group_max(amax, g._group_plan)
    got, far = dp.group_best_tokens(groups, gmax, amax, aarg, ta.group_atoms, ta.group_offsets)
    assert far == np.abs(gmax[np.arange(L), groups]).max()
    outside = 0
    for l, gr in enumerate(groups.tolist()):
        atoms = ta.group_atoms[ta.group_offsets[gr]:ta.group_offsets[gr + 1]]
        best = atoms[amax[l, atoms] == amax[l, atoms].max()].min()
        assert got[l] == aarg[l, best]
        outside += bool(np.flatnonzero(amax[l] == amax[l, best])[0] != best)
    assert outside > 0  # (the fallback ran)


def test_factor_logs_and_entropies_agree_with_numpy_at_every_kind_of_factor():
    """``factor_logs``: log F as numpy's log gives it (within a few ulp) at normal factors,
    and exactly at 0, subnormals, inf and nan; entropies as their definition, the rows
    of subnormal factors included."""
    rng = np.random.default_rng(0)
    F = rng.random((40, 30)) * 20.0
    F[rng.random(F.shape) < 0.3] = 0.0
    F[3, 4], F[5, 6], F[7, 8], F[9, 1] = 5e-320, np.inf, np.nan, 2.2250738585072014e-308
    asum = rng.random(F.shape)
    asum[:, ::7] = 0.0
    asumx = -rng.random(F.shape)
    log_f, H = dp.factor_logs(F, asum, asumx)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = np.log(F)
        terms = np.where((F > 0) & (asum > 0), F * (asumx + asum * want), 0.0)
    np.testing.assert_allclose(log_f, want, rtol=1e-15, atol=0.0)  # (float64_math's log: within 2 ulp of libm's)
    assert np.array_equal(np.isnan(log_f), np.isnan(want)) and np.array_equal(np.isinf(log_f), np.isinf(want))
    assert log_f[3, 4] == np.log(5e-320)
    ok = np.isfinite(terms).all(axis=1)
    np.testing.assert_allclose(H[ok], np.maximum(-terms.sum(axis=1), 0.0)[ok], rtol=1e-12)
    assert not ok[5] and ok[3] and ok[7]  # (an inf factor's row is not finite; a nan factor adds nothing)
    log_only, none = dp.factor_logs(F, asum, None)
    assert none is None and np.array_equal(log_only, log_f, equal_nan=True)
