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
a log-sum-exp: over dense messages in the fast passes' layout (runs of edges, each a
vectorised loop) where the canvas's support is dense, else over lists of edges by state,
each position's states shared by numba's threads, and over a pruned canvas's kept cells
alone where ``pruning``'s sweep in log space keeps few (random logits at temperature
0.01, BPE 4k, 20 tools: ~15 ms a step against ~280 over the whole support).

Quantities follow ``canvas``: atoms, groups (unions of atoms on one edge), positions
l = 0..L - 1 between rows l and l + 1 of the automaton's states. The passes over lists
take their arrays in state order, the dense ones in the layout's rows; ``live`` (L + 1, S)
masks the states on some valid canvas.

    >>> import numpy as np
    >>> lg = np.log(np.array([[1.0, 2.0]]))  # one position, two atoms, one group of both
    >>> plan = canvas.group_plan(np.array([0, 1], np.int32), np.array([0, 2], np.int64), 2)
    >>> log_sums_by_group(lg, *plan).round(4).tolist()
    [[1.0986]]
"""

from __future__ import annotations

import math
from typing import Any

import numba as nb
import numpy as np
import torch

from ..numba_threads import parallel_kernel, row_parts, serial_and_threaded
from . import canvas
from .float32_math import exp_nonpositive as exp_nonpositive32
from .float64_math import exp_nonpositive, key_to_double, log_positive, order_key

#: Rows of logits per chunk of ``log_atom_stats`` (its temporaries are (rows, V)).
_ROWS_PER_CHUNK = 16

#: Terms further below their atom's best than this (float32's exp reaches its subnormals
#: at 87.3) weigh less than 1e-37 of it: they count as 0.
_FLUSHED = 87.0


def log_atom_stats(logits: Any, atom_of: np.ndarray, amax: np.ndarray, rowmax: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row n and atom k, over the atom's tokens t: (log sum of exp(x_t - rowmax[n]),
    the mean of x_t - amax[n, k] under weights exp(x_t), and log sum of exp(x_t -
    amax[n, k])), each (N, K) float64; -inf, 0 and -inf where the atom has no finite
    logit. The third is the first less amax - rowmax, kept apart: beside a huge gap (a
    token masked with -3.4e38) the first holds the gap alone. ``logits`` (N, V) float32
    (numpy, or a tensor on its device, where the sums are taken), ``atom_of`` (V,) (-1: never
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
    ref = torch.from_numpy(np.asarray(rowmax, np.float64)).to(dev)  # (N,)
    log_sum = torch.empty((N, K), dtype=torch.float64, device=dev)
    mean_gap = torch.empty((N, K), dtype=torch.float64, device=dev)
    log_inside = torch.empty((N, K), dtype=torch.float64, device=dev)
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
        log_inside[r] = torch.where(has, s.log(), -math.inf)
        # (the gap first, exact: best + log_inside alone lost log_inside beside a huge best,
        # a row masked whole at 1e20, where the host pass kept it)
        log_sum[r] = torch.where(has, (best[r].double() - ref[r, None]) + log_inside[r], -math.inf)
        mean_gap[r] = torch.where(has, sx / s, 0.0)
    return log_sum.cpu().numpy(), mean_gap.cpu().numpy(), log_inside.cpu().numpy()


@nb.njit(cache=True, nogil=True, inline="always", fastmath={"contract"})
def _with_term(m, s, v):  # pragma: no cover - compiled
    """One term v into a running log-sum-exp kept as (max m, sum s of exp(term - m));
    either or both may be -inf, no nan comes in. Branch-free, with float64_math's exp:
    the dense passes' run loops vectorise it."""
    hi = np.fmax(m, v)
    e = exp_nonpositive(np.fmin(m, v) - hi)  # (nan where both are -inf: exp gives 0 there)
    return hi, (s * e + 1.0 if v > m else s + e)


@nb.njit(cache=True, nogil=True, inline="always")
def _log_of(m, s):  # pragma: no cover - compiled
    return m + math.log(s) if s > 0.0 else -np.inf


