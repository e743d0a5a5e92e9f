"""The atom reduction of ``device_passes`` as one Triton kernel: each logit is read once.

Imported only where triton is (CUDA builds of torch bring it). Under ``TRITON_INTERPRET=1``
at import, the kernel runs on CPU tensors in Triton's interpreter (the tests).
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
