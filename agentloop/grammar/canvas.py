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
choice of a token inside the sampled atom. Forward/backward run in probability space with
per-position scaling (float64), which is exact up to rounding for logits within ~700 of
the row maximum; Viterbi runs in log space.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

NEG_INF = -np.inf


# ---- 1. score atoms: one pass over the logits per position --------------------------------


@nb.njit(cache=True, nogil=True)
def _reduce_row(row, atom_of, K, asum, asumx, amax, aarg, want_sum, want_x):  # pragma: no cover
    m = -np.inf
    for t in range(row.shape[0]):
        if atom_of[t] >= 0 and row[t] > m:
            m = row[t]
    for t in range(row.shape[0]):
        k = atom_of[t]
        if k < 0:
            continue
        x = row[t]
        if x > amax[k]:
            amax[k] = x
            aarg[k] = t
        if want_sum:
            e = math.exp(x - m)
            asum[k] += e
            if want_x:
                asumx[k] += e * (x - m)
    return m


@nb.njit(cache=True, nogil=True)
def _scatter_atoms(x, e, atom_of, asum, asumx, amax, aarg, rowmax, want_x):  # pragma: no cover - compiled
    """Accumulate per-atom sums of e = exp(x - rowmax) (and e * (x - rowmax)), max, argmax."""
    N, V = x.shape
    for n in range(N):
        row = x[n]
        er = e[n]
        s = asum[n]
        mx = amax[n]
        am = aarg[n]
        m = rowmax[n]
        for t in range(V):
            k = atom_of[t]
            if k < 0:
                continue
            v = row[t]
            w = er[t]
            s[k] += w
            if want_x:
                asumx[n, k] += w * (v - m)
            if v > mx[k]:
                mx[k] = v
                am[k] = t


@nb.njit(cache=True, nogil=True)
def _max_atoms(x, atom_of, amax, aarg):  # pragma: no cover - compiled
    N, V = x.shape
    for n in range(N):
        row = x[n]
        mx = amax[n]
        am = aarg[n]
        for t in range(V):
            k = atom_of[t]
            if k >= 0 and row[t] > mx[k]:
                mx[k] = row[t]
                am[k] = t


_CHUNK_ELEMENTS = 1 << 20  # rows per exp() call: ~4 MB of float32, stays in cache


