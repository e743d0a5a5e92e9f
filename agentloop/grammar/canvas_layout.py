"""The order the canvas passes visit the token automaton's states and edges in.

Most edges of a tool grammar belong to counters: a string of ``maxLength`` n unrolls into
states c_0 .. c_n (with a few partial-character states beside each), an array of
``maxItems`` into copies of its item. Every counter state repeats its neighbour's edges one
count further on: c_i -> c_{i+d} under the same group for every i. Numbered so that each
such chain of states is consecutive, those edges become *runs*: edge j of a run joins row
a + j to row b + j under one group, and a pass over a run is one contiguous loop,

    value[a:a + n] += weight[g] * message[b:b + n],

which the compiler vectorises, with no index loaded per edge (89% of the edges of one tool,
90% of five, 90% of twenty, at 4k vocab). Of the other edges, those from consecutive rows
into one row under one group are *fans* (a counted string ends from every count by its
closing quote), a loop over one slice too: half of what is left at five and at twenty
tools. The rest are pulled one by one, listed by the row they pull into.

Finding the chains: a group whose edges form long simple paths (the one-character step of
a counter; where several of its edges enter one state, the path keeps the one that comes
the longest way) seeds a *successor* map succ(s) along them; the map then spreads over the
automaton: where s -> t and succ(s) -> t' under the same group, succ(t) = t'. Groups are
tried in order of the path lengths they offer, each over the states still without a
successor. Rows then follow the chains, chain after chain, in breadth-first order from the
start state.
"""

from __future__ import annotations

from typing import NamedTuple

import numba as nb
import numpy as np

#: Shorter runs (and fans) than this go with the edges pulled one by one (a run's loop
#: costs more to set up than a few single edges).
MIN_RUN = 4

#: A group's simple paths shorter than this do not count towards its use as a seed.
_MIN_PATH = 8


@nb.njit(cache=True, nogil=True)
def _find_out(src_offsets, edge_group, edge_dst, s, g):  # pragma: no cover - compiled
    """The end of the edge leaving s under group g, or -1 (a state's edges have distinct groups)."""
    for e in range(src_offsets[s], src_offsets[s + 1]):
        if edge_group[e] == g:
            return edge_dst[e]
    return -1


@nb.njit(cache=True, nogil=True)
def _path_edges(edges, edge_src, edge_dst, scratch):  # pragma: no cover - compiled
    """Of ``edges`` (one group's: a state leaves by at most one of them), a set that forms
    simple paths: where several of them enter one state, the one kept comes from the
    state that ends the longest path of them (a counter whose every step has two
    sources, as a hostname label's after a letter and after a hyphen, still yields its
    chain of one kind); self-loops excluded. ``scratch`` (4, S) int64 holds zeros and
    is left so."""
    out_of, ind, depth, best = scratch[0], scratch[1], scratch[2], scratch[3]  # best: edge + 1
    for e in edges:
        if edge_src[e] != edge_dst[e]:
            out_of[edge_src[e]] = e + 1
            ind[edge_dst[e]] += 1
    # the longest path ending at each state, states taken once all their edges in are
    # (Kahn's order); an edge from a cycle is never taken here
    ready = np.empty(edges.shape[0], np.int64)
    top = 0
    for e in edges:
        if edge_src[e] != edge_dst[e] and ind[edge_src[e]] == 0:
            ready[top] = edge_src[e]
            top += 1
    while top > 0:
        top -= 1
        s = ready[top]
        e = out_of[s] - 1
        t = edge_dst[e]
        b = best[t] - 1
        if b < 0 or depth[s] > depth[edge_src[b]] or (depth[s] == depth[edge_src[b]] and e < b):
            best[t] = e + 1
            depth[t] = depth[s] + 1
        ind[t] -= 1
        if ind[t] == 0 and out_of[t] > 0:
            ready[top] = t
            top += 1
    for e in edges:  # a cycle's edges, where nothing else enters: the cycle stays whole
        if edge_src[e] != edge_dst[e] and best[edge_dst[e]] == 0:
            best[edge_dst[e]] = e + 1
    keep = np.zeros(edges.shape[0], np.bool_)
    for i in range(edges.shape[0]):
        e = edges[i]
        keep[i] = edge_src[e] != edge_dst[e] and best[edge_dst[e]] == e + 1
    for e in edges:
        for s in (edge_src[e], edge_dst[e]):
            out_of[s] = 0
            ind[s] = 0
            depth[s] = 0
            best[s] = 0
    return edges[keep]


