"""The cells of a canvas's lattice that carry no weight a step could show, left out.

The passes run over every (position, state) cell of the support: every state that lies
on *some* valid canvas. Nearly all the weight sits on a few of them. Under random logits
it lies on strings (many tokens fit at each position of one), and prefixes that spell
keys, numbers or other tools' names one token at a time fall billions of times behind;
under a model's logits, once the call's name is likely, so do the other tools' states,
and along a counted string all counts but the few that the likely tokens add up to.
Kept cells, BPE 4k, L=256: 1.7% of the support at 1 tool, 0.4% at 5, 0.03% at 20 under
N(0, 1) logits; 0.2-1.2% with the demo model (L=64).

Which cells can go, exactly. With each position's token weights normalised to
probabilities, a canvas's suffix weighs at most 1, so the canvases through a cell weigh
at most its prefix mass alpha. The forward sweep here keeps a cell where alpha (over
kept cells only) reaches a cut. A canvas left out passes a first cell left out, whose
prefix mass bounds every canvas through it, so the canvases left out weigh less than
(cells) x (cut) together. The cut is ``m * 2**-56 / cells``, where ``m`` is the mass of
some valid canvases and ``cells`` (L + 1) x S, the lattice's count: the canvases left
out weigh less than 2**-56 of the total. Samples, entropies and marginals over the kept
cells are within 2**-56 of the total weight of their values over all (below float64's
resolution), except that a token whose whole probability is that small may get a
log-marginal of -inf.

The Viterbi canvas can weigh less than the cut (where the weight spreads over many
canvases and the best one is rare: the texts against one call): a second test keeps a
cell where its best prefix followed by the best token at every later position reaches
the probability ``v`` of some valid canvas. A cell of the Viterbi canvas passes it (its
prefix and its suffix can only do better than those bounds, and the canvas at least as
well as ``v``), so the Viterbi canvas over the kept cells is the best of all.

``m`` and ``v`` come from greedy walks from the start: at each position the edge of the
heaviest group, or of the group with the best token, into a state that can still finish
the canvas in the tokens left; ``m`` counts every token of each group, ``v`` the best
one. A step that wants both sweeps first with the first test alone, and meanwhile takes
the best canvas on the cells it keeps and the best bound of the second test on a cell it
leaves out: where the bound falls below that canvas (or ``v``), the Viterbi canvas lies
on the kept cells already and one sweep is enough (usually); else a second sweep runs
both tests, the second against the better of the two canvases. Neither walk nor sweep
needs the canvas's ``Support``: the sweep follows the start state forward, and whether
a state can still finish follows from the fewest tokens it needs
(``fewest_to_finish``). The sweep gives up, and the passes run on the whole support,
where the kept cells would pass an eighth of the lattice's. A cut more than 990 nats
below 1 (under peaked logits the valid canvases can weigh e^-716 of the best tokens',
and the greedy walks find e^-974) would leave the weights of [cut, 1] out of float64's
range together: the sweep raises it to e^-990 and checks at the end that the canvases
over its kept cells weigh enough for that cut; where they do not, it tries again from
e^-1200, and then gives up. Where those canvases weigh far more than the walks found,
their weight gives a higher cut, and the kept cells under it go too (``keep_above``).

At low temperatures an atom more than 708 nats below its row's best has a sum float64
holds as 0 (or with few digits), and the fast passes would weigh its canvases as 0.
Each such atom's probability is below float64's smallest normal at its position, so
the canvases through any of them weigh at most (their count) x (that number) together
(the caller's ``log_lost``); where that is below 2**-57 of the kept canvases' weight,
they are left out too, beside the cells the sweep leaves out under a cut of half the
share (temperature 0.02, BPE 4k, 20 tools: 3.9 ms a step instead of 264 in log space
over the whole support). Where the sweep gives up, the same test against the greedy
walk's weight lets the fast passes run over the whole support
(``out_of_range_weighs_nothing``). Where the valid canvases weigh that little, those
atoms may carry them; and where they weigh below ~e^-1148 of the best tokens' the sweep
above gives up whatever the atoms' range, too light for a cut in float64 (a sure model
whose best tokens the grammar forbids: a call forced where it would answer in text, at
a low temperature). In both cases the sweep runs again in log space (a log-sum-exp an
edge, no cut raised, the group sums' logs from ``log_canvas``), and the log-space passes
run over its kept cells (random logits at temperature 0.01, 20 tools: ~15 ms a step
against ~280 over the whole support). Its cut can lie thousands of nats below the
canvases' weight where the greedy walk took an early edge that makes it pay at every
later position, and keep most of the lattice: it then searches for one from above,
each try lower by half again the last fall, and keeps the first whose kept canvases
weigh enough for it, or for the cut their weight gives.

Every test above bounds a cell's way on by 1 (or by the best token at each later
position). Where a sure model's best tokens are invalid throughout (a text answer where
a call is forced), nearly every prefix that writes the text into a string is heavy and
every way on from it light: the sweeps keep most of the lattice and give up, and the
passes leave float64's range over the whole support. Before those go to log space over
the whole support, a last sweep in log space tests each cell's prefix mass times a
bound on its way on (``suffix_bounds``: a pass over the whole lattice, a max and a
count an edge, no exp; ``dense_suffix_bounds`` over the support's rows where it is
dense), its cut searched from the bound at the start (with ``gmax`` its Viterbi test
takes the best prefix with the exact best way on). BPE 4k, 5 tools, temperature 0.2:
~1k of 700k cells kept, where 385 hold all but 2**-56 of the weight (7% of the lattice
without the bound).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numba as nb
import numpy as np

from .canvas import BETA, MESSAGES, KeptSets, MessageBuffers, Support, _clipped_run
from .canvas_layout import EdgeLayout
from .fsa import grown
from .token_automaton import NO_PATH, fewest_steps_back

#: The most weight, as a share of the total, the canvases left out may have together.
LOST_SHARE = 2.0**-56
#: The kept cells, as a share of the lattice's (L + 1) x S, above which the step runs on
#: the whole support. Around an eighth the passes over kept cells (lists, with the sweep
#: before them) cost what the whole support's do (BPE 4k, L=256): one tool, logits sure
#: of a call 12 nats over N(0, 2), 11.5% kept, 3.06 ms against 3.16 whole (3.47 giving
#: up at a tenth); engine logits of a random 40M model, 5 tools, 6-8 ms at 5-6% kept,
#: 12-14 ms at 12-15%, 10 ms whole. A lower cap ends a sweep that will give up sooner.
MAX_KEPT_SHARE = 0.125
#: The most cells a sweep in log space keeps before it gives up: it takes a log-sum-exp
#: an edge (~64 ns a kept cell at 20 tools), and its test against a loose Viterbi bound
#: can keep most of a large lattice before giving up at the share above (flat logits,
#: one allowed atom at -1e4: 100 ms at 20 tools). Random logits at temperatures from
#: 0.02 down to 0.002 keep 1.5-2.3k cells at 1, 5 and 20 tools (BPE 4k, L=256).
MAX_KEPT_LOG_CELLS = 50_000
#: Where the fast passes could run over the whole lattice instead (no atom out of range),
#: a sweep in log space keeps at most this share of it: the passes in log space over
#: kept cells (~0.4 us a cell) beat those (~6 ns a cell at 20 tools) up to about it (a
#: sure model whose best tokens the grammar forbids at 10 of 256 positions, 20 tools:
#: 52k cells kept, 28 ms a step against 94 over the whole lattice).
LOG_KEPT_SHARE = 0.015
#: The share of the lattice a bounded sweep (``way_on_bounds``) keeps at most, where it is
#: more than MAX_KEPT_LOG_CELLS: its alternative is log space over the whole support
#: (~0.2 us a cell), which its passes over kept cells (~0.4 us) beat by far at this share,
#: and a try that gives up here costs ~3% of that. A sure text answer where a call is
#: forced, byte tokenizer, 20 tools: ~53k cells kept (40.5k hold all but 2**-56 of the
#: weight), a step of 0.23 s against 1.0 s.
BOUNDED_KEPT_LOG_SHARE = 0.05
#: The lattices (positions x edges) from which a step that would go to log space over the
#: whole support first sweeps with each cell's suffix bounded (``suffix_bounds``): below,
#: the passes over the whole support cost little more than a sweep that gives up (one
#: tool, BPE 4k: 9.4 ms in log space; where the sweep gave up, 13 with it).
BOUNDED_SWEEP_MIN_EDGES = 1 << 20
#: Where the canvases over the kept cells weigh this many nats more than the greedy walks
#: found, their weight gives a higher cut (``keep_above``: fewer cells).
_LOOSE_WALK = 20.0
#: The sweep holds alpha times exp(lift): a cut below e^-_CUT_AT at e^-_CUT_AT, the lift
#: at most _TOP_AT (alpha <= 1; float64 ends at e^709), so that cuts down to
#: e^-(_CUT_AT + _TOP_AT) keep clear of the subnormals; a cut lower still is raised to a
#: floor (see ``kept_cells``), first that one, then, where the kept canvases weigh too
#: little for it, e^-_LOWEST_CUT (held at e^-510: terms far below the cut go subnormal,
#: ~10% slower at 20 tools under one token 80 nats ahead).
_CUT_AT = 300.0
_TOP_AT = 690.0
_LOWEST_CUT = 1200.0


@nb.njit(cache=True, nogil=True)
def greedy_bounds(gsum, gmax, ref, log_norm, to_finish, start, out_offsets, out_dst, out_group,
                  by_max, in_logs):  # pragma: no cover - compiled
    """Two lower bounds from a greedy walk: at each position the edge of the heaviest
    group (``gsum`` (L, G)), or with ``by_max`` of the group with the best token (``gmax``
    (L, G) logits; ``gsum`` may then be (L, 0), and the mass comes out -inf), into a state
    that can still finish the canvas (``to_finish``: see ``fewest_to_finish``). -> (log of
    the mass of the canvases along it, log of the probability of the best of them, -inf
    without ``by_max``); a token's probability is exp(x - ref) / norm at each position.
    Both -inf where the walk finds no edge. With ``in_logs`` ``gsum`` holds the logs of
    the sums."""
    L = gmax.shape[0] if by_max else gsum.shape[0]
    sums = gsum.shape[1] > 0
    s = start
    log_m = 0.0
    log_v = 0.0
    for l in range(L):
        best = -np.inf
        best_j = -1
        left = L - l - 1  # the tokens after this one
        for j in range(out_offsets[s], out_offsets[s + 1]):
            g = out_group[j]
            w = np.float64(gmax[l, g]) if by_max else gsum[l, g]
            if to_finish[out_dst[j]] <= left and (not sums or gsum[l, g] > (-np.inf if in_logs else 0.0)) and w > best:
                best = w
                best_j = j
        if best_j < 0 or best == -np.inf:
            return -np.inf, -np.inf
        g = out_group[best_j]
        log_m += (gsum[l, g] if in_logs else math.log(gsum[l, g])) - log_norm[l] if sums else -np.inf
        if by_max:
            log_v += (np.float64(gmax[l, g]) - ref[l]) - log_norm[l]
        s = out_dst[best_j]
    return log_m, log_v if by_max else -np.inf


#: How far below 1 a sweep in log space tries its first cut from above, where its bound
#: left too many cells (nats) ...
_CUT_SEARCH_STEP = 64.0
#: ... and how much further each try falls than the last: gently, since a cut far below
#: the canvases' weight keeps many cells (a sure model the grammar overrules at 20 tools:
#: cuts 1,000 nats apart keep 1.1k and over 50k cells).
_CUT_SEARCH_GROWTH = 1.5
#: The most cells the first sweep in log space keeps, from the greedy walk's bound: where
#: that bound lies far too low a sweep from it keeps most of the lattice, slowly.
_FIRST_LOG_CELLS = 10_000


#: The longest list of states sorted by insertion (n**2 / 4 moves against two radix
#: rounds' ~1,000 steps of counts and ~6n moves: even at ~70).
_INSERTION_SORT_MAX = 48


@nb.njit(cache=True, nogil=True)
def _sort_states(a, spare, count, bits):  # pragma: no cover - compiled
    """Sort the state ids ``a`` (below 2**bits) in place: a radix sort, a byte a round
    (numba's sort takes ~6x as long on a position's few hundred states), or an insertion
    sort for a few (a pruned sweep keeps ~9 states a position, where each radix round's
    257 counts cost ~20x the sort). ``spare`` is scratch of a's size at least, ``count``
    of 257."""
    n = a.shape[0]
    if n <= _INSERTION_SORT_MAX:
        for i in range(1, n):
            x = a[i]
            j = i - 1
            while j >= 0 and a[j] > x:
                a[j + 1] = a[j]
                j -= 1
            a[j + 1] = x
        return
    for shift in range(0, bits, 8):
        count[:] = 0
        for i in range(n):
            count[((a[i] >> shift) & 255) + 1] += 1
        for b in range(256):
            count[b + 1] += count[b]
        for i in range(n):
            b = (a[i] >> shift) & 255
            spare[count[b]] = a[i]
            count[b] += 1
        a[:] = spare[:n]


@nb.njit(cache=True, nogil=True)
def _best_after(log_norm):  # pragma: no cover - compiled
    """(L + 1,): the log-probability of the best token at each position from l on (each
    position's best allowed logit has probability 1 / norm)."""
    L = log_norm.shape[0]
    best_after = np.zeros(L + 1, np.float64)
    for l in range(L - 1, -1, -1):
        best_after[l] = best_after[l + 1] - log_norm[l]
    return best_after


@nb.njit(cache=True, nogil=True, inline="always")
def _log_add(a, b):  # pragma: no cover - compiled
    """log(exp(a) + exp(b))."""
    top = max(a, b)
    if top == -np.inf:
        return top
    return top + math.log1p(math.exp(min(a, b) - top))


#: How far below a state's largest term, past log(its edges), ``suffix_bounds`` counts a
#: term as near it (3: ~16 nats above the exact suffix at the median cell, 1: 47, 5: 13
#: but 92 at the worst, under a sure text answer where a call is forced, 5 tools) ...
_NEAR_GAP = 3.0
#: ... and its table: log(n + e^-_NEAR_GAP), n edges near the largest term (a state with
#: more takes the log itself; numba bakes the table into the kernel: kept small).
_LOG_NEAR = np.log(np.arange(1 << 10) + math.exp(-_NEAR_GAP))
#: A way on weighs at most 1, up to how far the normalisers (logs of the scan's float32
#: sums: ~1e-7 relative, at worst ~2e-6 for a block of 256 terms) fall short of the log
#: sums the bound adds up: ``suffix_bounds`` clamps at this many nats a position left.
_NORM_SLACK = 1e-3


@nb.njit(cache=True, nogil=True, inline="always")
def _log_near(near):  # pragma: no cover - compiled
    """log(near + e^-_NEAR_GAP), from the table where it holds it."""
    return _LOG_NEAR[near] if near < _LOG_NEAR.shape[0] else math.log(near + math.exp(-_NEAR_GAP))


@nb.njit(cache=True, nogil=True)
def suffix_bounds(log_gsum, gmax, ref, log_norm, to_finish, out_offsets, out_dst, out_group, offsets, states, bound,
                  best):  # pragma: no cover - compiled
    """Bounds on each cell's suffix, into ``bound`` and ``best`` (L + 1, S) each (best
    (0, S): not asked): on the log of its mass, the weight of the ways to finish the
    canvas from state s after l tokens, each position's tokens normalised to
    probabilities (``log_gsum`` (L, G) the groups' log sums, ``log_norm`` (L,) each
    position's normaliser); and, with ``gmax`` (L, G) the groups' best logits ((L, 0):
    none), the log-probability of its best way on, exactly (``ref`` (L,) each position's
    best allowed logit, as in ``greedy_bounds``). -inf where s cannot finish in the
    tokens left. Returns (bound, best).

    A forward sweep that keeps a cell only where its prefix mass reaches the cut bounds
    the suffix by 1, and one that keeps a cell for the Viterbi canvas bounds its way on
    by the best token at each position; where a sure model's best tokens are invalid (a
    text answer where a call is forced) nearly every prefix that writes the text into a
    string is heavy and every way on from it light, and the sweeps keep most of the
    lattice (7% at 5 tools, where 0.06% holds all but 2**-56 of the weight). The exact
    mass is the backward pass in log space, an exp an edge; the bound takes a max and a
    count instead: the terms t of a state's edges (group weight times the next cell's
    bound) add up to at most e^max * (near + e^-3), ``near`` the terms within log(edges)
    + 3 of the largest (the others together weigh less than e^(max - 3)); and at most 1,
    each position's tokens normalised over every allowed one (a state's edges hold
    disjoint tokens), where that bound is looser (up to ``_NORM_SLACK``). Under that sure
    model it lies ~15 nats above the exact value at its median cell (BPE 4k, 5 tools,
    temperature 0.2). This pass walks each state's edges one by one, in state order:
    every state's, or with a support's lists (``offsets`` (L + 2,) and ``states``, as in
    ``canvas.Support``; (0,) each: none) its live states' alone, the others -inf;
    ``dense_suffix_bounds`` takes the same values over the layout's runs."""
    L = log_gsum.shape[0]
    S = to_finish.shape[0]
    with_best = best.shape[0] > 0
    listed = offsets.shape[0] > 0
    gap = np.empty(S, np.float64)  # how far below the largest term a term counts as near
    widest = 1
    for s in range(S):
        bound[L, s] = 0.0 if to_finish[s] == 0 and not listed else -np.inf
        if with_best:
            best[L, s] = bound[L, s]
        n = out_offsets[s + 1] - out_offsets[s]
        widest = max(widest, n)
        gap[s] = math.log(max(n, 1)) + _NEAR_GAP
    if listed:  # (the support's cells alone: the others stay -inf)
        bound[:L] = -np.inf
        if with_best:
            best[:L] = -np.inf
        for i in range(offsets[L], offsets[L + 1]):  # (live at L: accepting by construction)
            bound[L, states[i]] = 0.0
            if with_best:
                best[L, states[i]] = 0.0
    terms = np.empty(widest, np.float64)  # a state's terms
    v = np.empty(gmax.shape[1], np.float64)  # a position's groups' best log-probabilities
    w = np.empty(log_gsum.shape[1], np.float64)  # and log sums (the arrays may be in Fortran order)
    for l in range(L - 1, -1, -1):
        left = L - l
        nxt = bound[l + 1]
        w[:] = log_gsum[l]
        shift = ref[l] + log_norm[l]
        for g in range(v.shape[0]):
            v[g] = np.float64(gmax[l, g]) - shift
        best_next = best[l + 1] if with_best else nxt
        for i in range(offsets[l] if listed else 0, offsets[l + 1] if listed else S):
            s = states[i] if listed else i
            e0, e1 = out_offsets[s], out_offsets[s + 1]
            top = -np.inf
            top_v = -np.inf
            if to_finish[s] <= left:  # (indices unsigned: see kept_cells)
                for j in range(np.uint32(e0), np.uint32(e1)):
                    d = np.uint32(out_dst[j])
                    g = np.uint32(out_group[j])
                    t = w[g] + nxt[d]
                    terms[np.uint32(j - e0)] = t
                    top = max(top, t)
                    if with_best:
                        top_v = max(top_v, v[g] + best_next[d])
            if with_best:
                best[l, s] = top_v
            if top == -np.inf:
                bound[l, s] = -np.inf
                continue
            near = 1  # (one edge, as most states have: it is the largest)
            if e1 - e0 > 1:
                near_from = top - gap[s]
                near = 0
                for j in range(np.uint32(e1 - e0)):
                    near += terms[j] >= near_from
            bound[l, s] = min(top - log_norm[l] + _log_near(near), _NORM_SLACK * left)  # (see _NORM_SLACK)
    return bound, best


@nb.njit(cache=True, nogil=True, inline="always")
def _max_run(top, w, nxt):  # pragma: no cover - compiled
    for j in range(top.shape[0]):
        top[j] = np.fmax(top[j], w + nxt[j])


@nb.njit(cache=True, nogil=True, inline="always")
def _count_run(near, near_from, w, nxt):  # pragma: no cover - compiled
    for j in range(near.shape[0]):
        near[j] += w + nxt[j] >= near_from[j]


@nb.njit(cache=True, nogil=True, inline="always")
def _max_along_edges(top, w, nxt, src, dst, group, runs, clip_l, fans):  # pragma: no cover - compiled
    """top[src] = max(top[src], w[group] + nxt[dst]) over every edge of the layout that
    may join live cells: a run as one loop over slices (clipped to its live stretch), a
    fan's one term out to its sources, the single edges one by one."""
    for r in range(runs.shape[0] - 1):
        e = runs[r]
        a, b, n = _clipped_run(src, dst, e, clip_l[r])
        _max_run(top[a:a + n], w[group[e]], nxt[b:b + n])
    for f in range(fans.shape[0] - 1):
        e = fans[f]
        t = w[group[e]] + nxt[dst[e]]
        for j in range(src[e], src[e] + fans[f + 1] - e):
            top[j] = np.fmax(top[j], t)
    for e in range(fans[-1], src.shape[0]):  # (indices unsigned: see kept_cells)
        s = np.uint32(src[e])
        top[s] = np.fmax(top[s], w[np.uint32(group[e])] + nxt[np.uint32(dst[e])])


@nb.njit(cache=True, nogil=True, inline="always")
def _count_along_edges(near, near_from, w, nxt, src, dst, group, runs, clip_l, fans):  # pragma: no cover - compiled
    """near[src] += (w[group] + nxt[dst] >= near_from[src]) over the edges
    ``_max_along_edges`` takes, in the same three kinds."""
    for r in range(runs.shape[0] - 1):
        e = runs[r]
        a, b, n = _clipped_run(src, dst, e, clip_l[r])
        _count_run(near[a:a + n], near_from[a:a + n], w[group[e]], nxt[b:b + n])
    for f in range(fans.shape[0] - 1):
        e = fans[f]
        t = w[group[e]] + nxt[dst[e]]
        for j in range(src[e], src[e] + fans[f + 1] - e):
            near[j] += t >= near_from[j]
    for e in range(fans[-1], src.shape[0]):
        s = np.uint32(src[e])
        near[s] += w[np.uint32(group[e])] + nxt[np.uint32(dst[e])] >= near_from[s]


@nb.njit(cache=True, nogil=True)
def dense_suffix_bounds(log_gsum, gmax, ref, log_norm, live, state, out_offsets, src, dst, group, runs, clip, fans,
                        bound, best):  # pragma: no cover - compiled
    """``suffix_bounds`` over the whole support's rows (``canvas.Support``: ``live`` and
    ``clip``; the layout's edges and each row's ``state``, ``out_offsets`` the states'
    edges as there): the same values at its live cells, -inf at the others, by row (the
    layout's ``rank`` is a state's column). Each position takes two passes over the
    layout's edges, a max and then the count of terms near it, each run one loop over
    slices, which vectorise: 20 tools at BPE 4k, ~55 ms where the pass by state took
    ~90 (both into kept arrays)."""
    L = log_gsum.shape[0]
    S = live.shape[1]
    with_best = best.shape[0] > 0
    gap = np.empty(S, np.float64)  # each row's: how far below its largest term a term counts as near
    for r in range(S):
        s = state[r]
        gap[r] = math.log(max(out_offsets[s + 1] - out_offsets[s], 1)) + _NEAR_GAP
        bound[L, r] = 0.0 if live[L, r] else -np.inf
        if with_best:
            best[L, r] = bound[L, r]
    top = np.empty(S, np.float64)  # each row's largest term at l
    near_from = np.empty(S, np.float64)
    near = np.empty(S, np.int32)  # and its terms near it
    v = np.empty(gmax.shape[1], np.float64)  # a position's groups' best log-probabilities
    w = np.empty(log_gsum.shape[1], np.float64)  # and log sums (the arrays may be in Fortran order)
    for l in range(L - 1, -1, -1):
        nxt = bound[l + 1]
        w[:] = log_gsum[l]
        live_l = live[l]
        top[:] = -np.inf
        _max_along_edges(top, w, nxt, src, dst, group, runs, clip[l], fans)
        for r in range(S):
            near_from[r] = top[r] - gap[r]
            near[r] = 0
        _count_along_edges(near, near_from, w, nxt, src, dst, group, runs, clip[l], fans)
        out = bound[l]
        cap = _NORM_SLACK * (L - l)
        for r in range(S):
            out[r] = min(top[r] - log_norm[l] + _log_near(near[r]), cap) if live_l[r] and top[r] > -np.inf \
                else -np.inf
        if with_best:
            shift = ref[l] + log_norm[l]
            for g in range(v.shape[0]):
                v[g] = np.float64(gmax[l, g]) - shift
            out = best[l]
            out[:] = -np.inf
            _max_along_edges(out, v, best[l + 1], src, dst, group, runs, clip[l], fans)
            for r in range(S):
                out[r] = out[r] if live_l[r] else -np.inf
    return bound, best


def way_on_bounds(log_gsum: np.ndarray, gmax: np.ndarray, ref: np.ndarray, log_norm: np.ndarray,
                   to_finish: np.ndarray, out_edges: tuple[np.ndarray, np.ndarray, np.ndarray],
                   whole: tuple[Support, EdgeLayout] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``suffix_bounds``' (bound, best) and the column of each state in them: over the
    layout's rows where ``whole`` (the whole support of the canvas and the grammar's
    layout) is a dense support (``dense_suffix_bounds``), else by state (over the
    support's live lists where it has them: -inf at the other cells). The bound lies
    in the dense passes' beta buffer (``canvas.MESSAGES``: a bound on beta's logs; no
    pass's beta is alive while a sweep runs), kept from one step to the next: a fresh
    (257, 49k) array at 20 tools cost ~40 ms of page faults, near what the pass takes.
    Inside an op (``MESSAGES.taken``) it is valid until the next pass there writes beta."""
    L, S = log_gsum.shape[0], to_finish.shape[0]
    bound = MESSAGES.get(BETA, L + 1, S)
    best = np.empty((L + 1 if gmax.shape[1] else 0, S), np.float64)
    if whole is not None and whole[0].dense:
        sup, lay = whole
        dense_suffix_bounds(log_gsum, gmax, ref, log_norm, sup.live, lay.state, out_edges[0], lay.src, lay.dst,
                            lay.group, lay.runs, sup.clip, lay.fans, bound, best)
        return bound, best, lay.rank
    lists = (whole[0].offsets, whole[0].states) if whole is not None else (np.zeros(0, np.int64), np.zeros(0, np.int32))
    suffix_bounds(log_gsum, gmax, ref, log_norm, to_finish, *out_edges, *lists, bound, best)
    return bound, best, np.arange(S, dtype=np.int32)


def _kept_cells_kernel(want_sum: bool, want_max: bool, in_logs: bool,  # type: ignore[no-untyped-def]
                       bounded: bool = False):
    """The forward sweep over kept cells for one choice of tests, and with ``in_logs``
    over the logs of the sums, with ``bounded`` each cell's prefix mass taken with the
    ``suffix`` bound on the rest (compile-time flags)."""
    none = -np.inf if in_logs else 0.0  # alpha's zero

    @nb.njit(cache=True, nogil=True)
    def kept_cells(gsum, gmax, ref, log_norm, to_finish, start, out_offsets, out_dst, out_group, suffix,
                   best_suffix, column, log_cut, log_share, lowest, log_best, max_cells, states, alpha, prefix, cur,
                   nxt, vcur, vnxt, touched, is_touched, spare):  # pragma: no cover - compiled
        """(offsets (L + 2,), states, alpha, prefix, n, ok, best, dropped, log_kept, lift):
        the kept cells are states[:n] (sorted at each position), each with its alpha[:n] and
        prefix[:n], in the arrays passed in (``SweepScratch``'s) or, where they were too
        short, in larger ones made here; the arrays ``cur`` .. ``spare`` (S entries at least)
        are scratch. ok is False where it gives up; log_kept is the log
        of the weight of the canvases over the kept cells (with ``want_sum``; where it gives
        up, +inf for too many cells, else that weight or -inf), alpha each kept cell's
        prefix mass times exp(lift) (``in_logs``: its log, gsum the sums' logs, no lift;
        a log-sum-exp an edge, for weights out of float64's range), prefix its best
        prefix's log-probability (see
        ``keep_above``); best is the log-probability of the best canvas on the
        kept cells (with ``want_max``). With ``want_sum`` a cell stays where its prefix
        mass reaches ``log_cut``; with ``want_max`` also where its best prefix followed by
        the best token at every position after it reaches ``log_best`` (probabilities as
        in ``greedy_bounds``), and ``dropped`` is the most that bound reaches on a cell
        left out that could still finish (-inf where none): a canvas of probability above
        it lies on the kept cells alone. ``log_share`` is log(LOST_SHARE / cells), which
        ``log_cut`` (with ``want_sum``) adds to a lower bound on the total weight; a cut
        below ``lowest`` is raised to it, sound where the kept canvases' weight bounds it
        so too (else the sweep gives up). With ``bounded`` (in logs) the first test is on
        the prefix mass plus ``suffix`` (L + 1, S), a bound on the log of the mass of the
        ways on from the cell (``suffix_bounds``; state s in its column ``column[s]``): a
        canvas left out passes a first cell left out, and weighs at most its prefix mass
        there times that bound; and the second (with ``want_max``) on the best prefix plus
        ``best_suffix``, the best way on."""
        L = log_norm.shape[0]
        S = to_finish.shape[0]
        offsets = np.zeros(L + 2, np.int64)
        bits = 8
        while (1 << bits) < S:
            bits += 8
        count = np.zeros(257, np.int64)
        cap = states.shape[0]
        best_after = _best_after(log_norm)  # (the best allowed logit is ``ref``, its probability 1 / norm)
        # alpha over the kept cells is at most 1 (each position's token probabilities add
        # up to 1) and at least the cut on a kept cell: held as alpha * exp(lift), the lift
        # raising a cut far below 1 (peaked logits: a valid canvas can weigh e^-716
        # of the best tokens' where the model is sure of an invalid one) to e^-300 (to
        # e^-510 at most, see _LOWEST_CUT), so that all of [cut, 1] lies in float64's
        # range and a term far below the cut flushes without passing through the
        # subnormals, which cost ~100 cycles an operation. A cut below ``lowest`` is raised
        # to it, and the kept cells are checked at the end to weigh enough for it: their
        # canvases, all valid, are a lower bound on the total, better than the greedy
        # walk's, which can fall 250 nats short under peaked logits
        lift = 0.0
        raised = want_sum and not in_logs and log_cut < lowest
        if raised:
            log_cut = lowest
        if want_sum and not in_logs and log_cut < -_CUT_AT:
            lift = min(-_CUT_AT - log_cut, _TOP_AT)
        cut = (log_cut if in_logs else math.exp(log_cut + lift)) if want_sum else np.inf
        for s in range(S):
            cur[s] = none  # alpha at l over the kept cells, times exp(lift)
            nxt[s] = none
            vcur[s] = -np.inf  # the best prefix's log-probability over the kept cells
            vnxt[s] = -np.inf
            is_touched[s] = 0  # (touched: the states reached from the kept cells, finishing or not)
        states[0] = start
        alpha[0] = 0.0 if in_logs else math.exp(lift)
        prefix[0] = 0.0
        cur[start] = alpha[0]
        vcur[start] = 0.0
        offsets[1] = 1
        n = 1
        dropped = -np.inf
        for l in range(L):
            nt = 0
            inv = math.exp(-log_norm[l])
            shift = ref[l] + log_norm[l]
            for i in range(offsets[l], offsets[l + 1]):
                s = np.uint32(states[np.uint32(i)])  # (indices unsigned: numba checks a signed one for
                # wrapping around from the end, which made the sweep 1.4x slower)
                a = cur[s] - log_norm[l] if in_logs else cur[s] * inv
                v = vcur[s] - shift
                cur[s] = none
                vcur[s] = -np.inf
                for j in range(np.uint32(out_offsets[s]), np.uint32(out_offsets[s + 1])):  # (no branch: ~2x faster)
                    d = np.uint32(out_dst[np.uint32(j)])
                    g = np.uint32(out_group[np.uint32(j)])
                    if want_sum and in_logs:
                        nxt[d] = _log_add(nxt[d], a + gsum[l, g])
                    elif want_sum:
                        nxt[d] += a * gsum[l, g]
                    if want_max:
                        vnxt[d] = max(vnxt[d], v + gmax[l, g])
                    touched[np.uint32(nt)] = d
                    nt += 1 - is_touched[d]
                    is_touched[d] = 1
            if n + nt > max_cells:  # (log_kept +inf: too many cells, whatever the cut)
                return offsets, states, alpha, prefix, n, False, -np.inf, np.inf, np.inf, 0.0
            v_cut = log_best - best_after[l + 1]
            if n + nt > cap:
                while cap < n + nt:
                    cap *= 2
                states = grown(states, n, cap)
                alpha = grown(alpha, n, cap)
                prefix = grown(prefix, n, cap)
            left = L - l - 1
            m = n
            for k in range(nt):
                d = np.uint32(touched[np.uint32(k)])
                w = nxt[d]
                v = vnxt[d]
                nxt[d] = none
                vnxt[d] = -np.inf
                is_touched[d] = 0
                if to_finish[d] > left:
                    continue
                if bounded:  # (a hair above the bounds: their sums round)
                    c = np.uint32(column[d])
                    w_on = w + suffix[l + 1, c] + 1e-9 * (1.0 + abs(w) + abs(suffix[l + 1, c]))
                    v_on = v + best_suffix[l + 1, c] + 1e-9 * (1.0 + abs(v) + abs(best_suffix[l + 1, c])) \
                        if want_max else -np.inf
                    keep = (want_sum and w_on >= cut) or (want_max and v_on >= log_best)
                else:
                    v_on = v + best_after[l + 1]  # (the best canvas through the cell, at most)
                    keep = (want_sum and w >= cut) or (want_max and v >= v_cut)
                if keep:
                    states[np.uint32(m)] = d
                    m += 1
                    cur[d] = w
                    vcur[d] = v
                elif want_max:
                    dropped = max(dropped, v_on)
            if m == n:  # (a raised cut above every cell; else, rounding aside, the walk's canvas passes)
                return offsets, states, alpha, prefix, n, False, -np.inf, np.inf, -np.inf, 0.0
            _sort_states(states[n:m], spare, count, bits)  # (the passes find a state in a list by bisection)
            for i in range(n, m):
                alpha[i] = cur[states[i]]
                prefix[i] = vcur[states[i]]
            n = m
            offsets[l + 2] = n
        best = -np.inf
        mass = none
        for i in range(offsets[L], n):
            best = max(best, vcur[states[i]])
            mass = _log_add(mass, cur[states[i]]) if in_logs else mass + cur[states[i]]
        if in_logs:
            log_kept = mass
        else:
            log_kept = math.log(mass) - lift if mass > 0.0 else -np.inf
        if raised and not log_kept + log_share >= log_cut:
            return offsets, states, alpha, prefix, n, False, -np.inf, np.inf, -np.inf, 0.0
        return offsets, states, alpha, prefix, n, True, best, dropped, log_kept, lift

    return kept_cells


_KEPT_CELLS = {(s, m, logs, b): _kept_cells_kernel(s, m, logs, b)
               for s, m, logs, b in ((True, False, False, False), (False, True, False, False),
                                     (True, True, False, False), (True, False, True, False), (True, True, True, False),
                                     (True, False, True, True), (True, True, True, True))}


class SweepScratch:
    """The arrays one sweep works in, kept from one step to the next (in
    ``SWEEP_SCRATCH``). Fresh ones are faulted in page by page, and under flat logits a
    sweep keeps ~1M cells (a random model, byte tokenizer, 20 tools, L=256: 8.6% of the
    lattice), whose lists grew by doubling into 40 MB of new pages a sweep: 8.5k page
    faults, 11 of its 29 ms. It keeps the longest lists a sweep asked for, up to
    ``KEPT_BYTES`` (20 bytes a cell, at most twice ``MAX_KEPT_SHARE`` of the lattice: 42
    MB at 20 tools and L=256), and scratch of 41 bytes a state of the largest automaton
    it swept (2.0 MB at 20 tools)."""

    #: The longest lists kept for the next sweep: the dense passes' limit.
    KEPT_BYTES = MessageBuffers.KEPT_BYTES

    def __init__(self) -> None:
        self.cells = (np.empty(1024, np.int32), np.empty(1024, np.float64), np.empty(1024, np.float64))
        self.by_state: tuple[np.ndarray, ...] = ()

    def sweep(self, want_sum: bool, want_max: bool, in_logs: bool, bounded: bool, *args: Any) -> tuple[Any, ...]:
        """``kept_cells`` for those tests over ``args`` (its arguments up to ``max_cells``)
        in these arrays. -> (offsets, states, ok, best, dropped, log_kept, alpha, prefix,
        lift), states, alpha and prefix views of the arrays where they were long enough:
        valid until their next sweep."""
        S = args[4].shape[0]  # (to_finish)
        if not self.by_state or self.by_state[0].shape[0] < S:
            self.by_state = (np.empty(S, np.float64), np.empty(S, np.float64), np.empty(S, np.float64),
                             np.empty(S, np.float64), np.empty(S, np.int32), np.empty(S, np.uint8),
                             np.empty(S, np.int32))
        kernel = _KEPT_CELLS[want_sum, want_max, in_logs, bounded]
        offsets, states, alpha, prefix, n, ok, best, dropped, log_kept, lift = kernel(*args, *self.cells,
                                                                                      *self.by_state)
        grown_here = states.shape[0] > self.cells[0].shape[0]
        if grown_here and states.shape[0] * 20 <= self.KEPT_BYTES:
            self.cells = (states, alpha, prefix)
        return offsets, states[:n], ok, best, dropped, log_kept, alpha[:n], prefix[:n], lift


#: The process's sweep arrays: a sweep takes a set and gives it back (see KeptSets).
SWEEP_SCRATCH: KeptSets[SweepScratch] = KeptSets(SweepScratch)


@nb.njit(cache=True, nogil=True)
def _fewest_to_finish(final, in_offsets, in_src, out_offsets, out_dst):  # pragma: no cover - compiled
    S = final.shape[0]
    fewest = fewest_steps_back(final, in_offsets, in_src)
    longer = True  # every accepting state steps to an accepting one
    for s in range(S):
        if in_offsets[s] == in_offsets[s + 1] and out_offsets[s] == out_offsets[s + 1]:
            # no token leads to it or from it (the automaton drops the edges into states
            # its tokens cannot finish from): on no canvas, unless one starts there
            fewest[s] = NO_PATH
            continue
        if final[s]:
            steps = False
            for j in range(out_offsets[s], out_offsets[s + 1]):
                steps = steps or final[out_dst[j]]
            longer = longer and steps
    return fewest, longer


def fewest_to_finish(final: np.ndarray, in_edges: tuple[np.ndarray, np.ndarray, np.ndarray],
                     out_edges: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray | None:
    """(S,) int32: the fewest tokens from each state to an accepting one (``final`` (S,)
    bool), where a state finishes a canvas in any number of tokens from there on: every
    accepting state steps to an accepting one (the padding after the stop token; with
    ``partial`` every state, where none is a dead end). None where that does not hold.
    A state no edge enters or leaves is on no canvas (the token automaton drops the edges
    into states its tokens cannot finish from) and counts as never finishing: a canvas
    that starts there is left to the support, which refuses it.

    With it a state at position l lies on a valid canvas of length L exactly where the
    start reaches it in l tokens, which the sweep follows, and it has at most L - l
    tokens to finish: the sweep needs no ``Support``, whose masks take 45 ms a canvas at
    20 tools (BPE 4k, L=256), five times a pruned step.
    """
    fewest, longer = _fewest_to_finish(final, in_edges[0], in_edges[1], out_edges[0], out_edges[1])
    return fewest if longer else None


@nb.njit(cache=True, nogil=True)
def keep_above(offsets, states, alpha, prefix, cut, log_norm):  # pragma: no cover - compiled
    """A sweep's kept cells (``kept_cells``'s offsets, states, alpha, prefix) less those
    whose alpha is below a higher ``cut`` (at alpha's scale). -> (offsets, states, the most
    a canvas through a cell left out may weigh, as ``kept_cells``'s ``dropped``: -inf
    where the sweep ran without the Viterbi test).

    Sound as the sweep's own test: a canvas left out passes a first cell left out, whose
    prefixes over the kept cells weigh at most its alpha (taken over at least those
    cells), below the cut. Cells kept may lose all their predecessors (their alpha in the
    passes is then 0): no harm. A second sweep with the higher cut keeps fewer, at the
    cost of a sweep (1.03-1.08x the step at 1 tool, measured)."""
    L = log_norm.shape[0]
    best_after = _best_after(log_norm)
    out_offsets = np.zeros_like(offsets)
    out = np.empty_like(states)
    dropped = -np.inf
    n = 0
    for p in range(L + 1):
        for i in range(offsets[p], offsets[p + 1]):
            if alpha[i] >= cut or p == 0:
                out[n] = states[i]
                n += 1
            else:
                dropped = max(dropped, prefix[i] + best_after[p])
        out_offsets[p + 1] = n
    return out_offsets, out[:n], dropped


def _below_rounding(log_p: float) -> float:
    """A canvas's log-probability lowered by more than the rounding in its sums, so that
    the canvas's own cells pass a test against it."""
    return log_p - 1e-6 * (1.0 + abs(log_p))


def _log_normalisers(to_finish: np.ndarray, start: int, ref: np.ndarray, asum: np.ndarray | None
                     ) -> np.ndarray | None:
    """(L,) the log of each position's normaliser (the atoms' sums ``asum`` (L, K) added
    up; 0 without sums), or None where neither a walk nor a sweep can run: the canvas
    cannot finish in L tokens from ``start``, or a position has no allowed finite logit."""
    L = ref.shape[0]
    with np.errstate(divide="ignore"):  # (a position without an allowed finite logit: caught below)
        log_norm = np.log(asum.sum(axis=1) if asum is not None else np.ones(L))  # (L,)
    if not (to_finish[start] <= L and np.isfinite(ref).all() and np.isfinite(log_norm).all()):
        return None
    return log_norm


class KeptCells(NamedTuple):
    """``sweep_support``'s answer: the kept cells as a support of lists, or None where
    too few can be left out; and, where so, whether the sweep gave up because the valid
    canvases weigh too little for a cut in float64 (below ~e^-1200 of the rows' best
    tokens: a sure model whose best tokens the grammar forbids), where a sweep in log
    space may still keep few cells; ``log_walk``, the log of the mass of the canvases
    along the greedy walk by the groups' sums (-inf without sums), which bounds the
    valid canvases' weight from below (``out_of_range_weighs_nothing``)."""

    support: Support | None
    too_light: bool
    log_walk: float


def probable_support(to_finish: np.ndarray, start: int, out_edges: tuple[np.ndarray, np.ndarray, np.ndarray],
                     ref: np.ndarray, gsum: np.ndarray | None = None, asum: np.ndarray | None = None,
                     gmax: np.ndarray | None = None, log_lost: float = -math.inf,
                     in_logs: bool = False, whole_in_range: bool = False,
                     bound_suffixes: bool = False, whole: tuple[Support, EdgeLayout] | None = None) -> Support | None:
    """``sweep_support``'s cells, or None where too few can be left out."""
    return sweep_support(to_finish, start, out_edges, ref, gsum, asum, gmax, log_lost, in_logs,
                         whole_in_range, bound_suffixes, whole).support


def sweep_support(to_finish: np.ndarray, start: int, out_edges: tuple[np.ndarray, np.ndarray, np.ndarray],
                  ref: np.ndarray, gsum: np.ndarray | None = None, asum: np.ndarray | None = None,
                  gmax: np.ndarray | None = None, log_lost: float = -math.inf, in_logs: bool = False,
                  whole_in_range: bool = False, bound_suffixes: bool = False,
                  whole: tuple[Support, EdgeLayout] | None = None) -> KeptCells:
    """The cells of a canvas from ``start`` that can carry weight (with ``gsum`` and
    ``asum``) and the Viterbi canvas (with ``gmax``), see the module's docstring, as a
    support of lists (``KeptCells``).

    ``to_finish`` is ``fewest_to_finish``'s, ``out_edges`` is (offsets, destination,
    group) of each state's edges. ``ref`` (L,) is each position's best allowed logit,
    which the step's sums were taken from: ``gsum`` (L, G) the groups' sums, ``asum``
    (L, K) the atoms' (they add up to each position's normaliser); ``gmax`` (L, G) the
    groups' best logits. ``log_lost`` (with the sums) bounds the log-probability, tokens
    normalised so at each position, of the canvases through atoms the sums hold as 0 or
    coarsely (below float64's smallest normal): those are left out too, so the cut takes
    half the share, and the cells are kept only where they weigh less than the other
    half of the valid canvases' weight (else None). With ``in_logs``, ``gsum`` holds the
    logs of the groups' sums (``log_canvas``'s, exact where the sums leave float64's
    range) and the sweep adds its weights in log space; ``asum`` stays the sums, whose
    totals at each position are in range (the best allowed token's term is 1).
    ``whole_in_range`` (with ``in_logs``): the fast passes could run over the whole
    support instead, which bounds the cells worth keeping (``LOG_KEPT_SHARE``).
    ``bound_suffixes`` (with ``in_logs`` and the sums): each cell's prefix mass is tested
    with a bound on its suffix's (``way_on_bounds``, a pass over the whole lattice), for
    where the prefixes alone keep too many cells; ``whole``, the canvas's whole support
    and the grammar's layout, lets that pass run over the support's rows.
    """
    want_sum, want_max = gsum is not None, gmax is not None
    L = ref.shape[0]
    log_norm = _log_normalisers(to_finish, start, ref, asum)
    if log_norm is None:
        return KeptCells(None, False, -math.inf)
    none = np.zeros((L, 0), np.float64)
    gsum_ = gsum if gsum is not None else none
    gmax_ = gmax if gmax is not None else none
    walks = [greedy_bounds(gsum_, gmax_, ref, log_norm, to_finish, start, *out_edges, by_max, in_logs)
             for by_max in ((False, True) if want_sum and want_max else (want_max,))]
    log_m = max(w[0] for w in walks)
    log_v = max(w[1] for w in walks)
    log_walk = walks[0][0]  # (the walk by the sums, where there are sums: -inf else)
    cells = (L + 1) * to_finish.shape[0]  # (at least the support's)
    share = LOST_SHARE if not (want_sum and log_lost > -np.inf) else LOST_SHARE / 2
    with SWEEP_SCRATCH.taken() as scratch:  # (arrays of its own while it sweeps)
        bounded = bound_suffixes and in_logs and want_sum
        none2 = np.zeros((0, 0), np.float64)
        suffix, best_suffix, column = way_on_bounds(gsum_, gmax_, ref, log_norm, to_finish, out_edges, whole) \
            if bounded else (none2, none2, np.zeros(0, np.int32))
        args = (gsum_, gmax_, ref, log_norm, to_finish, start, *out_edges, suffix, best_suffix, column)
        kept, too_light = _sweeps(scratch, args, want_sum, want_max, in_logs, log_m, log_v, share, cells, log_lost,
                                  whole_in_range, bounded)
        if kept is None:
            return KeptCells(None, too_light, log_walk)
        offsets, states = kept
        if np.may_share_memory(states, scratch.cells[0]):  # (the set's next sweep would overwrite it)
            states = states.copy()
    # (no mask: the passes over lists read none, and the log-space ones make theirs)
    no_mask = np.zeros((0, to_finish.shape[0]), np.uint8)
    return KeptCells(Support(offsets, states, no_mask, False, np.zeros((0, 0, 2), np.int32)), False, log_walk)


def _sweeps(scratch: "SweepScratch", args: tuple[Any, ...], want_sum: bool, want_max: bool, in_logs: bool,
            log_m: float, log_v: float, share: float, cells: int, log_lost: float, whole_in_range: bool,
            bounded: bool = False) -> tuple[tuple[np.ndarray, np.ndarray] | None, bool]:
    """``probable_support``'s sweeps from the lower bounds ``log_m`` (the mass of some
    valid canvases) and ``log_v`` (the log-probability of one), the canvases left out
    weighing less than ``share`` of the total together over the lattice's ``cells``:
    ((offsets, states) of the kept cells, or None where they give up; whether they gave
    up because the canvases weigh too little for a cut in float64, where a sweep in log
    space may keep few cells). ``whole_in_range``: the fast passes could run over the
    whole support instead (no atom's sum out of float64's range): a sweep in log space
    then keeps at most ``LOG_KEPT_SHARE`` of the lattice. ``bounded``: args' last two
    entries are ``way_on_bounds``' (bound, best, column), which the tests take with each
    cell's prefixes."""
    if (want_sum and not log_m > -np.inf) or (want_max and not log_v > -np.inf):
        return None, False
    log_share = math.log(share / cells)
    sweep = functools.partial(scratch.sweep, want_sum, want_max, in_logs and want_sum, bounded)
    max_cells = int(MAX_KEPT_SHARE * cells)
    if in_logs:
        most = max(MAX_KEPT_LOG_CELLS, int(BOUNDED_KEPT_LOG_SHARE * cells)) if bounded else MAX_KEPT_LOG_CELLS
        max_cells = min(max_cells, int(LOG_KEPT_SHARE * cells) if whole_in_range else most)
        if max_cells <= args[2].shape[0]:  # (fewer cells than the canvas's positions: it cannot keep one canvas)
            return None, False
    log_best = np.inf if want_sum else _below_rounding(log_v)
    log_cut = log_m + log_share
    lowest = -np.inf if in_logs else -(_CUT_AT + _TOP_AT)  # (log space: no cut is raised)
    searching = in_logs and want_sum  # (a first try in log space keeps few cells: see below)
    offsets, states, ok, best, dropped, log_kept, alpha, prefix, lift = sweep(
        *args, log_cut, log_share, lowest, log_best, min(max_cells, _FIRST_LOG_CELLS) if searching else max_cells)
    if not ok and want_sum and log_cut < lowest and log_kept < np.inf:  # (raised and refused: lower)
        lowest = -_LOWEST_CUT
        offsets, states, ok, best, dropped, log_kept, alpha, prefix, lift = sweep(*args, log_cut, log_share, lowest,
                                                                                  log_best, max_cells)
        if not ok and log_cut < lowest and log_kept < np.inf:
            return None, True
    if not ok and searching and log_kept == np.inf:
        # The bound left too many cells: it can lie thousands of nats below the canvases'
        # weight (a greedy walk that enters a call early, where a sure model wants the
        # call's text a few positions on, pays for every token after). Cuts from above
        # instead, each lower by half again the last fall (a try far above the canvases'
        # weight keeps no cell for long), the first sound one kept: one whose kept
        # canvases weigh enough for it, or the cut their weight gives. A try that keeps
        # too many cells ends it (the weight spreads: a lower cut keeps more), and the
        # bound's cut is tried last, with every cell the sweep may keep.
        # (a canvas weighs at most 1, or, with the suffixes bounded, the bound at the start)
        cut, fall = log_share + (min(args[-3][0, args[-1][args[5]]], 0.0) if bounded else 0.0), _CUT_SEARCH_STEP
        while True:
            cut = max(cut - fall, log_cut)
            fall *= _CUT_SEARCH_GROWTH
            found = sweep(*args, cut, log_share, lowest, log_best, max_cells)
            if found[2] and found[5] > -np.inf and found[5] + log_share < cut:  # (too high for what it kept)
                cut = found[5] + log_share
                found = sweep(*args, cut, log_share, lowest, log_best, max_cells)
            if found[2] or found[5] == np.inf or cut <= log_cut:
                break
        offsets, states, ok, best, dropped, log_kept, alpha, prefix, lift = found
        log_cut = cut
    if ok and want_sum:  # (the cut it used, raised or not, is sound: a second sweep starts there)
        log_cut = max(log_cut, lowest)
    if ok and want_sum and log_kept > log_m + _LOOSE_WALK:
        # the greedy walks' bound was loose (a sure model's best tokens invalid: they found
        # e^-974 where the canvases weigh e^-716): the kept canvases' weight gives a higher
        # cut, 9.3k kept cells -> 3.0k at 20 tools (90k -> 6.2k edges out of them)
        log_cut = max(log_cut, log_kept + log_share)
        cut = log_cut if in_logs else math.exp(log_cut + lift)  # (at alpha's scale)
        offsets, states, dropped_now = keep_above(offsets, states, alpha, prefix, cut, args[3])
        dropped = max(dropped, dropped_now)
    if ok and want_sum and want_max:
        # The first sweep took the cells that carry the weight alone (where they are too
        # many, the cells of both tests would be more). Where no cell left out leads to a
        # better canvas than the best one on them, the Viterbi canvas lies on them: done.
        # (a greedy walk's best canvas can lie far below the best on the kept cells: one
        # that turns into a string early, say)
        floor = _below_rounding(max(best, log_v))
        if dropped >= floor:
            offsets, states, ok = sweep(*args, log_cut, log_share, lowest, floor, max_cells)[:3]
    if not ok:
        return None, False
    if want_sum and not log_lost <= max(log_m, log_kept) + math.log(share):  # (both bound the total from below)
        return None, False
    return (offsets, states), False


def out_of_range_weighs_nothing(log_walk: float, log_lost: float) -> bool:
    """Whether the canvases through atoms whose sums fell out of float64's range (the
    caller's ``log_lost``, as in ``probable_support``) weigh less than 2**-57 of the valid
    canvases' weight, which the greedy walk's (``KeptCells.log_walk``, of the sweep that
    gave up) bounds from below: then the fast passes may run over the whole support where
    pruning gave up, those canvases left out, as a pruned step leaves them out (one token
    forced 1000 nats ahead at the first position, the rest flat: 20 tools, BPE 4k, 0.12 s
    a step instead of 0.58 in log space)."""
    return bool(log_lost <= log_walk + math.log(LOST_SHARE / 2))


class PruningSchedule:
    """When a run of denoising steps over one canvas should try pruning.

    Where a canvas's weight spreads over most of its lattice (flat logits: a random
    model, a first step; a counted string the canvas continues), pruning gives up, and
    its sweep has cost a good part of a step over the whole support for nothing; the
    logits of the next steps look alike.
    After each step that tried and gave up, the schedule skips the next 1, 2, 4, ...
    (at most ``longest_pause``) steps, and a step that pruned starts it over. The pause
    stays short because a model's logits sharpen as its canvas settles: the bundled
    model's calls give up on a canvas's first step or two, then prune; a long pause
    would miss that many pruned steps, a short one costs a few more sweeps where the
    logits stay flat. What a step returns does not depend on this beyond the 2**-56 of
    the weight that pruning may leave out.

    >>> schedule = PruningSchedule()
    >>> [schedule.try_now() for _ in range(2)]  # nothing recorded yet: try every step
    [True, True]
    >>> schedule.record(pruned=False)  # the step that tried gave up: skip one step
    >>> [schedule.try_now() for _ in range(2)]
    [False, True]
    """

    def __init__(self, longest_pause: int = 8) -> None:
        self.longest_pause = longest_pause
        self._skip = 0  # steps still to skip
        self._pause = 1  # steps to skip after the next failure

    def try_now(self) -> bool:
        """Whether this step should try pruning (call once per step)."""
        if self._skip:
            self._skip -= 1
            return False
        return True

    def record(self, pruned: bool) -> None:
        """The outcome of a step that tried: ``StepOutput.pruned``."""
        if pruned:
            self._pause = 1
        else:
            self._skip = self._pause
            self._pause = min(2 * self._pause, self.longest_pause)
