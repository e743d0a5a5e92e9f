"""The canvas DP: exact inference over a canvas of L positions restricted to a language.

The model gives independent per-position distributions p_l(t) ∝ exp(logits[l, t]). A
canvas is valid when its tokens spell a path of the token automaton from the start state
to a final state (accepting: call + stop + pad; or, for a canvas that continues in the
next one, any live state). The restricted distribution is

    P(t_1..t_L) ∝ prod_l p_l(t_l) * [t_1..t_L is valid]

and this module computes, per step of the denoiser:

* ``viterbi``   - its mode (max-product over positions x states);
* ``sample``    - an exact sample (backward filtering, forward sampling);
* ``marginals`` - its per-position marginals P(t_l = t) (forward-backward), in log space,
  and their entropies without touching the vocabulary twice.

All of them work on atoms and groups (see token_automaton), never on single tokens,
except for one pass over the logits per position that scores the atoms, and the final
choice of a token inside the sampled atom. The DP visits only the states that lie on
some valid canvas at each position and pulls over their edges (each state's value is a
sum or max over its incoming or outgoing edges), so it writes one number per live state,
never one per edge; the marginals' edge posteriors are summed inside the forward pass.
Forward/backward run in probability space with per-position scaling (float64), which is
exact up to rounding for logits within ~700 of the row maximum; Viterbi runs in log space.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba as nb
import numpy as np

NEG_INF = -np.inf


# ---- 1. score atoms: one pass over the logits per position --------------------------------


class SortedAtoms(NamedTuple):
    """The allowed tokens listed atom by atom (built once per grammar and vocabulary size):
    the tokens of atom k are perm[lo[k]:hi[k]], ascending."""

    atom_of: np.ndarray  # (V,) i32 the atom of each token, -1 where never allowed
    perm: np.ndarray  # (n,) i32 allowed token ids, grouped by atom
    lo: np.ndarray  # (K,) i64
    hi: np.ndarray  # (K,) i64


def sorted_atoms(atom_of: np.ndarray, K: int) -> SortedAtoms:
    """The token lists of ``atom_of`` (V,) over K atoms, for the pass below."""
    allowed = np.flatnonzero(atom_of >= 0)
    perm = allowed[np.argsort(atom_of[allowed], kind="stable")].astype(np.int32)
    hi = np.cumsum(np.bincount(atom_of[allowed], minlength=K)[:K]).astype(np.int64)
    lo = np.concatenate([[0], hi[:-1]]).astype(np.int64)
    return SortedAtoms(atom_of, perm, lo, hi)


# Atom statistics are reductions over each atom's tokens. Scattering every token into its
# atom's slot costs ~1.6 ns a token (each add waits for the previous add to the same
# slot). Instead each chunk of rows is gathered into atom order (``perm``), which makes
# every atom one contiguous run, and each run is reduced by a loop the compiler
# vectorises: the pass is ~2x faster at 4k and ~1.4x at 30k-262k tokens. A run is walked
# through a slice of the row, not ``range(lo, hi)`` over the row: numba vectorises only
# the former (10x).

# The order-preserving int32 key of a float32's bits (keys compare like the floats): a
# max over keys vectorises where a float max (nan-aware) does not. NaN maps below every
# key, so a nan logit is never an atom's best, as with a float ``>``.
_KEY_NAN = np.int32(-(2**31))
_KEY_NEG_INF = np.int32(-2139095041)  # the key of -inf: an atom no higher has no usable logit


@nb.njit(cache=True, nogil=True, inline="always")
def _float_key(i):  # pragma: no cover - compiled
    key = i ^ ((i >> 31) & np.int32(0x7FFFFFFF))
    return key if (i & np.int32(0x7FFFFFFF)) <= np.int32(0x7F800000) else _KEY_NAN


@nb.njit(cache=True, nogil=True)
def _gather_rows(x, perm, out):  # pragma: no cover - compiled
    """out[r, j] = x[r, perm[j]]: each row's allowed tokens, atom after atom."""
    for r in range(x.shape[0]):
        xr = x[r]
        o = out[r]
        for j in range(perm.shape[0]):
            o[j] = xr[perm[j]]