@nb.njit(cache=True, nogil=True)
def _chain_successors(S, src_offsets, edge_src, edge_dst, edge_group, G):  # pragma: no cover - compiled
    """succ (S,) and pred (S,): each state's next state along its chain (-1: none)."""
    by_group = np.argsort(edge_group, kind="mergesort")
    g_offsets = np.searchsorted(edge_group[by_group], np.arange(G + 1))
    scratch = np.zeros((4, S), np.int64)
    ind = np.zeros(S, np.int64)
    nxt = np.full(S, -1, np.int64)
    # 1. score each group by the edges on its simple paths of _MIN_PATH edges or more
    score = np.zeros(G, np.int64)
    for g in range(G):
        path = _path_edges(by_group[g_offsets[g]:g_offsets[g + 1]], edge_src, edge_dst, scratch)
        for e in path:
            nxt[edge_src[e]] = edge_dst[e]
            ind[edge_dst[e]] = 1  # marks "has a path predecessor"
        for e in path:
            s = edge_src[e]
            if ind[s] == 0:  # a path's head: walk it
                n = 0
                x = s
                while nxt[x] >= 0 and n <= S:
                    x = nxt[x]
                    n += 1
                if n >= _MIN_PATH:
                    score[g] += n
        for e in path:
            nxt[edge_src[e]] = -1
            ind[edge_dst[e]] = 0
    # 2. seed from each group in turn, best first, and spread the successor map
    succ = np.full(S, -1, np.int64)
    pred = np.full(S, -1, np.int64)
    stack = np.empty(S, np.int64)
    for g in np.argsort(-score, kind="mergesort"):
        if score[g] == 0:
            break
        top = 0
        for e in _path_edges(by_group[g_offsets[g]:g_offsets[g + 1]], edge_src, edge_dst, scratch):
            s, t = edge_src[e], edge_dst[e]
            if succ[s] < 0 and pred[t] < 0:
                succ[s] = t
                pred[t] = s
                stack[top] = s
                top += 1
        while top > 0:
            top -= 1
            s = stack[top]
            s2 = succ[s]
            for e in range(src_offsets[s], src_offsets[s + 1]):
                t = edge_dst[e]
                if succ[t] >= 0:
                    continue
                t2 = _find_out(src_offsets, edge_group, edge_dst, s2, edge_group[e])
                if t2 < 0 or t2 == t or pred[t2] >= 0:
                    continue
                succ[t] = t2
                pred[t2] = t
                stack[top] = t
                top += 1
    return succ, pred


@nb.njit(cache=True, nogil=True)
def _rows_along_chains(S, start, src_offsets, edge_dst, succ, pred):  # pragma: no cover - compiled
    """row -> state: chains laid out whole, in breadth-first order of the states from start
    (unreachable states last); a chain that closes on itself starts anywhere on it."""
    seen = np.zeros(S, np.bool_)
    bfs = np.empty(S, np.int64)
    n = 0
    if S > 0:
        bfs[0] = start
        seen[start] = True
        n = 1
    i = 0
    while i < n:
        s = bfs[i]
        for e in range(src_offsets[s], src_offsets[s + 1]):
            t = edge_dst[e]
            if not seen[t]:
                seen[t] = True
                bfs[n] = t
                n += 1
        i += 1
    for s in range(S):
        if not seen[s]:
            bfs[n] = s
            n += 1
    placed = np.zeros(S, np.bool_)
    order = np.empty(S, np.int32)
    k = 0
    for s in bfs:
        if placed[s]:
            continue
        head = s
        steps = 0
        while pred[head] >= 0 and not placed[pred[head]] and steps < S:
            head = pred[head]
            steps += 1
        x = head
        while x >= 0 and not placed[x]:
            placed[x] = True
            order[k] = x
            k += 1
            x = succ[x]
    return order


def _in_turns(rows: np.ndarray) -> np.ndarray:
    """The order that deals a sorted list of edges out in turns: every row's first edge
    (rows ascending), then every row's second, and so on. The passes add each single
    edge into its row's slot, and consecutive adds into one slot wait for each other
    (a store, its reload and the add: ~2 ns an edge); dealt out in turns, consecutive
    edges mostly go to different rows (20 tools: 4.4 single edges a row on average, up
    to 36). A row still receives its edges in their order, so every sum comes out the
    same to the bit."""
    first = np.searchsorted(rows, rows, side="left")
    turn = np.arange(rows.shape[0]) - first  # (n,) the edge's place among its row's
    return np.lexsort((rows, turn))


def _consecutive(edges: np.ndarray, key_a: np.ndarray, key_b: np.ndarray, moving: np.ndarray
                 ) -> tuple[list[np.ndarray], np.ndarray]:
    """Of ``edges`` (ids), the stretches of MIN_RUN or more that agree on both keys while
    ``moving`` goes up by one from edge to edge (each in that order, stretches by their
    first ``moving``), and the edges left over (ids, in no set order). Keys and
    ``moving`` are indexed by edge id."""
    o = edges[np.lexsort((moving[edges], key_b[edges], key_a[edges]))]
    new = np.ones(o.shape[0], np.bool_)
    new[1:] = (key_a[o][1:] != key_a[o][:-1]) | (key_b[o][1:] != key_b[o][:-1]) | (moving[o][1:] != moving[o][:-1] + 1)
    stretch_of = np.cumsum(new) - 1  # (n,) in o's order
    length = np.bincount(stretch_of)
    kept = length[stretch_of] >= MIN_RUN
    firsts = np.flatnonzero(new & kept)
    firsts = firsts[np.argsort(moving[o[firsts]], kind="stable")]  # visited by source row, for locality
    return [o[f:f + length[stretch_of[f]]] for f in firsts], o[~kept]


