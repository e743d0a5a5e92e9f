"""Regular expressions over symbols, their NFA, and minimal DFAs with boolean operations.

Symbols are small integers: 0..255 are bytes, 256 and up are special tokens (a wire
format's ``<|"|>``, ``<|tool_call>``, the stop and pad tokens). A set of symbols is a Python
``int`` used as a bitmask, so unions and intersections are single operations.

A language is first written as a tiny expression tree (``Node``), built by the schema
compiler; ``to_dfa`` turns it into a minimal, trimmed DFA over *symbol classes* (symbols
that every transition treats alike). DFAs support product operations (and / or / minus /
xor), which the schema compiler uses for ``oneOf``, patterns combined with lengths, and
key exclusion.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numba as nb
import numpy as np

from ..errors import AutomatonTooLarge

# ----------------------------------------------------------------------------------------
# Expression nodes. Plain tuples keep construction cheap; the helpers below are the API.
#   ("set", mask)                       one symbol from the set
#   ("seq", (n1, n2, ...))              concatenation; ("seq", ()) is the empty string
#   ("alt", (n1, n2, ...))              union; ("alt", ()) is the empty language
#   ("rep", n, lo, hi)                  n repeated lo..hi times (hi None = unbounded)
#   ("dfa", Dfa)                        an already-compiled automaton, embedded
#   ("graph", n_states, finals, edges)  a small NFA whose edges are nodes; state 0 starts.
#                                       Used where a tree would duplicate shared suffixes
#                                       (object members with optional properties) or
#                                       repeat a part (``separated``).
# ----------------------------------------------------------------------------------------

Node = tuple

EMPTY: Node = ("seq", ())
NEVER: Node = ("alt", ())


def sym(*symbols: int) -> Node:
    mask = 0
    for s in symbols:
        mask |= 1 << s
    return ("set", mask)


def byte_range(lo: int, hi: int) -> Node:
    return ("set", ((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1))


def seq(*nodes: Node) -> Node:
    flat: list[Node] = []
    for n in nodes:
        if n[0] == "seq":
            flat.extend(n[1])
        elif n == NEVER:
            return NEVER
        else:
            flat.append(n)
    if len(flat) == 1:
        return flat[0]
    return ("seq", tuple(flat))


def alt(*nodes: Node) -> Node:
    flat: list[Node] = []
    for n in nodes:
        if n[0] == "alt":
            flat.extend(n[1])
        else:
            flat.append(n)
    if len(flat) == 1:
        return flat[0]
    return ("alt", tuple(flat))


def rep(node: Node, lo: int = 0, hi: int | None = None) -> Node:
    if hi is not None and hi < lo:
        return NEVER
    if hi == 0:
        return EMPTY
    if lo == 1 and hi == 1:
        return node
    return ("rep", node, lo, hi)


def opt(node: Node) -> Node:
    return rep(node, 0, 1)


def literal(symbols: Iterable[int]) -> Node:
    return seq(*(sym(s) for s in symbols))


def embed(dfa: "Dfa") -> Node:
    return ("dfa", dfa)


def graph(n_states: int, finals: Sequence[int], edges: Sequence[tuple[int, int, Node]]) -> Node:
    return ("graph", n_states, tuple(finals), tuple(edges))


def separated(item: Node, separator: Node) -> Node:
    """One or more ``item`` with ``separator`` between them, the language of
    seq(item, rep(seq(separator, item))) built with one copy of ``item``: a loop back
    through the separator. The NFA of the seq form holds ``item`` twice, and the subset
    construction walks both copies before minimising folds them: a 20-tool envelope
    walked 101k states for the 49k it keeps (its to_dfa 3.6-4.2 s; with one copy, 51k
    states and 1.9-2.2 s, at BPE 4k)."""
    return graph(2, [1], [(0, 1, item), (1, 0, separator)])


# ----------------------------------------------------------------------------------------
# NFA (Thompson-style, epsilon edges), built from a node
# ----------------------------------------------------------------------------------------


class _Nfa:
    """States are numbers; edges are kept in flat lists (a list per state cost more than
    the construction: the 20-tool envelope has ~300k states), and an embedded DFA's edges
    stay in its table until ``to_dfa`` reads them as arrays."""

    def __init__(self) -> None:
        self.n = 0
        self.eps_src: list[int] = []
        self.eps_dst: list[int] = []
        self.sym_src: list[int] = []  # symbol edges: source, mask, destination
        self.sym_mask: list[int] = []
        self.sym_dst: list[int] = []
        self.blocks: list[tuple[int, Dfa, int]] = []  # (first state, dfa, where its accepting states lead)

    def new(self) -> int:
        self.n += 1
        return self.n - 1

    def eps(self, s: int, e: int) -> None:
        self.eps_src.append(s)
        self.eps_dst.append(e)

    def build(self, node: Node, s: int, e: int) -> None:
        """Add paths from ``s`` to ``e`` spelling exactly the language of ``node``."""
        kind = node[0]
        if kind == "set":
            if node[1]:
                self.sym_src.append(s)
                self.sym_mask.append(node[1])
                self.sym_dst.append(e)
        elif kind == "seq":
            parts = node[1]
            if not parts:
                self.eps(s, e)
                return
            cur = s
            for i, part in enumerate(parts):
                nxt = e if i == len(parts) - 1 else self.new()
                self.build(part, cur, nxt)
                cur = nxt
        elif kind == "alt":
            for part in node[1]:
                # A fresh entry state per branch keeps loops inside a branch from leaking
                # into its siblings.
                m = self.new()
                self.eps(s, m)
                self.build(part, m, e)
        elif kind == "rep":
            _, inner, lo, hi = node
            cur = s
            for _ in range(lo):
                nxt = self.new()
                self.build(inner, cur, nxt)
                cur = nxt
            if hi is None:
                loop = self.new()
                self.eps(cur, loop)
                back = self.new()
                self.build(inner, loop, back)
                self.eps(back, loop)
                self.eps(loop, e)
            else:
                for _ in range(hi - lo):
                    self.eps(cur, e)
                    nxt = self.new()
                    self.build(inner, cur, nxt)
                    cur = nxt
                self.eps(cur, e)
        elif kind == "dfa":
            dfa: Dfa = node[1]
            base = self.n  # the embedded states are base, base + 1, ...
            self.n += dfa.n_states
            self.eps(s, base + dfa.start)
            self.blocks.append((base, dfa, e))
        elif kind == "graph":
            _, n_states, finals, edges = node
            ids = [self.new() for _ in range(n_states)]
            self.eps(s, ids[0])
            for f in finals:
                self.eps(ids[f], e)
            for a, b, label in edges:
                self.build(label, ids[a], ids[b])
        else:  # pragma: no cover - construction bug
            raise ValueError(f"unknown node kind {kind!r}")

    def arrays(self, class_masks: list[int]) -> tuple[np.ndarray, ...]:
        """(eps_offsets, eps_dst, edge_offsets, edge_mask, edge_dst, mask_offsets,
        mask_classes): the edges by source as CSR arrays, each symbol edge with a mask id
        and each mask id with the classes (of ``class_masks``) it covers."""
        mask_id: dict[int, int] = {}
        mask_classes: list[int] = []
        mask_offsets = [0]

        def id_of(m: int) -> int:
            k = mask_id.get(m)
            if k is None:
                k = mask_id[m] = len(mask_id)
                mask_classes.extend(c for c in range(len(class_masks)) if class_masks[c] & m)
                mask_offsets.append(len(mask_classes))
            return k

        sym = [np.array([self.sym_src, [id_of(m) for m in self.sym_mask], self.sym_dst], np.int64).reshape(3, -1)]
        eps = [np.array([self.eps_src, self.eps_dst], np.int64).reshape(2, -1)]
        # The blocks of one DFA (a string's character, embedded at each of its counted
        # positions: 15,766 blocks of a few DFAs in the 20-tool envelope) are added all
        # at once, their edges offset by each block's first state.
        by_dfa: dict[int, tuple[Dfa, list[int], list[int]]] = {}
        for base, dfa, e in self.blocks:
            _, bases, exits = by_dfa.setdefault(id(dfa), (dfa, [], []))
            bases.append(base)
            exits.append(e)
        for dfa, base_list, exit_list in by_dfa.values():
            bases = np.array(base_list, np.int64)[:, None]  # (blocks, 1)
            q, c = np.nonzero(dfa.trans >= 0)
            ids = np.array([id_of(m) for m in dfa.class_masks], np.int64)
            n_edges = q.shape[0]
            sym.append(np.stack([(q + bases).ravel(), np.broadcast_to(ids[c], (bases.shape[0], n_edges)).ravel(),
                                 (dfa.trans[q, c].astype(np.int64) + bases).ravel()]))
            finals = np.flatnonzero(dfa.accept)
            eps.append(np.stack([(finals + bases).ravel(),
                                 np.repeat(np.array(exit_list, np.int64), finals.shape[0])]))
        sym_all, eps_all = np.concatenate(sym, axis=1), np.concatenate(eps, axis=1)
        sym_all = sym_all[:, np.argsort(sym_all[0], kind="stable")]
        eps_all = eps_all[:, np.argsort(eps_all[0], kind="stable")]
        states = np.arange(self.n + 1)
        return (np.searchsorted(eps_all[0], states), np.ascontiguousarray(eps_all[1]),
                np.searchsorted(sym_all[0], states), np.ascontiguousarray(sym_all[1]),
                np.ascontiguousarray(sym_all[2]), np.array(mask_offsets, np.int64),
                np.array(mask_classes, np.int64))


# ----------------------------------------------------------------------------------------
# DFA
# ----------------------------------------------------------------------------------------


@dataclass(eq=False)
class Dfa:
    """A trimmed deterministic automaton over symbol classes.

    ``trans[q, c]`` is the next state on any symbol of class ``c`` or -1 (dead).
    ``sym_class[symbol]`` gives the class of each symbol (the alphabet is ``n_symbols``
    wide). Every state is reachable from ``start`` and can reach an accepting state, so a
    -1 transition means "this prefix can never be completed".
    """

    trans: np.ndarray  # (S, C) int32
    accept: np.ndarray  # (S,) bool
    start: int
    sym_class: np.ndarray  # (n_symbols,) int32
    class_masks: list[int] = field(repr=False)

    @property
    def n_states(self) -> int:
        return int(self.trans.shape[0])

    @property
    def n_symbols(self) -> int:
        return int(self.sym_class.shape[0])

    def step(self, state: int, symbol: int) -> int:
        if state < 0 or symbol >= self.n_symbols:
            return -1
        return int(self.trans[state, self.sym_class[symbol]])

    def run(self, symbols: Iterable[int], state: int | None = None) -> int:
        q = self.start if state is None else state
        for s in symbols:
            q = self.step(q, s)
            if q < 0:
                return -1
        return q

    def accepts(self, symbols: Iterable[int]) -> bool:
        q = self.run(symbols)
        return q >= 0 and bool(self.accept[q])

    def is_empty(self) -> bool:
        return not bool(self.accept.any())


def _empty_dfa(n_symbols: int) -> Dfa:
    return Dfa(
        trans=np.full((1, 1), -1, np.int32),
        accept=np.zeros(1, bool),
        start=0,
        sym_class=np.zeros(n_symbols, np.int32),
        class_masks=[(1 << n_symbols) - 1],
    )


def _symbol_classes(masks: Iterable[int], n_symbols: int) -> tuple[np.ndarray, list[int]]:
    """Coarsest partition of the alphabet that every mask is a union of, classes numbered
    by their lowest symbol. A symbol's class is the set of masks holding it: one bit matrix
    (masks x symbols), each symbol's column packed into bytes, rather than a Python tuple
    per symbol and mask."""
    distinct = sorted(set(m for m in masks if m))
    n_bytes = (n_symbols + 7) // 8
    raw = np.frombuffer(b"".join(m.to_bytes(n_bytes, "little") for m in distinct), np.uint8)
    bits = np.unpackbits(raw.reshape(len(distinct), n_bytes), axis=1, bitorder="little")[:, :n_symbols]
    columns = np.packbits(bits.T, axis=1)  # (n_symbols, ceil(masks / 8)) each symbol's signature
    signature: dict[bytes, int] = {}
    sym_class = np.zeros(n_symbols, np.int32)
    class_masks: list[int] = []
    for s_, key in enumerate(map(bytes, columns)):
        c = signature.get(key)
        if c is None:
            c = signature[key] = len(class_masks)
            class_masks.append(0)
        class_masks[c] |= 1 << s_
        sym_class[s_] = c
    return sym_class, class_masks


def to_dfa(node: Node, n_symbols: int) -> Dfa:
    """Compile an expression node into a minimal trimmed DFA."""
    nfa = _Nfa()
    start, end = nfa.new(), nfa.new()
    nfa.build(node, start, end)

    sym_class, class_masks = _symbol_classes(
        itertools.chain(nfa.sym_mask, (m for _, d, _ in nfa.blocks for m in d.class_masks)), n_symbols)
    arrays = nfa.arrays(class_masks)
    C = len(class_masks)
    no_pruning = np.zeros((0, 0), np.bool_), np.zeros(0, np.int64)
    # The plain construction, stopped where its sets multiply far past the NFA's states
    # (bounded repeats around a literal, as in the pattern ".{0,14}x.{0,14}": 2**k sets
    # for a minimal DFA of k**2 states) ...
    first_budget = min(MAX_SUBSET_STATES, _BLOWUP_STATES + _BLOWUP_FACTOR * nfa.n)
    trans, accept, D = _subsets(*arrays, C, start, end, *no_pruning, first_budget)
    if D < 0:
        # ... then again with each set cut to the states no other of its states simulates
        # (the same language, so the same minimal DFA), where the NFA is small enough to
        # compute the simulation; else plainly up to the whole budget.
        pruning = _simulation(*arrays, C, end, MAX_SIMULATED_STATES)
        if pruning[0].shape[0] or first_budget < MAX_SUBSET_STATES:
            trans, accept, D = _subsets(*arrays, C, start, end, *pruning, MAX_SUBSET_STATES)
        if D < 0:
            raise AutomatonTooLarge(
                f"the automaton grows past {MAX_SUBSET_STATES:,} states while being built (the minimal one may "
                "be smaller, but this construction cannot reach it): bounded repeats of a wide class such as "
                "'.{0,64}' around a literal multiply; bound them by the string's maxLength, or narrow the class")
    return minimize(trans.reshape(accept.shape[0], C), accept, 0, sym_class, class_masks)


#: The plain subset construction gives up past this many states, plus _BLOWUP_FACTOR per
#: NFA state, and the construction with simulation pruning starts.
_BLOWUP_STATES = 50_000
_BLOWUP_FACTOR = 8
#: The most NFA states (with a symbol edge) the simulation is computed for: an (n, n) bool
#: matrix, refined in passes over the pairs.
MAX_SIMULATED_STATES = 4096
#: The most states the subset construction builds before it refuses (~0.5 GB and ~2 s
#: on this project's CPU; the 20-tool envelope builds ~0.1M).
MAX_SUBSET_STATES = 1_000_000


@nb.njit(cache=True, nogil=True)
def grown(a, n, cap):  # pragma: no cover - compiled
    """A new array of ``cap`` entries holding a[:n]. (Loops, not slices, in the compiler's
    kernels: numba took ~1.3 s to compile a slice assignment, once per install and kernel.)"""
    out = np.empty(cap, a.dtype)
    for i in range(n):
        out[i] = a[i]
    return out


# A hash table of non-negative int64 keys -> int64 values in two arrays (keys -1: empty
# slot; open addressing), for the subset construction and the product walk: numba's
# typed dict took ~2.5 s to compile in each kernel that used one, a first run's cost on
# every fresh install.


@nb.njit(cache=True, nogil=True, inline="always")
def _table_slot(keys, key):  # pragma: no cover - compiled
    """Where ``key`` is in the table, or the empty slot where it would go."""
    mask = keys.shape[0] - 1
    i = (((key ^ (key >> 31)) * np.int64(-7046029254386353131)) >> 17) & mask
    while keys[i] != -1 and keys[i] != key:
        i = (i + 1) & mask
    return i


@nb.njit(cache=True, nogil=True)
def _table(capacity):  # pragma: no cover - compiled
    """An empty table of ``capacity`` (a power of two) slots: (keys, values)."""
    return np.full(capacity, -1, np.int64), np.empty(capacity, np.int64)


@nb.njit(cache=True, nogil=True)
def _table_grown(keys, values):  # pragma: no cover - compiled
    """The table's entries in one twice as large."""
    new_keys, new_values = _table(2 * keys.shape[0])
    for i in range(keys.shape[0]):
        if keys[i] != -1:
            j = _table_slot(new_keys, keys[i])
            new_keys[j] = keys[i]
            new_values[j] = values[i]
    return new_keys, new_values


