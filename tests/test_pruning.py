"""Pruning (grammar/pruning.py): the passes over the cells of a canvas's lattice that can
carry weight or the Viterbi canvas give what the whole lattice gives, leave out all but a
few of its cells, and leave out less than the stated share of its weight."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_grammar_soundness import compile_or_reject, schemas  # (tests/ is on the path, as for conftest)

from agentloop.errors import NoValidCanvasError
from agentloop.grammar import canvas as dp
from agentloop.grammar import log_canvas
from agentloop.grammar import compile_tools, pruning

TOOLS = json.loads((Path(__file__).parents[1] / "agentloop/data/tool_schemas.json").read_text())
L = 64


@pytest.fixture(scope="module")
def tools3(btok):
    return compile_tools(TOOLS[:3], btok, "gemma4")


def _call_canvas(g, btok) -> list[int]:
    call = btok.encode('<|tool_call>call:get_weather{city:<|"|>Lisbon<|"|>,days:3}<tool_call|><|tool_response>',
                       add_special_tokens=False).ids
    canvas = call + [g.vocab.pad_id] * (L - len(call))
    assert g.accepts(canvas)
    return canvas


def _confident(g, btok, scale: float, seed: int = 0, lead: float = 12.0) -> torch.Tensor:
    """Logits N(0, scale) with a valid call ``lead`` nats ahead at each position (by
    default, a model that knows what it writes)."""
    x = torch.randn(L, g.vocab.size, generator=torch.Generator().manual_seed(seed)) * scale
    x[torch.arange(L), torch.tensor(_call_canvas(g, btok))] += lead
    return x


def _kept(g, x: torch.Tensor, sums: bool = True, viterbi: bool = True, partial: bool = False) -> dp.Support:
    """The cells pruning keeps for one canvas of logits ``x`` (L, V) from the start (the
    support itself where it keeps them all)."""
    xs = x[None].numpy()
    sc = g._scores(xs, want_sum=sums, want_x=False)
    gmax = dp.group_max(sc.amax, g._group_plan) if viterbi else None
    return g._step_support(sc, slice(0, L), g.start_state, partial, True, sums=sums, gmax=gmax)[0]


def _log_mass(g, sup: dp.Support, x: torch.Tensor) -> float:
    """log of the weight of the canvases on ``sup``'s cells, from a backward pass."""
    sc = g._scores(x[None].numpy())
    passes = g._canvas_passes(sup, g.start_state, False, gsum=sc.canvas_gsum(slice(0, x.shape[0])), factors=True)
    assert passes.in_range
    beta_start = passes.beta[0, g._layout.rank[g.start_state]] if sup.dense else passes.beta[sup.offsets[0]]
    return dp.log_mass_backward(beta_start, passes.beta_totals, sup.dense) + float(sc.rowmax.sum())


@pytest.mark.parametrize("logits", ["N(0, 1)", "N(0, 3)", "confident"])
def test_the_pruned_step_gives_what_the_whole_lattice_gives(btok, tools3, logits):
    """Viterbi canvas and sample the same, marginals and entropies to rounding; every
    token the whole lattice gives a log-marginal above -30 keeps a finite one. Batched,
    from the start and from inside a call; and pruning did leave most cells out."""
    g = tools3
    if logits == "confident":
        x = torch.stack([_confident(g, btok, 2.0, seed) for seed in (0, 1)])
    else:
        x = torch.randn(2, L, g.vocab.size, generator=torch.Generator().manual_seed(5)) * float(logits[5])
    mid = g.state_after(btok.encode("<|tool_call>call:get_weather{", add_special_tokens=False).ids)
    for state, partial in ((None, False), (mid, True)):
        whole = g.denoise_step(x, torch.Generator().manual_seed(0), state=state, partial=partial, prune=False)
        kept = g.denoise_step(x, torch.Generator().manual_seed(0), state=state, partial=partial)
        assert whole.pruned == [False, False] and kept.pruned == [state is None] * 2  # (inside the call it gives up)
        assert kept.argmax == whole.argmax and kept.sample == whole.sample
        likely = whole.log_marginals > -30
        assert torch.isfinite(kept.log_marginals[likely]).all()
        torch.testing.assert_close(kept.log_marginals[likely], whole.log_marginals[likely], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kept.entropy, whole.entropy, rtol=1e-9, atol=1e-12)
        assert g.viterbi(x, state=state, partial=partial) == whole.argmax
        assert g.sample(x, torch.Generator().manual_seed(7), state=state, partial=partial) == \
            g.sample(x, torch.Generator().manual_seed(7), state=state, partial=partial, prune=False)
        torch.testing.assert_close(g.marginals(x, state=state, partial=partial)[likely], whole.log_marginals[likely],
                                   rtol=1e-5, atol=1e-5)
    share = _kept(g, x[0]).offsets[-1] / g._support(L, g.start_state, False).offsets[-1]
    assert share < 0.5  # (it left most cells out)