def _atom_stats_kernel(want_sum: bool, want_x: bool):  # type: ignore[no-untyped-def]
    """The run reduction compiled for one choice of outputs (compile-time flags keep the
    loop free of branches, which is what lets it vectorise)."""

    @nb.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def stats(xg, xg_bits, eg, lo, hi, ref, asum, asumx, best):  # pragma: no cover - compiled
        """Per row r and atom k, over the run [lo[k], hi[k]) of the gathered row: the sum of
        eg (= exp(x - ref[r])), of eg * (x - ref[r]), and the best key packed with the run
        offset of its first token (int64 key << 32 | (2**32 - 1 - offset): the max picks
        the lowest token among equal logits). With the sums, a nan logit makes its atom's
        sum nan (the caller refuses it), so only the max-only pass keys nan below all."""
        for r in range(xg_bits.shape[0]):
            m = ref[r]  # float64: x - m in float32 loses ~1e-8 of a term, which sums that cancel show
            for k in range(lo.shape[0]):
                bits = xg_bits[r, lo[k]:hi[k]]
                top = np.int64(-(2**63))
                if want_sum:
                    e = eg[r, lo[k]:hi[k]]
                    v = xg[r, lo[k]:hi[k]]
                    s = 0.0
                    sx = 0.0
                    for j in range(bits.shape[0]):
                        w = e[j]
                        s += w
                        if want_x:
                            # 0 where w is 0: x may be -inf there, and 0 * -inf is nan
                            sx += w * (np.float64(v[j]) - m) if w > 0.0 else 0.0
                        i = bits[j]
                        key = i ^ ((i >> 31) & np.int32(0x7FFFFFFF))
                        top = max(top, (np.int64(key) << 32) | (np.int64(0xFFFFFFFF) - j))
                    asum[r, k] = s
                    if want_x:
                        asumx[r, k] = sx
                else:
                    for j in range(bits.shape[0]):
                        top = max(top, (np.int64(_float_key(bits[j])) << 32) | (np.int64(0xFFFFFFFF) - j))
                best[r, k] = top

    return stats


@nb.njit(cache=True, nogil=True)
def _unpack_best(best, perm, lo, amax_bits, aarg):  # pragma: no cover - compiled
    """Packed keys (N, K) -> the bits of amax (N, K) (a float32 view) and aarg (N, K);
    -inf and -1 for an atom with no usable logit (all -inf or nan, or no token in this
    vocabulary)."""
    N, K = best.shape
    for r in range(N):
        for k in range(K):
            key = np.int32(best[r, k] >> 32)
            if key <= _KEY_NEG_INF:
                amax_bits[r, k] = np.int32(-8388608)  # 0xff800000: -inf
                aarg[r, k] = -1
            else:
                amax_bits[r, k] = key ^ ((key >> 31) & np.int32(0x7FFFFFFF))
                aarg[r, k] = perm[lo[k] + np.int64(0xFFFFFFFF) - (best[r, k] & np.int64(0xFFFFFFFF))]


def _best_of_atoms(best, perm, lo):  # type: ignore[no-untyped-def]
    amax = np.empty(best.shape, np.float32)
    aarg = np.empty(best.shape, np.int32)
    _unpack_best(best, perm, lo, amax.view(np.int32), aarg)
    return amax, aarg


_NO_REF = np.zeros(0, np.float64)  # the arguments _atom_max leaves alone
_NO_SUMS = np.zeros((0, 0), np.float64)
_atom_max = _atom_stats_kernel(False, False)  # viterbi: the best token of each atom only
_atom_sums = _atom_stats_kernel(True, False)  # sample, marginals
_atom_sums_x = _atom_stats_kernel(True, True)  # marginals with entropies, denoise_step