def reduce_atoms(logits, atom_of, K, want_sum, want_x):  # type: ignore[no-untyped-def]
    """logits (N, V) -> rowmax (N,), asum/asumx (N, K) f64, amax (N, K) f32, aarg (N, K) i32.

    asum[n, k] = sum over tokens t of atom k of exp(logits[n, t] - rowmax[n]). The exp runs
    in numpy's SIMD loops (float32) and only the scatter into atoms in compiled code: a
    scalar exp per token would cost more than the whole DP.
    """
    N, V = logits.shape
    amax = np.full((N, K), -np.inf, np.float32)
    aarg = np.full((N, K), -1, np.int32)
    if not want_sum:
        _max_atoms(logits, atom_of, amax, aarg)
        return np.zeros(N), np.zeros((N, 1)), np.zeros((N, 1)), amax, aarg
    rowmax = logits.max(axis=1).astype(np.float64)
    asum = np.zeros((N, K), np.float64)
    asumx = np.zeros((N, K if want_x else 1), np.float64)
    rows = max(1, _CHUNK_ELEMENTS // max(V, 1))
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        e = np.exp(logits[r0:r1] - rowmax[r0:r1, None].astype(np.float32))
        _scatter_atoms(logits[r0:r1], e, atom_of, asum[r0:r1], asumx[r0:r1] if want_x else asumx, amax[r0:r1],
                       aarg[r0:r1], rowmax[r0:r1], want_x)
    # Where every allowed token sits ~100 nats below a forbidden one, float32 underflows:
    # redo those rows in float64 around the best allowed logit.
    weak = np.nonzero(asum.max(axis=1) < 1e-30)[0] if K else np.zeros(0, np.int64)
    for n in weak.tolist():
        asum[n] = 0.0
        if want_x:
            asumx[n] = 0.0
        rowmax[n] = _reduce_row(logits[n], atom_of, K, asum[n], asumx[n] if want_x else np.zeros(K), amax[n],
                                aarg[n], True, want_x)
    return rowmax, asum, asumx, amax, aarg


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


# ---- 2. the support: edges that lie on some valid canvas, per position -------------------
# Computed once per (canvas length, start state, ending rule) and reused by every
# denoising step. All passes below run over these alive edges only, and keep per-edge
# messages (alpha at the source, beta at the destination) instead of (L, S) tables.


@nb.njit(cache=True, nogil=True)
def alive_edges(edge_src, edge_dst, edge_group, S, start, final, L):  # pragma: no cover - compiled
    fwd = np.zeros((L + 1, S), np.bool_)
    bwd = np.zeros((L + 1, S), np.bool_)
    fwd[0, start] = True
    E = edge_src.shape[0]
    for l in range(L):
        for e in range(E):
            if fwd[l, edge_src[e]]:
                fwd[l + 1, edge_dst[e]] = True
    for s in range(S):
        bwd[L, s] = final[s] and fwd[L, s]
    for l in range(L - 1, -1, -1):
        for e in range(E):
            if bwd[l + 1, edge_dst[e]] and fwd[l, edge_src[e]]:
                bwd[l, edge_src[e]] = True
    offsets = np.zeros(L + 1, np.int64)
    count = 0
    for l in range(L):
        for e in range(E):
            if bwd[l, edge_src[e]] and bwd[l + 1, edge_dst[e]]:
                count += 1
        offsets[l + 1] = count
    # structure of arrays: (source, destination, group) of each alive edge, by position
    a_src = np.empty(count, np.int32)
    a_dst = np.empty(count, np.int32)
    a_grp = np.empty(count, np.int32)
    i = 0
    for l in range(L):
        for e in range(E):
            if bwd[l, edge_src[e]] and bwd[l + 1, edge_dst[e]]:
                a_src[i] = edge_src[e]
                a_dst[i] = edge_dst[e]
                a_grp[i] = edge_group[e]
                i += 1
    return offsets, a_src, a_dst, a_grp


# ---- 3. forward / backward over alive edges ------------------------------------------------


@nb.njit(cache=True, nogil=True)
def _backward(gsum, offsets, edge_src, edge_dst, edge_group, final, S):  # pragma: no cover
    """b_dst[i] ∝ weight of valid completions after alive edge i (beta at its destination)."""
    L = gsum.shape[0]
    b_dst = np.empty(edge_src.shape[0], np.float64)
    nxt = np.zeros(S, np.float64)  # beta at l + 1
    cur = np.zeros(S, np.float64)  # beta at l (being built)
    for s in range(S):
        nxt[s] = 1.0 if final[s] else 0.0
    for l in range(L - 1, -1, -1):
        tot = 0.0
        for i in range(offsets[l], offsets[l + 1]):
            e = i
            v = nxt[edge_dst[e]]
            b_dst[i] = v
            w = gsum[l, edge_group[e]] * v
            cur[edge_src[e]] += w
            tot += w
        if tot <= 0.0:
            return b_dst, False
        for i in range(offsets[l], offsets[l + 1]):
            nxt[edge_dst[i]] = 0.0
        for i in range(offsets[l], offsets[l + 1]):
            s = edge_src[i]
            if cur[s] != 0.0:
                nxt[s] = cur[s] / tot
                cur[s] = 0.0
    return b_dst, True


@nb.njit(cache=True, nogil=True)
def _forward(gsum, offsets, edge_src, edge_dst, edge_group, start, S):  # pragma: no cover
    """a_src[i] ∝ weight of valid prefixes before alive edge i (alpha at its source)."""
    L = gsum.shape[0]
    a_src = np.empty(edge_src.shape[0], np.float64)
    cur = np.zeros(S, np.float64)
    nxt = np.zeros(S, np.float64)
    cur[start] = 1.0
    for l in range(L):
        tot = 0.0
        for i in range(offsets[l], offsets[l + 1]):
            e = i
            v = cur[edge_src[e]]
            a_src[i] = v
            w = v * gsum[l, edge_group[e]]
            nxt[edge_dst[e]] += w
            tot += w
        if tot <= 0.0:
            return a_src, False
        for i in range(offsets[l], offsets[l + 1]):
            cur[edge_src[i]] = 0.0
        for i in range(offsets[l], offsets[l + 1]):
            d = edge_dst[i]
            if nxt[d] != 0.0:
                cur[d] = nxt[d] / tot
                nxt[d] = 0.0
    return a_src, True


@nb.njit(cache=True, nogil=True)
def _atom_factors(gsum, offsets, a_src, b_dst, edge_group, atom_groups, atom_group_offsets):  # pragma: no cover
    """F[l, k]: P(token t at l) = exp(x_t - rowmax_l) * F[l, atom(t)].

    The posterior of an edge is a_src * gsum * b_dst, normalised per position (exactly
    one edge is taken at each position); inside a group, tokens follow exp(x_t)/gsum.
    """
    L, G = gsum.shape
    K = atom_group_offsets.shape[0] - 1
    F = np.zeros((L, K), np.float64)
    W = np.zeros(G, np.float64)
    for l in range(L):
        tot = 0.0
        for i in range(offsets[l], offsets[l + 1]):
            g = edge_group[i]
            w = a_src[i] * gsum[l, g] * b_dst[i]
            W[g] += w
            tot += w
        for g in range(G):
            if W[g] > 0.0:
                W[g] /= tot * gsum[l, g]
        for k in range(K):
            acc = 0.0
            for j in range(atom_group_offsets[k], atom_group_offsets[k + 1]):
                acc += W[atom_groups[j]]
            F[l, k] = acc
        W[:] = 0.0
    return F


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
            o[t] = row[t] + shift[k if k >= 0 else K]


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
def _sample_path(logits, rowmax, asum, amax, aarg, gsum, offsets, b_dst, start, edge_src, edge_dst, edge_group,
                 group_atoms, group_offsets, atom_tokens, atom_offsets, uniforms):  # pragma: no cover
    L = gsum.shape[0]
    out = np.empty(L, np.int32)
    s = start
    for l in range(L):
        # an alive edge out of s, weight gsum * beta(next)
        tot = 0.0
        for i in range(offsets[l], offsets[l + 1]):
            e = i
            if edge_src[e] == s:
                tot += gsum[l, edge_group[e]] * b_dst[i]
        u = uniforms[l, 0] * tot
        chosen = -1
        acc = 0.0
        for i in range(offsets[l], offsets[l + 1]):
            e = i
            if edge_src[e] == s:
                w = gsum[l, edge_group[e]] * b_dst[i]
                if w > 0.0:
                    chosen = e
                    acc += w
                    if acc >= u:
                        break
        g = edge_group[chosen]
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
        # a token inside the atom, weight exp(x - rowmax). The atom's argmax token alone
        # carries e_max / asum of the mass: try it first (a peaked model ends here in O(1)),
        # else scan the other tokens with the remaining mass.
        m = rowmax[l]
        best = aarg[l, k]
        e_best = math.exp(amax[l, k] - m)
        u = uniforms[l, 2] * asum[l, k]
        if u < e_best or atom_offsets[k + 1] - atom_offsets[k] == 1:
            tok = best
        else:
            u -= e_best
            tok = best
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
        s = edge_dst[chosen]
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
def _viterbi(gmax, garg, offsets, edge_src, edge_dst, edge_group, start, final, S):  # pragma: no cover
    L = gmax.shape[0]
    d_src = np.empty(edge_src.shape[0], np.float64)  # best prefix score at each alive edge's source
    cur = np.full(S, -np.inf)
    nxt = np.full(S, -np.inf)
    cur[start] = 0.0
    for l in range(L):
        for i in range(offsets[l], offsets[l + 1]):
            e = i
            d = cur[edge_src[e]]
            d_src[i] = d
            v = d + gmax[l, edge_group[e]]
            if v > nxt[edge_dst[e]]:
                nxt[edge_dst[e]] = v
        for i in range(offsets[l], offsets[l + 1]):
            cur[edge_src[i]] = -np.inf
        for i in range(offsets[l], offsets[l + 1]):
            dd = edge_dst[i]
            if nxt[dd] > -np.inf:
                cur[dd] = nxt[dd]
                nxt[dd] = -np.inf
    best = -1
    bv = -np.inf
    for s in range(S):
        if final[s] and cur[s] > bv:
            bv = cur[s]
            best = s
    out = np.full(L, -1, np.int32)
    if best < 0:
        return out, -np.inf, False
    s = best
    for l in range(L - 1, -1, -1):
        be = -1
        bs = -np.inf
        for i in range(offsets[l], offsets[l + 1]):
            e = i
            if edge_dst[e] == s:
                v = d_src[i] + gmax[l, edge_group[e]]
                if v > bs:
                    bs = v
                    be = e
        out[l] = garg[l, edge_group[be]]
        s = edge_src[be]
    return out, bv, True


@nb.njit(cache=True, nogil=True)
def _forced(offsets, edge_group, group_atoms, group_offsets, atom_offsets, atom_tokens, L):  # pragma: no cover
    """Token forced at each position whatever the logits (-1 where there is a choice)."""
    out = np.full(L, -1, np.int32)
    for l in range(L):
        tok = -1
        ok = offsets[l + 1] > offsets[l]
        for i in range(offsets[l], offsets[l + 1]):
            g = edge_group[i]
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
        if ok:
            out[l] = tok
    return out