def test_the_cells_left_out_weigh_nothing_a_float64_shows(btok, tools3):
    """The canvases on the kept cells (3% of the support here) weigh what the whole
    lattice weighs, to rounding (the cut leaves out less than 2**-56 of it); the kept
    lists hold the start state first, accepting states last, and at every position
    states of the support, sorted."""
    g = tools3
    x = torch.randn(L, g.vocab.size, generator=torch.Generator().manual_seed(2)) * 1.5
    whole = g._support(L, g.start_state, False)
    kept = _kept(g, x)
    assert kept.states[kept.offsets[0]:kept.offsets[1]].tolist() == [g.start_state]
    assert g._final(False)[kept.states[kept.offsets[L]:kept.offsets[L + 1]]].all()
    for l in range(L + 1):
        here = kept.states[kept.offsets[l]:kept.offsets[l + 1]]
        assert (np.diff(here) > 0).all() and whole.live[l, g._layout.rank[here]].all()
    assert kept.offsets[-1] < 0.1 * whole.offsets[-1]
    assert abs(_log_mass(g, whole, x) - _log_mass(g, kept, x)) < 1e-12


def test_a_pruned_step_makes_no_support(btok):
    """The kept cells follow the start state forward and keep the states that can still
    finish in the tokens left (``pruning.fewest_to_finish``: every accepting state steps
    to an accepting one, so a state finishes in any number of tokens from its fewest):
    a pruned step builds no ``Support``, whose masks cost more than the step at 20 tools;
    where pruning gives up, the step builds it."""
    g = compile_tools(TOOLS[:2], btok, "gemma4")
    g._support_cache.clear()
    x = torch.randn(L, g.vocab.size, generator=torch.Generator().manual_seed(2))
    for op in (lambda: g.denoise_step(x), lambda: g.viterbi(x), lambda: g.sample(x), lambda: g.marginals(x)):
        op()
    assert not g._support_cache
    to_finish = g._to_finish(False)
    assert to_finish[g.start_state] > 0 and (to_finish[g._final(False)] == 0).all()
    assert (g._to_finish(True) == 0).all()
    g.denoise_step(torch.zeros(L, g.vocab.size))  # every canvas alike: nothing can go
    assert list(g._support_cache) == [(L, g.start_state, False, g._canvas_pass_kind)]


def test_the_sweeps_reuse_their_arrays_and_a_kept_support_outlives_the_next_sweep(btok, tools3):
    """Sweeps take their arrays from a pool (``SweepScratch``: fresh ones cost more in
    page faults than the sweep) and give them back: one sweep after another reuses one
    set, threads at once take a set each, and the pool keeps no more sets than ran at
    once. Yet the kept cells a step gets are its own: a second sweep, on this thread or
    on another at the same time, leaves them as they were."""
    pool = pruning.SWEEP_SCRATCH
    xs = [_confident(tools3, btok, 1.0)]
    xs += [torch.randn(L, tools3.vocab.size, generator=torch.Generator().manual_seed(s)) * scale
           for s, scale in ((5, 1.0), (0, 3.0))]
    for x in xs:  # (the arrays grow to the longest lists these sweeps keep)
        _kept(tools3, x)
    with pool.taken() as scratch:
        arrays = scratch.cells
    first = _kept(tools3, xs[0])
    states = first.states.copy()
    others = [_kept(tools3, x) for x in xs[1:]]
    with pool.taken() as scratch:
        assert scratch.cells[0] is arrays[0]
    assert first.states.size and np.array_equal(first.states, states)
    assert not any(np.array_equal(s.states, states) for s in others)  # (each sweep kept other cells)

    from concurrent.futures import ThreadPoolExecutor

    sets = len(pool)
    with ThreadPoolExecutor(3) as threads:
        for _ in range(3):
            kept = list(threads.map(lambda x: _kept(tools3, x), xs * 2))
            for a, b in zip(kept, [first, *others] * 2):
                assert np.array_equal(a.offsets, b.offsets) and np.array_equal(a.states, b.states)
    assert sets <= len(pool) <= sets + 2  # (at most three sweeps ran at once)


def _cells_of(g, canvas: list[int], start: int) -> list[tuple[int, int]]:
    out, q = [(0, start)], start
    for l, t in enumerate(canvas):
        q = g.state_after([t], q)
        out.append((l + 1, q))
    return out


def test_the_viterbi_canvas_stays_where_the_weight_lies_elsewhere(btok, tools3):
    """Nearly flat logits where a call's tokens lead by 0.7 nats: the best canvas is the
    call, but nearly all the weight lies on texts (which take most tokens at each
    position), and the call's cells fall below the weight's cut. The best-prefix test
    keeps them, and the pruned Viterbi canvas is the whole lattice's."""
    g = tools3
    x = _confident(g, btok, 0.1, lead=0.7)
    best = g.viterbi(x, prune=False)
    assert best == _call_canvas(g, btok)
    by_weight = _kept(g, x, viterbi=False)
    both = _kept(g, x)

    def holds(sup: dp.Support) -> bool:
        return all(q in sup.states[sup.offsets[l]:sup.offsets[l + 1]] for l, q in _cells_of(g, best, g.start_state))

    assert not holds(by_weight) and holds(both)
    assert both.offsets[-1] < 0.1 * g._support(L, g.start_state, False).offsets[-1]
    assert g.viterbi(x) == best and g.denoise_step(x).argmax == best
    assert _kept(g, x, sums=False).offsets[-1] < 0.1 * g._support(L, g.start_state, False).offsets[-1]


def test_pruning_gives_up_where_the_weight_spreads(btok, tools3, monkeypatch):
    """Equal logits give every valid canvas the same weight: no cell can go, and the
    step runs over the whole support. So it does past MAX_KEPT_SHARE."""
    g = tools3
    whole = g._support(L, g.start_state, False)
    assert _kept(g, torch.zeros(L, g.vocab.size)) is whole
    assert g.denoise_step(torch.zeros(L, g.vocab.size)).pruned is False
    x = torch.randn(L, g.vocab.size, generator=torch.Generator().manual_seed(2))
    assert _kept(g, x) is not whole
    monkeypatch.setattr(pruning, "MAX_KEPT_SHARE", 0.0)
    assert _kept(g, x) is whole