@nb.njit(cache=True, nogil=True, inline="always")
def _position_factors(chunk_m, chunk_s, log_w, acc, atom_groups, atom_group_offsets, log_f_l):  # pragma: no cover
    """log_f_l (K,) <- one position's atom factors in log, from each chunk's group
    posteriors as running log-sum-exps (chunk_m, chunk_s (chunks, G)), added in chunk
    order, and the group weights log_w (G,) (acc (G,): scratch). False where the position
    has no mass."""
    pm, ps = -np.inf, 0.0  # the position's mass: every group's edges, weighed by the group
    for g in range(acc.shape[0]):
        am, at = -np.inf, 0.0
        for c in range(chunk_m.shape[0]):
            am, at = _with_term(am, at, _log_of(chunk_m[c, g], chunk_s[c, g]))
        acc[g] = _log_of(am, at)
        pm, ps = _with_term(pm, ps, acc[g] + log_w[g])
    log_post = _log_of(pm, ps)
    if log_post == -np.inf:
        return False
    for k in range(log_f_l.shape[0]):
        km, ks = -np.inf, 0.0
        for i in range(atom_group_offsets[k], atom_group_offsets[k + 1]):
            km, ks = _with_term(km, ks, acc[atom_groups[i]])
        log_f_l[k] = _log_of(km, ks) - log_post
    return True


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
                    m, t = _with_term(m, t, log_gsum[l, out_group[j]] + lb[l + 1, out_dst[j]])
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
                    m, t = _with_term(m, t, a + log_gsum[l, g])
                    am[g], at[g] = _with_term(am[g], at[g], a + lb[l + 1, d])
                nxt[d] = _log_of(m, t)
        if not _position_factors(acc_m, acc_s, log_gsum[l], acc, atom_groups, atom_group_offsets, log_f[l]):
            return log_f, False
        cur, nxt = nxt, cur
    return log_f, True


# ---- the same passes over a pruned canvas's kept cells ------------------------------------
# ``pruning``'s sweep in log space keeps a few thousand of a canvas's cells (its lists:
# offsets, states sorted at each position) where the weights leave float64's range; the
# passes below run over those alone, each value stored per kept cell (a dense (L + 1, S)
# array is 100 MB at 20 tools, and its pages cost more than the step), a position's
# values looked up by state in an (S,) scratch row, set from the lists and reset after.


@nb.njit(cache=True, nogil=True)
def kept_log_backward(log_gsum, offsets, states, out_offsets, out_dst, out_group, S):  # pragma: no cover - compiled
    """lb (n,): lb[i] = log of the total weight of the completions over the kept cells of
    the canvas from kept cell i (state states[i] at its position); 0 at the last
    position, whose kept states are all accepting."""
    L = log_gsum.shape[0]
    lb = np.full(states.shape[0], -np.inf)
    nxt = np.full(S, -np.inf)  # lb at l + 1 by state
    for i in range(offsets[L], offsets[L + 1]):
        lb[i] = 0.0
    for l in range(L - 1, -1, -1):
        for i in range(offsets[l + 1], offsets[l + 2]):
            nxt[states[i]] = lb[i]
        for i in range(offsets[l], offsets[l + 1]):
            s = states[i]
            m, t = -np.inf, 0.0
            for j in range(out_offsets[s], out_offsets[s + 1]):
                b = nxt[out_dst[j]]
                if b > -np.inf:
                    m, t = _with_term(m, t, log_gsum[l, out_group[j]] + b)
            lb[i] = _log_of(m, t)
        for i in range(offsets[l + 1], offsets[l + 2]):
            nxt[states[i]] = -np.inf
    return lb


