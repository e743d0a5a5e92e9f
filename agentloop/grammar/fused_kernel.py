"""The vocabulary passes of ``device_passes`` as Triton kernels, each reading the logits once.

Imported only where triton is (CUDA builds of torch bring it). Under ``TRITON_INTERPRET=1``
at import, the kernels run on CPU tensors in Triton's interpreter (the tests).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def chunk_stats(x_ptr, stride, gather_ptr, weight_ptr, m_ptr, first_ptr, s_ptr, sx_ptr, n_chunks, V,
                C: tl.constexpr, BLOCK: tl.constexpr, WANT_SUM: tl.constexpr, WANT_X: tl.constexpr):
    """One logits row x BLOCK chunks of C tokens (``AtomLayout.gather``) -> per chunk: the
    best logit m, the lowest token reaching it (V if none is finite), the sum of
    e = exp(x - m) over its tokens (pads weigh 0) and of e * (x - m); an all -inf chunk
    takes m = 0 as the sums' reference."""
    # chunks along the grid's fast axis: the blocks running at once read the same few rows,
    # which stay in L2 while their tokens are gathered out of order
    row = tl.program_id(1)
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) chunk ids
    live = c < n_chunks
    slot = c[:, None] * C + tl.arange(0, C)[None, :]  # (BLOCK, C) places in the layout
    tok = tl.load(gather_ptr + slot, mask=live[:, None], other=0)
    x = tl.load(x_ptr + row.to(tl.int64) * stride + tok, mask=live[:, None], other=-float("inf"))
    m = tl.max(x, axis=1)  # (BLOCK,)
    empty = m == -float("inf")
    first = tl.where(empty, V, tl.min(tl.where(x == m[:, None], tok, V), axis=1))
    out = row.to(tl.int64) * n_chunks + c
    tl.store(m_ptr + out, m, mask=live)
    tl.store(first_ptr + out, first, mask=live)
    if WANT_SUM:
        w = tl.load(weight_ptr + slot, mask=live[:, None], other=0.0)
        m0 = tl.where(empty, 0.0, m)
        d = tl.maximum(x - m0[:, None], -1e30)  # floored: e * d is 0, not nan, at x = -inf
        e = tl.exp(d) * w
        tl.store(s_ptr + out, tl.sum(e, axis=1), mask=live)
        if WANT_X:
            tl.store(sx_ptr + out, tl.sum(e * d, axis=1), mask=live)


@triton.jit
def log_marginals(x_ptr, x_stride, rowmax_ptr, logf_ptr, index_ptr, out_ptr, out_stride, V, K,
                  BLOCK: tl.constexpr):
    """One row x BLOCK tokens of the constrained log-marginals, x - rowmax + log F[atom]
    (float32, in the torch ops' order: the same numbers), -inf at the tokens never allowed
    (atom K) even where x is nan. ``logf`` is (rows, K + 1) float32."""
    row = tl.program_id(1).to(tl.int64)
    col = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) token ids
    live = col < V
    x = tl.load(x_ptr + row * x_stride + col, mask=live, other=0.0)
    k = tl.load(index_ptr + col, mask=live, other=K)
    log_f = tl.load(logf_ptr + row * (K + 1) + k, mask=live, other=0.0)  # a (K + 1,) row: in cache
    v = (x - tl.load(rowmax_ptr + row)) + log_f
    tl.store(out_ptr + row * out_stride + col, tl.where(k == K, -float("inf"), v), mask=live)


@triton.jit
def draw_in_atoms(x_ptr, x_stride, rowmax_ptr, tokens_ptr, row_ptr, start_ptr, size_ptr, best_ptr, rest_ptr,
                  out_ptr, BLOCK: tl.constexpr):
    """One sampled position: the token inside its atom at which the running mass of the
    atom's other tokens (weight exp(x - rowmax), token order, float64 sums) first reaches
    ``rest``; past the end (rounding), the last token with weight; with none, the best
    token. The atom's tokens are ``tokens[start:start + size]``; the walk stops at the
    block holding the answer."""
    i = tl.program_id(0)
    row = tl.load(row_ptr + i)
    start = tl.load(start_ptr + i)
    size = tl.load(size_ptr + i)
    best = tl.load(best_ptr + i)
    rest = tl.load(rest_ptr + i)  # float64, > 0
    m = tl.load(rowmax_ptr + row)
    acc = tl.zeros((), tl.float64)  # the mass of the blocks walked
    pick = best
    last = best  # the last token with weight so far
    found = 0
    j0 = 0
    while (j0 < size) & (found == 0):
        place = j0 + tl.arange(0, BLOCK)  # (BLOCK,)
        inside = place < size
        ids = tl.load(tokens_ptr + start + place, mask=inside, other=0)
        x = tl.load(x_ptr + row * x_stride + ids, mask=inside, other=-float("inf"))
        w = tl.where(inside & (ids != best), tl.exp(x - m), 0.0)  # (BLOCK,) float32
        c = acc + tl.cumsum(w.to(tl.float64), 0)  # (BLOCK,) running mass
        at = tl.min(tl.where(c >= rest, place, size))  # first place reaching it (it has weight: rest > 0)
        weighted = tl.max(tl.where(w > 0, place, -1))
        if weighted >= 0:
            last = tl.sum(tl.where(place == weighted, ids, 0))
        if at < size:
            pick = tl.sum(tl.where(place == at, ids, 0))
            found = 1
        acc = tl.max(c)  # c rises: its last value
        j0 += BLOCK
    tl.store(out_ptr + i, tl.where(found == 1, pick, last))