@nb.njit(cache=True, nogil=True)
def _closure(seeds, first, last, eps_offsets, eps_dst, mark, stamp, stack, out):  # pragma: no cover - compiled
    """The states reachable from seeds[first:last] along the edges (CSR: ``eps_offsets``,
    ``eps_dst``; epsilon edges in the subset construction), into out, in no order ->
    their count. ``mark`` holds ``stamp`` for exactly those states afterwards (a stamp
    not used before)."""
    top = 0
    n = 0
    for i in range(first, last):
        q = seeds[i]
        if mark[q] != stamp:
            mark[q] = stamp
            stack[top] = q
            top += 1
    while top > 0:
        top -= 1
        q = stack[top]
        out[n] = q
        n += 1
        for j in range(eps_offsets[q], eps_offsets[q + 1]):
            d = eps_dst[j]
            if mark[d] != stamp:
                mark[d] = stamp
                stack[top] = d
                top += 1
    return n


@nb.njit(cache=True, nogil=True)
def _hash_states(a, n):  # pragma: no cover - compiled
    """A hash of the set of states a[:n], in any order (a sum of their splitmix64
    mixes), as a non-negative int64 (a key of ``_table``)."""
    h = np.uint64(0)
    for i in range(n):
        x = np.uint64(a[i]) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h += x ^ (x >> np.uint64(31))
    return np.int64(h >> np.uint64(1))