@nb.njit(cache=True, nogil=True)
def kept_log_factors(log_gsum, lb, offsets, states, out_offsets, out_dst, out_group, group_atoms, group_offsets,
                     K, S):  # pragma: no cover - compiled
    """``log_factors`` over the kept cells, from ``kept_log_backward``'s lb: a forward
    pass pushing each kept cell's log alpha along its edges into kept cells. -> (log_f
    (L, K), ok). A position's factors come from the groups its kept edges carry alone
    (a few; ``_position_factors`` walks every group and atom, 15x the time at 20
    tools), added up in the order the edges first reach them."""
    L, G = log_gsum.shape
    log_f = np.full((L, K), -np.inf)
    alpha = np.full(states.shape[0], -np.inf)  # log alpha of each kept cell
    nxt_b = np.full(S, -np.inf)  # lb at l + 1 by state
    nxt_m = np.full(S, -np.inf)  # alpha at l + 1 by state, as running log-sum-exps
    nxt_s = np.zeros(S, np.float64)
    acc_m = np.full(G, -np.inf)  # each group's posterior at l, likewise
    acc_s = np.zeros(G, np.float64)
    groups = np.empty(G, np.int64)  # the groups the position's edges carry, in the order reached
    atom_m = np.full(K, -np.inf)  # each atom's factor at l, likewise
    atom_s = np.zeros(K, np.float64)
    atoms = np.empty(K, np.int64)
    alpha[offsets[0]] = 0.0  # (the start state, alone at position 0)
    for l in range(L):
        for i in range(offsets[l + 1], offsets[l + 2]):
            nxt_b[states[i]] = lb[i]
        ng = 0
        for i in range(offsets[l], offsets[l + 1]):
            a = alpha[i]
            if a == -np.inf:
                continue
            s = states[i]
            for j in range(out_offsets[s], out_offsets[s + 1]):
                d = out_dst[j]
                b = nxt_b[d]
                if b == -np.inf:
                    continue
                g = out_group[j]
                nxt_m[d], nxt_s[d] = _with_term(nxt_m[d], nxt_s[d], a + log_gsum[l, g])
                if acc_m[g] == -np.inf and acc_s[g] == 0.0:
                    groups[ng] = g
                    ng += 1
                acc_m[g], acc_s[g] = _with_term(acc_m[g], acc_s[g], a + b)
        pm, ps = -np.inf, 0.0  # the position's mass: every group's edges, weighed by the group
        for q in range(ng):
            g = groups[q]
            pm, ps = _with_term(pm, ps, _log_of(acc_m[g], acc_s[g]) + log_gsum[l, g])
        log_post = _log_of(pm, ps)
        if log_post == -np.inf:
            return log_f, False
        na = 0
        for q in range(ng):
            g = groups[q]
            post = _log_of(acc_m[g], acc_s[g])
            acc_m[g], acc_s[g] = -np.inf, 0.0
            for i in range(group_offsets[g], group_offsets[g + 1]):
                k = group_atoms[i]
                if atom_m[k] == -np.inf and atom_s[k] == 0.0:
                    atoms[na] = k
                    na += 1
                atom_m[k], atom_s[k] = _with_term(atom_m[k], atom_s[k], post)
        for q in range(na):
            k = atoms[q]
            log_f[l, k] = _log_of(atom_m[k], atom_s[k]) - log_post
            atom_m[k], atom_s[k] = -np.inf, 0.0
        for i in range(offsets[l + 1], offsets[l + 2]):
            d = states[i]
            alpha[i] = _log_of(nxt_m[d], nxt_s[d])
            nxt_b[d], nxt_m[d], nxt_s[d] = -np.inf, -np.inf, 0.0
    return log_f, True


# ---- the same passes over dense messages, as the fast passes run -------------------------
# Where the canvas's support is dense (``canvas.Support.dense``), the passes below visit
# the edges as ``canvas``'s dense passes do, in the layout's rows: runs of consecutive
# rows (one vectorised loop each, clipped to the live stretch at each position), fans,
# then single edges. Every row's value is built as a running log-sum-exp (m, s): m the
# largest term so far, s the sum of exp(term - m), each term added with one vectorised
# exp (float64_math) and no log; a log per row at the end of each position. 3-6x the
# speed of the passes over lists of edges by state above (BPE 4k, 1, 5 and 20 tools, one
# thread), the same numbers to ~1e-11 in log.


@nb.njit(cache=True, nogil=True, inline="always", fastmath={"contract"})
def _add_run(m, s, w, x):  # pragma: no cover - compiled
    """Terms w + x[j] into the rows' sums (m[j], s[j]): a run's pull."""
    for j in range(m.shape[0]):
        m[j], s[j] = _with_term(m[j], s[j], w + x[j])


@nb.njit(cache=True, nogil=True, inline="always", fastmath={"contract"})
def _add_to_all(m, s, v):  # pragma: no cover - compiled
    """One term v into every row's sums: a fan's one row pushed to its sources."""
    for j in range(m.shape[0]):
        m[j], s[j] = _with_term(m[j], s[j], v)