@pytest.mark.parametrize("peak", [25.0, 40.0, 50.0])
def test_pruning_holds_where_the_valid_canvases_weigh_far_below_the_best_tokens(btok, tools3, peak, monkeypatch):
    """A model sure of a token the canvas cannot take at each position (one token per row
    ``peak`` nats ahead, a random one): the valid canvases weigh e^-550 (25), e^-890
    (40) and e^-1100 (50) of the best tokens', and the greedy walks' bound on that
    weight lies 200-400 nats lower still, so the sweep's cut lies below e^-750, e^-990
    and e^-1200, where the kept weights [cut, 1] leave float64's range together. The
    sweep holds them at a lifted scale, raises a cut below e^-990 and checks that its
    canvases weigh enough for that, else (50) tries again from e^-1200: it prunes, and
    the step is the whole lattice's. Its kept canvases' weight,
    far above the walks' bound, then gives a higher cut, which leaves out more cells
    (``keep_above``). Past that range (e^-2000) it gives up, the canvases too light for
    float64, and a sweep in log space tries, keeping at most ``LOG_KEPT_SHARE`` of this
    small lattice (the fast passes over the whole of it cost less than more kept cells'
    in log space): the step is the whole lattice's either way."""
    g = tools3
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(L, g.vocab.size, generator=gen) * 3.0
        ahead = torch.randint(0, g.vocab.size, (L,), generator=gen)
        x[torch.arange(L), ahead] = x.max(dim=1).values + peak
        whole = g.denoise_step(x, torch.Generator().manual_seed(0), prune=False)
        kept = g.denoise_step(x, torch.Generator().manual_seed(0))
        assert kept.pruned
        assert kept.argmax == whole.argmax and kept.sample == whole.sample
        likely = whole.log_marginals > -30
        torch.testing.assert_close(kept.log_marginals[likely], whole.log_marginals[likely], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kept.entropy, whole.entropy, rtol=1e-9, atol=1e-12)
        with monkeypatch.context() as m:
            m.setattr(pruning, "_LOOSE_WALK", np.inf)
            loose = _kept(g, x).offsets[-1]
        assert _kept(g, x).offsets[-1] < loose
        x[torch.arange(L), ahead] += 100.0 - peak
        far, whole = (g.denoise_step(x, torch.Generator().manual_seed(0), prune=prune) for prune in (True, False))
        assert far.argmax == whole.argmax
        torch.testing.assert_close(far.entropy, whole.entropy, rtol=0, atol=1e-5)  # (the fast passes' float32 terms)


@pytest.mark.parametrize("lead, temperature", [(120.0, 1.0), (30.0, 0.2)])
def test_a_sure_model_the_grammar_overrules_still_prunes(btok, lead, temperature):
    """A sure model whose best tokens the grammar forbids, as a model meets constrained
    decoding: a valid call ``lead`` nats ahead, but a token the grammar forbids there
    ahead of it at 10 positions, at ``temperature``. The valid canvases weigh e^-1200
    (120, 1.0) or e^-1500 (30, 0.2) of the best tokens': too little for a cut in
    float64, so the sweep gave up, and the step ran the whole lattice (20 tools, BPE 4k:
    0.09 s a step at 1.0; in log space at 0.2, 0.56 s). A sweep in log space now prunes:
    the whole lattice's canvas, marginals and entropies."""
    g = compile_tools(TOOLS[:3], btok, "gemma4", allow_text=False)  # (a text answer would take every token)
    canvas = torch.tensor(_call_canvas(g, btok))
    x = torch.randn(L, g.vocab.size, generator=torch.Generator().manual_seed(4)) * 3.0
    x[torch.arange(L), canvas] = x.max(dim=1).values + lead
    rows = torch.arange(1, 11)  # (the call's name: "call:get_w", where no string can take a "Q")
    x[rows, btok.token_to_id("Q")] = x[rows].max(dim=1).values + lead
    x /= temperature
    kept, whole = (g.denoise_step(x, torch.Generator().manual_seed(0), prune=prune) for prune in (True, False))
    assert kept.pruned and not whole.pruned
    assert kept.argmax == whole.argmax and g.accepts(kept.sample)
    likely = whole.log_marginals > -30
    torch.testing.assert_close(kept.log_marginals[likely], whole.log_marginals[likely], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kept.entropy, whole.entropy, rtol=0, atol=1e-5)  # (the fast passes' float32 terms)