@nb.njit(cache=True, nogil=True)
def _pruned(found, n, below, important, mark, stamp):  # pragma: no cover - compiled
    """Cut the set found[:n] to its states that carry words (``important`` >= 0) and that
    no other of them simulates (``below[i, j]``: state i's words are state j's too; of
    states simulating each other, the lowest stays), and mark the states kept with
    ``stamp`` -> their count. The set's words are the same."""
    m = 0
    for a in range(n):
        i = important[found[a]]
        if i >= 0:
            found[m] = found[a]
            m += 1
    k = 0
    for a in range(m):
        i = important[found[a]]
        dominated = False
        for b in range(m):
            j = important[found[b]]
            if b != a and below[i, j] and (not below[j, i] or found[b] < found[a]):
                dominated = True
                break
        if not dominated:
            found[k] = found[a]  # (k <= a: the states still to test are not overwritten)
            k += 1
    for a in range(k):
        mark[found[a]] = stamp
    return k


@nb.njit(cache=True, nogil=True)
def _subsets(eps_offsets, eps_dst, edge_offsets, edge_mask, edge_dst, mask_offsets, mask_classes, C, start,
             end, below, important, max_states):  # pragma: no cover - compiled
    """The subset construction: each DFA state a set of NFA states closed under
    epsilon edges, found breadth first, its successors by class in order -> (transitions
    (D * C,) int32, row by row, accepting (D,) bool: the set holds ``end``, D), or D = -1
    where it passed ``max_states``. With a simulation (``below``, ``important``: see
    ``_simulation``; empty: none), each set is cut to the states that matter
    (``_pruned``): the DFA differs, its language not."""
    N = eps_offsets.shape[0] - 1
    prune = below.shape[0] > 0
    mark = np.zeros(N, np.int64)
    stack = np.empty(N, np.int64)
    found = np.empty(N, np.int64)  # (a closure being built)
    stamp = 1
    sets = np.empty(1024, np.int64)  # every DFA state's set, one after another
    set_offsets = np.zeros(1025, np.int64)
    keys, values = _table(4096)  # hash of a set -> its latest DFA state; earlier ones chained through same_hash
    same_hash = np.full(1024, -1, np.int64)
    trans = np.full(1024 * C, -1, np.int32)  # (flat, row by row: see _product_walk)
    accept = np.zeros(1024, np.bool_)
    seeds = np.empty(16, np.int64)
    seeds[0] = start
    n = _closure(seeds, 0, 1, eps_offsets, eps_dst, mark, stamp, stack, found)
    if prune:
        stamp += 1
        n = _pruned(found, n, below, important, mark, stamp)
    for k in range(n):
        sets[k] = found[k]
    set_offsets[1] = n
    h = _hash_states(found, n)
    slot = _table_slot(keys, h)
    keys[slot] = h
    values[slot] = 0
    n_keys = 1
    D = 1
    count = np.zeros(C + 1, np.int64)
    by_class = np.empty(16, np.int64)
    i = 0
    while i < D:
        lo, hi = set_offsets[i], set_offsets[i + 1]
        # (class, destination) of every edge out of the set, bucketed by class
        for c in range(C + 1):
            count[c] = 0
        total = 0
        for k in range(lo, hi):
            q = sets[k]
            accept[i] |= q == end
            for e in range(edge_offsets[q], edge_offsets[q + 1]):
                m = edge_mask[e]
                for j in range(mask_offsets[m], mask_offsets[m + 1]):
                    count[mask_classes[j] + 1] += 1
                    total += 1
        if by_class.shape[0] < total:
            by_class = np.empty(2 * total, np.int64)
        for c in range(C):
            count[c + 1] += count[c]
        fill = grown(count, C, C)
        for k in range(lo, hi):
            q = sets[k]
            for e in range(edge_offsets[q], edge_offsets[q + 1]):
                m = edge_mask[e]
                for j in range(mask_offsets[m], mask_offsets[m + 1]):
                    c = mask_classes[j]
                    by_class[fill[c]] = edge_dst[e]
                    fill[c] += 1
        for c in range(C):
            a, b = count[c], count[c + 1]
            if a == b:
                continue
            stamp += 1
            n = _closure(by_class, a, b, eps_offsets, eps_dst, mark, stamp, stack, found)
            if prune:
                stamp += 1
                n = _pruned(found, n, below, important, mark, stamp)
            h = _hash_states(found, n)
            slot = _table_slot(keys, h)
            j = values[slot] if keys[slot] == h else -1
            while j >= 0:  # (the set is the closure's when its size is and each state has the stamp)
                s0, s1 = set_offsets[j], set_offsets[j + 1]
                if s1 - s0 == n:
                    same = True
                    for t in range(s0, s1):
                        if mark[sets[t]] != stamp:
                            same = False
                            break
                    if same:
                        break
                j = same_hash[j]
            if j < 0:  # a new DFA state
                if D == max_states:
                    return trans[:0], accept[:0], -1
                j = D
                if D == accept.shape[0]:  # (the per-state arrays hold accept.shape[0] states)
                    set_offsets = grown(set_offsets, D + 1, 2 * D + 1)
                    same_hash = grown(same_hash, D, 2 * D)
                    trans = grown(trans, D * C, 2 * D * C)
                    for k in range(D * C, 2 * D * C):
                        trans[k] = -1
                    accept = grown(accept, D, 2 * D)
                    for k in range(D, 2 * D):
                        accept[k] = False
                end_at = set_offsets[D] + n
                if end_at > sets.shape[0]:
                    sets = grown(sets, set_offsets[D], max(2 * sets.shape[0], end_at))
                for k in range(n):
                    sets[set_offsets[D] + k] = found[k]
                set_offsets[D + 1] = end_at
                same_hash[D] = values[slot] if keys[slot] == h else -1
                if keys[slot] != h:
                    keys[slot] = h
                    n_keys += 1
                values[slot] = D
                D += 1
                if 2 * n_keys > keys.shape[0]:
                    keys, values = _table_grown(keys, values)
            trans[i * C + c] = j
        i += 1
    return grown(trans, D * C, D * C), grown(accept, D, D), D