@nb.njit(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")
def _close_rows(out, m, s, live):  # pragma: no cover - compiled
    """out <- m + log s where the row is live and has a term, else -inf; returns how many
    rows have a finite value. (A function of its own: inlined into a pass, its loop lost
    its vectorisation.)"""
    n = 0
    for j in range(out.shape[0]):
        has = live[j] != 0 and s[j] > 0.0
        out[j] = m[j] + log_positive(s[j] if has else 1.0) if has else -np.inf
        n += has
    return n


# A slice's log-sum-exp in two loops, each in a helper of its own (in one function the
# compiler vectorised neither): the largest term, as an int max over order keys, then the
# sum of exp(term - largest).


@nb.njit(cache=True, nogil=True, inline="always")
def _largest_sum(x, y):  # pragma: no cover - compiled
    k = order_key(-np.inf)  # (an empty slice: -inf)
    for j in range(x.shape[0]):
        k = max(k, order_key(x[j] + y[j]))
    return key_to_double(k)


@nb.njit(cache=True, nogil=True, inline="always", fastmath={"reassoc", "contract"})
def _exp_sum_below(x, y, top):  # pragma: no cover - compiled
    t = 0.0
    for j in range(x.shape[0]):
        t += exp_nonpositive(x[j] + y[j] - top)
    return t


@nb.njit(cache=True, nogil=True, inline="always")
def _largest(x):  # pragma: no cover - compiled
    k = order_key(-np.inf)
    for j in range(x.shape[0]):
        k = max(k, order_key(x[j]))
    return key_to_double(k)


@nb.njit(cache=True, nogil=True, inline="always", fastmath={"reassoc", "contract"})
def _exp_total_below(x, top):  # pragma: no cover - compiled
    t = 0.0
    for j in range(x.shape[0]):
        t += exp_nonpositive(x[j] - top)
    return t


@nb.njit(cache=True, nogil=True, inline="always")
def _log_dot(x, y):  # pragma: no cover - compiled
    """log sum exp(x[j] + y[j]): a run's share of its group's edge posteriors."""
    top = _largest_sum(x, y)
    return top if top == -np.inf else top + math.log(_exp_sum_below(x, y, top))


@nb.njit(cache=True, nogil=True, inline="always")
def _log_total(x):  # pragma: no cover - compiled
    """log sum exp(x[j]): a fan's sources."""
    top = _largest(x)
    return top if top == -np.inf else top + math.log(_exp_total_below(x, top))


def log_atom_stats_host(logits: np.ndarray, atoms: "canvas.SortedAtoms", amax: np.ndarray, rowmax: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``log_atom_stats`` for logits on the host, from the scan's token lists (``atoms``,
    ``canvas.sorted_atoms``): one compiled pass, its rows on numba's threads (2.6 ms
    against the torch ops' 10.7 at BPE 4k, one thread). Each term is exp(x - the atom's
    best) in float32, as the scan and the torch ops take it, added up in float64."""
    N = logits.shape[0]
    K = amax.shape[1]
    log_sum = np.empty((N, K), np.float64)
    mean_gap = np.empty((N, K), np.float64)
    log_inside = np.empty((N, K), np.float64)
    _log_atom_stats_rows(np.ascontiguousarray(logits, np.float32), atoms.perm, atoms.lo, atoms.hi, atoms.singles,
                         atoms.others, np.ascontiguousarray(amax, np.float32), np.asarray(rowmax, np.float64),
                         log_sum, mean_gap, log_inside, row_parts(N))
    return log_sum, mean_gap, log_inside


@parallel_kernel(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _log_atom_stats_rows(x, perm, lo, hi, singles, others, amax, rowmax, log_sum, mean_gap, log_inside,
                         parts):  # pragma: no cover - compiled
    N = x.shape[0]
    for part in nb.prange(parts):
        for r in range(part * N // parts, (part + 1) * N // parts):
            row = x[r]
            ref = rowmax[r]
            for j in range(singles.shape[0]):  # one term: the token's own logit, its atom's best
                k = singles[j]
                b = amax[r, k]
                log_sum[r, k] = np.float64(b) - ref if b > -np.inf else -np.inf
                mean_gap[r, k] = 0.0
                log_inside[r, k] = 0.0 if b > -np.inf else -np.inf
            for i in range(others.shape[0]):
                k = others[i]
                b = amax[r, k]
                if not b > -np.inf:
                    log_sum[r, k] = -np.inf
                    mean_gap[r, k] = 0.0
                    log_inside[r, k] = -np.inf
                    continue
                t = 0.0
                tx = 0.0
                for j in range(lo[k], hi[k]):
                    d = row[np.uint32(perm[j])] - b
                    e = exp_nonpositive32(d)
                    t += np.float64(e)
                    tx += np.float64(e * d) if e > np.float32(0.0) else 0.0  # (0 * -inf is nan)
                log_inside[r, k] = math.log(t)
                log_sum[r, k] = np.float64(b) - ref + log_inside[r, k]
                mean_gap[r, k] = tx / t


@nb.njit(cache=True, nogil=True, error_model="numpy")
def log_sums_by_group(log_asum, order, base, extra_offsets, extra, n_groups):  # pragma: no cover - compiled
    """(N, G) log of each group's sum of its atoms' sums, from ``log_asum`` (N, K), along
    a ``canvas.GroupPlan`` (order, base, extra_offsets, extra, n_groups): each node's row
    is its base node's plus its other parts' (groups it contains, blocks of atoms, atoms:
    5.8x fewer pairs than atoms at 20 tools), added along the positions, one vectorised
    loop per (node, part) pair."""
    N = log_asum.shape[0]
    K = log_asum.shape[1]
    cols = np.ascontiguousarray(log_asum.T)  # (K, N)
    out = np.empty((order.shape[0], N), np.float64)  # (nodes, N)
    m = np.empty(N, np.float64)
    s = np.empty(N, np.float64)
    every = np.ones(N, np.uint8)
    for a in range(order.shape[0]):
        g = order[a]
        if base[g] >= 0:  # (built before g)
            m[:] = out[base[g]]
            for j in range(N):
                s[j] = 1.0 if m[j] > -np.inf else 0.0
        else:
            m[:] = -np.inf
            s[:] = 0.0
        for i in range(extra_offsets[g], extra_offsets[g + 1]):
            e = extra[i]
            _add_run(m, s, 0.0, cols[e] if e < K else out[e - K])
        _close_rows(out[g], m, s, every)
    return np.ascontiguousarray(out[:n_groups].T)


# Large automata cut each position's rows into canvas.LIVE_CHUNKS chunks that numba's
# threads share; a chunk takes the terms of the edges into its rows (a run cut at the
# chunk's edges) in the order a whole row would, and its own share of every group's
# posterior, added up in chunk order: the same numbers on one thread or many. Small ones
# keep their rows whole (cut into 8 they ran 1.3-1.4x slower at one tool, and no launch
# per position pays for their work); how an automaton is cut depends on its size only.


def _chunks(S: int) -> int:
    """How many chunks the dense log-space passes cut S rows into."""
    return canvas.LIVE_CHUNKS if S >= THREADED_MIN_STATES else 1


#: Automata from this many states run the dense log-space passes in chunks on numba's threads.
THREADED_MIN_STATES = 4096


@nb.njit(cache=True, nogil=True, inline="always")
def _chunk_rows(S, c, C):  # pragma: no cover - compiled
    """Chunk c of C of the rows 0..S: (start, stop)."""
    return c * S // C, (c + 1) * S // C


@nb.njit(cache=True, nogil=True)
def _by_chunk(rows, S, C):  # pragma: no cover - compiled
    """The single edges grouped by the chunk (of C) of the row each writes, in their
    order: (offsets (C + 1,), indices into ``rows``)."""
    chunk_of = np.empty(rows.shape[0], np.int64)
    offsets = np.zeros(C + 1, np.int64)
    for c in range(C):
        r0, r1 = _chunk_rows(S, c, C)
        for i in range(rows.shape[0]):
            if r0 <= rows[i] < r1:
                chunk_of[i] = c
                offsets[c + 1] += 1
    offsets = np.cumsum(offsets)
    order = np.empty(rows.shape[0], np.int64)
    fill = offsets[:-1].copy()
    for i in range(rows.shape[0]):
        order[fill[chunk_of[i]]] = i
        fill[chunk_of[i]] += 1
    return offsets, order


@nb.njit(cache=True, nogil=True, inline="always", fastmath={"contract"}, error_model="numpy")
def _backward_chunk(c, C, out, nxt, w, m, s, live, src, dst, group, runs, clip_l, fans, singles,
                    single_offsets):  # pragma: no cover - compiled
    """Rows of chunk c (of C) of lb at one position (``out``) from the next position's
    (``nxt``), group weights w (G,) in log; returns how many of them are finite."""
    r0, r1 = _chunk_rows(out.shape[0], c, C)
    m[r0:r1] = -np.inf
    s[r0:r1] = 0.0
    for r in range(runs.shape[0] - 1):  # a run's sources (the rows written) cut to the chunk
        e = runs[r]
        a, b, n = canvas._clipped_run(src, dst, e, clip_l[r])
        lo, hi = max(a, r0), min(a + n, r1)
        if lo < hi:
            _add_run(m[lo:hi], s[lo:hi], w[group[e]], nxt[b + lo - a:b + hi - a])
    for f in range(fans.shape[0] - 1):  # a fan's one row out to its sources
        e = fans[f]
        lo, hi = max(src[e], r0), min(src[e] + fans[f + 1] - e, r1)
        if lo < hi:
            _add_to_all(m[lo:hi], s[lo:hi], w[group[e]] + nxt[dst[e]])
    E0 = fans[-1]
    for i in range(single_offsets[c], single_offsets[c + 1]):  # (indices unsigned: see canvas's scan)
        e = E0 + singles[i]
        j = np.uint32(src[e])
        m[j], s[j] = _with_term(m[j], s[j], w[np.uint32(group[e])] + nxt[np.uint32(dst[e])])
    return _close_rows(out[r0:r1], m[r0:r1], s[r0:r1], live[r0:r1])


def _dense_log_backward_kernel(chunks):  # type: ignore[no-untyped-def]
    """The backward pass with its chunks in a ``range`` (one thread) or an ``nb.prange``
    (numba's threads): two closures, so that numba's cache keeps them apart (it keys
    machine code by a function's source and closure, not by ``parallel``: one function
    compiled both ways loaded the one-thread code for both)."""

    def kernel(log_gsum, live, src, dst, group, runs, clip, fans, C, lb):  # pragma: no cover - compiled
        L = log_gsum.shape[0]
        S = live.shape[1]
        for j in range(S):
            lb[L, j] = 0.0 if live[L, j] else -np.inf
        m = np.empty(S, np.float64)  # each row's running log-sum-exp at l: largest term
        s = np.empty(S, np.float64)  # and sum of exp(term - largest)
        single_offsets, singles = _by_chunk(src[fans[-1]:], S, C)
        finite = np.zeros(C, np.int64)
        for l in range(L - 1, -1, -1):
            for c in chunks(C):
                finite[c] = _backward_chunk(c, C, lb[l], lb[l + 1], log_gsum[l], m, s, live[l], src, dst, group, runs,
                                            clip[l], fans, singles, single_offsets)
            if finite.sum() == 0:
                return lb, False
        return lb, True

    return kernel


def _both_ways(kernel_of: Any) -> tuple[Any, Any]:
    """(one-thread, threaded) compiled kernels of ``kernel_of(range)`` and
    ``kernel_of(nb.prange)``."""
    return serial_and_threaded(kernel_of, cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")


def _kernel_for(kernels: tuple[Any, Any], S: int) -> tuple[Any, int]:
    """The kernel of ``_both_ways`` to run over S rows, and their chunk count: the threaded
    one where the rows are cut and there are threads (the same numbers either way)."""
    C = _chunks(S)
    return kernels[1] if C > 1 and nb.get_num_threads() > 1 else kernels[0], C


_DENSE_LOG_BACKWARD = _both_ways(_dense_log_backward_kernel)


def dense_log_backward(log_gsum: np.ndarray, live: np.ndarray, src: np.ndarray, dst: np.ndarray, group: np.ndarray,
                       runs: np.ndarray, clip: np.ndarray, fans: np.ndarray,
                       out: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """``log_backward`` over dense messages in the layout's rows: (lb (L + 1, S) by row,
    ok), ok False where a position has no live row with a finite value (lb's rows above
    it are then not filled). ``live`` (L + 1, S) and ``clip`` are the support's
    (``canvas.Support``), the edges the layout's (``canvas_layout.EdgeLayout``). ``out``,
    a C-ordered (L + 1, S) float64 array, receives lb instead of a new one (a kept one:
    a fresh one at 20 tools is ~40 ms of page faults)."""
    kernel, C = _kernel_for(_DENSE_LOG_BACKWARD, live.shape[1])
    lb = np.empty(live.shape, np.float64) if out is None else out
    return kernel(log_gsum, live, src, dst, group, runs, clip, fans, C, lb)


@nb.njit(cache=True, nogil=True, inline="always", fastmath={"contract"}, error_model="numpy")
def _forward_chunk(c, C, cur, out, w, bn, m, s, gm, gs, live, src, dst, group, runs, clip_l, fans, in_row, in_other,
                   in_group, singles, single_offsets):  # pragma: no cover - compiled
    """Rows of chunk c (of C) of the forward message one position on (``out``) from ``cur``,
    and the chunk's share of each group's posterior, log-sum-exp of alpha_l(src) +
    lb_{l+1}(dst) over the group's edges into the chunk (gm, gs (G,)); returns how many
    of its rows are finite."""
    r0, r1 = _chunk_rows(out.shape[0], c, C)
    m[r0:r1] = -np.inf
    s[r0:r1] = 0.0
    gm[:] = -np.inf
    gs[:] = 0.0
    for r in range(runs.shape[0] - 1):  # a run's destinations (the rows written) cut to the chunk
        e = runs[r]
        a, b, n = canvas._clipped_run(src, dst, e, clip_l[r])
        lo, hi = max(b, r0), min(b + n, r1)
        if lo < hi:
            g = group[e]
            _add_run(m[lo:hi], s[lo:hi], w[g], cur[a + lo - b:a + hi - b])
            gm[g], gs[g] = _with_term(gm[g], gs[g], _log_dot(cur[a + lo - b:a + hi - b], bn[lo:hi]))
    for f in range(fans.shape[0] - 1):  # a fan's sources into its one row
        e = fans[f]
        d = dst[e]
        if r0 <= d < r1:
            g = group[e]
            t = _log_total(cur[src[e]:src[e] + fans[f + 1] - e])
            m[d], s[d] = _with_term(m[d], s[d], t + w[g])
            gm[g], gs[g] = _with_term(gm[g], gs[g], t + bn[d])
    for i in range(single_offsets[c], single_offsets[c + 1]):  # (indices unsigned: see canvas's scan)
        k = singles[i]
        row, other, g = np.uint32(in_row[k]), np.uint32(in_other[k]), np.uint32(in_group[k])
        x = cur[other]
        m[row], s[row] = _with_term(m[row], s[row], x + w[g])
        gm[g], gs[g] = _with_term(gm[g], gs[g], x + bn[row])
    return _close_rows(out[r0:r1], m[r0:r1], s[r0:r1], live[r0:r1])


def _dense_log_factors_kernel(chunks):  # type: ignore[no-untyped-def]
    """The forward pass and the factors, chunks in a ``range`` or an ``nb.prange`` (see
    ``_dense_log_backward_kernel``)."""

    def kernel(log_gsum, lb, live, src, dst, group, runs, clip, fans, in_row, in_other, in_group, start, atom_groups,
               atom_group_offsets, C):  # pragma: no cover - compiled
        L, G = log_gsum.shape
        S = live.shape[1]
        K = atom_group_offsets.shape[0] - 1
        log_f = np.full((L, K), -np.inf)
        cur = np.full(S, -np.inf)  # log alpha at l, by row
        nxt = np.empty(S, np.float64)  # at l + 1
        m = np.empty(S, np.float64)  # nxt's running log-sum-exps
        s = np.empty(S, np.float64)
        gm = np.empty((C, G), np.float64)  # per chunk and group: the posterior's log-sum-exp
        gs = np.empty((C, G), np.float64)
        acc = np.empty(G, np.float64)  # per group, over the chunks (a log)
        single_offsets, singles = _by_chunk(in_row, S, C)
        finite = np.zeros(C, np.int64)
        cur[start] = 0.0
        for l in range(L):
            for c in chunks(C):
                finite[c] = _forward_chunk(c, C, cur, nxt, log_gsum[l], lb[l + 1], m, s, gm[c], gs[c], live[l + 1], src,
                                           dst, group, runs, clip[l], fans, in_row, in_other, in_group, singles,
                                           single_offsets)
            if not _position_factors(gm, gs, log_gsum[l], acc, atom_groups, atom_group_offsets, log_f[l]) \
                    or finite.sum() == 0:
                return log_f, False
            cur, nxt = nxt, cur
        return log_f, True

    return kernel


_DENSE_LOG_FACTORS = _both_ways(_dense_log_factors_kernel)


def dense_log_factors(log_gsum: np.ndarray, lb: np.ndarray, live: np.ndarray, src: np.ndarray, dst: np.ndarray,
                      group: np.ndarray, runs: np.ndarray, clip: np.ndarray, fans: np.ndarray, in_row: np.ndarray,
                      in_other: np.ndarray, in_group: np.ndarray, start: int, atom_groups: np.ndarray,
                      atom_group_offsets: np.ndarray) -> tuple[np.ndarray, bool]:
    """``log_factors`` over dense messages in the layout's rows, from ``dense_log_backward``'s
    lb: (log_f (L, K), ok). ``start`` is the start state's row. Each position's group
    posteriors are taken from the forward message just computed, as the fast passes'
    one-thread sweep takes its factors (``canvas._alpha_factors_body``)."""
    kernel, C = _kernel_for(_DENSE_LOG_FACTORS, live.shape[1])
    return kernel(log_gsum, lb, live, src, dst, group, runs, clip, fans, in_row, in_other, in_group, start,
                  atom_groups, atom_group_offsets, C)


@nb.njit(cache=True, nogil=True)
def log_sample_atoms(log_asum, log_gsum, lb, column, offsets, states, start, out_offsets, out_dst, out_group,
                     group_atoms, group_offsets, uniforms):  # pragma: no cover - compiled
    """``canvas._sample_atoms`` in log space: an edge per position, weight
    exp(log_gsum + lb of its end), then an atom inside the edge's group, weight
    exp(log_asum), with the same uniforms in the same order. -> (atoms (L,) int32, ok):
    ok is False where the canvas has no mass. lb is flat: (L + 1) rows of S, state q's
    column column[q] (the layout's rank for the dense passes' rows, q itself for the
    lists'), or, where ``offsets`` (L + 2,) is given, one value per kept cell of the
    lists (``kept_log_backward``'s)."""
    L = log_gsum.shape[0]
    kept = offsets.shape[0] > 0
    S = column.shape[0]
    out = np.empty(L, np.int32)
    degree = out_offsets[1:] - out_offsets[:-1]
    sizes = group_offsets[1:] - group_offsets[:-1]
    w = np.empty(max(degree.max() if degree.shape[0] else 0, sizes.max() if sizes.shape[0] else 0), np.float64)
    s = start
    for l in range(L):
        e0, e1 = out_offsets[s], out_offsets[s + 1]
        top = -np.inf
        for j in range(e0, e1):
            if kept:
                at = canvas._slot(states, offsets[l + 1], offsets[l + 2], out_dst[j])
                b = lb[at] if at >= 0 else -np.inf
            else:
                b = lb[(l + 1) * S + column[out_dst[j]]]
            w[j - e0] = log_gsum[l, out_group[j]] + b
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
        for i in range(a0, a1):  # the group's atoms, weights summing to 1 (a vectorised exp: 728 at 20 tools)
            w[i - a0] = exp_nonpositive(min(log_asum[l, group_atoms[i]] - log_gsum[l, g], 0.0))
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
    P = np.empty(K, np.float64)
    for n in range(N):
        for k in range(K):  # (vectorised: float64_math's exp, 0 at -inf)
            P[k] = exp_nonpositive(min(log_f[n, k] + log_asum[n, k], 0.0))
        h = 0.0
        for k in range(K):
            if P[k] > 0.0:
                h -= P[k] * (mean_gap[n, k] + amax[n, k] - rowmax[n] + log_f[n, k])
        H[n] = max(h, 0.0)
    return H