def test_the_sweeps_kept_weight_is_the_canvases_and_bounds_a_raised_cut(btok, tools3):
    """The weight the sweep reports for its kept canvases is theirs: the whole lattice's
    in log space, to rounding. A cut below a floor (here e^-990) is raised to it, and the
    sweep keeps its cells only where that weight makes the raised cut sound (weight *
    2**-56 / cells >= e^-990): peaked logits whose valid canvases weigh from e^-880 to
    e^-1100 of the best tokens' (around the edge, e^-938) are kept and refused on the
    right side."""
    g = tools3
    L_ = L
    lay = g._layout
    seen = set()
    for peak in (40.0, 42.0, 43.0, 44.0, 46.0, 50.0):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(L_, g.vocab.size, generator=gen) * 3.0
        ahead = torch.randint(0, g.vocab.size, (L_,), generator=gen)
        x[torch.arange(L_), ahead] = x.max(dim=1).values + peak
        sc = g._scores(x[None].numpy())
        log_norm = np.log(sc.asum.sum(axis=1))
        log_asum = sc.log_stats(g._sorted_atoms(g.vocab.size))[0]
        log_gsum = log_canvas.log_sums_by_group(log_asum, *g._group_plan)
        live = np.ascontiguousarray(g._support(L_, g.start_state, False).live[:, lay.rank])
        log_z = log_canvas.log_backward(log_gsum, live, *g._out_edges)[0, g.start_state] - log_norm.sum()
        to_finish = g._to_finish(False)
        cells = (L_ + 1) * to_finish.shape[0]
        log_share = math.log(pruning.LOST_SHARE / cells)
        with pruning.SWEEP_SCRATCH.taken() as scratch:
            _, _, ok, _, _, log_kept, _, _, _ = scratch.sweep(
                True, False, False, False, sc.canvas_gsum(slice(0, L_)), np.zeros((L_, 0)), sc.rowmax, log_norm,
                to_finish, g.start_state,
                *g._out_edges, np.zeros((0, 0)), np.zeros((0, 0)), np.zeros(0, np.int32), -5000.0, log_share, -990.0,
                np.inf, cells)
        sound = log_z + log_share >= -990.0
        assert ok == sound, (peak, log_z)
        if ok:
            assert log_kept == pytest.approx(log_z, abs=1e-5)  # (the scan's float32 terms: ~1e-8 a position)
        seen.add(sound)
    assert seen == {True, False}


