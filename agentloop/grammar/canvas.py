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


@nb.njit(cache=True, nogil=True, parallel=True)
def reduce_atoms(logits, atom_of, K, want_sum, want_x):  # pragma: no cover - compiled
    """logits (N, V) -> rowmax (N,), asum/asumx (N, K) f64, amax (N, K) f32, aarg (N, K) i32.

    asum[n, k] = sum over tokens t of atom k of exp(logits[n, t] - rowmax[n]).
    """
    N = logits.shape[0]
    rowmax = np.empty(N, np.float64)
    asum = np.zeros((N, K if want_sum else 1), np.float64)
    asumx = np.zeros((N, K if want_x else 1), np.float64)
    amax = np.full((N, K), -np.inf, np.float32)
    aarg = np.full((N, K), -1, np.int32)
    for n in nb.prange(N):
        rowmax[n] = _reduce_row(logits[n], atom_of, K, asum[n], asumx[n], amax[n], aarg[n], want_sum, want_x)
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


# ---- 2. forward / backward --------------------------------------------------------------


@nb.njit(cache=True, nogil=True)
def _backward(gsum, edge_src, edge_dst, edge_group, final, S):  # pragma: no cover
    """beta[l, s] ∝ total weight of valid completions from state s at position l."""
    L = gsum.shape[0]
    beta = np.zeros((L + 1, S), np.float64)
    for s in range(S):
        beta[L, s] = 1.0 if final[s] else 0.0
    for l in range(L - 1, -1, -1):
        b = beta[l]
        nxt = beta[l + 1]
        for e in range(edge_src.shape[0]):
            w = nxt[edge_dst[e]]
            if w > 0.0:
                b[edge_src[e]] += gsum[l, edge_group[e]] * w
        tot = 0.0
        for s in range(S):
            tot += b[s]
        if tot <= 0.0:
            return beta, False
        for s in range(S):
            b[s] /= tot
    return beta, True


@nb.njit(cache=True, nogil=True)
def _forward(gsum, edge_src, edge_dst, edge_group, start, S):  # pragma: no cover
    L = gsum.shape[0]
    alpha = np.zeros((L + 1, S), np.float64)
    alpha[0, start] = 1.0
    for l in range(L):
        a = alpha[l + 1]
        cur = alpha[l]
        for e in range(edge_src.shape[0]):
            w = cur[edge_src[e]]
            if w > 0.0:
                a[edge_dst[e]] += w * gsum[l, edge_group[e]]
        tot = 0.0
        for s in range(S):
            tot += a[s]
        if tot <= 0.0:
            return alpha, False
        for s in range(S):
            a[s] /= tot
    return alpha, True


@nb.njit(cache=True, nogil=True)
def _atom_factors(gsum, alpha, beta, edge_src, edge_dst, edge_group, atom_groups, atom_group_offsets):  # pragma: no cover
    """F[l, k]: P(token t at l) = exp(x_t - rowmax_l) * F[l, atom(t)]."""
    L, G = gsum.shape
    K = atom_group_offsets.shape[0] - 1
    F = np.zeros((L, K), np.float64)
    W = np.zeros(G, np.float64)
    for l in range(L):
        W[:] = 0.0
        tot = 0.0
        for e in range(edge_src.shape[0]):
            a = alpha[l, edge_src[e]]
            if a > 0.0:
                b = beta[l + 1, edge_dst[e]]
                if b > 0.0:
                    w = a * gsum[l, edge_group[e]] * b
                    W[edge_group[e]] += w
                    tot += w
        for g in range(G):
            if W[g] > 0.0:
                W[g] /= tot * gsum[l, g]
        for k in range(K):
            acc = 0.0
            for i in range(atom_group_offsets[k], atom_group_offsets[k + 1]):
                acc += W[atom_groups[i]]
            F[l, k] = acc
    return F