@nb.njit(cache=True, nogil=True)
def _gather_pairs(x, perm, lo, hi, rows, ks, amax, d):  # pragma: no cover - compiled
    """d = the logits of each (row, atom) pair's tokens less the atom's best, pair after
    pair (>= -1e30: a -inf logit's terms must be exp(d) = 0 and d * exp(d) = 0, not nan)."""
    pos = 0
    for p in range(rows.shape[0]):
        r = rows[p]
        k = ks[p]
        m = amax[r, k]
        for j in range(lo[k], hi[k]):
            d[pos] = max(x[r, perm[j]] - m, -1e30)
            pos += 1


@nb.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _pair_sums(e, d, lens, rel, relx, want_x):  # pragma: no cover - compiled
    """Per pair (consecutive runs of ``lens``): sum of e, and of e * d (float64)."""
    pos = 0
    for p in range(lens.shape[0]):
        acc = 0.0
        accx = 0.0
        for j in range(pos, pos + lens[p]):
            acc += e[j]
            if want_x:
                accx += e[j] * d[j]
        rel[p] = acc
        relx[p] = accx
        pos += lens[p]


# Rows per chunk: ~256 KB of float32 per buffer, which stays in L2 between the gather, the
# exp and the reduction. The buffers are reused across chunks: a fresh 4 MB array per call
# comes from mmap, and its page faults alone cost more than the exp (~3 ms of a 7 ms pass
# at L=256, V=4096).
_CHUNK_ELEMENTS = 1 << 16

# An atom whose best logit lies more than this many nats below the row's reference is
# summed again around its own best: below ~-87 float32's exp loses precision and below
# ~-104 it is 0, and at 50 the terms float32 coarsens weigh < 262k * e^-37 (~1e-11) of
# their atom.
_WEAK_NATS = 50.0