def test_a_pruned_canvas_redone_in_log_space_gives_the_whole_lattice_s(btok, tools3, monkeypatch):
    """Where the fast passes on the kept cells leave float64's range (forced here), the
    canvas is redone in log space over the kept cells (a mask made from the lists): the
    same as the whole lattice in log space."""
    g = tools3
    monkeypatch.setattr(dp, "MASS_TOLERANCE", -1.0)  # every canvas fails the mass check
    x = _confident(g, btok, 2.0)
    whole = g.denoise_step(x, torch.Generator().manual_seed(0), prune=False)
    kept = g.denoise_step(x, torch.Generator().manual_seed(0))
    assert kept.argmax == whole.argmax and kept.sample == whole.sample
    likely = whole.log_marginals > -30
    torch.testing.assert_close(kept.log_marginals[likely], whole.log_marginals[likely], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kept.entropy, whole.entropy, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("temperature", [0.02, 0.005])
def test_a_low_temperature_prunes_where_the_atoms_out_of_float64s_range_weigh_nothing(btok, tools3, temperature,
                                                                                       monkeypatch):
    """A model sure of a valid call (12 nats ahead over N(0, 2)) at temperature 0.02 (a
    spread of ~800 nats): atoms more than 708 nats below their row's best leave
    float64's range (their sums underflow). The valid canvases pass the best tokens,
    so those atoms weigh far less than 2**-57 of them: the step prunes and runs the fast
    passes, where the whole lattice goes to log space. Random logits N(0, 2) at 0.005:
    the valid canvases weigh less than e^-2000 of the best tokens', out of the fast
    sweep's reach; a sweep in log space prunes, and the log-space passes run over its
    kept cells' lists (at seeds where it keeps few), and gives up past
    ``MAX_KEPT_LOG_CELLS`` (and ``LOG_KEPT_SHARE`` of the lattice). Either way the step
    gives the whole lattice's canvas, sample, marginals and entropies (to the rounding of the scan's float32 terms,
    |x - rowmax| * 6e-8, on the fast passes)."""
    g = tools3
    for seed in ((0, 1, 2) if temperature == 0.02 else (0, 2)):
        if temperature == 0.02:
            x = _confident(g, btok, 2.0, seed) / temperature
        else:
            x = torch.randn(L, g.vocab.size, generator=torch.Generator().manual_seed(seed)) * 2.0 / temperature
        sc = g._scores(x[None].numpy())
        assert sc.log_underflow(slice(0, L)) > -math.inf  # (some atom's sum underflowed)
        gmax = dp.group_max(sc.amax, g._group_plan)
        _, kept_cells, fast = g._step_support(sc, slice(0, L), g.start_state, False, True, sums=True, gmax=gmax)
        assert kept_cells and fast == (temperature == 0.02)
        whole = g.denoise_step(x, torch.Generator().manual_seed(0), prune=False)
        kept = g.denoise_step(x, torch.Generator().manual_seed(0))
        assert kept.pruned and not whole.pruned
        assert kept.argmax == whole.argmax and g.accepts(kept.sample)
        if not fast:  # (both in log space, the same uniforms)
            assert kept.sample == whole.sample
        likely = whole.log_marginals > -30
        assert torch.isfinite(kept.log_marginals[likely]).all()
        torch.testing.assert_close(kept.log_marginals[likely], whole.log_marginals[likely], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kept.entropy, whole.entropy, rtol=0, atol=1e-6)
        torch.testing.assert_close(g.marginals(x)[likely], whole.log_marginals[likely], rtol=1e-5, atol=1e-5)
        assert g.accepts(g.sample(x, torch.Generator().manual_seed(1)))
        if not fast:
            with monkeypatch.context() as m:
                # (below a canvas's cells: the sweep that bounds the suffixes keeps fewer)
                m.setattr(pruning, "MAX_KEPT_LOG_CELLS", L)
                m.setattr(pruning, "LOG_KEPT_SHARE", 0.0)
                capped = g.denoise_step(x, torch.Generator().manual_seed(0))
            assert not capped.pruned and capped.argmax == whole.argmax and capped.sample == whole.sample


def test_atoms_out_of_float64s_range_that_carry_weight_keep_the_step_in_log_space(btok, tools3):
    """A model sure of a call, except at the first position: there the call's first
    token lies 708.6 nats below the row's best (its sum underflows), the text tokens
    705 below, the best a token the canvas cannot start with. The call, 12 nats ahead
    at every later position, outweighs the texts, so the fast passes, which would weigh
    it as 0, may not run: the step goes to log space over the whole lattice, and gives
    the call's first token what the whole lattice gives it."""
    g = tools3
    x = _confident(g, btok, 1.0)
    first = btok.token_to_id("<|tool_call>")
    allowed_anywhere = g.automaton.atom_of_token >= 0
    best = int(np.flatnonzero(allowed_anywhere & ~g.allowed_tokens())[0])
    x[0] = -705.0
    x[0, best], x[0, first] = 0.0, -708.6
    sc = g._scores(x[None].numpy())
    assert sc.log_underflow(slice(0, L)) > -math.inf  # (some atom's sum underflowed)
    gmax = dp.group_max(sc.amax, g._group_plan)
    assert g._step_support(sc, slice(0, L), g.start_state, False, True, sums=True, gmax=gmax)[1:] == (False, False)
    whole = g.denoise_step(x, torch.Generator().manual_seed(0), prune=False)
    assert whole.log_marginals[0, first] > -1
    kept = g.denoise_step(x, torch.Generator().manual_seed(0))
    assert not kept.pruned
    torch.testing.assert_close(kept.log_marginals, whole.log_marginals)
    assert kept.argmax == whole.argmax and kept.sample == whole.sample


@pytest.mark.parametrize("lead", [1000.0, 1e20])
def test_atoms_out_of_range_that_weigh_nothing_keep_the_fast_passes_where_pruning_gives_up(btok, tools3, lead):
    """Flat logits (every canvas alike: pruning gives up) with the call's first token
    forced ``lead`` nats ahead at the first position, where the grammar allows it: the
    other atoms' sums there underflow, but the canvases through them weigh e^-lead of
    the rest, so the fast passes run over the whole support, where the step went to log
    space before (5x slower at 20 tools). They give what log space gives (``prune=False``)
    to the float32 terms' rounding."""
    g = tools3
    first = btok.token_to_id("<|tool_call>")
    x = torch.randn(L, g.vocab.size, generator=torch.Generator().manual_seed(4)) * 0.1
    x[0, first] = lead
    sc = g._scores(x[None].numpy())
    assert sc.log_underflow(slice(0, L)) > -math.inf  # (some atom's sum underflowed)
    gmax = dp.group_max(sc.amax, g._group_plan)
    sup, kept_cells, fast = g._step_support(sc, slice(0, L), g.start_state, False, True, sums=True, gmax=gmax)
    assert (kept_cells, fast) == (False, True) and sup is g._support(L, g.start_state, False)
    exact = g.denoise_step(x, torch.Generator().manual_seed(0), prune=False)  # (log space: the sums out of range)
    step = g.denoise_step(x, torch.Generator().manual_seed(0))
    assert not step.pruned and step.argmax == exact.argmax and g.accepts(step.sample)
    assert step.sample[0] == first and step.argmax[0] == first
    likely = exact.log_marginals > -30
    assert torch.isfinite(step.log_marginals[likely]).all()
    torch.testing.assert_close(step.log_marginals[likely], exact.log_marginals[likely], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step.entropy, exact.entropy, rtol=0, atol=1e-6)
    torch.testing.assert_close(g.marginals(x)[likely], exact.log_marginals[likely], rtol=1e-5, atol=1e-5)
    assert g.viterbi(x) == exact.argmax


def test_masks_the_canvases_can_avoid_keep_a_log_space_step_pruned(btok, tools3):
    """Logits N(0, 300) (the step goes to log space) with two tokens the calls spell
    masked with -3.4e38 at every position: the canvases can avoid them, so the masks'
    stand-ins (``masks``) leave the sweep in log space free to keep few cells. The step
    is pruned, and gives what it gives with those tokens at -inf, and over the whole
    lattice."""
    g = tools3
    x = torch.randn(L, g.vocab.size, generator=torch.Generator().manual_seed(4)) * 300
    banned = [btok.token_to_id("a"), btok.token_to_id("1")]
    masked, never = x.clone(), x.clone()
    masked[:, banned] = torch.finfo(torch.float32).min
    never[:, banned] = -math.inf
    got = g.denoise_step(masked, torch.Generator().manual_seed(0))
    want = g.denoise_step(never, torch.Generator().manual_seed(0))
    whole = g.denoise_step(masked, torch.Generator().manual_seed(0), prune=False)
    assert got.pruned and want.pruned
    for other in (want, whole):
        assert got.argmax == other.argmax
        likely = other.log_marginals > -35
        assert (got.log_marginals[likely] - other.log_marginals[likely]).abs().max().item() < 2e-5
        assert (got.entropy - other.entropy).abs().max().item() < 1e-6
    assert not set(got.sample) & set(banned)


def test_the_schedule_pauses_longer_after_each_give_up_and_starts_over_after_a_pruned_step():
    schedule = pruning.PruningSchedule(longest_pause=4)
    outcomes = iter([False, False, False, False, True, False])
    tried = []
    for i in range(20):
        if schedule.try_now():
            tried.append(i)
            schedule.record(pruned=next(outcomes, True))
    # gave up at 0, 2, 5, 10 (pauses 1, 2, 4, 4), pruned at 15, gave up at 16 (pause 1 again)
    assert tried == [0, 2, 5, 10, 15, 16, 18, 19]


def test_radix_sort_of_states():
    rng = np.random.default_rng(0)
    for n, top in ((0, 10), (1, 10), (300, 200), (5000, 70_000), (100, 2**24 - 1)):
        a = rng.integers(0, top, n).astype(np.int32)
        bits = 8 * max(1, math.ceil(math.log2(top + 1) / 8))
        got = a.copy()
        pruning._sort_states(got, np.empty(max(n, 1), np.int32), np.zeros(257, np.int64), bits)
        assert got.tolist() == sorted(a.tolist())


# ---- the pruned ops against the whole lattice on random grammars and logits (slow) ----------

_REGIMES = ["noise", "lead", "masked", "flat"]


def _pruned_equals_whole(g, seed: int, regime: str, scale: float, lead: float, n: int, mid: float,
                         partial: bool) -> None:
    """Logits of one regime, from the start or from a state part way through a sampled
    canvas; Viterbi and the step (its argmax, sample, marginals and entropies) pruned
    against the whole lattice: the same Viterbi canvas (or the same error),
    log-marginals within 2e-5 (float32's rounding at -35 is 4e-6) wherever the whole
    gives a token more than e**-35, a token left out (-inf) only below 2**-56,
    entropies within 1e-6. And the whole lattice against itself redone in log space
    (``_fast_equals_log_space``): the fast passes' own exactness."""
    V = g.vocab.size
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, V) if regime == "flat" else torch.randn(n, V, generator=gen) * scale
    state = g.start_state
    if regime in ("lead", "masked") or mid > 0.5:
        try:
            ref = g.sample(torch.randn(n, V, generator=gen), generator=gen, partial=partial)
        except NoValidCanvasError:
            return
        if regime == "lead":
            x[torch.arange(n), torch.tensor(ref)] += lead
        if mid > 0.5:
            state, partial = g.state_after(ref[:int((mid - 0.5) * 2 * len(ref))]), True
    if regime == "masked":
        x[torch.rand(n, V, generator=gen) < 0.3] = -math.inf
    outs = []
    for prune in (False, True):
        try:
            outs.append((g.viterbi(x, state=state, partial=partial, prune=prune),
                         g.denoise_step(x, torch.Generator().manual_seed(1), state=state, partial=partial,
                                        prune=prune)))
        except NoValidCanvasError as e:
            outs.append(type(e))
    whole, kept = outs
    if not isinstance(whole, tuple) or not isinstance(kept, tuple):
        assert whole == kept
        return
    assert whole[0] == kept[0] == kept[1].argmax == whole[1].argmax
    lw, lp = whole[1].log_marginals, kept[1].log_marginals
    likely = lw > -35
    assert torch.isfinite(lp[likely]).all() and (lp[likely] - lw[likely]).abs().max().item() < 2e-5
    dropped = torch.isneginf(lp) & ~torch.isneginf(lw)
    assert not dropped.any() or lw[dropped].max().item() < math.log(2.0**-56) + 1.0
    assert (whole[1].entropy - kept[1].entropy).abs().max().item() < 1e-6
    _fast_equals_log_space(g, x, state, partial, whole[1])


