"""Symbol DFA x vocabulary -> token automaton with token classes ("atoms") and groups.

Every token is walked through the DFA from every state. Tokens with the same effect from
*every* state form an **atom**; atoms partition the vocabulary, so one pass over the
logits per position scores them all. The tokens taking state ``s`` to state ``s'`` form a
**group** (a union of atoms); the same group recurs across states (every free-string state
shares the huge "plain text" group), so groups are deduplicated. The canvas DP then runs
over edges ``(s, s', group)`` and never over single tokens.

To keep 262k vocabularies fast, tokens are first reduced to their *shape* (the string of
DFA symbol classes they spell; many tokens share one), shapes are sorted, and each state
walks them in order reusing the walk of the common prefix with the previous shape and
skipping every shape that shares a prefix already found dead; neighbouring states walk
side by side, so that their table loads overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba as nb
import numpy as np

from ..errors import VocabularyError
from ..numba_threads import parallel_kernel
from .canvas_layout import chain_order
from .fsa import Dfa
from .vocabulary import Vocabulary


@nb.njit(cache=True, nogil=True)
def _jump_table(lcp, lens, maxlen):  # pragma: no cover - compiled
    """jump[u, d]: the first shape after u sharing at most d symbols with u.

    When a walk dies at depth d, every shape before jump[u, d] shares the dead prefix.
    """
    U = lcp.shape[0]
    jump = np.full((U, maxlen), U, np.int32)
    for u in range(U - 2, -1, -1):
        nxt = lcp[u + 1]
        for d in range(maxlen):
            jump[u, d] = u + 1 if nxt <= d else jump[u + 1, d]
    return jump


#: States walked side by side through each shape: their steps are independent loads,
#: which the core overlaps, where one state's walk waits for each load in turn (262k
#: vocab, 20 tools, 49k states: 3.1x faster than one state at a time; 32 lanes rather
#: than 16 on the chain-ordered table: 0.89x at 20 tools, 0.9x at 5).
_LANES = 32
#: Stretches of the sorted shapes that numba's threads walk apart (a fixed number, so
#: that the hashes, folded state after state within each shape, never depend on the
#: thread count).
_SHAPE_CHUNKS = 8


#: Below this many states the walk's table holds uint16 rows (the dead row S included).
_UINT16_STATES = int(np.iinfo(np.uint16).max)


def _walk_table(dfa: Dfa) -> tuple[np.ndarray, np.ndarray]:
    """The DFA's table for ``_walk_hash`` and ``_walk_reps``, and the state of each of its
    rows (S,) int32. The table is (C, S + 1), class-major (the lanes' states are
    neighbours, so one class's entries for them share cache lines), with a last column
    for the dead state S that every dead entry points to and that stays dead.

    States are renumbered along their chains (``canvas_layout.chain_order``): lanes that
    start side by side then stay side by side as they walk a shape (a counted string's
    c_i, c_i+1, ... step to c_i+n, c_i+1+n, ...), and the entries are uint16 where the
    states fit. The table of 20 tools (49k states, 94 classes) is 18 MB in int32, larger
    than the caches, and the walk waits on its loads: 262k x 20 tools, one thread,
    7.8-9.6 s in int32 in the DFA's numbering, 3.4-3.9 s so. The hashes see row numbers;
    atoms are numbered by their tokens (``build_token_automaton``), whatever the hashes."""
    S, C = dfa.trans.shape
    src, cls = np.nonzero(dfa.trans >= 0)  # the DFA's edges, by state then class
    dst = dfa.trans[src, cls]
    state = chain_order(src, dst, cls, S, dfa.start, np.searchsorted(src, np.arange(S + 1)))
    row = np.empty(S + 1, np.int64)  # state -> row, and the dead state S -> S
    row[state] = np.arange(S)
    row[S] = S
    table = np.empty((C, S + 1), np.uint16 if S < _UINT16_STATES else np.int32)
    table[:, row[:S]] = row[np.where(dfa.trans >= 0, dfa.trans, S)].T
    table[:, S] = S
    return table, state.astype(np.int32)


@nb.njit(cache=True, nogil=True, inline="always")
def _lanes_start(st, s0, lanes, dead):  # pragma: no cover - compiled
    """The lanes at rows s0, s0 + 1, ... (``lanes`` of them; the rest dead)."""
    for b in range(_LANES):
        st[0, b] = s0 + b if b < lanes else dead


@nb.njit(cache=True, nogil=True, inline="always")
def _lanes_step(table, st, cls, d, dead):  # pragma: no cover - compiled
    """Every lane one symbol of class ``cls`` on: st[d + 1] <- the table's row cls at
    st[d]. Whether any lane is still alive."""
    row = table[np.uint32(cls)]  # (indices unsigned: numba checks a signed one for wrapping around)
    n_alive = 0
    for b in range(_LANES):
        q = row[st[np.uint32(d), b]]
        st[np.uint32(d + 1), b] = q
        n_alive += q != dead
    return n_alive > 0


@parallel_kernel(cache=True, nogil=True)
def _walk_hash(table, shapes, lens, lcp, jump, h1, h2):  # pragma: no cover - compiled
    """Fold (state, next state) of every alive (state, shape) pair into two hashes, states
    in order within each shape. ``table`` is ``_walk_table``'s."""
    n_states = table.shape[1] - 1
    dead = n_states
    n_shapes = shapes.shape[0]
    maxlen = shapes.shape[1]
    for chunk in nb.prange(_SHAPE_CHUNKS):
        u0 = chunk * n_shapes // _SHAPE_CHUNKS
        u1 = (chunk + 1) * n_shapes // _SHAPE_CHUNKS
        st = np.empty((maxlen + 1, _LANES), table.dtype)  # each lane's state (row) along the current shape
        for s0 in range(0, n_states, _LANES):
            lanes = min(_LANES, n_states - s0)
            _lanes_start(st, s0, lanes, dead)
            u = u0
            while u < u1:
                alive = True
                uu = np.uint32(u)  # (unsigned, as in _lanes_step: 262k x 20 tools, 2.39 -> 2.12 s)
                # the walk so far is shared with the previous shape, except at a chunk's first
                for d in range(lcp[uu] if u > u0 else 0, lens[uu]):
                    if not _lanes_step(table, st, shapes[uu, np.uint32(d)], d, dead):
                        # dead for every lane: skip the shapes sharing this prefix
                        u = jump[uu, np.uint32(d)]
                        alive = False
                        break
                if alive:
                    end = np.uint32(lens[uu])
                    for b in range(lanes):
                        q = st[end, b]
                        if q != dead:
                            key = np.uint64((s0 + b) * 1000003 + np.int64(q) + 1)
                            h1[uu] = h1[uu] * np.uint64(0x100000001B3) ^ key
                            h2[uu] = (h2[uu] ^ (key * np.uint64(0x9E3779B97F4A7C15))) * np.uint64(0xC2B2AE3D27D4EB4F)
                    u += 1


@nb.njit(cache=True, nogil=True)
def _walk_reps(table, state_of_row, shapes, lens, rep_shapes):  # pragma: no cover - compiled
    """Sparse (state, atom, next state) for every atom alive from every state, by state,
    then atom. ``table`` is ``_walk_table``'s (rows), ``state_of_row`` its numbering.

    Each atom's representative shape is walked from _LANES neighbouring rows at once, as
    in ``_walk_hash`` (262k x 20 tools: 10M triples from 83M walks). Two passes (count,
    then fill) so a 262k vocabulary with tens of thousands of states never materialises
    a dense (S, K) table; the fill writes each state's triples at its place in state
    order, however the rows are numbered."""
    n_states = table.shape[1] - 1
    dead = n_states
    K = rep_shapes.shape[0]
    maxlen = shapes.shape[1]
    per_state = np.zeros(n_states + 1, np.int64)
    st = np.empty((maxlen + 1, _LANES), table.dtype)
    src = np.empty(0, np.int32)
    atom = np.empty(0, np.int32)
    dst = np.empty(0, np.int32)
    for phase in range(2):
        if phase == 1:
            at = np.cumsum(per_state)  # where each state's triples end
            src = np.empty(at[-1], np.int32)
            atom = np.empty(at[-1], np.int32)
            dst = np.empty(at[-1], np.int32)
            at -= per_state  # ... and start
        for s0 in range(0, n_states, _LANES):
            lanes = min(_LANES, n_states - s0)
            _lanes_start(st, s0, lanes, dead)
            for k in range(K):
                u = rep_shapes[k]
                n = lens[u]
                alive = True
                for d in range(n):
                    if not _lanes_step(table, st, shapes[u, d], d, dead):
                        alive = False  # (st[n] is left from an earlier shape)
                        break
                if not alive:
                    continue
                for b in range(lanes):
                    q = st[n, b]
                    if q == dead:
                        continue
                    s = state_of_row[s0 + b]
                    if phase == 0:
                        per_state[s] += 1
                    else:
                        i = at[s]
                        src[i] = s
                        atom[i] = k
                        dst[i] = state_of_row[q]
                        at[s] = i + 1
    return src, atom, dst


#: The most distinct next states of one state that ``_edges_by_destination`` gathers
#: by scanning that state's triples once per next state; past it, a sort.
_FEW_TARGETS = 64


#: ``fewest_steps_back``'s answer where no path leads to a final state.
NO_PATH = np.iinfo(np.int32).max


@nb.njit(cache=True, nogil=True)
def fewest_steps_back(final, in_offsets, in_src):  # pragma: no cover - compiled
    """(S,) int32: the fewest edges from each state to a ``final`` one ((S,) bool), found
    breadth first along the edges backwards (``in_src[in_offsets[q]:in_offsets[q + 1]]``:
    the sources of q's incoming edges); ``NO_PATH`` where none leads there."""
    S = final.shape[0]
    fewest = np.full(S, NO_PATH, np.int32)
    queue = np.empty(S, np.int32)
    n = 0
    for s in range(S):
        if final[s]:
            fewest[s] = 0
            queue[n] = s
            n += 1
    i = 0
    while i < n:
        t = queue[i]
        i += 1
        for j in range(in_offsets[t], in_offsets[t + 1]):
            s = in_src[j]
            if fewest[s] == NO_PATH:
                fewest[s] = fewest[t] + 1
                queue[n] = s
                n += 1
    return fewest


@nb.njit(cache=True, nogil=True)
def _predecessors(edge_src, edge_dst, S):  # pragma: no cover - compiled
    """(offsets (S + 1,), sources): each state's incoming edges' sources, a counting sort."""
    first = np.zeros(S + 1, np.int64)
    for e in range(edge_dst.shape[0]):
        first[edge_dst[e] + 1] += 1
    for q in range(S):
        first[q + 1] += first[q]
    pred = np.empty(edge_dst.shape[0], np.int32)
    fill = first[:-1].copy()
    for e in range(edge_dst.shape[0]):
        pred[fill[edge_dst[e]]] = edge_src[e]
        fill[edge_dst[e]] += 1
    return first, pred


@nb.njit(cache=True, nogil=True)
def _edges_by_destination(src, atom, dst):  # pragma: no cover - compiled
    """The triples of ``_walk_reps`` (sorted by state, then atom) as edges: sorted by
    (state, next state, atom), each run of one (state, next state) pair an edge. Returns
    (the atoms in that order, each edge's start and end in it, each edge's state and
    next state). Each state's triples are ordered apart, where a global lexsort of all of
    them (~13M at 262k x 20 tools) took ~2 s with the gathers around it: a state has a
    few hundred triples but few next states (its edges), so they are listed in order and
    each one's atoms gathered by a scan (0.39 -> 0.30 s against a stable sort per state
    at 262k x 20 tools); a state with more than _FEW_TARGETS next states is sorted."""
    n = src.shape[0]
    atoms = np.empty(n, np.int32)
    starts = np.empty(n, np.int64)
    edge_src = np.empty(n, np.int32)
    edge_dst = np.empty(n, np.int32)
    targets = np.empty(_FEW_TARGETS + 1, np.int32)  # one state's distinct next states, ascending
    E = 0
    a = 0
    while a < n:
        b = a
        while b < n and src[b] == src[a]:
            b += 1
        m = 0  # (insertion into ``targets``; m > _FEW_TARGETS: too many, sort instead)
        for i in range(a, b):
            q = dst[i]
            j = m
            while j > 0 and targets[j - 1] > q:
                j -= 1
            if j > 0 and targets[j - 1] == q:
                continue
            for k in range(m, j, -1):
                targets[k] = targets[k - 1]
            targets[j] = q
            m += 1
            if m > _FEW_TARGETS:
                break
        if m <= _FEW_TARGETS:
            w = a
            for t in range(m):  # each next state's atoms, ascending as they come
                q = targets[t]
                starts[E] = w
                edge_src[E] = src[a]
                edge_dst[E] = q
                E += 1
                for i in range(a, b):
                    if dst[i] == q:
                        atoms[w] = atom[i]
                        w += 1
        else:
            order = np.argsort(dst[a:b], kind="mergesort")  # stable: atoms stay ascending
            for j in range(b - a):
                i = a + order[j]
                atoms[a + j] = atom[i]
                if j == 0 or dst[i] != dst[a + order[j - 1]]:
                    starts[E] = a + j
                    edge_src[E] = src[a]
                    edge_dst[E] = dst[i]
                    E += 1
        a = b
    ends = np.empty(E, np.int64)
    ends[:E - 1] = starts[1:E]
    if E > 0:
        ends[E - 1] = n
    return atoms, starts[:E].copy(), ends, edge_src[:E].copy(), edge_dst[:E].copy()


@nb.njit(cache=True, nogil=True)
def _step(src_offsets, edge_dst, edge_group, group_atoms, group_offsets, state, atom):  # pragma: no cover
    """Next state from ``state`` on a token of ``atom`` (-1 if not allowed)."""
    for e in range(src_offsets[state], src_offsets[state + 1]):
        g = edge_group[e]
        lo = group_offsets[g]
        hi = group_offsets[g + 1]
        # group atoms are sorted: binary search
        while lo < hi:
            mid = (lo + hi) // 2
            if group_atoms[mid] < atom:
                lo = mid + 1
            else:
                hi = mid
        if lo < group_offsets[g + 1] and group_atoms[lo] == atom:
            return edge_dst[e]
    return -1


@dataclass(eq=False)
class TokenAutomaton:
    """The compiled token-level structure the canvas DP runs on.

    Shapes: S states, K atoms, G groups, E edges, V tokens.
    """

    n_states: int
    start: int
    accept: np.ndarray  # (S,) bool: complete canvas content ends here (stop written)
    atom_of_token: np.ndarray  # (V,) int32, -1 for tokens never allowed
    atom_tokens: np.ndarray  # (V_alive,) int32 tokens sorted by atom
    atom_offsets: np.ndarray  # (K+1,) int64 into atom_tokens
    group_atoms: np.ndarray  # (sum of group sizes,) int32
    group_offsets: np.ndarray  # (G+1,) int64
    atom_groups: np.ndarray  # inverse of group_atoms: groups containing each atom
    atom_group_offsets: np.ndarray  # (K+1,) int64
    edge_src: np.ndarray  # (E,) int32, edges sorted by source state
    edge_dst: np.ndarray  # (E,) int32
    edge_group: np.ndarray  # (E,) int32
    src_offsets: np.ndarray  # (S+1,) int64: edges of state s are src_offsets[s]:src_offsets[s+1]

    @property
    def n_atoms(self) -> int:
        return int(self.atom_offsets.shape[0] - 1)

    @property
    def n_groups(self) -> int:
        return int(self.group_offsets.shape[0] - 1)

    @property
    def n_edges(self) -> int:
        return int(self.edge_src.shape[0])

    def step(self, state: int, token: int) -> int:
        """State after one token (-1 if the token is not allowed there)."""
        if state < 0:
            return -1
        if not 0 <= token < self.atom_of_token.shape[0]:
            return -1
        k = self.atom_of_token[token]
        if k < 0:
            return -1
        return int(_step(self.src_offsets, self.edge_dst, self.edge_group, self.group_atoms, self.group_offsets,
                         state, k))

    def allowed_atoms(self, state: int) -> np.ndarray:
        """(K + 1,) bool: the atoms allowed from ``state``; the last entry, False, stands for
        the tokens never allowed (``atom_of_token`` -1), so that
        ``allowed_atoms(q)[atom_of_token]`` is a mask over tokens."""
        atoms = np.zeros(self.n_atoms + 1, np.bool_)
        for g in self.edge_group[self.src_offsets[state] : self.src_offsets[state + 1]].tolist():
            atoms[self.group_atoms[self.group_offsets[g] : self.group_offsets[g + 1]]] = True
        return atoms

    def allowed_tokens(self, state: int) -> np.ndarray:
        """Token ids allowed from ``state`` (sorted)."""
        return np.flatnonzero(self.allowed_atoms(state)[self.atom_of_token]).astype(np.int32)

    def nbytes(self) -> int:
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))