def reduce_atoms(logits, atoms, want_sum, want_x):  # type: ignore[no-untyped-def]
    """logits (N, V), ``atoms`` from :func:`sorted_atoms` -> rowmax (N,) f64, asum/asumx
    (N, K) f64, amax (N, K) f32, aarg (N, K) i32.

    rowmax[n] is the best allowed logit of row n (0 if there is none), and
    asum[n, k] = sum over tokens t of atom k of exp(logits[n, t] - rowmax[n]); asumx weighs
    the same terms by (logits[n, t] - rowmax[n]). One scan gathers each row's allowed
    tokens into atom order, takes exp(x - the row's max) in numpy's float32 SIMD loops and
    reduces each atom's run (a scalar exp per token would cost more than the whole DP).
    An atom far below that max, as low temperatures make them (the demo model's logits
    span ~360 nats at 0.1), would come out 0 or coarse, and the canvas may need exactly
    that atom: those atoms are summed again around their own best logit and scaled in
    float64, which keeps them down to ~1e-308. (float32's exp of x - ref is good to
    ~|x - ref| * 6e-8 relative, so an atom kept from the scan is known to a few 1e-6 at
    worst.) aarg is the lowest token reaching amax.
    """
    N, V = logits.shape
    atom_of, perm, lo, hi = atoms
    K = lo.shape[0]
    n = perm.shape[0]
    best_key = np.empty((N, K), np.int64)
    rows = min(N, max(1, _CHUNK_ELEMENTS // max(n, 1)))
    xg = np.empty((rows, n), np.float32)  # one chunk's allowed logits, atom after atom
    if not want_sum:
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            x = xg[: r1 - r0]
            _gather_rows(logits[r0:r1], perm, x)
            _atom_max(x, x.view(np.int32), x, lo, hi, _NO_REF, _NO_SUMS, _NO_SUMS, best_key[r0:r1])
        amax, aarg = _best_of_atoms(best_key, perm, lo)
        return np.zeros(N), np.zeros((N, 1)), np.zeros((N, 1)), amax, aarg
    ref = np.fmax.reduce(logits, axis=1).astype(np.float64)  # the scan's reference: any token's best, nan aside
    ref[~np.isfinite(ref)] = 0.0  # a row of -inf: zero mass below (and no nan from -inf - -inf)
    asum = np.zeros((N, K), np.float64)
    asumx = np.zeros((N, K if want_x else 1), np.float64)
    shift = ref.astype(np.float32)[:, None]  # (N, 1)
    eg = np.empty((rows, n), np.float32)  # exp(xg - ref)
    stats = _atom_sums_x if want_x else _atom_sums
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        x, e = xg[: r1 - r0], eg[: r1 - r0]
        _gather_rows(logits[r0:r1], perm, x)
        np.subtract(x, shift[r0:r1], out=e)
        np.exp(e, out=e)
        stats(x, x.view(np.int32), e, lo, hi, ref[r0:r1], asum[r0:r1], asumx[r0:r1] if want_x else asumx,
              best_key[r0:r1])
    amax, aarg = _best_of_atoms(best_key, perm, lo)
    finite = np.isfinite(amax)
    best = np.where(finite, amax, -np.inf).max(axis=1, initial=-np.inf).astype(np.float64)  # (N,)
    rowmax = np.where(np.isfinite(best), best, 0.0)
    # Move the scan's sums from ref to rowmax (<= ref). A row with an atom the scan kept
    # has rowmax >= ref - _WEAK_NATS; in other rows nothing is kept, and the cap only
    # stops exp from overflowing.
    gap = np.minimum(ref - rowmax, _WEAK_NATS)  # (N,)
    if want_x:
        asumx += gap[:, None] * asum
        asumx *= np.exp(gap)[:, None]
    asum *= np.exp(gap)[:, None]
    redo_r, redo_k = np.nonzero(finite & (amax < (ref - _WEAK_NATS)[:, None].astype(np.float32)))
    if redo_r.size:
        rel, relx = _resum_atoms(logits, perm, lo, hi, redo_r, redo_k, amax, want_x)
        g = amax[redo_r, redo_k].astype(np.float64) - rowmax[redo_r]  # (P,) <= 0
        scale = np.exp(g)
        asum[redo_r, redo_k] = scale * rel
        if want_x:
            asumx[redo_r, redo_k] = scale * (relx + g * rel)
    return rowmax, asum, asumx, amax, aarg


def _resum_atoms(logits, perm, lo, hi, rows, ks, amax, want_x):  # type: ignore[no-untyped-def]
    """(rel, relx) per (row, atom) pair: the sum of exp(x - atom's best) over the atom's
    tokens, and of its terms weighted by (x - atom's best). The gathers and sums are
    compiled, the exp is numpy's (float32; the largest term is exactly 1)."""
    lens = hi[ks] - lo[ks]  # (P,)
    rel = np.zeros(rows.shape[0], np.float64)
    relx = np.zeros(rows.shape[0], np.float64)
    ends = np.cumsum(lens)
    cap = max(_CHUNK_ELEMENTS, int(lens.max()))
    d = np.empty(cap, np.float32)
    e = np.empty(cap, np.float32)
    p0 = 0
    while p0 < rows.shape[0]:
        base = ends[p0] - lens[p0]
        p1 = max(p0 + 1, int(np.searchsorted(ends, base + cap, side="right")))  # pairs that fit the buffer
        n = int(ends[p1 - 1] - base)
        _gather_pairs(logits, perm, lo, hi, rows[p0:p1], ks[p0:p1], amax, d[:n])
        np.exp(d[:n], out=e[:n])
        _pair_sums(e[:n], d[:n], lens[p0:p1], rel[p0:p1], relx[p0:p1], want_x)
        p0 = p1
    return rel, relx


@nb.njit(cache=True, nogil=True)
def _group_sums(asum, group_atoms, group_offsets):  # pragma: no cover - compiled
    L = asum.shape[0]
    G = group_offsets.shape[0] - 1
    gsum = np.zeros((L, G), np.float64)
    for l in range(L):
        for g in range(G):
            acc = 0.0
            for i in range(group_offsets[g], group_offsets[g + 1]):
                acc += asum[l, group_atoms[i]]
            gsum[l, g] = acc
    return gsum


# ---- 2. the support: states that lie on some valid canvas, per position ------------------
# Computed once per (canvas length, start state, ending rule) and reused by every
# denoising step. The passes below visit only these live states, and reach their edges
# through the automaton's static adjacency (in CSR, a few hundred KB that stay in cache),
# so a step streams O(L x live states) words of memory, not O(L x live edges).


@nb.njit(cache=True, nogil=True)
def live_states(edge_src, edge_dst, S, start, final, L):  # pragma: no cover - compiled
    """(offsets (L + 2,), states): the states at position l (0..L) on a valid canvas, sorted.

    A state is live at l when the start reaches it in exactly l tokens and it reaches an
    accepting state in exactly L - l more; states[offsets[l]:offsets[l + 1]] lists them.
    """
    E = edge_src.shape[0]
    fwd = np.zeros((L + 1, S), np.bool_)
    live = np.zeros((L + 1, S), np.bool_)
    fwd[0, start] = True
    for l in range(L):
        for e in range(E):
            if fwd[l, edge_src[e]]:
                fwd[l + 1, edge_dst[e]] = True
    for s in range(S):
        live[L, s] = final[s] and fwd[L, s]
    for l in range(L - 1, -1, -1):
        for e in range(E):
            if live[l + 1, edge_dst[e]] and fwd[l, edge_src[e]]:
                live[l, edge_src[e]] = True
    offsets = np.zeros(L + 2, np.int64)
    count = 0
    for l in range(L + 1):
        for s in range(S):
            if live[l, s]:
                count += 1
        offsets[l + 1] = count
    states = np.empty(count, np.int32)
    i = 0
    for l in range(L + 1):
        for s in range(S):
            if live[l, s]:
                states[i] = s
                i += 1
    return offsets, states


@nb.njit(cache=True, nogil=True, inline="always")
def _slot(states, lo, hi, s):  # pragma: no cover - compiled
    """Index of state s in the sorted states[lo:hi], or -1."""
    while lo < hi:
        mid = (lo + hi) >> 1
        v = states[mid]
        if v < s:
            lo = mid + 1
        elif v > s:
            hi = mid
        else:
            return mid
    return -1


# ---- 3. forward / backward over live states ----------------------------------------------
# Messages are kept per (position, live state), aligned with ``states``; each position is
# rescaled by its total so float64 never under- or overflows (the posteriors below are
# ratios within one position).


@nb.njit(cache=True, nogil=True)
def _backward(gsum, offsets, states, out_offsets, out_dst, out_group, S):  # pragma: no cover
    """beta[i] ∝ weight of the valid completions from live state i (its position's suffix)."""
    L = gsum.shape[0]
    beta = np.zeros(states.shape[0], np.float64)
    nxt = np.zeros(S, np.float64)  # beta at l + 1, dense over states
    for i in range(offsets[L], offsets[L + 1]):
        beta[i] = 1.0
        nxt[states[i]] = 1.0
    for l in range(L - 1, -1, -1):
        tot = 0.0
        for i in range(offsets[l], offsets[l + 1]):
            s = states[i]
            acc = 0.0
            for j in range(out_offsets[s], out_offsets[s + 1]):
                acc += gsum[l, out_group[j]] * nxt[out_dst[j]]
            beta[i] = acc
            tot += acc
        if tot <= 0.0:
            return beta, False
        for i in range(offsets[l + 1], offsets[l + 2]):
            nxt[states[i]] = 0.0
        for i in range(offsets[l], offsets[l + 1]):
            beta[i] /= tot
            nxt[states[i]] = beta[i]
    return beta, True


def _forward_kernel(want_sum: bool, want_max: bool):  # type: ignore[no-untyped-def]
    """The forward kernel compiled for one choice of passes (the flags are compile-time
    constants: a runtime flag in the inner loop costs the single passes ~20%)."""

    @nb.njit(cache=True, nogil=True)
    def forward(gsum, gmax, offsets, states, beta, in_offsets, in_src, in_group, atom_groups, atom_group_offsets,
                S):  # pragma: no cover - compiled
        return _forward_body(gsum, gmax, offsets, states, beta, in_offsets, in_src, in_group, atom_groups,
                             atom_group_offsets, S, want_sum, want_max)

    return forward


@nb.njit(cache=True, nogil=True, inline="always")
def _forward_body(gsum, gmax, offsets, states, beta, in_offsets, in_src, in_group, atom_groups, atom_group_offsets,
                  S, want_sum, want_max):  # pragma: no cover
    """The forward passes, pulling over each live state's incoming edges: with
    ``want_sum`` the sum-product pass and from it and ``beta`` the atom factors F (L, K);
    with ``want_max`` the max-product (Viterbi) pass and a backpointer per live state.
    Asked together they share one sweep over the edges (the denoiser wants both every
    step), which saves a third of the time of running them apart.

    Atom factors: P(token t at l) = exp(x_t - rowmax_l) * F[l, atom(t)]. The posterior of
    an edge s -> d at l is alpha_l(s) * gsum[l, g] * beta_{l+1}(d), normalised per
    position (exactly one edge is taken at each position). The forward pass pulls
    alpha_{l+1}(d) over exactly these products (bar beta), so the group posteriors come
    out of it for one more multiply-add per edge; inside a group, tokens follow
    exp(x_t) / gsum.

    Returns (F, back, best_end, ok): best_end is the live index of the best accepting
    state at L (Viterbi), ok is False when no valid canvas exists.
    """
    L = gsum.shape[0] if want_sum else gmax.shape[0]
    G = gsum.shape[1] if want_sum else gmax.shape[1]
    K = atom_group_offsets.shape[0] - 1
    F = np.zeros((L, K if want_sum else 0), np.float64)
    W = np.zeros(G, np.float64)
    cur = np.zeros(S, np.float64)  # alpha at l (scaled), dense over states
    nxt = np.zeros(S, np.float64)
    back = np.full(states.shape[0] if want_max else 0, -1, np.int32)  # incoming edge of the best prefix
    vcur = np.full(S, -np.inf)  # best prefix log-score at l, dense over states
    vnxt = np.full(S, -np.inf)
    for i in range(offsets[0], offsets[1]):  # the start state alone
        cur[states[i]] = 1.0
        vcur[states[i]] = 0.0
    for l in range(L):
        tot = 0.0  # forward mass at l + 1 (for scaling)
        post = 0.0  # posterior mass of position l (for normalising W)
        for i in range(offsets[l + 1], offsets[l + 2]):
            d = states[i]
            b = beta[i] if want_sum else 0.0
            acc = 0.0
            best = -np.inf
            be = -1
            for j in range(in_offsets[d], in_offsets[d + 1]):
                s = in_src[j]
                g = in_group[j]
                if want_sum:
                    w = cur[s] * gsum[l, g]
                    acc += w
                    W[g] += w * b
                if want_max:
                    v = vcur[s] + gmax[l, g]
                    if v > best:
                        best = v
                        be = j
            if want_sum:
                nxt[d] = acc
                tot += acc
                post += acc * b
            if want_max:
                vnxt[d] = best
                back[i] = be
        if want_sum:
            if tot <= 0.0 or post <= 0.0:
                return F, back, -1, False
            for g in range(G):
                if W[g] > 0.0:
                    # not W / (post * gsum): at low temperatures both factors can be ~1e-170
                    # (a group the canvas needs, far below the row's best token) and their
                    # product underflows to 0
                    W[g] = W[g] / post / gsum[l, g]
            for k in range(K):
                acc = 0.0
                for j in range(atom_group_offsets[k], atom_group_offsets[k + 1]):
                    acc += W[atom_groups[j]]
                F[l, k] = acc
            W[:] = 0.0
        for i in range(offsets[l], offsets[l + 1]):
            if want_sum:
                cur[states[i]] = 0.0
            if want_max:
                vcur[states[i]] = -np.inf
        for i in range(offsets[l + 1], offsets[l + 2]):
            if want_sum:
                cur[states[i]] = nxt[states[i]] / tot
            if want_max:
                vcur[states[i]] = vnxt[states[i]]
    best_end = -1
    if want_max:
        bv = -np.inf
        for i in range(offsets[L], offsets[L + 1]):  # live at L: accepting by construction
            if vcur[states[i]] > bv:
                bv = vcur[states[i]]
                best_end = i
        if best_end < 0:
            return F, back, -1, False
    return F, back, best_end, True


_forward_sum = _forward_kernel(True, False)  # marginals, sample: atom factors
_forward_max = _forward_kernel(False, True)  # viterbi
_forward_both = _forward_kernel(True, True)  # denoise_step


@nb.njit(cache=True, nogil=True)
def _write_marginals(logits, rowmax, atom_of, F, out):  # pragma: no cover
    N, V = logits.shape
    K = F.shape[1]
    shift = np.empty(K + 1, np.float64)  # log F - rowmax per atom; index K: never allowed (f64: logits may be far from 0)
    for n in range(N):
        for k in range(K):
            f = F[n, k]
            shift[k] = math.log(f) - rowmax[n] if f > 0.0 else -np.inf
        shift[K] = -np.inf
        row = logits[n]
        o = out[n]
        for t in range(V):
            k = atom_of[t]
            # a token never allowed is -inf even where its logit is nan (or +inf)
            o[t] = row[t] + shift[k] if k >= 0 else -np.inf


@nb.njit(cache=True, nogil=True)
def _entropy(asum, asumx, F):  # pragma: no cover
    """Entropy (nats) of each position's constrained marginal, from atom statistics."""
    L, K = F.shape
    H = np.zeros(L, np.float64)
    for l in range(L):
        h = 0.0
        for k in range(K):
            f = F[l, k]
            if f > 0.0 and asum[l, k] > 0.0:
                # sum_t P log P over atom k, P = e_t f, log P = (x_t - m) + log f
                h -= f * (asumx[l, k] + asum[l, k] * math.log(f))
        H[l] = max(h, 0.0)
    return H


# ---- 4. sampling and Viterbi --------------------------------------------------------------


@nb.njit(cache=True, nogil=True)
def _sample_atoms(asum, gsum, offsets, states, beta, start, out_offsets, out_dst, out_group, group_atoms,
                  group_offsets, uniforms):  # pragma: no cover
    """Backward filtering, forward sampling: an edge per position (weight gsum * beta of
    its end), then an atom inside the edge's group (weight asum). -> atoms (L,) int32."""
    L = gsum.shape[0]
    out = np.empty(L, np.int32)
    degree = out_offsets[1:] - out_offsets[:-1]
    w_edge = np.empty(degree.max() if degree.shape[0] else 0, np.float64)  # weights of the current state's edges
    s = start
    for l in range(L):
        # an edge out of s, weight gsum * beta(next); beta of a state not live at l + 1 is 0
        lo, hi = offsets[l + 1], offsets[l + 2]
        e0, e1 = out_offsets[s], out_offsets[s + 1]
        tot = 0.0
        for j in range(e0, e1):
            i = _slot(states, lo, hi, out_dst[j])
            w = gsum[l, out_group[j]] * beta[i] if i >= 0 else 0.0
            w_edge[j - e0] = w
            tot += w
        u = uniforms[l, 0] * tot
        chosen = -1
        acc = 0.0
        for j in range(e0, e1):
            w = w_edge[j - e0]
            if w > 0.0:
                chosen = j
                acc += w
                if acc >= u:
                    break
        g = out_group[chosen]
        # an atom inside the group, weight asum
        u = uniforms[l, 1] * gsum[l, g]
        k = -1
        acc = 0.0
        for i in range(group_offsets[g], group_offsets[g + 1]):
            w = asum[l, group_atoms[i]]
            if w > 0.0:
                k = group_atoms[i]
                acc += w
                if acc >= u:
                    break
        out[l] = k
        s = out_dst[chosen]
    return out


@nb.njit(cache=True, nogil=True)
def _sample_tokens(logits, rowmax, asum, amax, aarg, atoms, atom_tokens, atom_offsets, uniforms):  # pragma: no cover
    """A token inside each position's sampled atom, weight exp(x - rowmax). The atom's
    argmax token alone carries e_max / asum of the mass: try it first (a peaked model ends
    here in O(1)), else scan the other tokens with the remaining mass."""
    L = atoms.shape[0]
    out = np.empty(L, np.int32)
    for l in range(L):
        k = atoms[l]
        m = rowmax[l]
        best = aarg[l, k]
        e_best = math.exp(amax[l, k] - m)
        u = uniforms[l, 2] * asum[l, k]
        tok = best
        if not (u < e_best or atom_offsets[k + 1] - atom_offsets[k] == 1):
            u -= e_best
            acc = 0.0
            for i in range(atom_offsets[k], atom_offsets[k + 1]):
                t = atom_tokens[i]
                if t == best:
                    continue
                w = math.exp(logits[l, t] - m)
                if w > 0.0:
                    tok = t
                    acc += w
                    if acc >= u:
                        break
        out[l] = tok
    return out


@nb.njit(cache=True, nogil=True)
def _group_max(amax, aarg, group_atoms, group_offsets):  # pragma: no cover
    L = amax.shape[0]
    G = group_offsets.shape[0] - 1
    gmax = np.full((L, G), -np.inf, np.float64)
    garg = np.full((L, G), -1, np.int32)
    for l in range(L):
        for g in range(G):
            for i in range(group_offsets[g], group_offsets[g + 1]):
                k = group_atoms[i]
                if amax[l, k] > gmax[l, g]:
                    gmax[l, g] = amax[l, k]
                    garg[l, g] = aarg[l, k]
    return gmax, garg


@nb.njit(cache=True, nogil=True)
def _trace_back(back, best_end, garg, offsets, states, in_src, in_group):  # pragma: no cover
    """The Viterbi canvas: follow the backpointers of ``_forward(want_max=True)`` from the
    best accepting state, taking each edge's best token."""
    L = garg.shape[0]
    out = np.full(L, -1, np.int32)
    i = best_end
    for l in range(L - 1, -1, -1):
        j = back[i]
        out[l] = garg[l, in_group[j]]
        if l > 0:
            i = _slot(states, offsets[l], offsets[l + 1], in_src[j])
    return out


@nb.njit(cache=True, nogil=True)
def _forced(offsets, states, out_offsets, out_dst, out_group, group_atoms, group_offsets, atom_offsets, atom_tokens,
            L):  # pragma: no cover
    """Token forced at each position whatever the logits (-1 where there is a choice)."""
    out = np.full(L, -1, np.int32)
    for l in range(L):
        tok = -1
        ok = offsets[l + 1] > offsets[l]
        for i in range(offsets[l], offsets[l + 1]):
            s = states[i]
            for e in range(out_offsets[s], out_offsets[s + 1]):
                if _slot(states, offsets[l + 1], offsets[l + 2], out_dst[e]) < 0:
                    continue  # an edge off every valid canvas
                g = out_group[e]
                for j in range(group_offsets[g], group_offsets[g + 1]):
                    k = group_atoms[j]
                    if atom_offsets[k + 1] - atom_offsets[k] != 1:
                        ok = False
                        break
                    t = atom_tokens[atom_offsets[k]]
                    if tok == -1:
                        tok = t
                    elif tok != t:
                        ok = False
                        break
                if not ok:
                    break
            if not ok:
                break
        if ok:
            out[l] = tok
    return out