def _fast_equals_log_space(g, x: torch.Tensor, state: int, partial: bool, fast) -> None:
    """The whole lattice's step on the fast (float64, row-normalised) passes against the
    same step redone in log space (tested against enumeration on its own): the same
    Viterbi canvas, log-marginals within 2e-5 + 2e-7 x |x - rowmax| (the scan's float32
    terms) wherever log space gives more than e**-20, none -inf above e**-30. A position
    whose messages' products went subnormal gave marginals 1e-3 off here (now the
    canvas goes to log space); pruned against whole cannot see that, both share it."""
    mp = pytest.MonkeyPatch()
    mp.setattr(dp, "MASS_TOLERANCE", -1.0)  # every canvas fails the mass check: log space
    try:
        ref = g.denoise_step(x, torch.Generator().manual_seed(1), state=state, partial=partial, prune=False)
    finally:
        mp.undo()
    assert fast.argmax == ref.argmax
    lr, lf = ref.log_marginals.double(), fast.log_marginals.double()
    gap = (x - x.masked_fill(~torch.isfinite(x), -math.inf).max(dim=1, keepdim=True).values).abs().double()
    likely = lr > -20
    assert ((lf - lr).abs()[likely] <= 2e-5 + 2e-7 * gap[likely]).all(), (lf - lr).abs()[likely].max()
    assert torch.isfinite(lf[lr > -30]).all()


