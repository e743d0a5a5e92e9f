"""The canvas passes in log space: exact at any scale of the logits.

The passes in ``canvas`` carry plain float64 weights, each position's row known up to its
own factor. That is fast, and exact while every weight that matters stays within float64's
range, ~700 nats from the row's largest. A low temperature takes logits far beyond that:
at temperature 0.01 a model whose logits span 30 has rows spanning 3,000 nats, so a
position's valid tokens can all lie more than 745 nats below its best allowed token (and
their weights flush to 0: "no valid canvas" where there are several), or a branch of the
grammar can fall out of range early in the canvas and weigh the most later on. Such steps
are recognised (``CompiledGrammar._canvas_passes``: a pass without mass, forward and
backward masses that disagree, a draw that may have lost weight, an atom whose sum fell
below float64's normal range) and redone here, where every weight is a log and every sum
a log-sum-exp, over lists of edges by state, each position's states shared by numba's
threads: 9-20x the time of the fast passes (bench/log_space.py), for the rare steps that
need it.

Quantities follow ``canvas``: atoms, groups (unions of atoms on one edge), positions
l = 0..L - 1 between rows l and l + 1 of the automaton's states. Every array here is in
state order (no layout rows), ``live`` (L + 1, S) masks the states on some valid canvas.

    >>> import numpy as np
    >>> lg = np.log(np.array([[1.0, 2.0]]))  # one position, two groups
    >>> log_sums_by_group(lg, np.array([0, 1], np.int32), np.array([0, 2], np.int64)).round(4).tolist()
    [[1.0986]]
"""

from __future__ import annotations

import math
from typing import Any

import numba as nb
import numpy as np
import torch

from ..numba_threads import parallel_kernel
from . import canvas

#: Rows of logits per chunk of ``log_atom_stats`` (its temporaries are (rows, V)).
_ROWS_PER_CHUNK = 16

#: Terms further below their atom's best than this (float32's exp reaches its subnormals
#: at 87.3) weigh less than 1e-37 of it: they count as 0.
_FLUSHED = 87.0


