"""The vocabulary passes of ``device_passes`` as Triton kernels: the atom reduction in tiles
(``tile_stats``, then ``combine_tiles`` per atom), the marginals write, and the token draw
(``tile_masses``, then ``draw_in_atoms``). Each reads the logits it needs from HBM once.

Imported only where triton is (CUDA builds of torch bring it). Under ``TRITON_INTERPRET=1``
at import, the kernels run on CPU tensors in Triton's interpreter (the tests).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter has no libdevice: numpy's exp, as torch's on the CPU
    @triton.jit
    def exact_exp(x):
        return tl.exp(x)
else:
    try:
        from triton.language.extra import libdevice
    except ImportError:  # triton < 3.1
        from triton.language.extra.cuda import libdevice

    @triton.jit
    def exact_exp(x):
        """exp as torch computes it on a GPU (CUDA's expf, exp for float64). ``tl.exp`` lowers to
        the approximate ex2 instruction, an ulp or two away: enough to move a draw whose
        uniform falls among an atom's last tokens, where mass below 1e-12 of the atom's
        decides, off the token the torch ops (and the tests) pick."""
        return libdevice.exp(x)


@triton.jit
def log_marginals(x_ptr, x_stride, ref_ptr, shift_ptr, index_ptr, out_ptr, out_stride, V, K,
                  BLOCK: tl.constexpr):
    """One row x BLOCK tokens of the constrained log-marginals, x - ref[atom] + shift[atom]
    (float32, in the torch ops' order: the same numbers; ``device_passes.atom_references``),
    -inf at the tokens never allowed (atom K) even where x is nan. ``ref`` and ``shift``
    are (rows, K + 1) float32."""
    row = tl.program_id(1).to(tl.int64)
    col = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) token ids
    live = col < V
    x = tl.load(x_ptr + row * x_stride + col, mask=live, other=0.0)
    k = tl.load(index_ptr + col, mask=live, other=K)
    ref = tl.load(ref_ptr + row * (K + 1) + k, mask=live, other=0.0)  # (K + 1,) rows: in cache
    shift = tl.load(shift_ptr + row * (K + 1) + k, mask=live, other=0.0)
    v = (x - ref) + shift
    tl.store(out_ptr + row * out_stride + col, tl.where(k == K, -float("inf"), v), mask=live)


@triton.jit
def _other_weights(x_ptr, x_stride, tokens_ptr, row, start, place, end, best, m):
    """The tokens at ``place`` (BLOCK,) of an atom's list ``tokens[start:]``, those before
    ``end``, and their float32 weights exp(x - m), 0 for the best token and past ``end``:
    the one definition of the weights the tiles' masses add up and the draw walks, which
    must agree to the bit."""
    inside = place < end
    ids = tl.load(tokens_ptr + start + place, mask=inside, other=0).to(tl.int64)
    x = tl.load(x_ptr + row * x_stride + ids, mask=inside, other=-float("inf"))
    return ids, tl.where(inside & (ids != best), exact_exp(x - m), 0.0)


@triton.jit
def tile_masses(x_ptr, x_stride, ref_ptr, tokens_ptr, row_ptr, start_ptr, size_ptr, best_ptr, mass_ptr, n_mass,
                TILE: tl.constexpr, BLOCK: tl.constexpr):
    """One sampled position x one tile (TILE tokens) of its atom: the float64 sum of the
    float32 weights exp(x - ref) (ref: the atom's best logit) of the tile's tokens but the
    best, the weights the draw walks through (0 for a tile past the atom's end)."""
    i = tl.program_id(0)
    j = tl.program_id(1)
    row = tl.load(row_ptr + i)
    start = tl.load(start_ptr + i)
    size = tl.load(size_ptr + i)
    best = tl.load(best_ptr + i)
    m = tl.load(ref_ptr + i).to(tl.float32)  # (a float32 value, sent as float64)
    acc = tl.zeros([BLOCK], tl.float64)
    end = tl.minimum(size, (j + 1) * TILE)
    for j0 in range(j * TILE, end, BLOCK):
        _, w = _other_weights(x_ptr, x_stride, tokens_ptr, row, start, j0 + tl.arange(0, BLOCK), end, best, m)
        acc += w.to(tl.float64)
    tl.store(mass_ptr + i * n_mass + j, tl.sum(acc, axis=0))


@triton.jit
def draw_in_atoms(x_ptr, x_stride, ref_ptr, tokens_ptr, row_ptr, start_ptr, size_ptr, best_ptr, rest_ptr,
                  mass_ptr, n_mass, out_ptr, TILE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK: tl.constexpr):
    """One sampled position: the token inside its atom at which the running mass of the
    atom's other tokens (weight exp(x - ref), token order, float64 sums) first reaches
    ``rest``; past the end (rounding), the last token with weight; with none, the best
    token. The atom's tokens are ``tokens[start:start + size]``. The tiles' masses
    (``tile_masses``, n_mass a position) say which tile holds the answer; the walk starts
    there, from the mass of the tiles before it, and stops at the block holding the token
    (it walks on where rounding leaves it short)."""
    i = tl.program_id(0)
    row = tl.load(row_ptr + i)
    start = tl.load(start_ptr + i)
    size = tl.load(size_ptr + i)
    best = tl.load(best_ptr + i)
    rest = tl.load(rest_ptr + i)  # float64, > 0
    m = tl.load(ref_ptr + i).to(tl.float32)  # (a float32 value, sent as float64)
    jt = tl.arange(0, BLOCK_T)  # (BLOCK_T,) the atom's tiles
    mass = tl.load(mass_ptr + i * n_mass + jt, mask=jt < n_mass, other=0.0)
    upto = tl.cumsum(mass, 0)  # (BLOCK_T,) the mass up to each tile's end
    reach = tl.min(tl.where(upto >= rest, jt, BLOCK_T))  # the first tile reaching rest
    # none (rounding at the far end): the last tile with weight, which holds the last token with weight
    tile = tl.where(reach < BLOCK_T, reach, tl.maximum(tl.max(tl.where(mass > 0, jt, -1)), 0))
    # the mass of the tiles before it, from the same sums that chose it: below rest, so the
    # walk's first place reaching rest is a token with weight
    acc = tl.sum(tl.where(jt == tile - 1, upto, 0.0))
    pick = best
    last = best  # the last token with weight so far
    found = 0
    j0 = tl.where(tl.max(mass, 0) > 0, tile * TILE, size)  # no other token with weight: the best, no walk
    while (j0 < size) & (found == 0):
        place = j0 + tl.arange(0, BLOCK)  # (BLOCK,)
        ids, w = _other_weights(x_ptr, x_stride, tokens_ptr, row, start, place, size, best, m)  # (BLOCK,) float32 w
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


@triton.jit
def tile_stats(x_ptr, stride, tokens_ptr, tile_start_ptr, tile_len_ptr, m_ptr, first_ptr, s_ptr, sx_ptr, n_tiles, V,
               BLOCK: tl.constexpr, WANT_SUM: tl.constexpr, WANT_X: tl.constexpr):
    """One logits row x one tile (a stretch of at most a few thousand of one atom's tokens,
    ``AtomLayout.tile_start``/``tile_len`` into ``tokens``) -> the best logit m, the lowest
    token reaching it (V if none is finite, nan never counts), and the float64 sums over
    the tile of e = exp(x - m) and of e * (x - m) (an all -inf tile takes m = 0 as their
    reference). Two sweeps, the max then the sums: the second reads the tile back from L2."""
    t = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    start = tl.load(tile_start_ptr + t)
    size = tl.load(tile_len_ptr + t)
    lane = tl.arange(0, BLOCK)  # (BLOCK,)
    xrow = x_ptr + row * stride
    best = tl.full([BLOCK], -float("inf"), tl.float32)  # (BLOCK,) each lane's best logit so far
    best_tok = tl.zeros([BLOCK], tl.int32) + V  # (BLOCK,) and its token
    for j in range(0, size, BLOCK):
        live = j + lane < size
        tok = tl.load(tokens_ptr + start + j + lane, mask=live, other=0)
        x = tl.load(xrow + tok, mask=live, other=-float("inf"))
        better = x > best  # a lane's tokens rise: only a strictly better logit moves its token
        best_tok = tl.where(better, tok, best_tok)
        best = tl.where(better, x, best)
    m = tl.max(best, axis=0)
    out = row * n_tiles + t
    tl.store(m_ptr + out, m)
    tl.store(first_ptr + out, tl.min(tl.where(best == m, best_tok, V), axis=0))
    if WANT_SUM:
        m0 = tl.where(m == -float("inf"), 0.0, m)
        s = tl.zeros([BLOCK], tl.float64)  # (BLOCK,) float64: a tile can hold most of the row's mass
        sx = tl.zeros([BLOCK], tl.float64)
        for j in range(0, size, BLOCK):
            live = j + lane < size
            tok = tl.load(tokens_ptr + start + j + lane, mask=live, other=0)
            x = tl.load(xrow + tok, mask=live, other=-float("inf"))
            # floored, so that e * d is 0 (not nan) at x = -inf; nan stays nan (the caller's check)
            d = tl.maximum(x - m0, -1e30, propagate_nan=tl.PropagateNan.ALL)
            e = exact_exp(d)
            s += e.to(tl.float64)
            if WANT_X:
                sx += (e * d).to(tl.float64)
        tl.store(s_ptr + out, tl.sum(s, axis=0))
        if WANT_X:
            tl.store(sx_ptr + out, tl.sum(sx, axis=0))


@triton.jit
def combine_tiles(m_ptr, first_ptr, s_ptr, sx_ptr, atom_tiles_ptr, rowmax_ptr, out_ptr, amax_ptr, aarg_ptr, n_rows,
                  n_tiles, K, max_tiles, V, BLOCK_K: tl.constexpr, WANT_SUM: tl.constexpr, WANT_X: tl.constexpr):
    """One row's tiles -> its atoms (a lane each): the row's best allowed logit (0 if
    none is finite) into ``rowmax`` (float32, for the later passes); into the float64
    planes of ``out``, one after another, rowmax (n_rows,), then the atoms' sums taken
    from rowmax (n_rows, K), with WANT_X the x-weighted ones (n_rows, K); into ``amax``
    (float32) and ``aarg`` (int32), (n_rows, K) each, the atoms' best logit and its lowest
    token (-1: none). The caller lays the three out in one buffer, for one copy to the
    host, whose arrays are then views of it in the types the host's passes take."""
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_K)  # (BLOCK_K,) atoms
    live = k < K
    lo = tl.load(atom_tiles_ptr + k, mask=live, other=0)  # (BLOCK_K,) the atom's first tile
    hi = tl.load(atom_tiles_ptr + k + 1, mask=live, other=0)
    base = row * n_tiles
    amax = tl.full([BLOCK_K], -float("inf"), tl.float32)
    for j in range(0, max_tiles):
        amax = tl.maximum(amax, tl.load(m_ptr + base + lo + j, mask=lo + j < hi, other=-float("inf")))
    aarg = tl.zeros([BLOCK_K], tl.int32) + V
    for j in range(0, max_tiles):
        has = lo + j < hi
        mj = tl.load(m_ptr + base + lo + j, mask=has, other=-float("inf"))
        fj = tl.load(first_ptr + base + lo + j, mask=has, other=V)
        aarg = tl.where(has & (mj == amax), tl.minimum(aarg, fj), aarg)
    best = tl.max(amax, axis=0)
    rowmax = tl.where((best > -float("inf")) & (best < float("inf")), best, 0.0)
    tl.store(rowmax_ptr + row, rowmax)
    plane = (row * 0 + n_rows) * K  # int64 (row is): a plane of many canvases' rows may pass 2**31 entries
    at = row * K + k  # (BLOCK_K,) the row's atoms in an (n_rows, K) plane
    tl.store(out_ptr + row, rowmax.to(tl.float64))
    tl.store(amax_ptr + at, amax, mask=live)
    tl.store(aarg_ptr + at, tl.where(aarg < V, aarg, -1), mask=live)  # V: no finite logit (or no token)
    if WANT_SUM:
        acc = tl.zeros([BLOCK_K], tl.float64)
        accx = tl.zeros([BLOCK_K], tl.float64)
        for j in range(0, max_tiles):
            has = lo + j < hi
            mj = tl.load(m_ptr + base + lo + j, mask=has, other=0.0)
            sj = tl.load(s_ptr + base + lo + j, mask=has, other=0.0)
            lift = tl.where(mj == -float("inf"), 0.0, mj).to(tl.float64) - rowmax.to(tl.float64)  # tile -> row
            # (an all -inf tile adds nothing, even where rowmax is so low that exp(lift) overflows)
            scale = tl.where(mj == -float("inf"), 0.0, exact_exp(lift))
            acc += tl.where(has, sj * scale, 0.0)
            if WANT_X:  # sum of e * (x - rowmax) = sum of e * (x - m) + (m - rowmax) * sum of e
                sxj = tl.load(sx_ptr + base + lo + j, mask=has, other=0.0)
                accx += tl.where(has, (sxj + sj * lift) * scale, 0.0)
        tl.store(out_ptr + n_rows + at, acc, mask=live)
        if WANT_X:
            tl.store(out_ptr + n_rows + plane + at, accx, mask=live)