@pytest.mark.parametrize("scale", [3.0, 30.0, 100.0])
@pytest.mark.parametrize("wire_format", ["json", "gemma4"])
def test_the_fast_passes_give_what_log_space_gives(btok, wire_format, scale):
    """Three tools, logits N(0, scale) from the start and from part way into a call:
    the fast passes' step equals the same step in log space (``_fast_equals_log_space``)."""
    g = compile_tools(TOOLS[:3], btok, wire_format)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(48, g.vocab.size, generator=gen) * scale
        for state, partial in ((g.start_state, False), (None, True)):
            if state is None:
                canvas = g.sample(torch.randn(48, g.vocab.size, generator=gen), generator=gen)
                state = g.state_after(canvas[:5 + seed * 3])
            try:
                fast = g.denoise_step(x, torch.Generator().manual_seed(1), state=state, partial=partial, prune=False)
            except NoValidCanvasError:
                continue
            _fast_equals_log_space(g, x, state, partial, fast)


_FUZZ = dict(seed=st.integers(0, 2**31), regime=st.sampled_from(_REGIMES),
             scale=st.sampled_from([0.3, 1.0, 3.0, 10.0, 30.0, 60.0, 300.0]), lead=st.sampled_from([2.0, 5.0, 12.0, 40.0]),
             mid=st.floats(0, 1), partial=st.booleans())