@nb.njit(cache=True, nogil=True)
def _simulation(eps_offsets, eps_dst, edge_offsets, edge_mask, edge_dst, mask_offsets, mask_classes, C, end,
                max_states):  # pragma: no cover - compiled
    """A simulation preorder of the NFA's states that carry words -> (below (n, n) bool,
    important (N,) int64: each state's row there, -1 for a state with no symbol edge that
    is not ``end``, which adds no word to a set); empty arrays past ``max_states`` such
    states.

    A state's words here are those it spells itself: the empty word at ``end``, and c w
    for an edge on class c into a state whose epsilon closure spells w. below[i, j] says
    every word of i is one of j: where i is ``end`` so is j, and for each class c every
    state of post(i, c) (the closure of i's successors on c, the states there that carry
    words) is below one of post(j, c). The largest such relation, refined from all pairs
    until no pair fails, implies it (by induction on a word's length)."""
    N = eps_offsets.shape[0] - 1
    important = np.full(N, -1, np.int64)
    n = 0
    for q in range(N):
        if q == end or edge_offsets[q + 1] > edge_offsets[q]:
            important[q] = n
            n += 1
    if n > max_states:
        return np.zeros((0, 0), np.bool_), np.zeros(0, np.int64)
    # post(i, c) for each state i carrying words and class c, as lists (CSR over i * C + c)
    post_offsets = np.zeros(n * C + 1, np.int64)
    post = np.empty(64, np.int64)
    mark = np.zeros(N, np.int64)
    stack = np.empty(N, np.int64)
    found = np.empty(N, np.int64)
    seeds = np.empty(16, np.int64)
    stamp = 0
    for q in range(N):
        i = important[q]
        if i < 0:
            continue
        for c in range(C):
            m = 0
            for e in range(edge_offsets[q], edge_offsets[q + 1]):
                mk = edge_mask[e]
                for t in range(mask_offsets[mk], mask_offsets[mk + 1]):
                    if mask_classes[t] == c:
                        if m == seeds.shape[0]:
                            seeds = grown(seeds, m, 2 * m)
                        seeds[m] = edge_dst[e]
                        m += 1
                        break
            at = post_offsets[i * C + c]
            if m:
                stamp += 1
                k = _closure(seeds, 0, m, eps_offsets, eps_dst, mark, stamp, stack, found)
                for a in range(k):
                    if important[found[a]] >= 0:
                        if at == post.shape[0]:
                            post = grown(post, at, 2 * at)
                        post[at] = important[found[a]]
                        at += 1
            post_offsets[i * C + c + 1] = at
    # the classes on which each state has successors (most have one or two of the C)
    class_offsets = np.zeros(n + 1, np.int64)
    for i in range(n):
        k = 0
        for c in range(C):
            k += post_offsets[i * C + c + 1] > post_offsets[i * C + c]
        class_offsets[i + 1] = class_offsets[i] + k
    classes = np.empty(class_offsets[n], np.int64)
    for i in range(n):
        k = class_offsets[i]
        for c in range(C):
            if post_offsets[i * C + c + 1] > post_offsets[i * C + c]:
                classes[k] = c
                k += 1
    below = np.ones((n, n), np.bool_)
    end_row = important[end]
    for j in range(n):
        below[end_row, j] = j == end_row
    changed = True
    while changed:
        changed = False
        for i in range(n):
            for j in range(n):
                if i == j or not below[i, j]:
                    continue
                for ci in range(class_offsets[i], class_offsets[i + 1]):
                    c = classes[ci]
                    a0, a1 = post_offsets[i * C + c], post_offsets[i * C + c + 1]
                    b0, b1 = post_offsets[j * C + c], post_offsets[j * C + c + 1]
                    ok = True
                    for a in range(a0, a1):
                        matched = False
                        for b in range(b0, b1):
                            if below[post[a], post[b]]:
                                matched = True
                                break
                        if not matched:
                            ok = False
                            break
                    if not ok:
                        below[i, j] = False
                        changed = True
                        break
    return below, important