def log_atom_stats(logits: Any, atom_of: np.ndarray, amax: np.ndarray, rowmax: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per row n and atom k, over the atom's tokens t: (log sum of exp(x_t - rowmax[n]),
    and the mean of x_t - amax[n, k] under weights exp(x_t)), both (N, K) float64; -inf
    and 0 where the atom has no finite logit. ``logits`` (N, V) float32 (numpy, or a
    tensor on its device, where the sums are taken), ``atom_of`` (V,) (-1: never
    allowed), ``amax`` (N, K) each atom's best logit (from the scan), ``rowmax`` (N,).
    Each term is taken from its atom's best, so it is at most 1 and the terms float32
    flushes (87 nats below the best) weigh nothing beside it."""
    x = logits if isinstance(logits, torch.Tensor) else torch.from_numpy(logits)
    N, V = x.shape
    K = amax.shape[1]
    dev = x.device
    idx = torch.from_numpy(atom_of.astype(np.int64)).to(dev)  # (V,)
    allowed = idx >= 0
    idx = idx.clamp(min=0)
    best = torch.from_numpy(np.ascontiguousarray(amax, dtype=np.float32)).to(dev)  # (N, K)
    log_sum = torch.empty((N, K), dtype=torch.float64, device=dev)
    mean_gap = torch.empty((N, K), dtype=torch.float64, device=dev)
    for r0 in range(0, N, _ROWS_PER_CHUNK):
        r = slice(r0, min(N, r0 + _ROWS_PER_CHUNK))
        n = r.stop - r.start
        at = idx.expand(n, V)
        gap = x[r] - best[r].gather(1, at)  # (n, V) x - its atom's best, <= 0 (nan past an atom without one)
        use = allowed & (gap > -_FLUSHED)
        # (clamped: exp's results below float32's normal range are slow to make, and nil here)
        w = torch.where(use, gap.clamp(min=-_FLUSHED).exp(), 0.0)  # (n, V) float32
        gap = torch.where(use, gap, 0.0)
        s = torch.zeros((n, K), dtype=torch.float64, device=dev).scatter_add_(1, at, w.double())
        sx = torch.zeros((n, K), dtype=torch.float64, device=dev).scatter_add_(1, at, (w * gap).double())
        has = best[r] > -math.inf
        log_sum[r] = torch.where(has, best[r].double() + s.log(), -math.inf)
        mean_gap[r] = torch.where(has, sx / s, 0.0)
    log_sum -= torch.from_numpy(np.asarray(rowmax, np.float64)).to(dev)[:, None]
    return log_sum.cpu().numpy(), mean_gap.cpu().numpy()


@nb.njit(cache=True, nogil=True, inline="always")
def _add_log(m, s, v):  # pragma: no cover - compiled
    """One term v into a running log-sum-exp kept as (max m, sum s of exp(term - m))."""
    if v == -np.inf:
        return m, s
    if v <= m:
        return m, s + math.exp(v - m)
    return v, s * math.exp(m - v) + 1.0


@nb.njit(cache=True, nogil=True, inline="always")
def _log_of(m, s):  # pragma: no cover - compiled
    return m + math.log(s) if s > 0.0 else -np.inf


@nb.njit(cache=True, nogil=True)
def log_sums_by_group(log_asum, group_atoms, group_offsets):  # pragma: no cover - compiled
    """(N, G) log of each group's sum of its atoms' sums, from ``log_asum`` (N, K)."""
    N = log_asum.shape[0]
    G = group_offsets.shape[0] - 1
    out = np.empty((N, G), np.float64)
    for n in range(N):
        for g in range(G):
            m, s = -np.inf, 0.0
            for i in range(group_offsets[g], group_offsets[g + 1]):
                m, s = _add_log(m, s, log_asum[n, group_atoms[i]])
            out[n, g] = _log_of(m, s)
    return out


@parallel_kernel(cache=True, nogil=True)
def log_backward(log_gsum, live, out_offsets, out_dst, out_group):  # pragma: no cover - compiled
    """lb (L + 1, S): lb[l, s] = log of the total weight of the valid completions of the
    canvas from state s at position l (-inf where s is not live). A position's states
    are independent: ``canvas.LIVE_CHUNKS`` chunks of them, shared by numba's threads."""
    L = log_gsum.shape[0]
    S = live.shape[1]
    lb = np.full((L + 1, S), -np.inf)
    for s in range(S):
        if live[L, s]:
            lb[L, s] = 0.0
    for l in range(L - 1, -1, -1):
        for c in nb.prange(canvas.LIVE_CHUNKS):
            s0, s1 = canvas._chunk(0, S, c)
            for s in range(s0, s1):
                if not live[l, s]:
                    continue
                m, t = -np.inf, 0.0
                for j in range(out_offsets[s], out_offsets[s + 1]):
                    m, t = _add_log(m, t, log_gsum[l, out_group[j]] + lb[l + 1, out_dst[j]])
                lb[l, s] = _log_of(m, t)
    return lb


@parallel_kernel(cache=True, nogil=True)
def log_factors(log_gsum, lb, live, start, in_offsets, in_src, in_group, atom_groups,
                atom_group_offsets):  # pragma: no cover - compiled
    """The atom factors of ``canvas._factors`` in log: log_f (L, K) with P(token t at l) =
    exp(x_t - rowmax_l + log_f[l, atom(t)]), from a forward pass in log space and the
    backward values ``lb``. Returns (log_f, ok): ok is False where the canvas has no
    mass at all (every valid canvas passes a -inf logit). A position's states are
    pulled in ``canvas.LIVE_CHUNKS`` chunks on numba's threads, as the live-list passes
    pull theirs, each chunk's group sums kept apart and added in chunk order (the same
    numbers on any number of threads)."""
    L, G = log_gsum.shape
    S = live.shape[1]
    K = atom_group_offsets.shape[0] - 1
    log_f = np.full((L, K), -np.inf)
    cur = np.full(S, -np.inf)  # log alpha at l
    nxt = np.full(S, -np.inf)  # at l + 1
    # per chunk and group: log-sum-exp of alpha_l(s) * beta_{l+1}(d) over the group's edges
    acc_m = np.empty((canvas.LIVE_CHUNKS, G), np.float64)
    acc_s = np.empty((canvas.LIVE_CHUNKS, G), np.float64)
    acc = np.empty(G, np.float64)  # their sum over the chunks, a log
    cur[start] = 0.0
    for l in range(L):
        for c in nb.prange(canvas.LIVE_CHUNKS):
            am, at = acc_m[c], acc_s[c]
            am[:] = -np.inf
            at[:] = 0.0
            d0, d1 = canvas._chunk(0, S, c)
            for d in range(d0, d1):
                nxt[d] = -np.inf
                if not live[l + 1, d]:
                    continue
                m, t = -np.inf, 0.0
                for j in range(in_offsets[d], in_offsets[d + 1]):
                    a = cur[in_src[j]]
                    if a == -np.inf:
                        continue
                    g = in_group[j]
                    m, t = _add_log(m, t, a + log_gsum[l, g])
                    am[g], at[g] = _add_log(am[g], at[g], a + lb[l + 1, d])
                nxt[d] = _log_of(m, t)
        # the position's mass: every group's edges, weighed by the group
        m, t = -np.inf, 0.0
        for g in range(G):
            gm, gt = -np.inf, 0.0
            for c in range(canvas.LIVE_CHUNKS):
                gm, gt = _add_log(gm, gt, _log_of(acc_m[c, g], acc_s[c, g]))
            acc[g] = _log_of(gm, gt)
            m, t = _add_log(m, t, acc[g] + log_gsum[l, g])
        log_post = _log_of(m, t)
        if log_post == -np.inf:
            return log_f, False
        for k in range(K):
            m, t = -np.inf, 0.0
            for i in range(atom_group_offsets[k], atom_group_offsets[k + 1]):
                m, t = _add_log(m, t, acc[atom_groups[i]])
            log_f[l, k] = _log_of(m, t) - log_post
        cur, nxt = nxt, cur
    return log_f, True