@nb.njit(cache=True, nogil=True, parallel=True)
def _write_marginals(logits, rowmax, atom_of, F, out):  # pragma: no cover
    N, V = logits.shape
    for n in nb.prange(N):
        for t in range(V):
            k = atom_of[t]
            f = F[n, k] if k >= 0 else 0.0
            if f > 0.0:
                out[n, t] = logits[n, t] - rowmax[n] + math.log(f)
            else:
                out[n, t] = -np.inf


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


# ---- 3. sampling and Viterbi --------------------------------------------------------------


@nb.njit(cache=True, nogil=True)
def _sample_path(logits, rowmax, asum, gsum, beta, start, src_offsets, edge_dst, edge_group,
                 group_atoms, group_offsets, atom_tokens, atom_offsets, uniforms):  # pragma: no cover
    L = gsum.shape[0]
    out = np.empty(L, np.int32)
    s = start
    for l in range(L):
        # edge out of s, weight gsum * beta(next)
        tot = 0.0
        for e in range(src_offsets[s], src_offsets[s + 1]):
            tot += gsum[l, edge_group[e]] * beta[l + 1, edge_dst[e]]
        u = uniforms[l, 0] * tot
        chosen = -1
        acc = 0.0
        for e in range(src_offsets[s], src_offsets[s + 1]):
            w = gsum[l, edge_group[e]] * beta[l + 1, edge_dst[e]]
            if w > 0.0:
                chosen = e
                acc += w
                if acc >= u:
                    break
        g = edge_group[chosen]
        # atom inside the group, weight asum
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
        # token inside the atom, weight exp(x - rowmax)
        u = uniforms[l, 2] * asum[l, k]
        tok = -1
        acc = 0.0
        m = rowmax[l]
        for i in range(atom_offsets[k], atom_offsets[k + 1]):
            t = atom_tokens[i]
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
def _viterbi(gmax, garg, edge_src, edge_dst, edge_group, start, final, S):  # pragma: no cover
    L = gmax.shape[0]
    delta = np.full(S, -np.inf)
    delta[start] = 0.0
    back = np.full((L, S), -1, np.int32)
    nd = np.empty(S)
    for l in range(L):
        nd[:] = -np.inf
        for e in range(edge_src.shape[0]):
            d = delta[edge_src[e]]
            if d > -np.inf:
                v = d + gmax[l, edge_group[e]]
                if v > nd[edge_dst[e]]:
                    nd[edge_dst[e]] = v
                    back[l, edge_dst[e]] = e
        delta[:] = nd
    best = -1
    bv = -np.inf
    for s in range(S):
        if final[s] and delta[s] > bv:
            bv = delta[s]
            best = s
    out = np.full(L, -1, np.int32)
    if best < 0:
        return out, -np.inf, False
    s = best
    for l in range(L - 1, -1, -1):
        e = back[l, s]
        out[l] = garg[l, edge_group[e]]
        s = edge_src[e]
    return out, bv, True


@nb.njit(cache=True, nogil=True)
def _forced(edge_src, edge_dst, edge_group, group_atoms, group_offsets, atom_offsets, atom_tokens,
            start, final, S, L):  # pragma: no cover
    """Token forced at each position whatever the logits (-1 where there is a choice)."""
    fwd = np.zeros((L + 1, S), np.bool_)
    bwd = np.zeros((L + 1, S), np.bool_)
    fwd[0, start] = True
    for l in range(L):
        for e in range(edge_src.shape[0]):
            if fwd[l, edge_src[e]]:
                fwd[l + 1, edge_dst[e]] = True
    for s in range(S):
        bwd[L, s] = final[s]
    for l in range(L - 1, -1, -1):
        for e in range(edge_src.shape[0]):
            if bwd[l + 1, edge_dst[e]]:
                bwd[l, edge_src[e]] = True
    out = np.full(L, -1, np.int32)
    for l in range(L):
        tok = -1
        ok = True
        for e in range(edge_src.shape[0]):
            if fwd[l, edge_src[e]] and bwd[l + 1, edge_dst[e]]:
                g = edge_group[e]
                for i in range(group_offsets[g], group_offsets[g + 1]):
                    k = group_atoms[i]
                    n = atom_offsets[k + 1] - atom_offsets[k]
                    if n != 1:
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