def _unique_shapes(shape_mat: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct shapes of tokens (rows of ``shape_mat`` (n, maxlen), the first
    ``lens[i]`` classes of row i), in lexicographic order, a shape before those it is a
    prefix of (the walk shares each shape's prefix with the one before it): (shapes (U,
    maxlen) int32 padded with 0, their lengths (U,), each token's shape (n,)).

    Each shape is sorted as bytes (classes as big-endian 16-bit numbers, so that byte
    order is class order): 0.33-0.47 s at Gemma's 262k tokens, 4-5x faster than
    ``np.unique(axis=0)``, whose rows compare column by column (49 of them)."""
    n, maxlen = shape_mat.shape
    width = 2 * maxlen
    buf = shape_mat.astype(">u2").tobytes()
    keys = [buf[i * width:i * width + 2 * int(k)] for i, k in enumerate(lens.tolist())]
    ordered = sorted(set(keys))
    index = {k: u for u, k in enumerate(ordered)}
    shape_of = np.fromiter((index[k] for k in keys), np.int64, count=n)
    padded = b"".join(k.ljust(width, b"\0") for k in ordered)
    shapes = np.frombuffer(padded, ">u2").reshape(len(ordered), maxlen).astype(np.int32)
    slens = np.fromiter((len(k) // 2 for k in ordered), np.int64, count=len(ordered))
    return shapes, slens, shape_of


@nb.njit(cache=True, nogil=True)
def _segment_hashes(values, starts, ends):  # pragma: no cover - compiled
    """A 64-bit hash of each segment values[starts[i]:ends[i]] (its length included)."""
    h = np.empty(starts.shape[0], np.uint64)
    for i in range(starts.shape[0]):
        x = np.uint64(ends[i] - starts[i]) * np.uint64(0x9E3779B97F4A7C15)
        for j in range(starts[i], ends[i]):
            x = (x ^ np.uint64(values[j])) * np.uint64(0x100000001B3)
            x ^= x >> np.uint64(29)
        h[i] = x
    return h


@nb.njit(cache=True, nogil=True)
def _segments_equal(values, starts, ends, other):  # pragma: no cover - compiled
    """Whether every segment i holds the same values as segment other[i]."""
    for i in range(starts.shape[0]):
        r = other[i]
        n = ends[i] - starts[i]
        if ends[r] - starts[r] != n:
            return False
        for k in range(n):
            if values[starts[i] + k] != values[starts[r] + k]:
                return False
    return True


def _groups(atoms: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The groups of the edges whose sorted atom sets are the segments atoms[starts[i]:
    ends[i]]: equal sets share a group, numbered in order of first appearance. Returns
    (each edge's group (E,) i32, group_atoms i32, group_offsets (G + 1,) i64).

    Segments are matched by a hash, then every segment is compared with its group's
    first: only a hash collision (never seen) takes the exact path, a dict of tuples,
    which at 262k x 20 tools (338k edges) took ~2 s of Python."""
    h = _segment_hashes(atoms, starts, ends)
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # groups by first appearance
    rank = np.empty(order.shape[0], np.int64)
    rank[order] = np.arange(order.shape[0])
    group_of = rank[inverse.ravel()]
    reps = first[order]  # each group's first segment
    if not _segments_equal(atoms, starts, ends, reps[group_of]):
        return _groups_exact(atoms, starts, ends)
    lengths = ends[reps] - starts[reps]
    group_offsets = np.zeros(reps.shape[0] + 1, np.int64)
    group_offsets[1:] = np.cumsum(lengths)
    take = np.repeat(starts[reps] - group_offsets[:-1], lengths) + np.arange(group_offsets[-1])
    return group_of.astype(np.int32), atoms[take].astype(np.int32), group_offsets


def _groups_exact(atoms: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_groups`` with a dict of tuples (the same result, without hashing)."""
    index: dict[tuple[int, ...], int] = {}
    members: list[tuple[int, ...]] = []
    group_of = np.empty(starts.shape[0], np.int32)
    for i, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
        key = tuple(atoms[a:b].tolist())
        g = index.get(key)
        if g is None:
            g = index[key] = len(members)
            members.append(key)
        group_of[i] = g
    group_offsets = np.zeros(len(members) + 1, np.int64)
    group_offsets[1:] = np.cumsum([len(m) for m in members])
    return group_of, np.array([k for m in members for k in m], np.int32), group_offsets


def build_token_automaton(dfa: Dfa, vocab: Vocabulary) -> TokenAutomaton:
    S = dfa.n_states
    V = vocab.size
    sym_class = dfa.sym_class
    usable_class = (dfa.trans >= 0).any(axis=0)  # (C,)

    # 1. token -> shape (class string); tokens spelling nothing or an unusable class die.
    sym_mat, lens = vocab.symbol_matrix
    maxlen = sym_mat.shape[1]
    # class of each symbol, with one extra "padding" class (index C) for -1 entries
    cls_ext = np.append(sym_class, np.int32(len(usable_class)))
    usable_ext = np.append(usable_class, True)
    shape_mat = cls_ext[sym_mat]  # (V, maxlen); -1 pads map to the extra class
    alive = (lens > 0) & usable_ext[shape_mat].all(axis=1)
    shape_mat = np.where(sym_mat >= 0, shape_mat, 0).astype(np.int32)
    alive_ids = np.nonzero(alive)[0]
    if alive_ids.size == 0:
        raise VocabularyError("no token of the vocabulary can spell anything in this grammar")
    shapes, slens, shape_of_alive = _unique_shapes(shape_mat[alive_ids], lens[alive_ids])
    # longest common prefix with the previous shape
    lcp = np.zeros(len(slens), np.int64)
    if len(slens) > 1:
        eq = shapes[1:] == shapes[:-1]
        first_diff = np.where(eq.all(axis=1), maxlen, np.argmin(eq, axis=1))
        lcp[1:] = np.minimum(first_diff, np.minimum(slens[1:], slens[:-1]))

    # 2. signature hashes -> atoms
    h1 = np.zeros(len(slens), np.uint64)
    h2 = np.zeros(len(slens), np.uint64)
    jump = _jump_table(lcp, slens, maxlen)
    table, state_of_row = _walk_table(dfa)
    _walk_hash(table, shapes, slens, lcp, jump, h1, h2)
    del jump
    dead_shape = (h1 == 0) & (h2 == 0)
    sig = np.stack([h1, h2], axis=1)
    _, sig_of_shape = np.unique(sig, axis=0, return_inverse=True)
    sig_of_shape = sig_of_shape.ravel().astype(np.int64)
    # atoms numbered densely, the atoms of one token first, each part in the order of its
    # first token, skipping the "dead everywhere" signature (the hashes' values depend on
    # the walk's numbering); the scan over the logits then writes the one-token atoms'
    # statistics as runs (canvas.reduce_atoms; BPE 4k, 20 tools: 614 of 747 atoms)
    sig_of_token = np.full(V, -1, np.int64)
    sig_of_token[alive_ids] = np.where(dead_shape, -1, sig_of_shape)[shape_of_alive]
    live_tokens = np.flatnonzero(sig_of_token >= 0)
    live_sigs, first, n_tokens = np.unique(sig_of_token[live_tokens], return_index=True, return_counts=True)
    remap = np.full(sig_of_shape.max() + 1, -1, np.int64)
    remap[live_sigs[np.lexsort((first, n_tokens != 1))]] = np.arange(len(live_sigs))  # (the dead signature's stays -1)
    atom_of_shape = remap[sig_of_shape]
    K = len(live_sigs)

    atom_of_token = np.full(V, -1, np.int32)
    atom_of_token[alive_ids] = atom_of_shape[shape_of_alive]
    order = np.argsort(atom_of_token, kind="stable")
    order = order[atom_of_token[order] >= 0]
    atom_tokens = order.astype(np.int32)
    atom_offsets = np.searchsorted(atom_of_token[order], np.arange(K + 1)).astype(np.int64)

    # 3. the DFA on atoms, from one representative shape each
    rep_shape = np.zeros(K, np.int64)
    rep_shape[atom_of_shape[atom_of_shape >= 0]] = np.nonzero(atom_of_shape >= 0)[0]
    src, atoms, dst = _walk_reps(table, state_of_row, shapes, slens, rep_shape)

    # 4. edges (s, s') with their atom sets -> deduplicated groups, where the tokens can
    # still complete a value after the edge: the DFA is trimmed on symbols, but a
    # tokenizer need not spell every symbol path (an uncased WordPiece has no 'Q'), and a
    # partial canvas must not end where no token leads on
    atoms_sorted, starts, ends, edge_src, edge_dst = _edges_by_destination(src, atoms, dst)
    completable = fewest_steps_back(dfa.accept, *_predecessors(edge_src, edge_dst, S)) != NO_PATH
    if not completable[dfa.start]:
        raise VocabularyError("the tokenizer cannot spell any complete value of this grammar: no sequence of its "
                              "tokens leads from the start to the end (is a character the values need missing "
                              "from its vocabulary?)")
    if not completable.all():
        keep = completable[edge_dst]
        starts, ends, edge_src, edge_dst = starts[keep], ends[keep], edge_src[keep], edge_dst[keep]
    edge_group, group_atoms, group_offsets = _groups(atoms_sorted, starts, ends)
    n_groups = len(group_offsets) - 1
    ga_groups = np.repeat(np.arange(n_groups, dtype=np.int32), np.diff(group_offsets))
    # inverse: for each atom, the groups containing it
    inv = np.argsort(group_atoms, kind="stable")
    atom_groups = ga_groups[inv].astype(np.int32)
    atom_group_offsets = np.searchsorted(group_atoms[inv], np.arange(K + 1)).astype(np.int64)

    src_offsets = np.searchsorted(edge_src, np.arange(S + 1)).astype(np.int64)
    return TokenAutomaton(
        n_states=S,
        start=dfa.start,
        accept=dfa.accept.copy(),
        atom_of_token=atom_of_token,
        atom_tokens=atom_tokens,
        atom_offsets=atom_offsets,
        group_atoms=group_atoms,
        group_offsets=group_offsets,
        atom_groups=atom_groups,
        atom_group_offsets=atom_group_offsets,
        edge_src=edge_src,
        edge_dst=edge_dst,
        edge_group=edge_group,
        src_offsets=src_offsets,
    )


def spells_prefix(automaton: TokenAutomaton, dfa: Dfa, vocab: Vocabulary, prefix: list[int]) -> tuple[bool, bool]:
    """Whether a token sequence from the start spells a text that begins with the symbols
    ``prefix`` and goes on to a complete canvas, and whether one spells ``prefix`` at all
    (complete or not). The DFA accepts the prefix's symbols; the tokens need not: an uncased
    WordPiece has no capitals, so a tool named ``getQuote`` is trimmed from the automaton
    (``build_token_automaton``'s step 4) while the others keep it non-empty.

    The symbols fix the state after each part of the prefix, so a search over the prefix's
    offsets is enough: a token that spells prefix[i:i + m] leads from offset i to i + m,
    and one that spells all of prefix[i:] (and maybe more) finishes the search where the
    token automaton allows it from the state at i (its edges lead only to states from
    which the canvas can still be completed)."""
    mat, lens = vocab.symbol_matrix
    order, starts = vocab.by_first_symbol
    n = len(prefix)
    states = [automaton.start]  # the state after prefix[:i]
    for s in prefix:
        states.append(dfa.step(states[-1], s))
    reached = np.zeros(n + 1, bool)
    reached[0] = True
    begins = False
    for i in range(n):
        if not reached[i] or states[i] < 0:
            continue
        tokens = order[starts[prefix[i]]:starts[prefix[i] + 1]]  # (those that begin with prefix[i])
        j = 1
        while tokens.size and i + j < n:
            reached[i + j] |= bool((lens[tokens] == j).any())
            tokens = tokens[lens[tokens] > j]  # (then the matrix is wider than j)
            tokens = tokens[mat[tokens, j] == prefix[i + j]] if tokens.size else tokens
            j += 1
        if not tokens.size:
            continue
        begins = True
        if automaton.allowed_atoms(states[i])[automaton.atom_of_token[tokens]].any():
            return True, True
    return False, begins