@pytest.mark.slow
@pytest.mark.parametrize("wire_format", ["json", "gemma4"])
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=schemas(), n=st.sampled_from([6, 17, 40, 90]), **_FUZZ)
def test_pruned_ops_equal_the_whole_lattice_on_random_schemas(btok, wire_format, schema, n, **kw):
    _pruned_equals_whole(compile_or_reject(schema, btok, wire_format), n=n, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("wire_format", ["json", "gemma4"])
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(pick=st.lists(st.integers(0, len(TOOLS) - 1), min_size=1, max_size=6, unique=True),
       n=st.sampled_from([16, 48, 128]), **_FUZZ)
def test_pruned_ops_equal_the_whole_lattice_on_random_tool_sets(btok, wire_format, pick, n, **kw):
    _pruned_equals_whole(compile_tools([TOOLS[i] for i in pick], btok, wire_format), n=n, **kw)


def _text_where_a_call_is_forced(g, btok, seed: int, lead: float, temperature: float) -> tuple[torch.Tensor, int]:
    """Logits N(0, 3) of a model sure of a text answer (``lead`` nats ahead at its first
    positions), where the canvas continues a call (the state after `<|tool_call>`), at
    ``temperature``: the grammar forbids every token the model wants there."""
    text = btok.encode("I cannot look that up, but Lisbon is mild and sunny.", add_special_tokens=False).ids
    x = torch.randn(L, g.vocab.size, generator=torch.Generator().manual_seed(seed)) * 3.0
    x[torch.arange(len(text)), torch.tensor(text)] = x[:len(text)].max(dim=1).values + lead
    return x / temperature, g.state_after(btok.encode("<|tool_call>", add_special_tokens=False).ids)


@pytest.mark.parametrize("seed, lead, temperature", [(0, 30.0, 0.2), (1, 10.0, 0.1), (2, 30.0, 1.0)])
def test_suffix_bounds_bound_each_cells_way_on(btok, tools3, seed, lead, temperature):
    """``suffix_bounds`` against the suffixes' exact values, by brute force over the token
    automaton's edges: its first bound is at least the log of each cell's suffix mass
    (tokens normalised at each position), and within ~3 nats a position of it; its second
    is the best way on's log-probability. Over the support's rows (``dense_suffix_bounds``)
    or its live lists the same numbers at its cells."""
    g = tools3
    x, s0 = _text_where_a_call_is_forced(g, btok, seed, lead, temperature)
    sc = g._scores(x[None].numpy())
    gmax = dp.group_max(sc.amax, g._group_plan)
    log_norm = np.log(sc.asum.sum(axis=1))
    log_gsum = g._log_sums(sc, slice(0, L))[1]
    to_finish = g._to_finish(False)
    bound, best, column = pruning.way_on_bounds(log_gsum, gmax, sc.rowmax, log_norm, to_finish, g._out_edges)
    sup, lay = g._support(L, s0, False), g._layout
    assert sup.dense
    rows = pruning.way_on_bounds(log_gsum, gmax, sc.rowmax, log_norm, to_finish, g._out_edges, (sup, lay))
    assert (rows[2] == lay.rank).all() and (column == np.arange(g.automaton.n_states)).all()
    # over the support's rows: the same numbers at its cells, -inf at the others
    live = sup.live[:, lay.rank].astype(bool)
    for by_state, by_row in zip((bound, best), rows):
        by_row = by_row[:, lay.rank]
        assert np.array_equal(by_row[live], by_state[live]) and np.isneginf(by_row[~live]).all()
    # over a support's live lists (large automata whose cells mostly lie dead): the same again
    lists = dp.support(lay, s0, g._final(False), L, "live")
    assert not lists.dense
    listed = pruning.way_on_bounds(log_gsum, gmax, sc.rowmax, log_norm, to_finish, g._out_edges, (lists, lay))
    assert (listed[2] == column).all()
    for by_state, by_list in zip((bound, best), listed):
        assert np.array_equal(by_list[live], by_state[live]) and np.isneginf(by_list[~live]).all()
    ta = g.automaton
    src, dst, grp = ta.edge_src, ta.edge_dst, ta.edge_group
    exact = np.full((L + 1, ta.n_states), -np.inf)
    exact_best = np.full((L + 1, ta.n_states), -np.inf)
    exact[L, to_finish == 0] = exact_best[L, to_finish == 0] = 0.0
    for l in range(L - 1, -1, -1):
        terms = log_gsum[l, grp] - log_norm[l] + exact[l + 1, dst]
        top = np.full(ta.n_states, -np.inf)
        np.maximum.at(top, src, terms)
        total = np.zeros(ta.n_states)
        np.add.at(total, src, np.exp(terms - np.where(np.isfinite(top[src]), top[src], 0.0)))
        with np.errstate(divide="ignore"):
            exact[l] = np.where(np.isfinite(top), top + np.log(total), -np.inf)
        np.maximum.at(exact_best[l], src, gmax[l, grp] - sc.rowmax[l] - log_norm[l] + exact_best[l + 1, dst])
    finite = np.isfinite(exact)
    assert (np.isfinite(bound) == finite).all() and finite.sum() > 1000
    assert (bound[finite] >= exact[finite] - 1e-9 * (1 + np.abs(exact[finite]))).all()
    # (a way on weighs at most 1: the trivial bound where the count's is looser, up to the normalisers' rounding)
    cap = np.broadcast_to(pruning._NORM_SLACK * (L - np.arange(L + 1))[:, None], bound.shape)
    assert (bound[finite] <= cap[finite]).all() and (bound[finite] == cap[finite]).any()
    assert (bound[finite] - exact[finite]).max() <= 3.0 * L
    np.testing.assert_allclose(best[finite], exact_best[finite], rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("seed, lead, temperature", [(0, 30.0, 0.2), (1, 10.0, 0.1), (2, 60.0, 0.5)])
def test_a_text_answer_where_a_call_is_forced_runs_log_space_over_few_cells(btok, tools3, seed, lead, temperature,
                                                                          monkeypatch):
    """A sure text answer where the canvas continues a call, at a low temperature: each
    valid canvas weighs e^-1000 or less of the best tokens', the fast passes over the
    whole lattice leave float64's range, and the step ran in log space over the whole
    lattice (20 tools, BPE 4k: 0.55 s). Nearly every prefix that writes the text into a
    string is heavy and every way on from it light, so the sweeps that bound a cell's
    way on by 1 keep most of the lattice; one that bounds it by ``suffix_bounds`` keeps
    a few cells, and the passes in log space run over those: the whole lattice's canvas,
    sample, marginals and entropies."""
    g = tools3
    x, s0 = _text_where_a_call_is_forced(g, btok, seed, lead, temperature)
    bounded = []
    real = pruning.way_on_bounds
    monkeypatch.setattr(pruning, "way_on_bounds", lambda *a: bounded.append(a[-1] is not None) or real(*a))
    assert not g.denoise_step(x, torch.Generator().manual_seed(0), state=s0).pruned and not bounded  # (too small:
    # its lattice costs little more in log space than a sweep that gives up)
    monkeypatch.setattr(pruning, "BOUNDED_SWEEP_MIN_EDGES", 0)
    kept = g.denoise_step(x, torch.Generator().manual_seed(0), state=s0)
    assert bounded == [True] and kept.pruned  # (over the whole support's rows)
    bounded.clear()
    whole = g.denoise_step(x, torch.Generator().manual_seed(0), state=s0, prune=False)
    assert not bounded and not whole.pruned
    assert kept.argmax == whole.argmax and kept.sample == whole.sample
    torch.testing.assert_close(kept.log_marginals.exp(), whole.log_marginals.exp(), rtol=0, atol=1e-12)
    torch.testing.assert_close(kept.entropy, whole.entropy, rtol=0, atol=1e-9)
    m, _ = g.marginals(x, state=s0, return_entropy=True)
    torch.testing.assert_close(m.exp(), whole.log_marginals.exp(), rtol=0, atol=1e-12)
    # (without entropies the scan's float32 sums lie in another kernel, which the CPU may
    # vectorise otherwise: 1.8e-7 apart without AVX-512)
    torch.testing.assert_close(g.marginals(x, state=s0).exp(), whole.log_marginals.exp(), rtol=1e-5, atol=1e-6)
    # a bounded sweep may keep more cells than other sweeps in log space, up to a share of the
    # lattice (a byte tokenizer's 20 tools need ~53k): with those capped far below, it still prunes
    monkeypatch.setattr(pruning, "MAX_KEPT_LOG_CELLS", 100)
    capped = g.denoise_step(x, torch.Generator().manual_seed(0), state=s0)
    assert capped.pruned and capped.argmax == whole.argmax and capped.sample == whole.sample
    monkeypatch.setattr(pruning, "BOUNDED_KEPT_LOG_SHARE", 0.0)
    assert not g.denoise_step(x, torch.Generator().manual_seed(0), state=s0).pruned
    monkeypatch.undo()
    # with the Viterbi test too (the best prefix with the best way on): the canvas's cells kept
    sc = g._scores(x[None].numpy())
    both = [pruning.sweep_support(g._to_finish(False), s0, g._out_edges, sc.rowmax,
                                  gsum=g._log_sums(sc, slice(0, L))[1], asum=sc.asum,
                                  gmax=dp.group_max(sc.amax, g._group_plan), in_logs=True,
                                  bound_suffixes=bound).support for bound in (False, True)]
    assert both[0] is None  # (without the bounds: too many cells)
    both = both[1]
    q = s0
    for l, token in enumerate(whole.argmax):
        assert q in both.states[both.offsets[l]:both.offsets[l + 1]]
        q = g.automaton.step(q, token)