@nb.njit(cache=True, nogil=True)
def log_sample_atoms(log_asum, log_gsum, lb, start, out_offsets, out_dst, out_group, group_atoms, group_offsets,
                     uniforms):  # pragma: no cover - compiled
    """``canvas._sample_atoms`` in log space: an edge per position, weight
    exp(log_gsum + lb of its end), then an atom inside the edge's group, weight
    exp(log_asum), with the same uniforms in the same order. -> (atoms (L,) int32, ok):
    ok is False where the canvas has no mass."""
    L = log_gsum.shape[0]
    out = np.empty(L, np.int32)
    degree = out_offsets[1:] - out_offsets[:-1]
    sizes = group_offsets[1:] - group_offsets[:-1]
    w = np.empty(max(degree.max() if degree.shape[0] else 0, sizes.max() if sizes.shape[0] else 0), np.float64)
    s = start
    for l in range(L):
        e0, e1 = out_offsets[s], out_offsets[s + 1]
        top = -np.inf
        for j in range(e0, e1):
            w[j - e0] = log_gsum[l, out_group[j]] + lb[l + 1, out_dst[j]]
            top = max(top, w[j - e0])
        if top == -np.inf:
            return out, False
        tot = 0.0
        for j in range(e1 - e0):  # weights from the best edge's: no range to leave
            w[j] = math.exp(w[j] - top)
            tot += w[j]
        chosen = e0 + canvas.draw_index(w[:e1 - e0], uniforms[l, 0] * tot)
        g = out_group[chosen]
        a0, a1 = group_offsets[g], group_offsets[g + 1]
        for i in range(a0, a1):  # the group's atoms, weights summing to 1
            w[i - a0] = math.exp(log_asum[l, group_atoms[i]] - log_gsum[l, g])
        out[l] = group_atoms[a0 + canvas.draw_index(w[:a1 - a0], uniforms[l, 1])]
        s = out_dst[chosen]
    return out, True


@nb.njit(cache=True, nogil=True)
def entropies(log_f, log_asum, mean_gap, amax, rowmax):  # pragma: no cover - compiled
    """(N,) entropy (nats) of each row's constrained marginal, from the atoms: the tokens
    of atom k weigh p_t = exp(x_t - rowmax + log_f[k]) and carry P_k = exp(log_f[k] +
    log_asum[k]) in all, so that -sum over them of p_t log p_t = -P_k (mean_gap[k] +
    amax[k] - rowmax + log_f[k]), with every term finite where P_k > 0."""
    N, K = log_f.shape
    H = np.zeros(N, np.float64)
    for n in range(N):
        h = 0.0
        for k in range(K):
            lp = log_f[n, k] + log_asum[n, k]
            if lp > -np.inf:
                h -= math.exp(lp) * (mean_gap[n, k] + amax[n, k] - rowmax[n] + log_f[n, k])
        H[n] = max(h, 0.0)
    return H