class EdgeLayout(NamedTuple):
    """The token automaton's edges in the passes' order (built once per automaton).

    States are renumbered as rows (``rank``); every edge appears once, as rows: first the
    runs (run r holds edges runs[r]:runs[r + 1], along which src and dst each go up by one
    and the group stays the same), then the fans (fan f holds edges fans[f]:fans[f + 1],
    from consecutive source rows into one destination row under one group: the end of a
    counted string, entered from every count by the closing quote), then the single
    edges by source row (the backward pass pulls them in this order), dealt out in turns
    (``_in_turns``). The forward pass pulls the single edges by destination row, dealt
    out likewise: ``in_row``/``in_other``/``in_group`` list their destination, source and
    group in that order. A row's single edges keep the automaton's order.
    """

    rank: np.ndarray  # (S,) i32 state -> row
    state: np.ndarray  # (S,) i32 row -> state
    src: np.ndarray  # (E,) i32 source row of each edge
    dst: np.ndarray  # (E,) i32 destination row
    group: np.ndarray  # (E,) i32
    runs: np.ndarray  # (R + 1,) i64
    fans: np.ndarray  # (F + 1,) i64, fans[0] == runs[-1]; the single edges are fans[-1]:E
    in_row: np.ndarray  # (E - fans[-1],) i32
    in_other: np.ndarray  # (E - fans[-1],) i32
    in_group: np.ndarray  # (E - fans[-1],) i32


def chain_order(edge_src: np.ndarray, edge_dst: np.ndarray, edge_group: np.ndarray, S: int, start: int,
                src_offsets: np.ndarray) -> np.ndarray:
    """row -> state: the states of an automaton (edges sorted by source, ``src_offsets``
    (S + 1,); a state's edges have distinct groups) numbered along their chains (see the
    module's docstring), chain after chain, (S,) int32. Neighbouring rows then step to
    neighbouring rows, which keeps a walk of many states side by side in few cache lines
    (the token automaton's walk of a symbol DFA, as well as the canvas passes)."""
    G = int(edge_group.max()) + 1 if edge_group.size else 0
    src64, dst64, grp64 = (a.astype(np.int64) for a in (edge_src, edge_dst, edge_group))
    succ, pred = _chain_successors(S, src_offsets, src64, dst64, grp64, G)
    return _rows_along_chains(S, start, src_offsets, dst64, succ, pred)


def edge_layout(edge_src: np.ndarray, edge_dst: np.ndarray, edge_group: np.ndarray, S: int, start: int,
                src_offsets: np.ndarray) -> EdgeLayout:
    """The layout of an automaton's edges (sorted by source, ``src_offsets`` (S + 1,))."""
    state = chain_order(edge_src, edge_dst, edge_group, S, start, src_offsets)
    grp64 = edge_group.astype(np.int64)
    rank = np.empty(S, np.int32)
    rank[state] = np.arange(S, dtype=np.int32)
    r_src, r_dst = rank[edge_src].astype(np.int64), rank[edge_dst].astype(np.int64)
    E = edge_src.shape[0]
    # runs: one group and one diagonal dst - src, src going up by one; then, of the rest,
    # fans: one group and one dst, src going up by one
    run_edges, rest = _consecutive(np.arange(E), grp64, r_dst - r_src, r_src)
    fan_edges, single = _consecutive(rest, grp64, r_dst, r_src)
    runs = np.cumsum([0] + [len(r) for r in run_edges]).astype(np.int64)
    fans = runs[-1] + np.cumsum([0] + [len(f) for f in fan_edges]).astype(np.int64)
    single = single[np.lexsort((single, r_src[single]))]  # by source row, then automaton order
    single = single[_in_turns(r_src[single])]
    order = np.concatenate(run_edges + fan_edges + [single]).astype(np.int64)
    src, dst, group = r_src[order].astype(np.int32), r_dst[order].astype(np.int32), edge_group[order].astype(np.int32)
    ids = np.arange(int(fans[-1]), E)
    by_dst = ids[np.lexsort((order[ids], dst[ids]))]  # by destination row, then automaton order
    by_dst = by_dst[_in_turns(dst[by_dst])]
    return EdgeLayout(rank, state.astype(np.int32), src, dst, group, runs, fans, dst[by_dst], src[by_dst],
                      group[by_dst])