@nb.njit(cache=True, nogil=True)
def _trim(trans, accept, start):  # pragma: no cover - compiled
    """Boolean mask of the states reachable from start that can reach acceptance."""
    n, C = trans.shape
    stack = np.empty(n, np.int64)
    reach = np.zeros(n, np.bool_)
    reach[start] = True
    stack[0] = start
    top = 1
    indegree = np.zeros(n + 1, np.int64)
    while top > 0:
        top -= 1
        q = stack[top]
        for c in range(C):
            d = trans[q, c]
            if d >= 0:
                indegree[d + 1] += 1
                if not reach[d]:
                    reach[d] = True
                    stack[top] = d
                    top += 1
    # backwards from the accepting states, along the reached states' edges reversed
    offsets = np.cumsum(indegree)
    fill = grown(offsets, n, n)
    sources = np.empty(offsets[n], np.int64)
    for q in range(n):
        if reach[q]:
            for c in range(C):
                d = trans[q, c]
                if d >= 0:
                    sources[fill[d]] = q
                    fill[d] += 1
    seeds = np.empty(n, np.int64)
    n_seeds = 0
    for q in range(n):
        if reach[q] and accept[q]:
            seeds[n_seeds] = q
            n_seeds += 1
    found = np.empty(n, np.int64)
    k = _closure(seeds, 0, n_seeds, offsets, sources, np.zeros(n, np.int64), 1, stack, found)
    live = np.zeros(n, np.bool_)
    for i in range(k):
        live[found[i]] = True
    return live


@nb.njit(cache=True, nogil=True)
def _hopcroft(t, accept):  # pragma: no cover - compiled
    """Hopcroft's partition refinement, O(C n log n): block id of each state.

    ``t`` (S, C) may hold -1 (dead); a sink state S completes the automaton. Blocks live
    as contiguous ranges of ``elems``; splitting moves the marked predecessors to the
    front of their block's range.

    No block holding the sink is ever a splitter, so the dead transitions (84% of the
    20-tool envelope's table) are never listed or walked: the initial splitter is the
    accepting block (the sink does not accept), and where a block that is not waiting
    splits, the half without the sink waits, rather than the smaller one (either half
    is correct there; a state leaves the sink's block once, so that costs at most C n
    more in all). A block with the sink then never waits: one splits into two waiting
    halves only where it waited itself. Nor does a block wait on a class none of its
    states has a transition in on: every block is stable against it there, and so
    against the rest of its parent.
    """
    S, C = t.shape
    n = S + 1
    # inverse transitions but the dead ones, CSR per class: sources p with T[p, c] = q
    inv_off = np.zeros((C, n + 1), np.int32)
    for p in range(S):
        for c in range(C):
            q = t[p, c]
            if q >= 0:
                inv_off[c, q + 1] += 1
    for c in range(C):
        for q in range(n):
            inv_off[c, q + 1] += inv_off[c, q]
    inv_src = np.empty((C, n), np.int32)
    fill = inv_off[:, :n].copy()
    for p in range(S):
        for c in range(C):
            q = t[p, c]
            if q >= 0:
                inv_src[c, fill[c, q]] = p
                fill[c, q] += 1
    # initial partition: accepting / the rest (the sink is not accepting)
    elems = np.empty(n, np.int64)
    pos = np.empty(n, np.int64)
    blk = np.empty(n, np.int64)
    bstart = np.zeros(n + 1, np.int64)
    bend = np.zeros(n + 1, np.int64)
    k = 0
    n_acc = 0
    for p in range(S):
        if accept[p]:
            n_acc += 1
    if n_acc == 0:  # one block, the sink's (the splitters above assume an accepting block without it)
        blk[:] = 0
        return blk[:S], blk[S]
    nblocks = 0
    for want in (True, False):
        start = k
        for p in range(n):
            is_acc = p < S and accept[p]
            if is_acc == want:
                elems[k] = p
                pos[p] = k
                blk[p] = nblocks
                k += 1
        if k > start:
            bstart[nblocks] = start
            bend[nblocks] = k
            nblocks += 1
    mcount = np.zeros(n + 1, np.int64)
    in_w = np.zeros((n + 1, C), np.bool_)
    wl_b = np.empty((n + 1) * C + C, np.int32)
    wl_c = np.empty((n + 1) * C + C, np.int32)
    top = 0
    # seed the worklist with the initial block without the sink (the accepting one;
    # there is one: minimize trims to the states that reach one) for every class
    first = 0
    for c in range(C):
        if _any_in(inv_off[c], elems, bstart[first], bend[first]):  # (see below)
            wl_b[top] = first
            wl_c[top] = c
            in_w[first, c] = True
            top += 1
    members = np.empty(n, np.int64)
    touched = np.empty(n + 1, np.int64)
    while top > 0:
        top -= 1
        A = wl_b[top]
        c = wl_c[top]
        in_w[A, c] = False
        m = 0
        for i in range(bstart[A], bend[A]):
            members[m] = elems[i]
            m += 1
        nt = 0
        for j in range(m):
            a = members[j]
            for i in range(inv_off[c, a], inv_off[c, a + 1]):
                p = inv_src[c, i]
                b = blk[p]
                # move p into the marked prefix of its block
                slot = bstart[b] + mcount[b]
                other = elems[slot]
                pp = pos[p]
                elems[slot] = p
                pos[p] = slot
                elems[pp] = other
                pos[other] = pp
                if mcount[b] == 0:
                    touched[nt] = b
                    nt += 1
                mcount[b] += 1
        for j in range(nt):
            b = touched[j]
            size = bend[b] - bstart[b]
            marked = mcount[b]
            mcount[b] = 0
            if marked == size:
                continue
            nb = nblocks
            nblocks += 1
            bstart[nb] = bstart[b]
            bend[nb] = bstart[b] + marked
            bstart[b] = bend[nb]
            for i in range(bstart[nb], bend[nb]):
                blk[elems[i]] = nb
            for cc in range(C):
                if in_w[b, cc]:
                    w = nb
                else:  # the half without the sink (never marked: it stays in b), else the smaller
                    w = nb if blk[S] == b or marked <= size - marked else b
                # a block none of whose states has a transition in on cc would split
                # nothing: it does not wait (most blocks here end as single states, and
                # most classes lead into a state from nowhere: 4.6M waits on the 20-tool
                # envelope, most of them for nothing)
                if _any_in(inv_off[cc], elems, bstart[w], bend[w]):
                    wl_b[top] = w
                    wl_c[top] = cc
                    in_w[w, cc] = True
                    top += 1
    return blk[:S], blk[S]


@nb.njit(cache=True, nogil=True, inline="always")
def _any_in(offsets, elems, lo, hi):  # pragma: no cover - compiled
    """Whether a state of elems[lo:hi] has a transition in (on the class whose inverse
    list offsets are ``offsets``)."""
    for i in range(lo, hi):
        a = elems[i]
        if offsets[a + 1] > offsets[a]:
            return True
    return False


def _refine(t: np.ndarray, accept: np.ndarray) -> np.ndarray:
    """Equivalence classes of states (no suffix tells them apart), numbered densely."""
    blk, sink_block = _hopcroft(t, accept)
    # every state was trimmed to be live, so none shares the sink's block
    uniq, dense = np.unique(blk, return_inverse=True)
    return dense.ravel().astype(np.int64)


# The two kernels below replace numpy steps of ``minimize`` that each made (S, C) int64
# temporaries (the 20-tool envelope at BPE 4k: 50,706 x 95, 38 MB an array, every new one
# paid in page faults): the remaps 0.43 s, the merge of equal columns 0.22 s, of a 2.3 s
# cold compile.


@nb.njit(cache=True, nogil=True)
def _rows_renamed(t, rows, name):  # pragma: no cover - compiled
    """(len(rows), C) int32: the rows ``rows`` of the table ``t``, each next state q
    renamed name[q] (a dead entry, -1, stays -1)."""
    C = t.shape[1]
    out = np.empty((rows.shape[0], C), np.int32)
    for i in range(rows.shape[0]):
        r = rows[i]
        for c in range(C):
            q = t[r, c]
            out[i, c] = name[q] if q >= 0 else -1
    return out


@nb.njit(cache=True, nogil=True)
def _distinct_columns(t):  # pragma: no cover - compiled
    """The equal columns of the table ``t`` (S, C) taken together -> (firsts, col_of):
    each group's first column, ascending, and each column's group. Columns are compared
    by a hash first (one pass over the table, row by row) and then entry by entry, so a
    collision never merges two different columns."""
    S, C = t.shape
    h = np.full(C, np.uint64(14695981039346656037))  # FNV-1a over each column's entries
    for s in range(S):
        for c in range(C):
            h[c] = (h[c] ^ np.uint64(np.uint32(t[s, c]))) * np.uint64(1099511628211)
    firsts = np.empty(C, np.int64)
    col_of = np.full(C, -1, np.int64)
    n = 0
    for c in range(C):
        for k in range(n):
            f = firsts[k]
            if h[f] != h[c]:
                continue
            same = True
            for s in range(S):
                if t[s, f] != t[s, c]:
                    same = False
                    break
            if same:
                col_of[c] = k
                break
        if col_of[c] < 0:
            firsts[n] = c
            col_of[c] = n
            n += 1
    return firsts[:n], col_of


def minimize(
    trans: np.ndarray,
    accept: np.ndarray,
    start: int,
    sym_class: np.ndarray,
    class_masks: list[int],
) -> Dfa:
    """Trim useless states, merge equivalent ones (Hopcroft) and the classes whose columns
    are the same; numbered by the language alone (``_canonical``, which also makes the
    order the merged classes come in here irrelevant)."""
    n_symbols = sym_class.shape[0]
    trans = np.ascontiguousarray(trans)  # (a table in Fortran order compiled the kernels below twice: ~1 s)
    keep = _trim(trans, accept, start)
    if not keep[start]:
        return _empty_dfa(n_symbols)
    old_ids = np.nonzero(keep)[0]
    remap = np.full(trans.shape[0], -1, np.int64)
    remap[old_ids] = np.arange(len(old_ids))
    t = _rows_renamed(trans, old_ids, remap)  # (S, C) the live states, renumbered
    acc = accept[old_ids]
    st = int(remap[start])

    block = _refine(t, acc)
    n_blocks = int(block.max()) + 1
    reps = np.zeros(n_blocks, np.int64)  # one state of each block
    reps[block] = np.arange(len(block))
    t2 = _rows_renamed(t, reps, block)  # (blocks, C)
    # classes whose columns are the same merge
    firsts, col_of_class = _distinct_columns(t2)
    new_masks: list[int] = [0] * firsts.shape[0]
    for c, m in enumerate(class_masks):
        new_masks[col_of_class[c]] |= m
    return _canonical(np.ascontiguousarray(t2[:, firsts]), acc[reps].astype(bool), int(block[st]),
                      col_of_class[sym_class].astype(np.int32), new_masks)


def _canonical(trans: np.ndarray, accept: np.ndarray, start: int, sym_class: np.ndarray,
               class_masks: list[int]) -> Dfa:
    """A minimal DFA numbered by its language alone: classes by their lowest symbol,
    states in breadth-first order from the start (which becomes state 0) along the
    classes in that order. Whatever order a construction found the states in, the same
    language comes out as the same arrays."""
    C = trans.shape[1]
    lowest = np.full(C, sym_class.shape[0], np.int64)
    np.minimum.at(lowest, sym_class, np.arange(sym_class.shape[0]))
    class_order = np.argsort(lowest, kind="stable")  # new class -> old class
    new_class = np.empty(C, np.int32)
    new_class[class_order] = np.arange(C, dtype=np.int32)
    t = trans[:, class_order]
    state_order = _breadth_first(t, start)  # new state -> old state
    new_state = np.empty(trans.shape[0] + 1, np.int32)
    new_state[state_order] = np.arange(state_order.shape[0], dtype=np.int32)
    new_state[-1] = -1  # (a dead entry, -1, stays -1)
    return Dfa(trans=np.ascontiguousarray(new_state[t[state_order]]), accept=accept[state_order], start=0,
               sym_class=new_class[sym_class], class_masks=[class_masks[c] for c in class_order])


@nb.njit(cache=True, nogil=True)
def _breadth_first(t, start):  # pragma: no cover - compiled
    """The states of a trimmed DFA (every state reachable) in breadth-first order."""
    S, C = t.shape
    order = np.empty(S, np.int64)
    seen = np.zeros(S, np.uint8)
    order[0] = start
    seen[start] = 1
    n = 1
    i = 0
    while i < n:
        q = order[i]
        i += 1
        for c in range(C):
            d = t[q, c]
            if d >= 0 and not seen[d]:
                seen[d] = 1
                order[n] = d
                n += 1
    return order


def product(a: Dfa, b: Dfa, op: str) -> Dfa:
    """The DFA of ``a op b`` for op in {"and", "or", "minus", "xor"}."""
    if a.n_symbols != b.n_symbols:
        raise ValueError("DFAs over different alphabets")
    n_symbols = a.n_symbols
    pair_of_sym = a.sym_class.astype(np.int64) * (len(b.class_masks) + 1) + b.sym_class
    uniq, sym_class = np.unique(pair_of_sym, return_inverse=True)
    sym_class = sym_class.astype(np.int32)
    ca = uniq // (len(b.class_masks) + 1)
    cb = uniq % (len(b.class_masks) + 1)
    class_masks = [0] * len(uniq)
    for s in range(n_symbols):
        class_masks[sym_class[s]] |= 1 << s
    need_a = op in ("and", "minus")
    need_b = op == "and"
    trans, qa, qb = _product_walk(a.trans, b.trans, ca.astype(np.int64), cb.astype(np.int64), a.start, b.start,
                                  need_a, need_b)
    trans = trans.reshape(qa.shape[0], len(uniq))
    xa = (qa >= 0) & a.accept[np.maximum(qa, 0)]
    xb = (qb >= 0) & b.accept[np.maximum(qb, 0)]
    accept = {"and": xa & xb, "or": xa | xb, "minus": xa & ~xb, "xor": xa != xb}[op]
    return minimize(trans, accept, 0, sym_class, class_masks)


@nb.njit(cache=True, nogil=True)
def _product_walk(ta, tb, ca, cb, start_a, start_b, need_a, need_b):  # pragma: no cover - compiled
    """The reachable pairs of states of two DFAs (-1: that side is dead), breadth first,
    each pair's successors by the joint classes in order -> (transitions (n * len(ca),)
    int32, row by row, each pair's state in a, in b). A pair ends where a side it needs
    is dead, or both are. (Flat arrays: numba takes seconds to compile 2-D slicing.)"""
    U = ca.shape[0]
    width = tb.shape[0] + 1  # a pair's key: (qa + 1) * width + qb + 1
    keys, values = _table(4096)
    first = (start_a + 1) * width + start_b + 1
    slot = _table_slot(keys, first)
    keys[slot] = first
    values[slot] = 0
    pair_a = np.empty(1024, np.int64)
    pair_b = np.empty(1024, np.int64)
    pair_a[0] = start_a
    pair_b[0] = start_b
    trans = np.empty(1024 * U, np.int32)
    n = 1
    i = 0
    while i < n:
        qa = pair_a[i]
        qb = pair_b[i]
        if (i + 1) * U > trans.shape[0]:
            trans = grown(trans, i * U, 2 * trans.shape[0])
        for c in range(U):
            na = ta[qa, ca[c]] if qa >= 0 else -1
            nb_ = tb[qb, cb[c]] if qb >= 0 else -1
            if (na < 0 and need_a) or (nb_ < 0 and need_b) or (na < 0 and nb_ < 0):
                trans[i * U + c] = -1
                continue
            key = (na + 1) * width + nb_ + 1
            slot = _table_slot(keys, key)
            if keys[slot] == key:
                j = values[slot]
            else:
                j = n
                keys[slot] = key
                values[slot] = j
                if 2 * (n + 1) > keys.shape[0]:
                    keys, values = _table_grown(keys, values)
                if n == pair_a.shape[0]:
                    pair_a = grown(pair_a, n, 2 * n)
                    pair_b = grown(pair_b, n, 2 * n)
                pair_a[n] = na
                pair_b[n] = nb_
                n += 1
            trans[i * U + c] = j
        i += 1
    return grown(trans, n * U, n * U), grown(pair_a, n, n), grown(pair_b, n, n)


def intersect_all(dfas: Sequence[Dfa]) -> Dfa:
    out = dfas[0]
    for d in dfas[1:]:
        out = product(out, d, "and")
    return out


def exactly_one(dfas: Sequence[Dfa]) -> Dfa:
    """Strings accepted by exactly one of ``dfas`` (JSON Schema ``oneOf``)."""
    if len(dfas) == 1:
        return dfas[0]
    # at_least_one and at_least_two, folded left: two += one & d ; one |= d
    one = dfas[0]
    two: Dfa | None = None
    for d in dfas[1:]:
        both = product(one, d, "and")
        two = both if two is None else product(two, both, "or")
        one = product(one, d, "or")
    assert two is not None
    return product(one, two, "minus")


def substitute(dfa: Dfa, fills: dict[int, Dfa]) -> Dfa | None:
    """The language of ``dfa`` with every edge on symbol ``h`` (a *hole*) replaced by a
    word of ``fills[h]``, built by splicing a copy of the filler's states in place of the
    edge rather than recompiling: ``dfa`` is compiled once, the fillers change (the copy
    constraint fills a tool envelope's holes with each turn's texts).

    Returns None where the splice would not be deterministic: the state before a hole has
    other edges sharing a symbol with the filler's first ones, or the edges after a hole
    share a symbol with those inside the filler. (Callers then compile the full language.)

    >>> d = to_dfa(seq(literal(b"a"), sym(0xFF), literal(b"b")), 256)
    >>> f = to_dfa(alt(literal(b"xy"), literal(b"z")), 256)
    >>> s = substitute(d, {0xFF: f})
    >>> s.accepts(b"axyb"), s.accepts(b"azb"), s.accepts(b"ab"), s.accepts(b"a\\xffb")
    (True, True, False, False)
    """
    n_symbols = dfa.n_symbols
    holes = [h for h in fills if dfa.sym_class[h] >= 0 and (dfa.trans[:, dfa.sym_class[h]] >= 0).any()]
    if not holes:
        return dfa
    parts = [dfa.sym_class] + [fills[h].sym_class for h in holes]
    # 1. one alphabet partition that refines the automaton's and every filler's
    sig = np.stack([p.astype(np.int64) for p in parts], axis=1)  # (n_symbols, 1 + holes)
    _, first, sym_class = np.unique(sig, axis=0, return_index=True, return_inverse=True)
    sym_class = sym_class.ravel().astype(np.int32)
    K = len(first)  # first[k]: a symbol of new class k
    hole_cols = np.zeros(K, bool)
    for h in holes:
        if (dfa.sym_class == dfa.sym_class[h]).sum() > 1:
            return None  # the automaton treats other symbols as it treats the hole: not a hole
        hole_cols |= sym_class[first] == sym_class[h]
    base = dfa.trans[:, dfa.sym_class[first]]  # (S, K) the automaton's edges on the new classes (a copy)
    base[:, hole_cols] = -1
    edges: list[tuple[int, int, int]] = []  # (state, hole, state after the hole)
    for h in holes:
        after = dfa.trans[:, dfa.sym_class[h]]  # (S,)
        edges += [(int(s), h, int(after[s])) for s in np.nonzero(after >= 0)[0]]

    def merge(row: np.ndarray, other: np.ndarray) -> bool:
        if ((row >= 0) & (other >= 0) & (row != other)).any():
            return False
        np.copyto(row, other, where=other >= 0)
        return True

    # 2. a copy of the filler per (hole, state after it): its accepting states continue as that state does
    blocks, accept = [base], [dfa.accept.copy()]
    offset: dict[tuple[int, int], int] = {}
    n = dfa.n_states
    for _, h, t in edges:
        if (h, t) in offset:
            continue
        f = fills[h]
        block = f.trans[:, f.sym_class[first]]  # (S_f, K)
        block = np.where(block >= 0, block + n, -1)
        for q in np.nonzero(f.accept)[0]:
            if not merge(block[q], base[t]):
                return None
        offset[(h, t)] = n
        blocks.append(block)
        accept.append(f.accept & bool(dfa.accept[t]))
        n += f.n_states
    trans = np.concatenate(blocks, axis=0)
    acc = np.concatenate(accept)
    # 3. the state before each hole enters the filler (and, if it accepts the empty word, what follows)
    for s, h, t in edges:
        f = fills[h]
        if not merge(trans[s], trans[offset[(h, t)] + f.start]):
            return None
        if f.accept[f.start]:
            acc[s] |= bool(dfa.accept[t])
    masks = [0] * K
    for s in range(n_symbols):
        masks[sym_class[s]] |= 1 << s
    return minimize(trans, acc, dfa.start, sym_class, masks)
