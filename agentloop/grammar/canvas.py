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
except for one pass over the logits per position that scores the atoms (section 1), and
the final choice of a token inside the sampled atom. The DP (section 3) keeps dense
messages over the automaton's states, zero where a state lies on no valid canvas at that
position, and pulls each state's value over its edges, most of them in runs of
consecutive states that one vectorised loop covers, clipped at each position to the
edges live at both ends (see canvas_layout and ``_run_clips``; automata too
large for dense messages visit the live states in chunks, section 3b); it writes one
number per state and position, never one per edge, and the marginals' edge posteriors
are added up per position from both messages (dense) or inside the forward pass (live
lists). The passes that do not depend on each other, and the positions of the passes
over the vocabulary, run on numba's threads. Forward/backward run in probability
space with per-position scaling (float64), which is exact up to rounding for logits
within ~700 of the row maximum; Viterbi runs in log space.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, NamedTuple, TypeVar

import numba as nb
import numpy as np

from ..numba_threads import parallel_kernel, row_parts, serial_and_threaded
from .canvas_layout import EdgeLayout
from .float32_math import (KEY_NAN, KEY_NEG_INF, KEY_POS_INF, bits_to_float, exp_nonpositive, exp_sums, exp_to_88,
                           key_to_bits, order_key)
from .float64_math import exp_nonpositive as exp_nonpositive64
from .float64_math import log_positive

# ---- 1. score atoms: one pass over the logits per position --------------------------------


class SortedAtoms(NamedTuple):
    """The allowed tokens listed atom by atom (built once per grammar and vocabulary size):
    the tokens of atom k are perm[lo[k]:hi[k]], ascending. The atoms of one token come
    first, in the order of ``singles`` (the token of atom singles[j] is perm[j]), then the
    ``others`` (several tokens, or none at this vocabulary size): the first ``n_few`` of
    them have 2.._FEW tokens, which lie right after the singles' (perm[K1:terms], K1 the
    number of singles; the scan takes them term by term), the rest more (or none). An
    atom of more than _FEW tokens
    has blocks of _BLOCK tokens numbered blocks[k]..blocks[k + 1] - 1 (the scan keeps each
    block's sum for sampling); one of fewer has none."""

    atom_of: np.ndarray  # (V,) i32 the atom of each token, -1 where never allowed
    perm: np.ndarray  # (n,) i32 allowed token ids, grouped by atom
    lo: np.ndarray  # (K,) i64
    hi: np.ndarray  # (K,) i64
    blocks: np.ndarray  # (K + 1,) i64
    singles: np.ndarray  # (K1,) i64 the atoms of one token
    others: np.ndarray  # (K - K1,) i64 the rest: those of at most _FEW tokens, then the others, each ascending
    allowed: np.ndarray  # (n,) i32 the allowed tokens, ascending ...
    place: np.ndarray  # (n,) i32 ... and where each stands in perm
    n_few: int  # how many of ``others`` have at most _FEW tokens ...
    terms: int  # ... and the end of their tokens in perm (after the singles')


#: The vocabulary size from which the scan reads each row in token order and writes each
#: logit to its place in atom order, rather than reading the row in atom order: a row
#: larger than the core's L1 cache (32 KB) is then read at streaming speed, not by jumps
#: through L2 and L3 (30k: 7.4 -> 5.6 ms for 256 rows; 262k: 66 -> 43 ms; at 4k both stay
#: in L1, and the reads in atom order are a little faster: 0.6 vs 0.7 ms).
_SCATTER_FROM = 8192


def sorted_atoms(atom_of: np.ndarray, K: int) -> SortedAtoms:
    """The token lists of ``atom_of`` (V,) over K atoms, for the pass below."""
    allowed = np.flatnonzero(atom_of >= 0)
    count = np.bincount(atom_of[allowed], minlength=K)[:K]
    singles = np.flatnonzero(count == 1).astype(np.int64)
    few = (count > 1) & (count <= _FEW)
    others = np.concatenate([np.flatnonzero(few), np.flatnonzero((count == 0) | (count > _FEW))]).astype(np.int64)
    order = np.concatenate([singles, others])  # the atoms in perm's order
    at = np.empty(K, np.int64)  # each atom's place in that order
    at[order] = np.arange(K)
    perm = allowed[np.argsort(at[atom_of[allowed]], kind="stable")].astype(np.int32)
    hi = np.empty(K, np.int64)
    hi[order] = np.cumsum(count[order])
    lo = hi - count
    blocks = np.zeros(K + 1, np.int64)
    blocks[1:] = np.cumsum(np.where(count <= _FEW, 0, -(-count // _BLOCK)))
    place = np.empty(atom_of.shape[0], np.int32)
    place[perm] = np.arange(perm.shape[0], dtype=np.int32)
    n_few = int(few.sum())
    return SortedAtoms(atom_of, perm, lo, hi, blocks, singles, others, allowed.astype(np.int32), place[allowed],
                       n_few, singles.shape[0] + int(count[few].sum()))


#: Tokens per block of the scan's float32 sums (added up in float64 across blocks) and of
#: the sampler's walk inside an atom.
_BLOCK = 256
#: The most tokens of an atom the scan takes term by term, as it takes the one-token atoms
#: (one exp(x - rowmax) per token, in loops across all such atoms), rather than in loops
#: of its own: those cost ~40 ns an atom and row to set up, more than a few terms.
_FEW = 64
#: How far below the row's best (nats) an atom of a few tokens may lie and still be added
#: up from its float32 terms exp(x - rowmax): 87 - 50 = 37 nats of float32's exponent
#: range are left below its best, so the terms it flushes are under 2**-53 of that best's.
_FAR = np.float32(50.0)
#: Atoms of a few tokens from _FAR to _FAR + _LOWER below the row's best add up float32
#: terms exp(x - (rowmax - _LOWER)) instead, taken for all such atoms of the row in one
#: loop (up to e^80: float32 ends at e^88.7), and scaled back in float64: a model sure of
#: one token puts nearly every other atom there (one token 80 nats ahead: 122 of the 123
#: few-token atoms at 20 tools), where each took the large atoms' loops of its own.
_LOWER = np.float32(80.0)


# Atom statistics are reductions over each atom's tokens. Scattering every token into its
# atom's slot costs ~1.6 ns a token (each add waits for the previous add to the same
# slot). Instead each row is copied into atom order (``perm``; see _SCATTER_FROM for how
# it is read), which makes every atom one contiguous run, and each run is reduced by
# loops the compiler vectorises, exp included (see float32_math); the whole pass is one
# compiled call per step. A run is
# walked through a slice of the row, not ``range(lo, hi)`` over the row: numba vectorises
# only the former (10x). Most atoms of a tool grammar have one token (73 of 94 at BPE 4k,
# one tool; 614 of 747 at 20 tools) and most others a few (97 of the 133 others at 20
# tools have under 16): their tokens lie side by side at the start of the row, and each
# of their steps is one loop across all of them (one term exp(x - rowmax) per token)
# rather than a loop per atom, whose set-up costs ~25-40 ns an atom and row.


@nb.njit(cache=True, nogil=True, inline="always", fastmath={"contract"})
def _single_sums(e, key, bits, m, d):  # pragma: no cover - compiled
    """A one-token atom's sums (exp(x - m), and times x - m) from its float32 term ``e``
    and ``d`` = x - m (x's ``key`` and ``bits``): in float64 where float32 flushed the
    term (0 at -inf; a nan's term is nan, not flushed)."""
    gap = np.float64(bits_to_float(bits)) - np.float64(m)
    e64 = exp_nonpositive64(gap)
    far = (e == np.float32(0.0)) & (key > KEY_NEG_INF)
    s = e64 if far else np.float64(e)
    sx = e64 * gap if far else (np.float64(e) * np.float64(d) if e > np.float32(0.0) else np.float64(e))
    return s, sx


def _scan_kernel(want_sum: bool, want_x: bool):  # type: ignore[no-untyped-def]
    """The scan of rows r0..r1 - 1, compiled with or without the sums, and the entropy
    sums (compile-time flags keep the inner loops free of branches, which is what lets
    them vectorise). Without the sums (Viterbi alone) a nan is never an atom's best, as
    for max()."""

    @nb.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def scan_rows(logit_bits, perm, lo, hi, blocks, singles, others, allowed, place, n_few, terms, scatter,
                  singles_first, rowmax, asum, asumx, amax_bits, aarg, block_sums, r0, r1):  # pragma: no cover
        # logit_bits: the logits (N, V) as int32 bits (a float32 view of a local array is
        # not known to be contiguous, and its loops would not vectorise); singles_first:
        # singles[j] == j (the token automaton numbers its atoms so), and the one-token
        # atoms' statistics are written as runs, in loops that vectorise; the atoms
        # others[:n_few] have few tokens, perm[K1:terms], taken term by term as the
        # one-token atoms are
        K1 = singles.shape[0]
        bits = np.empty(perm.shape[0], np.int32)  # a row's allowed logits, atom after atom
        keys = np.empty(terms, np.int32)  # the keys of the tokens taken term by term ...
        e1 = np.empty(terms, np.float32)  # ... their exp(x - rowmax)
        d1 = np.empty(terms, np.float32)  # ... and x - rowmax
        e2 = np.empty(terms - K1, np.float32)  # the few-token atoms' exp(x - (rowmax - _LOWER))
        for r in range(r0, r1):
            row = logit_bits[r]
            r_amax = amax_bits[r]
            r_aarg = aarg[r]
            r_sum = asum[r]
            r_sumx = asumx[r]
            # the row in atom order (indices unsigned: a signed one is checked for
            # wrapping around from the end, which made this loop 1.6x slower)
            if scatter:
                for j in range(allowed.shape[0]):
                    bits[np.uint32(place[j])] = row[np.uint32(allowed[j])]
            else:
                # the row read once in token order first: right after a forward the
                # logits sit in L2/L3, and the gather's jumps through a row then wait
                # on each line, where one stream brings the row (16 KB at 4k) into
                # L1 (the step 0.93-0.96x right after a forward, 1.00-1.02x warm,
                # bench/results/constraint_ab_row_touch_*.md). The store keeps the
                # loop: without it the compiler drops it (measured: 1.00x)
                touch = np.int32(0)
                for t in range(row.shape[0]):
                    touch |= row[t]
                if perm.shape[0]:
                    bits[0] = touch  # (overwritten by the gather's first store)
                for j in range(perm.shape[0]):
                    bits[j] = row[np.uint32(perm[j])]
            # 1. each atom's best logit (as a key) and its first token; the row's best
            # finite one. A nan is an atom's best (its sums come out nan, and the caller
            # names the position).
            top_row = KEY_NEG_INF
            for j in range(terms):
                key = order_key(bits[j])
                if not want_sum:
                    key = KEY_NEG_INF if key == KEY_NAN else key
                keys[j] = key
                top_row = max(top_row, key if key < KEY_POS_INF else KEY_NEG_INF)
            if singles_first:
                for j in range(K1):
                    usable = keys[j] > KEY_NEG_INF
                    r_amax[j] = key_to_bits(keys[j]) if usable else np.int32(-8388608)  # 0xff800000: -inf
                    r_aarg[j] = perm[j] if usable else np.int32(-1)
            else:
                for j in range(K1):
                    k = singles[j]
                    if keys[j] <= KEY_NEG_INF:  # no usable logit
                        r_amax[k] = np.int32(-8388608)
                        r_aarg[k] = -1
                    else:
                        r_amax[k] = key_to_bits(keys[j])
                        r_aarg[k] = perm[j]
            for i in range(n_few):  # (their keys are in top_row already)
                k = others[i]
                run_keys = keys[lo[k]:hi[k]]
                packed = np.int64(-(2**63))  # (packed as below: no branch to mispredict)
                for j in range(run_keys.shape[0]):
                    packed = max(packed, (np.int64(run_keys[j]) << 32) | (np.int64(0xFFFFFFFF) - j))
                top = np.int32(packed >> 32)
                at = lo[k] + np.int64(0xFFFFFFFF) - (packed & np.int64(0xFFFFFFFF))
                r_amax[k] = key_to_bits(top) if top > KEY_NEG_INF else np.int32(-8388608)
                r_aarg[k] = perm[at] if top > KEY_NEG_INF else np.int32(-1)
            for i in range(n_few, others.shape[0]):
                # a max over keys packed with the run offset (key << 32 | (2**32 - 1 -
                # offset)): ties go to the lowest token
                k = others[i]
                run = bits[lo[k]:hi[k]]
                top = np.int64(-(2**63))
                for j in range(run.shape[0]):
                    key = order_key(run[j])
                    if not want_sum:
                        key = KEY_NEG_INF if key == KEY_NAN else key
                    top = max(top, (np.int64(key) << 32) | (np.int64(0xFFFFFFFF) - j))
                key = np.int32(top >> 32)
                if key <= KEY_NEG_INF:  # no usable logit (or no token at all)
                    r_amax[k] = np.int32(-8388608)
                    r_aarg[k] = -1
                else:
                    r_amax[k] = key_to_bits(key)
                    r_aarg[k] = perm[lo[k] + np.int64(0xFFFFFFFF) - (top & np.int64(0xFFFFFFFF))]
                    if key < KEY_POS_INF:  # finite
                        top_row = max(top_row, key)
            m = np.float32(0.0)
            if top_row > KEY_NEG_INF:
                m = bits_to_float(key_to_bits(top_row))
            rowmax[r] = m
            if not want_sum:
                continue
            # 2. the terms exp(x - rowmax) in float32 of the atoms of one token and of a
            # few: 0 at -inf; nan at nan or +inf. A one-token atom's sums are its term,
            # taken in float64 where float32 flushes it (more than 87 below the row's best).
            for j in range(terms):
                d = bits_to_float(bits[j]) - m
                e1[j] = exp_nonpositive(d)
                if want_x:
                    d1[j] = d
            # numbered first, the one-token atoms' sums are written as runs; the loop
            # below then runs only on a row where float32 flushed a term: it takes
            # those in float64 (with float64_math's exp, which vectorises: where a
            # model is sure of one token, most of a row's terms flush, and a libm exp
            # each added 0.3 ms to the 0.5 ms scan at 20 tools), and writes the others
            # again as they are
            flushed = 0
            if singles_first:
                for j in range(K1):
                    e = np.float64(e1[j])
                    r_sum[j] = e
                    if want_x:
                        r_sumx[j] = e * np.float64(d1[j]) if e > 0.0 else e  # 0 * -inf is nan
                    flushed += (e1[j] == np.float32(0.0)) & (keys[j] > KEY_NEG_INF)
            if flushed and singles_first:  # (two loops: the runs' stores vectorise)
                for j in range(K1):
                    r_sum[j], sx = _single_sums(e1[j], keys[j], bits[j], m, d1[j] if want_x else np.float32(0.0))
                    if want_x:
                        r_sumx[j] = sx
            for j in range(0 if singles_first else K1):
                k = singles[j]
                r_sum[k], sx = _single_sums(e1[j], keys[j], bits[j], m, d1[j] if want_x else np.float32(0.0))
                if want_x:
                    r_sumx[k] = sx
            # 3. every other atom. One of a few tokens adds up its terms, where its best
            # lies within _FAR of the row's best (terms float32 flushes there are less
            # than 2**-53 of that best's: left out), or within _FAR + _LOWER, its terms
            # taken from a reference _LOWER lower (ref2, float32; the scale back,
            # exp(ref2 - rowmax), in float64: no rounding is shared by the terms)
            scale2 = -1.0  # (e2 not taken yet in this row)
            for i in range(others.shape[0]):
                k = others[i]
                b = bits_to_float(r_amax[k])
                near = not b - m < -_FAR  # (nan and +inf too: their terms make nan sums)
                if i < n_few and (near or not b - m < -(_FAR + _LOWER)):
                    if not near and scale2 < 0.0:
                        ref2 = m - _LOWER
                        for j in range(K1, terms):
                            e2[j - K1] = exp_to_88(bits_to_float(bits[j]) - ref2)
                        scale2 = math.exp(np.float64(ref2) - np.float64(m))
                    run_e = e1[lo[k]:hi[k]] if near else e2[lo[k] - K1:hi[k] - K1]
                    run_d = d1[lo[k]:hi[k]]
                    s = 0.0
                    sx = 0.0
                    for j in range(run_e.shape[0]):
                        e = np.float64(run_e[j])
                        s += e
                        if want_x:
                            sx += e * np.float64(run_d[j]) if e > 0.0 else e
                    scale = 1.0 if near else scale2
                    r_sum[k] = s * scale
                    if want_x:
                        r_sumx[k] = sx * scale
                    continue
                # the others' sums around their own best b (every term <= 1, so an atom
                # far below the row's best keeps its precision, where a few-token atom's
                # terms near float32's end would lose it, or flush), moved to rowmax in
                # float64: asum = exp(b - rowmax) * sum exp(x - b), asumx likewise with
                # (x - rowmax); a block sum for each block (an atom of a few has none)
                if r_aarg[k] < 0:
                    r_sum[k] = 0.0
                    if want_x:
                        r_sumx[k] = 0.0
                    block_sums[r, blocks[k]:blocks[k + 1]] = 0.0
                    continue
                run = bits[lo[k]:hi[k]]
                s = 0.0
                sx = 0.0
                for j0 in range(0, run.shape[0], _BLOCK):
                    # float32 sums over a block, float64 across blocks (a nan or +inf
                    # logit makes them nan: the caller refuses it)
                    bs, bsx = exp_sums(run[j0:j0 + _BLOCK], b)
                    if blocks[k] < blocks[k + 1]:
                        block_sums[r, blocks[k] + j0 // _BLOCK] = bs
                    s += bs
                    sx += bsx
                gap = np.float64(b) - np.float64(m)
                scale = math.exp(gap)
                r_sum[k] = scale * s
                if want_x:
                    r_sumx[k] = scale * (sx + gap * s)

    return scan_rows


_scan_rows_max = _scan_kernel(False, False)
_scan_rows_sums = _scan_kernel(True, False)
_scan_rows_sums_x = _scan_kernel(True, True)


def _scan_launcher(want_sum: bool, want_x: bool):  # type: ignore[no-untyped-def]
    """The scan's rows shared out across numba's threads. The rows' kernel is compiled on
    its own and called here: numba's parallel pipeline over the scan's whole body took
    8.2 s to compile, this 5.9 (a fresh install compiles it at its first step). It is
    named as a module global, not held in this closure, whose cells numba's disk cache
    hashes (a kernel pickles with a new id in each process: the cache never hit); the
    branch on the flags is decided at compile time, and only the kernel taken is
    compiled."""

    @parallel_kernel(cache=True, nogil=True)
    def scan(logit_bits, perm, lo, hi, blocks, singles, others, allowed, place, n_few, terms, scatter, singles_first,
             rowmax, asum, asumx, amax_bits, aarg, block_sums, parts):  # pragma: no cover
        N = logit_bits.shape[0]
        for part in nb.prange(parts):  # rows are independent: a share of them per thread (see row_parts)
            r0, r1 = part * N // parts, (part + 1) * N // parts
            if want_x:
                _scan_rows_sums_x(logit_bits, perm, lo, hi, blocks, singles, others, allowed, place, n_few, terms,
                                  scatter, singles_first, rowmax, asum, asumx, amax_bits, aarg, block_sums, r0, r1)
            elif want_sum:
                _scan_rows_sums(logit_bits, perm, lo, hi, blocks, singles, others, allowed, place, n_few, terms,
                                scatter, singles_first, rowmax, asum, asumx, amax_bits, aarg, block_sums, r0, r1)
            else:
                _scan_rows_max(logit_bits, perm, lo, hi, blocks, singles, others, allowed, place, n_few, terms,
                               scatter, singles_first, rowmax, asum, asumx, amax_bits, aarg, block_sums, r0, r1)

    return scan


_scan_max = _scan_launcher(False, False)  # viterbi
_scan_sums = _scan_launcher(True, False)  # sample, marginals
_scan_sums_x = _scan_launcher(True, True)  # marginals with entropies, denoise_step


@parallel_kernel(cache=True, nogil=True)
def _max_atoms(x, atom_of, amax, aarg):  # pragma: no cover - compiled
    """Each atom's best logit and its lowest token, in one pass over each row in token
    order, for vocabularies from 8k tokens (Viterbi needs no sums, and rows read in
    token order stream in faster than gathered into atom order: 4.4 vs 7.0 ms at 30k, 1
    tool; below, the scan's gather and key maxima win, more so with many atoms, whose
    updates here mispredict: BPE 4k, 0.70 vs 0.81 ms at 1 tool, 1.13 vs 2.13 at 20).
    The update is rare after the first tokens, so its branch is predicted; a nan never
    compares greater, so it is never an atom's best."""
    N, V = x.shape
    for n in nb.prange(N):
        row = x[n]
        mx = amax[n]
        am = aarg[n]
        for t in range(V):
            k = atom_of[t]
            if k >= 0 and row[t] > mx[k]:
                mx[k] = row[t]
                am[k] = t


def reduce_atoms(logits, atoms, want_sum, want_x, block_sums=None):  # type: ignore[no-untyped-def]
    """logits (N, V), ``atoms`` from :func:`sorted_atoms` -> rowmax (N,) f64, asum/asumx
    (N, K) f64, amax (N, K) f32, aarg (N, K) i32.

    amax[n, k] is atom k's best logit in row n (nan aside; -inf when it has none) and
    aarg[n, k] the lowest token reaching it (-1 when none); rowmax[n] is the best finite
    allowed logit of row n (0 if there is none). With ``want_sum``,
    asum[n, k] = sum over tokens t of atom k of exp(logits[n, t] - rowmax[n]), and asumx
    (with ``want_x``) weighs the same terms by (logits[n, t] - rowmax[n]); an allowed nan
    or +inf logit makes its atom's sums nan. An atom of more than _FEW tokens, or of fewer
    whose best lies more than _FAR + _LOWER below the row's best, is summed around its own
    best logit and scaled in float64; another atom of several tokens adds up its float32
    terms exp(x - rowmax), or from _FAR down exp(x - (rowmax - _LOWER)) scaled in float64
    (those float32 flushes weigh under 2**-53 of its best's), and an atom of one token is
    its one term, taken in float64 where float32 would flush it (87 nats below the row's
    best): so an atom far below the row's best (as low temperatures make them: the demo
    model's logits span ~360 nats at 0.1) keeps its precision down to ~1e-308; the float32
    terms are good to ~|x - ref| * 6e-8 relative (|x - ref| < 87 for a term that counts).
    ``block_sums`` (N,
    atoms.blocks[-1]) float32, when given, receives the sum of exp(x - amax) over each
    block of each atom of more than _FEW tokens (see ``_sample_tokens``).
    """
    N, V = logits.shape
    atom_of, perm, lo, hi, blocks, singles, others, allowed, place, n_few, terms = atoms
    K = lo.shape[0]
    singles_first = singles.shape[0] == 0 or singles[-1] == singles.shape[0] - 1  # (ascending: singles[j] == j)
    rowmax = np.zeros(N, np.float64)
    if not want_sum and V >= _SCATTER_FROM:  # (the atoms' maxima streamed in token order: see _max_atoms)
        amax = np.full((N, K), -np.inf, np.float32)
        aarg = np.full((N, K), -1, np.int32)
        _max_atoms(logits, atom_of, amax, aarg)
        if K:
            best = np.max(np.where(np.isfinite(amax), amax, -np.inf), axis=1)
            rowmax = np.where(np.isfinite(best), best, 0.0).astype(np.float64)
        return rowmax, np.zeros((N, 1)), np.zeros((N, 1)), amax, aarg
    amax = np.empty((N, K), np.float32)
    aarg = np.empty((N, K), np.int32)
    if not want_sum:  # the maxima of the scan alone, rows gathered into atom order
        _scan_max(np.ascontiguousarray(logits).view(np.int32), perm, lo, hi, blocks, singles, others, allowed, place,
                  n_few, terms, False, singles_first, rowmax, np.zeros((N, 0)), np.zeros((N, 0)),
                  amax.view(np.int32), aarg, np.zeros((N, 0), np.float32), row_parts(N))
        return rowmax, np.zeros((N, 1)), np.zeros((N, 1)), amax, aarg
    asum = np.zeros((N, K), np.float64)
    asumx = np.zeros((N, K) if want_x else (N, 1), np.float64)
    if block_sums is None:
        block_sums = np.empty((N, blocks[-1]), np.float32)
    kernel = _scan_sums_x if want_x else _scan_sums
    kernel(np.ascontiguousarray(logits).view(np.int32), perm, lo, hi, blocks, singles, others, allowed, place,
           n_few, terms, V >= _SCATTER_FROM, singles_first, rowmax, asum, asumx, amax.view(np.int32), aarg, block_sums,
           row_parts(N))
    return rowmax, asum, asumx, amax, aarg


# Group statistics are added up over all positions at once, along the positions (atoms by
# positions): one vectorised loop per (group, part) pair instead of a scalar add per
# position (20 tools: 13k pairs, 4.6 -> 1 ms for the sums). Groups overlap: most contain
# a smaller group (a string's characters but the quote, and with one more character), and
# the large ones (texts, strings) share most of their atoms without containing each
# other. So each group is built from parts (``GroupPlan``): groups it contains, *blocks*
# (atoms that lie in the same groups, added up once for all of those), and atoms. At 20
# tools, BPE 4k, 13,466 (group, atom) pairs take 2,312 row operations (4,145 when a group
# was one smaller group plus atoms, and each group's row was first filled); at Gemma's
# 262k 28,394 take 4,475 (8,137). The group maxima 0.7-0.8x, the sums 0.7-0.9x at 20
# tools (bench/results/constraint_ab_group_blocks.md).


class GroupPlan(NamedTuple):
    """How to build every group's statistics from its atoms': nodes (the groups 0..G - 1,
    then blocks of atoms) in ``order``, each the row of node ``base`` (-1: none; built
    before it, a subset) plus the parts extra[extra_offsets[n]:extra_offsets[n + 1]] (an
    atom k < K, or node p as K + p; disjoint, built before it). The values of a node are
    its parts' in this order, which the atom draw walks back down (``_draw_edge_and_atom``)."""

    order: np.ndarray  # (N,) i64
    base: np.ndarray  # (N,) i64
    extra_offsets: np.ndarray  # (N + 1,) i64
    extra: np.ndarray  # (n,) i32
    n_groups: int  # G: the nodes past it are blocks


@nb.njit(cache=True, nogil=True)
def _atom_blocks(group_atoms, group_offsets, K):  # pragma: no cover - compiled
    """The nodes' atoms (n,) i32 and offsets (G + B + 1,) i64: the G groups', then those of
    the B blocks worth a node of their own. A block is a class of atoms that lie in the
    same groups of two atoms or more, where the class holds two atoms or more, lies in two
    such groups or more, and is not itself a group. Partition refinement finds the
    classes: each group splits those it meets into its atoms and the rest."""
    G = group_offsets.shape[0] - 1
    cls = np.zeros(K, np.int64)  # class 0: atoms in no group of two atoms or more
    split_to = np.empty(group_atoms.shape[0] + 2, np.int64)  # (a new class per (group, class met))
    split_to.fill(-1)
    touched = np.empty(K, np.int64)
    n_cls = 1
    for g in range(G):
        a0, a1 = group_offsets[g], group_offsets[g + 1]
        if a1 - a0 < 2:
            continue
        n_touched = 0
        for i in range(a0, a1):  # the group's atoms leave their class for a new one
            c = cls[group_atoms[i]]
            if split_to[c] < 0:
                split_to[c] = n_cls
                n_cls += 1
                touched[n_touched] = c
                n_touched += 1
            cls[group_atoms[i]] = split_to[c]
        for t in range(n_touched):
            split_to[touched[t]] = -1
    size = np.zeros(n_cls, np.int64)
    for k in range(K):
        size[cls[k]] += 1
    n_groups = np.zeros(n_cls, np.int64)  # the groups of two atoms or more a class lies in
    is_group = np.zeros(n_cls, np.bool_)
    seen = np.empty(n_cls, np.int64)
    seen.fill(-1)
    for g in range(G):
        a0, a1 = group_offsets[g], group_offsets[g + 1]
        if a1 - a0 < 2:
            continue
        met = 0
        for i in range(a0, a1):
            c = cls[group_atoms[i]]
            if seen[c] != g:
                seen[c] = g
                n_groups[c] += 1
                met += 1
        c = cls[group_atoms[a0]]
        if met == 1 and size[c] == a1 - a0:
            is_group[c] = True
    block_of = np.empty(n_cls, np.int64)
    block_of.fill(-1)
    B = 0
    for c in range(1, n_cls):
        if size[c] >= 2 and n_groups[c] >= 2 and not is_group[c]:
            block_of[c] = B
            B += 1
    G1 = group_atoms.shape[0]  # the nodes' atoms: the groups', then each block's
    offsets = np.zeros(G + B + 1, np.int64)
    for g in range(G + 1):
        offsets[g] = group_offsets[g]
    for k in range(K):
        b = block_of[cls[k]]
        if b >= 0:
            offsets[G + b + 1] += 1
    for b in range(B):
        offsets[G + b + 1] += offsets[G + b]
    atoms = np.empty(offsets[G + B], np.int32)
    for i in range(G1):
        atoms[i] = group_atoms[i]
    fill = np.empty(B, np.int64)
    for b in range(B):
        fill[b] = offsets[G + b]
    for k in range(K):
        b = block_of[cls[k]]
        if b >= 0:
            atoms[fill[b]] = k
            fill[b] += 1
    return atoms, offsets


@nb.njit(cache=True, nogil=True)
def _plan_nodes(node_atoms, node_offsets, K):  # pragma: no cover - compiled
    N = node_offsets.shape[0] - 1
    W = (K + 63) // 64
    bits = np.zeros((N, W), np.uint64)
    size = np.empty(N, np.int64)
    for n in range(N):
        size[n] = node_offsets[n + 1] - node_offsets[n]
        for i in range(node_offsets[n], node_offsets[n + 1]):
            k = node_atoms[i]
            bits[n, k >> 6] |= np.uint64(1) << np.uint64(k & 63)
    # a node's parts are nodes built before it, so smaller (no group of two atoms or more
    # lies inside a block: blocks need no order of their own)
    order = np.argsort(size, kind="mergesort")
    base = np.empty(N, np.int64)
    base.fill(-1)
    parts = np.empty(node_atoms.shape[0], np.int32)  # each node's parts but its base, in build order
    first = np.empty(N, np.int64)  # where they start in it
    n_parts = 0
    rest = np.empty(W, np.uint64)
    for a in range(N):
        n = order[a]
        for w in range(W):
            rest[w] = bits[n, w]
        left = size[n]
        first[n] = n_parts
        for b in range(a - 1, -1, -1):  # a greedy cover by disjoint nodes, the largest first
            if left == 0:
                break
            h = order[b]
            if size[h] < 2 or size[h] > left:
                continue
            inside = True
            for w in range(W):
                if bits[h, w] & ~rest[w]:
                    inside = False
                    break
            if not inside:
                continue
            for w in range(W):
                rest[w] &= ~bits[h, w]
            left -= size[h]
            if base[n] < 0:
                base[n] = h
            else:
                parts[n_parts] = K + h
                n_parts += 1
        for i in range(node_offsets[n], node_offsets[n + 1]):  # then the atoms no part holds, in the node's order
            k = node_atoms[i]
            if (rest[k >> 6] >> np.uint64(k & 63)) & np.uint64(1):
                parts[n_parts] = k
                n_parts += 1
    extra_offsets = np.zeros(N + 1, np.int64)  # the parts in node order
    for a in range(N):
        n = order[a]
        end = first[order[a + 1]] if a + 1 < N else n_parts
        extra_offsets[n + 1] = end - first[n]
    for n in range(N):
        extra_offsets[n + 1] += extra_offsets[n]
    extra = np.empty(n_parts, np.int32)
    for n in range(N):
        for i in range(extra_offsets[n + 1] - extra_offsets[n]):
            extra[extra_offsets[n] + i] = parts[first[n] + i]
    return order, base, extra_offsets, extra


def group_plan(group_atoms: np.ndarray, group_offsets: np.ndarray, K: int) -> GroupPlan:
    """The ``GroupPlan`` of groups given as lists of atoms (of K): the blocks found by
    partition refinement, then each node covered greedily by the largest nodes it
    contains (one pass over the pairs of nodes, on bit sets), then its other atoms."""
    return GroupPlan(*_plan_nodes(*_atom_blocks(group_atoms, group_offsets, K), K),
                     n_groups=group_offsets.shape[0] - 1)


@nb.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _add_into(out, x):  # pragma: no cover - compiled
    for j in range(out.shape[0]):
        out[j] += x[j]


# Elementwise maxima are written with np.fmax: ``out[j] = max(out[j], v)`` compiles to a
# compare and a masked store, which AMD's cores microcode (2.4x slower an element than
# fmax's compare and blend, measured on this project's EPYC). fmax ignores a nan v as
# max() does (out is never nan here).


@nb.njit(cache=True, nogil=True)
def _max_into(out, x):  # pragma: no cover - compiled
    for j in range(out.shape[0]):
        out[j] = np.fmax(out[j], x[j])


@nb.njit(cache=True, nogil=True)
def _max_from(out, x):  # pragma: no cover - compiled
    for j in range(out.shape[0]):
        out[j] = np.fmax(x[j], -np.inf)  # (a copy, but for a nan: as _max_into into -inf)


def _group_kernel(want_max: bool):  # type: ignore[no-untyped-def]
    """The reduction of per-atom values (L, K) over each node's parts -> (L, N), along a
    ``GroupPlan``: their sum (float64), or with ``want_max`` (a compile-time flag, as for
    the scan) their max, of the values' type: the logits' float32, exact, in half the
    memory traffic of float64 (0.22 -> 0.15 ms at 20 tools, BPE 4k). The result is the
    transpose of the (N, L) array the reduction fills (Fortran order), not a copy in C
    order: the copy took more than the sums (BPE 4k, 20 tools: 0.64 vs 0.24 ms), and the
    pruned passes read a step's group values at a few cells each (the step 0.90x at 20
    tools, 0.96x at 1; the whole lattice's passes, which read every group at every
    position, 1.02x; bench/results/constraint_ab_group_values_*.md)."""

    @nb.njit(cache=True, nogil=True)
    def reduce(values, order, base, extra_offsets, extra):  # pragma: no cover - compiled
        K = values.shape[1]
        by_atom = np.ascontiguousarray(values.T)  # (K, L)
        by_node = np.empty((order.shape[0], values.shape[0]), values.dtype if want_max else np.float64)  # (N, L)
        for a in range(order.shape[0]):
            n = order[a]
            row = by_node[n]
            i0, i1 = extra_offsets[n], extra_offsets[n + 1]
            if base[n] >= 0:
                row[:] = by_node[base[n]]
            elif i0 == i1:
                row[:] = -np.inf if want_max else 0.0
            for i in range(i0, i1):
                e = extra[i]
                part = by_atom[e] if e < K else by_node[e - K]
                if base[n] < 0 and i == i0:  # the first part copied: a node of one atom is one pass
                    if want_max:
                        _max_from(row, part)
                    else:
                        row[:] = part
                elif want_max:
                    _max_into(row, part)
                else:
                    _add_into(row, part)
        return by_node.T

    return reduce


_group_sums_kernel = _group_kernel(False)
_group_max_kernel = _group_kernel(True)


def group_node_sums(asum: np.ndarray, plan: GroupPlan) -> np.ndarray:
    """(L, N), in Fortran order: the sum of asum (L, K) over each node's atoms, the G
    groups' (``group_sums``) and then the plan's blocks', as the atom draw walks them
    (``_draw_edge_and_atom``)."""
    return _group_sums_kernel(asum, *plan[:4])


def group_sums(asum: np.ndarray, plan: GroupPlan) -> np.ndarray:
    """gsum (L, G), in Fortran order: the sum of asum (L, K) over each group's atoms."""
    return group_node_sums(asum, plan)[:, :plan.n_groups]


def group_max(amax: np.ndarray, plan: GroupPlan) -> np.ndarray:
    """gmax (L, G) float32, in Fortran order: the best logit of each group's atoms (amax
    (L, K) float32); which token reaches it is looked up only where the Viterbi canvas takes the
    group (``group_best_tokens``)."""
    return _group_max_kernel(amax, *plan[:4])[:, :plan.n_groups]


# ---- 2. the support: states that lie on some valid canvas, per position ------------------
# Computed once per (canvas length, start state, ending rule) and reused by every
# denoising step, as masks (``support``) that zero the passes' messages at dead states:
# a state reachable from the start but unable to finish the canvas in the positions left
# would otherwise carry mass that no valid canvas has, and could crowd the live states'
# mass out of float64's range.


@nb.njit(cache=True, nogil=True, inline="always")
def _or_into(out, x):  # pragma: no cover - compiled
    for j in range(out.shape[0]):
        out[j] |= x[j]


@nb.njit(cache=True, nogil=True, inline="always")
def _fill_or(out, v):  # pragma: no cover - compiled
    for j in range(out.shape[0]):
        out[j] |= v


@nb.njit(cache=True, nogil=True, inline="always")
def _or_along_edges(out, out_rows, x, x_rows, runs, fans, forward):  # pragma: no cover - compiled
    """out[out_rows[e]] |= x[x_rows[e]] over every edge e, a run or a fan as one loop over
    a slice of bytes: (dst, src) pulls forward along the edges (``forward``: a fan's
    sources into its one row), (src, dst) backward (its one row out to its sources)."""
    for r in range(runs.shape[0] - 1):
        e = runs[r]
        n = runs[r + 1] - e
        _or_into(out[out_rows[e]:out_rows[e] + n], x[x_rows[e]:x_rows[e] + n])
    for f in range(fans.shape[0] - 1):
        e = fans[f]
        n = fans[f + 1] - e
        if forward:
            sources = x[x_rows[e]:x_rows[e] + n]
            v = np.uint8(0)
            for j in range(sources.shape[0]):
                v |= sources[j]
            out[out_rows[e]] |= v
        else:
            _fill_or(out[out_rows[e]:out_rows[e] + n], x[x_rows[e]])
    for e in range(fans[-1], out_rows.shape[0]):
        out[np.uint32(out_rows[e])] |= x[np.uint32(x_rows[e])]


@nb.njit(cache=True, nogil=True)
def _live_rows(src, dst, runs, fans, S, start_row, final_rows, L):  # pragma: no cover - compiled
    """live (L + 1, S) u8 by the layout's rows (see canvas_layout): 1 where the row's
    state lies on a valid canvas at position l, i.e. the start reaches it in exactly l
    tokens and it reaches an accepting state in exactly L - l more. Both sweeps go over
    the edges as the passes do."""
    fwd = np.zeros((L + 1, S), np.uint8)  # reached from the start in exactly l tokens
    fwd[0, start_row] = 1
    for l in range(L):
        _or_along_edges(fwd[l + 1], dst, fwd[l], src, runs, fans, True)
    live = np.zeros((L + 1, S), np.uint8)
    for j in range(S):
        live[L, j] = fwd[L, j] & final_rows[j]
    for l in range(L - 1, -1, -1):
        out = live[l]
        _or_along_edges(out, src, live[l + 1], dst, runs, fans, False)
        f = fwd[l]
        for j in range(S):
            out[j] &= f[j]
    return live


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


# ---- 3. forward / backward: dense messages, edges in runs ----------------------------------
# Messages are dense over the automaton's states at each position, zero (or -inf) where a
# state is not live; each position is rescaled by its total so float64 never under- or
# overflows (the posteriors below are ratios within one position).
#
# A pass pulls every state's value over its outgoing (backward) or incoming (forward)
# edges. The states are numbered so that the counters' edges form runs (see
# canvas_layout): a run is one branch-free loop over contiguous rows,
#     value[a:a + n] += weight[g] * message[b:b + n],
# and dead states cost a multiply by 0, which is cheaper than looking up which states
# live. A fan (consecutive rows into one row, one group) is one loop too: a sum of a
# slice (forward) or an add to every row of a slice (backward). The remaining edges are
# pulled one by one, row by row. All passes and the sampler share the one numbering, so
# beta needs no reordering between them.
#
# Viterbi, alpha and beta do not depend on each other: a step runs them as tasks on
# numba's threads (``_dense_passes``), then the posteriors from alpha and beta, whose
# positions are independent (``_factors``). One sweep for the forward sums, posteriors
# and Viterbi together had saved nothing on dense messages (1.14 ms vs 0.67 + 0.52 at
# 1 tool, BPE 4k).


class Support(NamedTuple):
    """The states that lie on some valid canvas at each position (see ``_live_rows``):
    a mask in the layout's row order, their count, and, for the live-list passes, their
    lists (made only for those: at twenty tools, 8M entries cost 44 ms a canvas, more
    than the mask)."""

    offsets: np.ndarray  # (L + 2,) i64 offsets[l + 1] - offsets[l] states live at l
    states: np.ndarray  # (offsets[-1],) i32, states[offsets[l]:offsets[l + 1]] live at l; (0,) when dense
    live: np.ndarray  # (L + 1, S) u8 by row; (0, S) for the lists alone (a pruned support: see pruning.py)
    dense: bool  # whether the dense passes run (else the live-list ones)
    clip: np.ndarray  # (L, runs, 2) i32 for the dense passes (see _run_clips); (0, 0, 2) otherwise


@nb.njit(cache=True, nogil=True)
def _run_clips(live, src, dst, runs):  # pragma: no cover - compiled
    """(L, R, 2): for each position l and run r, the edges [a, b) of the run (offsets into
    it) from its first to its last edge whose source lives at l and destination at l + 1.
    An edge outside carries nothing in any dense pass (its source's message is 0, or -inf,
    or its destination is masked after it), and a third of the run edges of twenty tools
    lie there (BPE 4k, L=256): the passes walk the clipped runs only, to the same numbers
    (the factors' dot products up to rounding: they add fewer zeros)."""
    L = live.shape[0] - 1
    R = runs.shape[0] - 1
    clip = np.zeros((L, R, 2), np.int32)
    longest = 0
    for r in range(R):
        longest = max(longest, runs[r + 1] - runs[r])
    both = np.zeros(-(-longest // 8) * 8, np.uint8)  # a run's edges, 1 where both ends live
    words = both.view(np.uint64)  # ... read 8 at a time to find the first and the last
    for l in range(L):
        here = live[l]
        there = live[l + 1]
        for r in range(R):
            e = runs[r]
            n = runs[r + 1] - e
            s0 = src[e]
            d0 = dst[e]
            h = here[s0:s0 + n]  # (slices: a loop over them vectorises)
            t = there[d0:d0 + n]
            for j in range(n):
                both[j] = h[j] & t[j]
            nw = -(-n // 8)
            for j in range(n, nw * 8):
                both[j] = 0
            i = 0
            while i < nw and words[i] == 0:
                i += 1
            if i == nw:
                continue  # no edge of the run carries anything: [0, 0)
            a = 8 * i
            while both[a] == 0:
                a += 1
            i = nw - 1
            while words[i] == 0:
                i -= 1
            b = min(8 * i + 8, n)
            while both[b - 1] == 0:
                b -= 1
            clip[l, r, 0] = a
            clip[l, r, 1] = b
    return clip


@nb.njit(cache=True, nogil=True)
def _set_columns(mask, n):  # pragma: no cover - compiled
    """The column of each of the n set entries of ``mask`` (rows, S) u8, row after row
    (np.nonzero takes 5x as long: it makes both coordinates in int64)."""
    out = np.empty(n + 1, np.int32)  # (one slot past the end: every column is written)
    i = 0
    for r in range(mask.shape[0]):
        row = mask[r]
        for j in range(row.shape[0]):
            out[i] = j
            i += row[j] != 0
    return out[:n]


def support(layout: EdgeLayout, start: int, final: np.ndarray, L: int, kind: str = "auto") -> Support:
    """The support of canvases of L positions from state ``start`` (``final`` (S,) bool:
    the states a canvas may end in), for the dense passes (``kind`` "dense", or "auto"
    and ``dense_pays``) or else the live-list ones ("live")."""
    S = layout.rank.shape[0]
    live = _live_rows(layout.src, layout.dst, layout.runs, layout.fans, S, layout.rank[start],
                      final[layout.state].view(np.uint8), L)  # (L + 1, S) by row
    offsets = np.zeros(L + 2, np.int64)
    np.cumsum(live.sum(axis=1, dtype=np.int64), out=offsets[1:])
    dense = kind == "dense" or (kind == "auto" and dense_pays(S, offsets))
    # the lists by position, then state
    states = np.zeros(0, np.int32) if dense else _set_columns(live[:, layout.rank], offsets[-1])
    clip = _run_clips(live, layout.src, layout.dst, layout.runs) if dense else np.zeros((0, 0, 2), np.int32)
    return Support(offsets, states, live, dense, clip)


# A run's loop goes over slices of the two rows (a loop over ``range(lo, hi)`` of the rows
# would not vectorise). Its helpers are inlined into the passes by numba
# (``inline="always"``): called as functions of their own they cost 15-25% more a pass
# (BPE 4k, 1 and 5 tools). The masking loops below stay functions of their own: inlined
# into the passes' bodies they lost their vectorisation (2x slower inside _backward).


@nb.njit(cache=True, nogil=True, inline="always", fastmath={"reassoc", "contract"})
def _axpy(out, w, x):  # pragma: no cover - compiled
    for j in range(out.shape[0]):
        out[j] += w * x[j]


@nb.njit(cache=True, nogil=True, inline="always", fastmath={"reassoc", "contract"})
def _dot(x, y):  # pragma: no cover - compiled
    t = 0.0
    for j in range(x.shape[0]):
        t += x[j] * y[j]
    return t


@nb.njit(cache=True, nogil=True, inline="always", fastmath={"reassoc", "contract"})
def _add_to_all(out, w):  # pragma: no cover - compiled
    for j in range(out.shape[0]):
        out[j] += w


@nb.njit(cache=True, nogil=True, inline="always", fastmath={"reassoc", "contract"})
def _total(x):  # pragma: no cover - compiled
    t = 0.0
    for j in range(x.shape[0]):
        t += x[j]
    return t


@nb.njit(cache=True, nogil=True, inline="always")
def _best(x):  # pragma: no cover - compiled
    """max of x (-inf when empty)."""
    t = -np.inf
    for j in range(x.shape[0]):
        t = max(t, x[j])
    return t


@nb.njit(cache=True, nogil=True, inline="always")
def _max_plus(out, w, x):  # pragma: no cover - compiled
    """out = max(out, x + w), a run's Viterbi pull (max() here would compile to a masked
    store: see _max_into)."""
    for j in range(out.shape[0]):
        out[j] = np.fmax(out[j], x[j] + w)


@nb.njit(cache=True, nogil=True, inline="always", fastmath={"reassoc", "contract"})
def _axpy_max_plus(out, w, x, vout, v, vx):  # pragma: no cover - compiled
    """A run's sum pull (``_axpy``) and its Viterbi pull (``_max_plus``) in one loop, the
    same numbers: the run's bounds are loaded and its loop set up once."""
    for j in range(out.shape[0]):
        out[j] += w * x[j]
        vout[j] = np.fmax(vout[j], vx[j] + v)


# A pass adds its edges into a row that starts empty (0, or -inf for Viterbi), and the
# buffers are reused (see MessageBuffers): each row must be cleared first. The masking
# loops clear the row the pass fills next as they go (``following``), which at twenty
# tools, whose rows (49k states) outgrow the caches, costs 6% less a pass than a sweep
# of its own; the first row to fill is cleared before the loop.


@nb.njit(cache=True, nogil=True, inline="always")
def _clipped_run(src, dst, e, clip_r):  # pragma: no cover - compiled
    """The live stretch of the run starting at edge e, given its clip at this position
    (``Support.clip[l, r]``): (first source row, first destination row, length)."""
    return src[e] + clip_r[0], dst[e] + clip_r[0], clip_r[1] - clip_r[0]


@nb.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _mask_total(out, live, following):  # pragma: no cover - compiled
    """Zero out where not live, and ``following`` everywhere; returns out's total."""
    t = 0.0
    for j in range(out.shape[0]):
        v = out[j] if live[j] else 0.0
        out[j] = v
        following[j] = 0.0
        t += v
    return t


@nb.njit(cache=True, nogil=True)
def _mask_live(out, live, following):  # pragma: no cover - compiled
    """-inf where not live, and in ``following`` everywhere; returns whether a live value
    is above -inf (a count, which vectorises where a float max does not)."""
    n = 0
    for j in range(out.shape[0]):
        v = out[j] if live[j] else -np.inf
        out[j] = v
        following[j] = -np.inf
        n += v > -np.inf
    return n > 0


@nb.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _mask_both(out, vout, live, following, vfollowing):  # pragma: no cover - compiled
    """``_mask_total`` of out and ``_mask_live`` of vout in one loop over ``live``:
    returns (out's total, whether vout has a live value above -inf)."""
    t = 0.0
    n = 0
    for j in range(out.shape[0]):
        is_live = live[j]
        v = out[j] if is_live else 0.0
        out[j] = v
        following[j] = 0.0
        t += v
        w = vout[j] if is_live else -np.inf
        vout[j] = w
        vfollowing[j] = -np.inf
        n += w > -np.inf
    return t, n > 0


@nb.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _backward_into(beta, gsum, live, src, dst, group, runs, clip, fans, totals):  # pragma: no cover
    """beta (L + 1, S), any contents <- beta[l, j] ∝ weight of the valid completions of
    the canvas from row j at position l (0 where j is not live); False when there are
    none. Each row is known up to its own factor (every use normalises within a
    position): its total divides the next row's weights instead of a pass over the row.
    totals (L + 1,) <- each row's total, from which ``log_mass_backward`` recovers the
    canvas's mass."""
    L = gsum.shape[0]
    S = live.shape[1]
    G = gsum.shape[1]
    E = src.shape[0]
    n_final = 0.0
    for j in range(S):
        beta[L, j] = 1.0 if live[L, j] else 0.0
        n_final += beta[L, j]
    totals[L] = n_final
    gsi = np.empty(G, np.float64)  # the group weights at l, divided by the total of row l + 1
    spare = np.empty(S, np.float64)  # (what the last row's masking clears)
    if L > 0:
        beta[L - 1, :] = 0.0
    scale = 1.0
    for l in range(L - 1, -1, -1):
        gs = gsum[l]
        for g in range(G):
            gsi[g] = gs[g] * scale
        nxt = beta[l + 1]
        out = beta[l]
        cl = clip[l]
        for r in range(runs.shape[0] - 1):
            e = runs[r]
            a, b, n = _clipped_run(src, dst, e, cl[r])
            _axpy(out[a:a + n], gsi[group[e]], nxt[b:b + n])
        for f in range(fans.shape[0] - 1):  # a fan's one row out to its sources
            e = fans[f]
            _add_to_all(out[src[e]:src[e] + fans[f + 1] - e], gsi[group[e]] * nxt[dst[e]])
        for e in range(fans[-1], E):  # the single edges, by source row in turns (indices unsigned: see the scan)
            out[np.uint32(src[e])] += gsi[np.uint32(group[e])] * nxt[np.uint32(dst[e])]
        tot = _mask_total(out, live[l], beta[l - 1] if l > 0 else spare)
        totals[l] = tot
        if not tot > 0.0:
            return False
        scale = 1.0 / tot
    return True


@nb.njit(cache=True, nogil=True, inline="always", fastmath={"reassoc", "contract"})
def _forward_step(cur, nxt, following, gsi, vcur, vnxt, vfollowing, gm, live_next, src, dst, group, runs, clip_l, fans,
                  in_row, in_other, in_group, want_sum, want_max):  # pragma: no cover - compiled
    """One position of the forward passes, masked by live_next: with ``want_sum``, nxt
    (all zero) <- the sum-product message one position on from cur (group weights gsi
    (G,)); with ``want_max``, vnxt (all -inf) <- the Viterbi scores one position on from
    vcur (group scores gm (G,)). Both together share each edge's loads and each run's
    set-up (the denoiser wants both every step). Clears ``following`` / ``vfollowing``
    (which may be cur / vcur). Returns (nxt's total, whether vnxt has a live value above
    -inf). The flags are compile-time constants where it is inlined."""
    for r in range(runs.shape[0] - 1):
        e = runs[r]
        a, b, n = _clipped_run(src, dst, e, clip_l[r])
        if want_sum and want_max:
            _axpy_max_plus(nxt[b:b + n], gsi[group[e]], cur[a:a + n], vnxt[b:b + n], gm[group[e]], vcur[a:a + n])
        elif want_sum:
            _axpy(nxt[b:b + n], gsi[group[e]], cur[a:a + n])
        else:
            _max_plus(vnxt[b:b + n], gm[group[e]], vcur[a:a + n])
    for f in range(fans.shape[0] - 1):  # a fan's sources into its one row
        e = fans[f]
        if want_sum:
            nxt[dst[e]] += _total(cur[src[e]:src[e] + fans[f + 1] - e]) * gsi[group[e]]
        if want_max:  # (rounding is monotone: the best source's sum is the best sum)
            vnxt[dst[e]] = max(vnxt[dst[e]], _best(vcur[src[e]:src[e] + fans[f + 1] - e]) + gm[group[e]])
    for k in range(in_row.shape[0]):  # the single edges, by destination row in turns (indices unsigned)
        row, other, g = np.uint32(in_row[k]), np.uint32(in_other[k]), np.uint32(in_group[k])
        if want_sum:
            nxt[row] += cur[other] * gsi[g]
        if want_max:
            vnxt[row] = max(vnxt[row], vcur[other] + gm[g])
    if want_sum and want_max:
        return _mask_both(nxt, vnxt, live_next, following, vfollowing)
    if want_sum:
        return _mask_total(nxt, live_next, following), True
    return 0.0, _mask_live(vnxt, live_next, vfollowing)


@nb.njit(cache=True, nogil=True, inline="always", fastmath={"reassoc", "contract"})
def _forward_into(alpha, vit, gsum, gmax, live, src, dst, group, runs, clip, fans, in_row, in_other, in_group, start,
                  rank, totals, want_sum, want_max):  # pragma: no cover - compiled
    """The forward passes into their (L + 1, S) buffers, any contents: with ``want_sum``
    alpha[l, j] ∝ weight of the valid prefixes of l tokens ending in row j (0 where j is
    not live), the mirror of ``_backward_into`` (each row is known up to its own factor,
    and its total divides the next row's weights); with ``want_max`` vit[l, j], the best
    log-score of such a prefix (-inf where not live). Both together share one sweep
    (``_forward_step``). Returns (best_end, ok): the best accepting row at L (ties: the
    lowest state; -1 without ``want_max``), and False when no valid canvas exists. Every
    position's Viterbi scores are kept for the traceback instead of backpointers
    (writing them made the run loops ~2x slower). With ``want_sum``, totals (L + 1,) <-
    each row's total (see ``log_mass_forward``)."""
    L = live.shape[0] - 1
    G = gsum.shape[1]
    gsi = np.empty(G, np.float64)  # the group weights at l, divided by the total of row l
    spare = np.empty(live.shape[1], np.float64)  # (what the last rows' masking clears)
    none = np.empty(0, np.float64)  # (the rows of a pass not asked for)
    if want_sum:
        alpha[0, :] = 0.0
        alpha[0, start] = 1.0
        totals[0] = 1.0
        if L > 0:
            alpha[1, :] = 0.0
    if want_max:
        _viterbi_start(vit, start)
    scale = 1.0
    for l in range(L):
        if want_sum:
            gs = gsum[l]
            for g in range(G):
                gsi[g] = gs[g] * scale
        if want_sum and want_max:
            tot, ok = _forward_step(alpha[l], alpha[l + 1], alpha[l + 2] if l + 2 <= L else spare, gsi, vit[l],
                                    vit[l + 1], vit[l + 2] if l + 2 <= L else spare, gmax[l], live[l + 1], src, dst,
                                    group, runs, clip[l], fans, in_row, in_other, in_group, True, True)
        elif want_sum:
            tot, ok = _forward_step(alpha[l], alpha[l + 1], alpha[l + 2] if l + 2 <= L else spare, gsi, none, none,
                                    none, none, live[l + 1], src, dst, group, runs, clip[l], fans, in_row, in_other,
                                    in_group, True, False)
        else:
            tot, ok = _forward_step(none, none, none, none, vit[l], vit[l + 1], vit[l + 2] if l + 2 <= L else spare,
                                    gmax[l], live[l + 1], src, dst, group, runs, clip[l], fans, in_row, in_other,
                                    in_group, False, True)
        if want_sum:
            totals[l + 1] = tot
            if not tot > 0.0:
                return -1, False
            scale = 1.0 / tot
        if not ok:
            return -1, False
    if want_max:
        return _best_end(vit[L], rank)
    return -1, True


@nb.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _alpha_into(alpha, gsum, live, src, dst, group, runs, clip, fans, in_row, in_other, in_group,
                start, totals):  # pragma: no cover
    """``_forward_into``'s sum pass alone: whether there is a valid canvas."""
    none2 = np.empty((0, 0), np.float64)
    return _forward_into(alpha, none2, gsum, none2, live, src, dst, group, runs, clip, fans, in_row, in_other, in_group,
                         start, np.empty(0, np.int32), totals, True, False)[1]


@nb.njit(cache=True, nogil=True)
def _viterbi_into(vit, gmax, live, src, dst, group, runs, clip, fans, in_row, in_other, in_group, start,
                  rank):  # pragma: no cover - compiled
    """``_forward_into``'s Viterbi pass alone: (best_end, ok)."""
    none2 = np.empty((0, 0), np.float64)
    return _forward_into(none2, vit, none2, gmax, live, src, dst, group, runs, clip, fans, in_row, in_other, in_group,
                         start, rank, np.empty(0, np.float64), False, True)


@nb.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _alpha_viterbi_into(alpha, vit, gsum, gmax, live, src, dst, group, runs, clip, fans, in_row, in_other, in_group,
                        start, rank, totals):  # pragma: no cover - compiled
    """``_forward_into``'s two passes in one sweep: (best_end, ok)."""
    return _forward_into(alpha, vit, gsum, gmax, live, src, dst, group, runs, clip, fans, in_row, in_other, in_group,
                         start, rank, totals, True, True)


#: Copies of the group posteriors the single edges add into, by edge (a power of 2): a
#: row's edges often share a group, and adds into one slot wait for each other.
_POSTERIOR_COPIES = 4


#: A draw's total, or a position's posterior mass in the factors, below this share of
#: (the largest group weight x what the messages multiplied sum to) may have lost weight
#: to float64's range (see ``_draw_in_range``, ``_posterior_in_range``).
RANGE_FLOOR = 1e-265


@nb.njit(cache=True, nogil=True, inline="always")
def _posterior_in_range(post, gmx, totals):  # pragma: no cover - compiled
    """Whether a position's posterior mass ``post`` (the sum over its edges of forward x
    group weight x backward values) is exact enough to divide by: each product lost to
    float64's range weighed less than 2.2e-308 x gmx (the largest group weight) x
    ``totals`` (1 + what the two messages sum to: a value of one side below 2.2e-308
    times one of the other), so above RANGE_FLOOR of that, with up to ~1e6 edges, such
    losses stay below ~1e-37 of the mass. Below it (logits N(0, 30) from a state whose
    canvases the forward and the backward messages weigh ~e^-360 of their rows each),
    products went subnormal and the factors came out ~1e-3 off, or a likely token's
    log-marginal -inf: the caller redoes the canvas in log space."""
    return post > RANGE_FLOOR * gmx * (1.0 + totals)


@nb.njit(cache=True, nogil=True, inline="always", fastmath={"reassoc", "contract"})
def _factors_at(cur, bn, gs, acc, F_row, src, dst, group, runs, clip_l, fans, in_row, in_other, in_group, atom_groups,
                atom_group_offsets, totals):  # pragma: no cover - compiled
    """F_row (K,) <- the atom factors of one position from its forward message cur and
    the next position's backward message bn (group weights gs (G,); acc
    (_POSTERIOR_COPIES, G) scratch); False where the position's posterior mass may have
    lost weight to float64's range (``_posterior_in_range``; ``totals``: what cur and bn
    sum to)."""
    acc[:, :] = 0.0
    for r in range(runs.shape[0] - 1):
        e = runs[r]
        a, b, n = _clipped_run(src, dst, e, clip_l[r])
        acc[0, group[e]] += _dot(cur[a:a + n], bn[b:b + n])
    for f in range(fans.shape[0] - 1):
        e = fans[f]
        acc[0, group[e]] += _total(cur[src[e]:src[e] + fans[f + 1] - e]) * bn[dst[e]]
    for k in range(in_row.shape[0]):  # (indices unsigned: see the scan)
        acc[k & (_POSTERIOR_COPIES - 1), np.uint32(in_group[k])] += (cur[np.uint32(in_other[k])]
                                                                    * bn[np.uint32(in_row[k])])
    post = 0.0
    gmx = 0.0
    for g in range(gs.shape[0]):
        t = 0.0
        for c in range(_POSTERIOR_COPIES):
            t += acc[c, g]
        acc[0, g] = t
        post += t * gs[g]
        gmx = max(gmx, gs[g])
    if not _posterior_in_range(post, gmx, totals):
        return False
    inv = 1.0 / post
    for k in range(F_row.shape[0]):
        t = 0.0
        for i in range(atom_group_offsets[k], atom_group_offsets[k + 1]):
            t += acc[0, atom_groups[i]]
        F_row[k] = t * inv
    return True


@parallel_kernel(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _factors(alpha, beta, gsum, src, dst, group, runs, clip, fans, in_row, in_other, in_group, atom_groups,
             atom_group_offsets, alpha_totals, beta_totals, parts):  # pragma: no cover - compiled
    """The atom factors F (L, K) from both messages, and whether every position has
    posterior mass. P(token t at l) = exp(x_t - rowmax_l) * F[l, atom(t)].

    The posterior of an edge s -> d at l is alpha_l(s) * gsum[l, g] * beta_{l+1}(d) /
    post_l, and a token of group g at l weighs exp(x_t - rowmax_l) / gsum[l, g] of its
    edge, so F[l, k] = sum over the groups g holding k of acc_g / post_l, with
    acc_g = sum over g's edges of alpha_l(s) * beta_{l+1}(d) (a dot product per run) and
    post_l = sum over g of gsum[l, g] * acc_g (gsum itself never divides: at low
    temperatures a group the canvas needs can weigh ~1e-170). Each row's own factor
    cancels in the ratio, so positions are independent: blocks of them per thread.
    alpha_totals / beta_totals (L + 1,): what each row of the messages sums to (as the
    passes record them), for ``_posterior_in_range``."""
    L, G = gsum.shape
    K = atom_group_offsets.shape[0] - 1
    F = np.zeros((L, K), np.float64)
    ok = np.ones(L, np.bool_)
    for part in nb.prange(parts):
        acc = np.empty((_POSTERIOR_COPIES, G), np.float64)
        for l in range(part * L // parts, (part + 1) * L // parts):
            ok[l] = _factors_at(alpha[l], beta[l + 1], gsum[l], acc, F[l], src, dst, group, runs, clip[l], fans, in_row,
                                in_other, in_group, atom_groups, atom_group_offsets,
                                alpha_totals[l] + beta_totals[l + 1])
    return F, ok.all()


@nb.njit(cache=True, nogil=True, inline="always", fastmath={"reassoc", "contract"})
def _alpha_factors_body(beta, gsum, gmax, vit, live, src, dst, group, runs, clip, fans, in_row, in_other, in_group,
                        start, rank, atom_groups, atom_group_offsets, beta_totals, totals,
                        want_max):  # pragma: no cover - compiled
    """The factors F (L, K) of ``_factors`` and the forward pass of ``_alpha_into`` in one
    sweep, for a single thread: each position's factors are taken from the forward
    message just computed, while it is in cache, and only two rows of it are kept. The
    same helpers in the same order make the same numbers to the bit (0.9x the two
    passes at 1 tool, BPE 4k; 0.78x at 20 tools, whose messages outgrow the caches).
    With ``want_max`` the Viterbi pass of ``_viterbi_into`` into vit rides along, its
    numbers the same too (warm, BPE 4k: 0.93x the two sweeps at 1 tool, 0.92x at 5 and
    0.91x at 20 tools). totals (L + 1,) <- the forward rows' totals, as
    ``_forward_into`` records them; beta_totals (L + 1,): the backward rows', as
    ``_backward_into`` recorded them.
    Returns (F, best_end, ok); best_end is -1 without ``want_max``."""
    L, G = gsum.shape
    S = live.shape[1]
    K = atom_group_offsets.shape[0] - 1
    F = np.zeros((L, K), np.float64)
    acc = np.empty((_POSTERIOR_COPIES, G), np.float64)
    gsi = np.empty(G, np.float64)
    cur = np.zeros(S, np.float64)  # the forward message at l
    nxt = np.zeros(S, np.float64)  # at l + 1
    spare = np.empty(S, np.float64)  # (what the last Viterbi row's masking fills)
    none = np.empty(0, np.float64)
    cur[start] = 1.0
    totals[0] = 1.0
    if want_max:
        _viterbi_start(vit, start)
    scale = 1.0
    for l in range(L):
        gs = gsum[l]
        if not _factors_at(cur, beta[l + 1], gs, acc, F[l], src, dst, group, runs, clip[l], fans, in_row, in_other,
                           in_group, atom_groups, atom_group_offsets, totals[l] + beta_totals[l + 1]):
            return F, -1, False
        for g in range(G):
            gsi[g] = gs[g] * scale
        if want_max:
            tot, ok = _forward_step(cur, nxt, cur, gsi, vit[l], vit[l + 1], vit[l + 2] if l + 2 <= L else spare,
                                    gmax[l], live[l + 1], src, dst, group, runs, clip[l], fans, in_row, in_other,
                                    in_group, True, True)
        else:
            tot, ok = _forward_step(cur, nxt, cur, gsi, none, none, none, none, live[l + 1], src, dst, group, runs,
                                    clip[l], fans, in_row, in_other, in_group, True, False)
        totals[l + 1] = tot
        if not (tot > 0.0 and ok):
            return F, -1, False
        scale = 1.0 / tot
        cur, nxt = nxt, cur
    if want_max:
        best_end, ok = _best_end(vit[L], rank)
        return F, best_end, ok
    return F, -1, True


@nb.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _alpha_factors(beta, gsum, live, src, dst, group, runs, clip, fans, in_row, in_other, in_group, start, atom_groups,
                   atom_group_offsets, beta_totals, totals):  # pragma: no cover - compiled
    """``_alpha_factors_body`` without the Viterbi pass: (F, ok)."""
    none2 = np.empty((0, 0), np.float64)
    F, _, ok = _alpha_factors_body(beta, gsum, none2, none2, live, src, dst, group, runs, clip, fans, in_row, in_other,
                                   in_group, start, np.empty(0, np.int32), atom_groups, atom_group_offsets, beta_totals,
                                   totals, False)
    return F, ok


@nb.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _alpha_factors_viterbi(beta, gsum, gmax, vit, live, src, dst, group, runs, clip, fans, in_row, in_other, in_group,
                           start, rank, atom_groups, atom_group_offsets, beta_totals,
                           totals):  # pragma: no cover - compiled
    """``_alpha_factors_body`` with the Viterbi pass into vit (L + 1, S): (F, best_end, ok)."""
    return _alpha_factors_body(beta, gsum, gmax, vit, live, src, dst, group, runs, clip, fans, in_row, in_other,
                               in_group, start, rank, atom_groups, atom_group_offsets, beta_totals, totals, True)


@nb.njit(cache=True, nogil=True, inline="always")
def _viterbi_start(vit, start):  # pragma: no cover - compiled
    """The Viterbi scores' first row (0 at the start row, -inf elsewhere), and the second cleared."""
    vit[0, :] = -np.inf
    vit[0, start] = 0.0
    if vit.shape[0] > 1:
        vit[1, :] = -np.inf


@nb.njit(cache=True, nogil=True, inline="always")
def _best_end(last, rank):  # pragma: no cover - compiled
    """The best accepting row of the Viterbi scores at L, ``last`` (S,) (ties: the lowest
    state, as they always have), and whether there is one."""
    best_end = -1
    bv = -np.inf
    for s in range(rank.shape[0]):
        j = rank[s]
        if last[j] > bv:
            bv = last[j]
            best_end = j
    return best_end, best_end >= 0


# ---- the total weight of the valid canvases, from each pass's row totals -----------------
# Each pass divides a row by a total before it pulls the next one, so the canvas's mass is
# the last row's total times every divisor before it. Forward and backward masses agree
# to rounding (~1e-13 in log) unless weight fell out of float64's range on one side (a
# branch of the grammar ~700 nats below the rest early on that outweighs it later): the
# caller then redoes the canvas in log space (see log_canvas).

#: Largest gap (in log) between the forward and the backward mass of a canvas in range.
MASS_TOLERANCE = 1e-6


def log_mass_forward(totals: np.ndarray) -> float:
    """log of the canvas's mass from a forward pass's row totals (L + 1,): row l + 1 was
    pulled from row l divided by its total (``_forward_into``, ``_alpha_factors_body``,
    ``_forward_live_kernel`` alike), row 0 holds the start state alone."""
    with np.errstate(divide="ignore"):
        return float(np.log(totals[1:]).sum())


def log_mass_backward(beta_start: float, totals: np.ndarray, dense: bool) -> float:
    """log of the canvas's mass from a backward pass: the start state's value at
    position 0 and the rows' totals (L + 1,). The dense pass pulls row l from row l + 1
    divided by its total (the last row, all ones, undivided); the live-list pass divides
    each row by its own total."""
    L = totals.shape[0] - 1
    with np.errstate(divide="ignore"):
        return float(np.log(beta_start) + np.log(totals[1:L] if dense else totals[:L]).sum())


#: The dense passes a step can ask for together (see ``_dense_passes``).
VITERBI, ALPHA, BETA = 0, 1, 2

_Set = TypeVar("_Set")


class KeptSets(Generic[_Set]):
    """Sets of buffers kept from one op to the next: an op takes a set for as long as it
    runs (``taken``) and gives it back, so the sets number the most ops that ran at
    once, not the threads that ever ran one. An engine steps one canvas at a time, but
    from whichever of anyio's worker threads its caller awaited in: sets kept by each
    thread would pile up (the dense messages: 200-300 MB a thread at twenty tools)."""

    def __init__(self, make: Callable[[], _Set]) -> None:
        self._make = make
        self._free: list[_Set] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def taken(self) -> Iterator[_Set]:
        """A set of one's own until the block ends: the one given back last, or a new one."""
        with self._lock:
            kept = self._free.pop() if self._free else self._make()
        try:
            yield kept
        finally:
            with self._lock:
                self._free.append(kept)

    def __len__(self) -> int:
        """The sets kept, free now."""
        return len(self._free)


class MessageBuffers:
    """The dense passes' messages, (L + 1, S) float64 for each of VITERBI, ALPHA and BETA,
    kept from one step to the next for whichever grammar steps next (the passes clear
    each row before they fill it). A fresh array is written page by page, each page
    faulted in and zeroed by the kernel: three fresh (257, 2716) arrays (five tools) cost
    8.5 ms on a 2-core EPYC, three reused ones 2.0 ms to clear and fill; right after a
    model's forward has freed its own buffers the faults cost far more (20 tools, Gemma
    262k: a step 708 ms with fresh messages, 414 kept). A set keeps the largest array it
    was asked for, up to KEPT_BYTES each: 2 x 100 MB at twenty tools and L=256 on one
    thread (three with more threads: alpha then has its own), 2 x 5.6 MB at five.

    An op takes a set for as long as it runs (``taken``; the sets are ``KeptSets``), and
    the passes deep inside it ``get`` that set's arrays. Outside ``taken``, ``get`` makes
    arrays that nothing keeps. BETA's array also holds, while a canvas goes to log space
    (``CompiledGrammar._log_space``), the bounds of a bounded sweep
    (``pruning.way_on_bounds``) and then the log-space backward values
    (``log_canvas.dense_log_backward``): the canvas's own passes are done with their beta
    there, and the next canvas's start after it."""

    #: The largest array kept for the next step.
    KEPT_BYTES = 256 << 20

    def __init__(self) -> None:
        self._sets: KeptSets[dict[int, np.ndarray]] = KeptSets(dict)
        self._held = threading.local()  # .arrays: the set this thread's op has taken

    @contextlib.contextmanager
    def taken(self) -> Iterator[None]:
        """This thread's ``get`` hands out one set's arrays until the block ends (a block
        inside another keeps the outer one's)."""
        if getattr(self._held, "arrays", None) is not None:
            yield
            return
        with self._sets.taken() as arrays:
            self._held.arrays = arrays
            try:
                yield
            finally:
                self._held.arrays = None

    def __len__(self) -> int:
        """The sets kept, free now."""
        return len(self._sets)

    def get(self, which: int, rows: int, S: int) -> np.ndarray:
        """A (rows, S) float64 array for pass ``which``, its contents left from before."""
        arrays = getattr(self._held, "arrays", None)
        if arrays is None:
            arrays = {}
        n = rows * S
        a = arrays.get(which)
        if a is None or a.shape[0] < n:
            a = np.empty(n, np.float64)
            if a.nbytes <= self.KEPT_BYTES:
                arrays[which] = a
        return a[:n].reshape(rows, S)


#: The process's messages (see MessageBuffers).
MESSAGES = MessageBuffers()


@parallel_kernel(cache=True, nogil=True)
def _dense_passes(gsum, gmax, live, src, dst, group, runs, clip, fans, in_row, in_other, in_group, start, rank,
                  task_of, vit, alpha, beta, alpha_totals, beta_totals):  # pragma: no cover - compiled
    """The passes that do not depend on each other, as tasks for numba's threads:
    task_of[p] is the task that runs pass p (VITERBI, ALPHA, BETA) into its buffer
    (L + 1, S), -1 where the pass is not wanted; a task runs its passes in that order,
    Viterbi and alpha in one sweep where it has both; alpha and beta record their rows'
    totals. Returns status = [best_end, Viterbi ok, alpha ok, beta ok]."""
    status = np.ones(4, np.int64)
    status[0] = -1
    for task in nb.prange(task_of.max() + 1):
        if task_of[VITERBI] == task and task_of[ALPHA] == task:
            best_end, ok = _alpha_viterbi_into(alpha, vit, gsum, gmax, live, src, dst, group, runs, clip, fans, in_row,
                                               in_other, in_group, start, rank, alpha_totals)
            status[0] = best_end
            status[1] = ok
            status[2] = ok
        elif task_of[VITERBI] == task:
            best_end, ok = _viterbi_into(vit, gmax, live, src, dst, group, runs, clip, fans, in_row, in_other, in_group,
                                         start, rank)
            status[0] = best_end
            status[1] = ok
        elif task_of[ALPHA] == task:
            status[2] = _alpha_into(alpha, gsum, live, src, dst, group, runs, clip, fans, in_row, in_other, in_group,
                                    start, alpha_totals)
        if task_of[BETA] == task:
            status[3] = _backward_into(beta, gsum, live, src, dst, group, runs, clip, fans, beta_totals)
    return status


def dense_tasks(passes: tuple[int, ...], threads: int) -> np.ndarray:
    """task_of for ``_dense_passes``: one task per pass where there are threads enough;
    with two threads for three passes, the forward ones (Viterbi and alpha, in one sweep)
    on one and beta on the other."""
    task_of = np.full(3, -1, np.int64)
    if threads >= len(passes):
        for t, p in enumerate(passes):
            task_of[p] = t
    elif threads == 2:
        for p in passes:
            task_of[p] = 1 if p == BETA else 0
    else:
        task_of[list(passes)] = 0
    return task_of


# ---- 3b. the same passes over live-state lists, for large automata ------------------------
# With tens of thousands of states the dense messages no longer fit the caches, and where
# few of the states live at each position the passes below pay off: they visit the live
# states only, in state order (whose edges mostly join nearby states), one by one. Each
# stored message is one number per (position, live state), aligned with Support.states.
# Which pays depends on that share more than on the size (20 tools, 49k states, L=256,
# 1 thread, whole step dense / live; 2-core EPYC): BPE 4k, 66% live, 222 / 274 ms;
# Gemma 262k, 68% live, 517 / 544; WordPiece 30k, whose tokens never split a character
# so that the partial-character states of the strings' counters all lie dead, 17%
# live, 208 / 158. At 2.7k states (5 tools, BPE 4k) the dense passes made sample and
# marginals ~1.5x faster.
#
# The live states of one position are independent of each other in every pass: each
# position's list is cut into LIVE_CHUNKS chunks that numba's threads share. Sums across
# a position (its total, the group posteriors) are kept per chunk and added up in chunk
# order, so the result is the same to the bit whatever the number of threads.

#: Automata up to this many states always run the dense passes.
DENSE_MAX_STATES = 16384
#: Larger ones run them too when at least this share of their (position, state) pairs is
#: live (the measurements above).
DENSE_MIN_LIVE = 0.5
#: Chunks of a position's live states (a fixed number: see above).
LIVE_CHUNKS = 8


def dense_pays(S: int, offsets: np.ndarray) -> bool:
    """Whether the dense passes beat the live-list passes over an automaton of S states
    whose live states at each position ``offsets`` (L + 2,) counts (see ``support``)."""
    L = offsets.shape[0] - 2
    return S <= DENSE_MAX_STATES or offsets[-1] >= DENSE_MIN_LIVE * S * (L + 1)


@nb.njit(cache=True, nogil=True, inline="always")
def _chunk(lo, hi, c):  # pragma: no cover - compiled
    """Chunk c of LIVE_CHUNKS of the range lo..hi: (start, stop)."""
    n = hi - lo
    return lo + c * n // LIVE_CHUNKS, lo + (c + 1) * n // LIVE_CHUNKS


def _backward_live_kernel(loop):  # type: ignore[no-untyped-def]
    """The backward pass over live-state lists, its chunks in ``loop`` (range or prange)."""

    def backward(gsum, offsets, states, out_offsets, out_dst, out_group, S, row_totals):  # pragma: no cover
        """beta[i] ∝ weight of the valid completions from live state i (its position's suffix),
        each position's values summing to 1; row_totals (L + 1,) <- what each position's
        values summed to before (see ``log_mass_backward``)."""
        L = gsum.shape[0]
        beta = np.zeros(states.shape[0], np.float64)
        nxt = np.zeros(S, np.float64)  # beta at l + 1, dense over states
        totals = np.zeros(LIVE_CHUNKS, np.float64)
        row_totals[L] = offsets[L + 1] - offsets[L]
        for i in range(offsets[L], offsets[L + 1]):
            beta[i] = 1.0
            nxt[states[i]] = 1.0
        for l in range(L - 1, -1, -1):
            for c in loop(LIVE_CHUNKS):
                t = 0.0
                i0, i1 = _chunk(offsets[l], offsets[l + 1], c)
                for i in range(i0, i1):
                    s = np.uint32(states[i])  # (indices unsigned: see the scan)
                    acc = 0.0
                    for j in range(np.uint32(out_offsets[s]), np.uint32(out_offsets[s + 1])):
                        acc += gsum[l, np.uint32(out_group[np.uint32(j)])] * nxt[np.uint32(out_dst[np.uint32(j)])]
                    beta[i] = acc
                    t += acc
                totals[c] = t
            tot = 0.0
            for c in range(LIVE_CHUNKS):
                tot += totals[c]
            row_totals[l] = tot
            if not tot > 0.0:
                return beta, False
            for c in loop(LIVE_CHUNKS):
                i0, i1 = _chunk(offsets[l + 1], offsets[l + 2], c)
                for i in range(i0, i1):
                    nxt[np.uint32(states[i])] = 0.0
            for c in loop(LIVE_CHUNKS):
                i0, i1 = _chunk(offsets[l], offsets[l + 1], c)
                for i in range(i0, i1):
                    beta[i] /= tot
                    nxt[np.uint32(states[i])] = beta[i]
        return beta, True

    return backward


_BACKWARD_LIVE = serial_and_threaded(_backward_live_kernel, cache=True, nogil=True)


def _forward_live_kernel(want_sum: bool, want_max: bool, loop):  # type: ignore[no-untyped-def]
    """The forward sweep over live-state lists compiled for one choice of passes (the
    flags are compile-time constants: a runtime flag in the inner loop costs ~20%), its
    chunks in ``loop`` (range or prange)."""

    def forward(gsum, gmax, offsets, states, beta, in_offsets, in_src, in_group, group_atoms, group_offsets, K, S,
                row_totals):  # pragma: no cover - compiled
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
        state at L (Viterbi), ok is False when no valid canvas exists. With ``want_sum``,
        row_totals (L + 1,) <- what each position's forward values summed to before they
        were divided by it (see ``log_mass_forward``).
        """
        L = gsum.shape[0] if want_sum else gmax.shape[0]
        G = gsum.shape[1] if want_sum else gmax.shape[1]
        F = np.zeros((L, K if want_sum else 0), np.float64)
        W = np.zeros(G, np.float64)
        Gs = G if want_sum else 0
        Wc = np.zeros((LIVE_CHUNKS, Gs), np.float64)  # W per chunk of the live states
        # the groups each chunk's edges used at this position, in the order first used, and
        # then all of them: a position's work on W and F follows these, not all G groups and
        # K atoms (a pruned support keeps ~1% of the states: see pruning.py)
        used_c = np.empty((LIVE_CHUNKS, Gs), np.int32)
        n_used_c = np.zeros(LIVE_CHUNKS, np.int64)
        is_used_c = np.zeros((LIVE_CHUNKS, Gs), np.uint8)
        used = np.empty(Gs, np.int32)
        is_used = np.zeros(Gs, np.uint8)
        totals = np.zeros((LIVE_CHUNKS, 2), np.float64)  # per chunk: tot, post
        cur = np.zeros(S, np.float64)  # alpha at l (scaled), dense over states
        nxt = np.zeros(S, np.float64)
        back = np.full(states.shape[0] if want_max else 0, -1, np.int32)  # incoming edge of the best prefix
        vcur = np.full(S, -np.inf)  # best prefix log-score at l, dense over states
        vnxt = np.full(S, -np.inf)
        for i in range(offsets[0], offsets[1]):  # the start state alone
            cur[states[i]] = 1.0
            vcur[states[i]] = 0.0
        if want_sum:
            row_totals[0] = 1.0
        for l in range(L):
            for c in loop(LIVE_CHUNKS):
                Wl = Wc[c]
                used_l = used_c[c]
                is_used_l = is_used_c[c]
                n_used = 0
                tot_c = 0.0  # forward mass at l + 1 (for scaling)
                post_c = 0.0  # posterior mass of position l (for normalising W)
                i0, i1 = _chunk(offsets[l + 1], offsets[l + 2], c)
                for i in range(i0, i1):
                    d = np.uint32(states[i])
                    b = beta[i] if want_sum else 0.0
                    acc = 0.0
                    best = -np.inf
                    be = -1
                    for j in range(in_offsets[d], in_offsets[d + 1]):
                        s = np.uint32(in_src[j])  # (unsigned indices: see the scan)
                        g = np.uint32(in_group[j])
                        if want_sum:
                            w = cur[s] * gsum[l, g]
                            acc += w
                            Wl[g] += w * b
                            if not is_used_l[g]:
                                is_used_l[g] = 1
                                used_l[n_used] = g
                                n_used += 1
                        if want_max:
                            v = vcur[s] + gmax[l, g]
                            if v > best:
                                best = v
                                be = j
                    if want_sum:
                        nxt[d] = acc
                        tot_c += acc
                        post_c += acc * b
                    if want_max:
                        vnxt[d] = best
                        back[i] = be
                totals[c, 0] = tot_c
                totals[c, 1] = post_c
                n_used_c[c] = n_used
            tot = 0.0
            post = 0.0
            if want_sum:
                n_used = 0
                for c in range(LIVE_CHUNKS):  # (each group's chunks added in chunk order, as before)
                    tot += totals[c, 0]
                    post += totals[c, 1]
                    Wl = Wc[c]
                    for u in range(n_used_c[c]):
                        g = used_c[c, u]
                        W[g] += Wl[g]
                        Wl[g] = 0.0
                        is_used_c[c, g] = 0
                        if not is_used[g]:
                            is_used[g] = 1
                            used[n_used] = g
                            n_used += 1
                row_totals[l + 1] = tot
                # (here a group weight multiplies the forward value before the backward
                # one, so a loss need not scale with it: 1 + gmx; the forward values sum
                # to 1, the backward ones too but at L, where each live state holds 1)
                gmx = 0.0
                for u in range(n_used):
                    gmx = max(gmx, gsum[l, used[u]])
                t_back = 1.0 if l + 1 < L else np.float64(offsets[L + 1] - offsets[L])
                if not (tot > 0.0 and _posterior_in_range(post, 1.0 + gmx, 1.0 + t_back)):
                    return F, back, -1, False
                Fl = F[l]
                for u in range(n_used):  # each used group's posterior onto its atoms
                    g = used[u]
                    is_used[g] = 0
                    w = W[g]
                    W[g] = 0.0
                    if w > 0.0:
                        # not W / (post * gsum): at low temperatures both factors can be ~1e-170
                        # (a group the canvas needs, far below the row's best token) and their
                        # product underflows to 0
                        w = w / post / gsum[l, g]
                        for i in range(group_offsets[g], group_offsets[g + 1]):
                            Fl[group_atoms[i]] += w
            for c in loop(LIVE_CHUNKS):
                i0, i1 = _chunk(offsets[l], offsets[l + 1], c)
                for i in range(i0, i1):
                    s = np.uint32(states[i])
                    if want_sum:
                        cur[s] = 0.0
                    if want_max:
                        vcur[s] = -np.inf
            for c in loop(LIVE_CHUNKS):
                i0, i1 = _chunk(offsets[l + 1], offsets[l + 2], c)
                for i in range(i0, i1):
                    s = np.uint32(states[i])
                    if want_sum:
                        cur[s] = nxt[s] / tot
                    if want_max:
                        vcur[s] = vnxt[s]
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

    return forward


def _forward_live_kernels(want_sum: bool, want_max: bool):  # type: ignore[no-untyped-def]
    return serial_and_threaded(lambda loop: _forward_live_kernel(want_sum, want_max, loop), cache=True, nogil=True)


_FORWARD_LIVE_SUM = _forward_live_kernels(True, False)
_FORWARD_LIVE_MAX = _forward_live_kernels(False, True)
_FORWARD_LIVE_BOTH = _forward_live_kernels(True, True)

#: Live cells a position, on average, from which the live-list passes share each
#: position's chunks out to numba's threads (below, starting the parallel loops costs
#: more than they save: a pruned support keeps ~1% of 20 tools' states).
LIVE_THREADED_MIN = 1024


def live_kernel(kernels: tuple[Any, Any], offsets: np.ndarray) -> Any:
    """The kernel of a (one-thread, threaded) pair to run over a support's lists
    (``offsets`` (L + 2,)): the same numbers either way."""
    threaded = nb.get_num_threads() > 1 and offsets[-1] >= LIVE_THREADED_MIN * (offsets.shape[0] - 1)
    return kernels[1] if threaded else kernels[0]


@nb.njit(cache=True, nogil=True, inline="always")
def _draw_in_range(tot, e0, e1, l, gsum, out_group, next_total):  # pragma: no cover - compiled
    """Whether a draw from edges e0..e1 - 1 at position l, their weights gsum * beta
    summing to tot, is exact: an edge's weight was lost to float64's range only where
    its group weight or its end's beta fell below 2.2e-308 (~1e-302 with a group's
    ~2.6e5 tokens and ~1e3 edges a state: the rest weigh no more than the largest group
    weight, or the backward row's total ``next_total``); above RANGE_FLOOR of those,
    such losses stay below 1e-37 of the draw."""
    gmx = 0.0
    for j in range(e0, e1):
        gmx = max(gmx, gsum[l, out_group[j]])
    return tot > RANGE_FLOOR * (gmx + next_total)


@nb.njit(cache=True, nogil=True, inline="always")
def draw_index(weights, u):  # pragma: no cover - compiled
    """The first index where the running sum of the positive ``weights`` reaches u (the
    last positive one where rounding leaves u unreached; -1 where none is positive)."""
    chosen = -1
    acc = 0.0
    for j in range(weights.shape[0]):
        w = weights[j]
        if w > 0.0:
            chosen = j
            acc += w
            if acc >= u:
                break
    return chosen


@nb.njit(cache=True, nogil=True, inline="always")
def _draw_edge_and_atom(w_edge, e0, e1, tot, l, asum, gsum, out_group, base, extra_offsets, extra,
                        uniforms):  # pragma: no cover - compiled
    """The edge among e0..e1 - 1 (weights w_edge[0:e1 - e0], total tot > 0) and the atom
    inside its group (weight asum (L, K)) drawn at position l: -> (edge, atom).

    The atom is drawn down the ``GroupPlan`` (base, extra_offsets, extra), whose nodes'
    sums ``gsum`` (L, N) holds (``group_node_sums``): a node is its base
    plus its other parts, and its sum is theirs added in that order, so the draw goes
    down into the base where u falls below the base's sum, else walks the other parts
    and goes down into the node part where u falls. A text group holds nearly every atom
    (728 of 747 at 20 tools, BPE 4k), which a walk over all its atoms took ~0.4 us a
    position."""
    K = asum.shape[1]
    chosen = e0 + draw_index(w_edge[:e1 - e0], uniforms[l, 0] * tot)
    g = out_group[chosen]
    u = uniforms[l, 1] * gsum[l, g]
    while True:
        h = base[g]
        hw = gsum[l, h] if h >= 0 else 0.0
        if h >= 0 and u < hw:
            g = h
            continue
        k = -1
        acc = hw
        start = 0.0
        w = 0.0
        for i in range(extra_offsets[g], extra_offsets[g + 1]):
            e = extra[i]
            we = asum[l, e] if e < K else gsum[l, e - K]
            if we > 0.0:
                k, start, w = e, acc, we
                acc += we
                if acc >= u:
                    break
        if k >= K:  # a node: u's place inside it (kept below its sum, which rounding may reach)
            g = k - K
            u = min(u - start, w * (1.0 - 2.0**-52))
            continue
        if k >= 0 or not hw > 0.0:
            return chosen, k
        # rounding left u unreached past a base with weight and parts of none: the base
        g = h
        u = hw * (1.0 - 2.0**-52)


@nb.njit(cache=True, nogil=True)
def _sample_atoms_live(asum, gsum, offsets, states, beta, start, out_offsets, out_dst, out_group, base,
                       extra_offsets, extra, uniforms):  # pragma: no cover
    """Backward filtering, forward sampling: an edge per position (weight gsum * beta of
    its end; each position's beta sums to 1), then an atom inside the edge's group
    (weight asum). -> (atoms (L,) int32, ok) as ``_sample_atoms``."""
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
        if not _draw_in_range(tot, e0, e1, l, gsum, out_group, 1.0):
            return out, False
        chosen, k = _draw_edge_and_atom(w_edge, e0, e1, tot, l, asum, gsum, out_group, base, extra_offsets, extra,
                                         uniforms)
        out[l] = k
        s = out_dst[chosen]
    return out, True


@nb.njit(cache=True, nogil=True)
def _trace_back_live(back, best_end, offsets, states, in_src, in_group):  # pragma: no cover
    """The Viterbi canvas' groups: follow the backpointers of ``_FORWARD_LIVE_MAX``
    from the best accepting state. -> groups (L,) i32."""
    L = offsets.shape[0] - 2
    out = np.full(L, -1, np.int32)
    i = best_end
    for l in range(L - 1, -1, -1):
        j = back[i]
        out[l] = in_group[j]
        if l > 0:
            i = _slot(states, offsets[l], offsets[l + 1], in_src[j])
    return out


#: float64's normal range: log_positive takes these, a factor outside them math.log; a
#: sum below NORMAL_MIN has lost digits (see ``below_normal``).
NORMAL_MIN = float(np.finfo(np.float64).tiny)
_NORMAL_MAX = float(np.finfo(np.float64).max)


def _factor_logs_kernel(want_h: bool):  # type: ignore[no-untyped-def]
    """log F and, with ``want_h`` (a compile-time flag, which keeps the loop free of
    branches), the entropies, in one pass over (L, K) (see ``factor_logs``)."""

    @nb.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"}, error_model="numpy")
    def factor_logs(F, asum, asumx):  # pragma: no cover - compiled
        L, K = F.shape
        log_f = np.empty((L, K), np.float64)
        H = np.zeros(L, np.float64)
        odd = np.zeros(L, np.int64)  # per row: factors outside the normal range, but 0 (subnormals, inf, nan)
        for l in range(L):
            f_l, s_l, sx_l, out = F[l], asum[l], asumx[l], log_f[l]
            h = 0.0
            n = 0
            for k in range(K):  # (selects, no branch: the loop vectorises)
                f = f_l[k]
                normal = (f >= NORMAL_MIN) & (f <= _NORMAL_MAX)
                lf = log_positive(f if normal else 1.0)
                lf = lf if normal else -np.inf
                out[k] = lf
                n += (f != 0.0) & ~normal
                if want_h:
                    # sum_t P log P over atom k, P = e_t f, log P = (x_t - m) + log f
                    term = f * (sx_l[k] + s_l[k] * lf)
                    h -= term if (f > 0.0) & (s_l[k] > 0.0) else 0.0
            H[l] = max(h, 0.0)
            odd[l] = n
        for l in range(L):  # (rare: a factor below 2**-1022) its row again, with libm's log there
            if odd[l] == 0:
                continue
            h = 0.0
            for k in range(K):
                f = F[l, k]
                if f != 0.0 and not (f >= NORMAL_MIN and f <= _NORMAL_MAX):
                    log_f[l, k] = math.log(f) if f > 0.0 else np.nan
                if want_h:
                    h -= f * (asumx[l, k] + asum[l, k] * log_f[l, k]) if f > 0.0 and asum[l, k] > 0.0 else 0.0
            H[l] = max(h, 0.0)
        return log_f, H

    return factor_logs


_factor_logs = _factor_logs_kernel(False)
_factor_logs_entropy = _factor_logs_kernel(True)


def factor_logs(F: np.ndarray, asum: np.ndarray, asumx: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(log F (-inf where F is 0), each position's entropy (nats) of its constrained
    marginal), from the factors F (L, K) and the scan's atom sums asum, and asumx (None:
    no entropies). One compiled pass with float64_math's log, which vectorises: numpy's
    log takes ~2.5x as long where F holds zeros (each an exception), and the entropies
    were a second pass over (L, K) (BPE 4k, 20 tools: 1.5 MB an array)."""
    if asumx is None:
        return _factor_logs(F, asum, asum)[0], None
    return _factor_logs_entropy(F, asum, asumx)


@nb.njit(cache=True, nogil=True)
def below_normal(asum, aarg):  # pragma: no cover - compiled
    """(N,) int64: per row, the atoms with a usable logit (``aarg`` >= 0) whose sum
    ``asum`` (N, K) fell below float64's smallest normal number. One pass, no (N, K)
    temporaries: the masks numpy made took 0.06 ms a step at 20 tools."""
    N, K = asum.shape
    out = np.zeros(N, np.int64)
    for n in range(N):
        s_n, a_n = asum[n], aarg[n]
        c = 0
        for k in range(K):
            c += (s_n[k] < NORMAL_MIN) & (a_n[k] >= 0)
        out[n] = c
    return out


#: Rows whose best allowed logit is this large or larger (|rowmax|: float32's integers
#: end there; a row masked with float32's lowest) are huge rows. Below it the write adds
#: log F - rowmax to each logit: the shift rounds by under 4e-9 nats, far below float32's
#: resolution of the result; the Viterbi pass moves a huge row of alike logits to 0.
HUGE_ROWMAX = 2.0**24


@parallel_kernel(cache=True, nogil=True)
def _write_marginals(logits, rowmax, atom_of, log_f, out, parts):  # pragma: no cover
    N, V = logits.shape
    K = log_f.shape[1]
    for part in nb.prange(parts):  # rows are independent (see row_parts)
        # per atom log F - rowmax, or log F alone; index K: never allowed (-inf even where
        # a logit is nan or +inf)
        shift = np.empty(K + 1, np.float64)
        for n in range(part * N // parts, (part + 1) * N // parts):
            m = rowmax[n]
            row = logits[n]
            o = out[n]
            shift[K] = -np.inf
            if abs(m) < HUGE_ROWMAX:  # (one add an element: 0.88x the time of two)
                for k in range(K):
                    shift[k] = log_f[n, k] - m
                for t in range(V):
                    k = atom_of[t]
                    o[t] = row[t] + shift[k] if k >= 0 else -np.inf
            else:  # huge logits (a row of -3.4e38 masking it): log F - rowmax would lose log F
                for k in range(K):
                    shift[k] = log_f[n, k]
                for t in range(V):
                    k = atom_of[t]
                    o[t] = (row[t] - m) + shift[k] if k >= 0 else -np.inf  # (x - rowmax: exact in float64)


def write_marginals(logits: np.ndarray, rowmax: np.ndarray, atom_of: np.ndarray, log_f: np.ndarray,
                    out: np.ndarray) -> None:
    """out (N, V) float32 <- the log-marginals logits - rowmax + log F[atom] (-inf at tokens
    never allowed), rows split across numba's threads."""
    _write_marginals(logits, rowmax, atom_of, log_f, out, row_parts(logits.shape[0]))


# ---- 4. sampling and Viterbi --------------------------------------------------------------


@nb.njit(cache=True, nogil=True)
def _sample_atoms(asum, gsum, beta, beta_totals, out_rank, start, out_offsets, out_dst, out_group, base,
                  extra_offsets, extra, uniforms):  # pragma: no cover
    """Backward filtering, forward sampling: an edge per position (weight gsum * beta of
    its end; beta in "out" order, 0 off the valid canvases, each row's total in
    beta_totals), then an atom inside the edge's group (weight asum). -> (atoms (L,)
    int32, ok): ok is False where a draw may have lost weight to float64's range
    (``_draw_in_range``), and the atoms are then unfinished."""
    L = gsum.shape[0]
    out = np.empty(L, np.int32)
    degree = out_offsets[1:] - out_offsets[:-1]
    w_edge = np.empty(degree.max() if degree.shape[0] else 0, np.float64)  # weights of the current state's edges
    s = start
    for l in range(L):
        bn = beta[l + 1]
        e0, e1 = out_offsets[s], out_offsets[s + 1]
        tot = 0.0
        for j in range(e0, e1):
            w = gsum[l, out_group[j]] * bn[out_rank[out_dst[j]]]
            w_edge[j - e0] = w
            tot += w
        if not _draw_in_range(tot, e0, e1, l, gsum, out_group, beta_totals[l + 1]):
            return out, False
        chosen, k = _draw_edge_and_atom(w_edge, e0, e1, tot, l, asum, gsum, out_group, base, extra_offsets, extra,
                                         uniforms)
        out[l] = k
        s = out_dst[chosen]
    return out, True


@nb.njit(cache=True, nogil=True, inline="always", fastmath={"contract"})
def _token_weights(row, tokens, b):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """exp(x - b) of ``tokens``' logits in ``row``, in loops that vectorise (the walk
    over them stops early, and an exp in it is taken one at a time: BPE 4k, 1 tool, 256
    positions 0.117 -> 0.086 ms)."""
    x = np.empty(tokens.shape[0], np.float32)
    for j in range(tokens.shape[0]):
        x[j] = row[np.uint32(tokens[j])]
    ws = np.empty(tokens.shape[0], np.float32)
    for j in range(tokens.shape[0]):
        ws[j] = exp_nonpositive(x[j] - b)
    return ws


@parallel_kernel(cache=True, nogil=True, fastmath={"contract"})
def _sample_tokens(logits, amax, aarg, block_sums, atoms, perm, lo, hi, blocks, uniforms):  # pragma: no cover
    """A token inside each position's sampled atom, weight exp(x - amax). The atom's best
    token weighs exactly 1 of the atom's total: it is tried first (a peaked model ends
    here in O(1)); else the scan's block sums (``reduce_atoms``), less that 1 in the best
    token's block, pick one block of the other tokens, and that block's weights,
    recomputed with the same exp, pick the token (an atom of at most _FEW tokens is one
    block, whose weights give the total). A step so touches at most _BLOCK of an atom's
    tokens, however large the atom, and uses the uniforms as the device passes do
    (``device_passes.tokens_in_atoms``: the best token, then the others in token order)."""
    L = atoms.shape[0]
    out = np.empty(L, np.int32)
    for l in nb.prange(L):  # positions are independent given their atoms
        k = atoms[l]
        row = logits[l]
        b = amax[l, k]
        best = aarg[l, k]
        out[l] = best
        run = perm[lo[k]:hi[k]]
        if run.shape[0] == 1:  # (an atom of one token has no blocks)
            continue
        few = blocks[k + 1] == blocks[k]  # (an atom of few tokens has no block sums: its one block is weighed here)
        tokens = run
        ws = _token_weights(row, run, b) if few else np.empty(0, np.float32)
        sums = ws if few else block_sums[l, blocks[k]:blocks[k + 1]]
        total = 0.0
        for i in range(sums.shape[0]):
            total += sums[i]
        u = uniforms[l, 2] * total
        if u < 1.0:
            continue
        u -= 1.0
        acc = 0.0
        if not few:
            best_block = np.searchsorted(run, best) // _BLOCK
            chosen = -1
            for i in range(sums.shape[0]):
                w = sums[i] - 1.0 if i == best_block else np.float64(sums[i])
                if w > 0.0:
                    chosen = i
                    if acc + w >= u:
                        break
                    acc += w
            else:  # rounding left u past the end: the last block with weight
                if chosen >= 0:
                    acc -= sums[chosen] - 1.0 if chosen == best_block else np.float64(sums[chosen])
            if chosen < 0:
                continue
            tokens = run[chosen * _BLOCK:(chosen + 1) * _BLOCK]
            ws = _token_weights(row, tokens, b)
        for j in range(tokens.shape[0]):
            if tokens[j] == best:
                continue
            w = ws[j]
            if w > 0.0:
                out[l] = tokens[j]
                acc += w
                if acc >= u:
                    break
    return out


def sample_tokens(logits: np.ndarray, amax: np.ndarray, aarg: np.ndarray, block_sums: np.ndarray,
                  atoms: np.ndarray, sorted_atoms: SortedAtoms, uniforms: np.ndarray) -> np.ndarray:
    """A token inside each position's sampled atom (see ``_sample_tokens``), positions
    split across numba's threads."""
    return _sample_tokens(logits, amax, aarg, block_sums, atoms, sorted_atoms.perm, sorted_atoms.lo,
                          sorted_atoms.hi, sorted_atoms.blocks, uniforms)


@nb.njit(cache=True, nogil=True)
def group_best_tokens(groups, gmax, amax, aarg, group_atoms, group_offsets):  # pragma: no cover - compiled
    """The best token of the group taken at each position (L,): that of the group's first
    atom (in group order) whose best logit is the group's; and the largest magnitude of
    those logits (a mask on the canvas: see ``masks``)."""
    # A group's atoms are listed ascending, so its first atom at the group's best is the
    # lowest-numbered one there. That is first found across the whole row, in a loop that
    # vectorises (no early exit), and kept where it belongs to the group: a walk through a
    # large group's list stopped at its best atom took ~700 ns a position (the string
    # group of 731 atoms at 20 tools), this ~50. Another atom at the same logit outside
    # the group (a tie: logits of a low-precision model have many) falls back to the walk.
    L, K = amax.shape
    out = np.full(L, -1, np.int32)
    far = 0.0
    for l in range(L):
        g = groups[l]
        lo, hi = group_offsets[g], group_offsets[g + 1]
        best = gmax[l, g]
        far = max(far, abs(np.float64(best)))
        row = amax[l]
        key = np.float32(best)  # (gmax holds float32 logits)
        first = np.int32(K)
        for k in range(K):  # (a min, in int32: that vectorises; a loop counting down did not, 12x slower)
            first = min(first, np.int32(k) if row[k] == key else np.int32(K))
        at = np.searchsorted(group_atoms[lo:hi], first) + lo
        if first < K and at < hi and group_atoms[at] == first:
            out[l] = aarg[l, first]
            continue
        for i in range(lo, hi):
            k = group_atoms[i]
            if np.float64(row[k]) == best:
                out[l] = aarg[l, k]
                break
    return out, far


@nb.njit(cache=True, nogil=True)
def _trace_back(vit, best_end, gmax, state, rank, in_offsets, in_src, in_group):  # pragma: no cover
    """The Viterbi canvas' groups from the scores of ``_viterbi_into``: from the
    best accepting row back, the first incoming edge (in the automaton's order) whose
    prefix score plus its group's best logit is the row's score (the same float sum the
    pass took its max over, so equal exactly). -> groups (L,) i32."""
    L = gmax.shape[0]
    out = np.full(L, -1, np.int32)
    j = best_end
    for l in range(L - 1, -1, -1):
        s = state[j]
        target = vit[l + 1, j]
        for i in range(in_offsets[s], in_offsets[s + 1]):
            p = rank[in_src[i]]
            g = in_group[i]
            if vit[l, p] + gmax[l, g] == target:
                out[l] = g
                j = p
                break
    return out


@nb.njit(cache=True, nogil=True, inline="always")
def _one_token(g, tok, group_atoms, group_offsets, atom_offsets, atom_tokens):  # pragma: no cover - compiled
    """The one token seen so far at a position (-1: none yet) with group g's added; -2
    where g brings another."""
    for j in range(group_offsets[g], group_offsets[g + 1]):
        k = group_atoms[j]
        if atom_offsets[k + 1] - atom_offsets[k] != 1:
            return -2
        t = atom_tokens[atom_offsets[k]]
        if tok == -1:
            tok = t
        elif tok != t:
            return -2
    return tok


@nb.njit(cache=True, nogil=True)
def choices_for_good(out_offsets, out_dst, out_group, group_atoms, group_offsets, atom_offsets, in_offsets,
                     in_src):  # pragma: no cover - compiled
    """(S,) bool: the states with two tokens or more to go on by, each with a successor
    in the set (the largest such set: a state left without one is dropped, and then its
    predecessors' counts fall). A canvas at one of them at position l has a choice there
    and at every position after, for as long as it can go on."""
    S = out_offsets.shape[0] - 1
    keep = np.zeros(S, np.bool_)
    for s in range(S):
        n = 0  # tokens on the state's edges, counted up to 2 (an atom holds one at least)
        for e in range(out_offsets[s], out_offsets[s + 1]):
            g = out_group[e]
            if group_offsets[g + 1] - group_offsets[g] > 1:
                n = 2
            else:
                k = group_atoms[group_offsets[g]]
                n += atom_offsets[k + 1] - atom_offsets[k]
            if n >= 2:
                break
        keep[s] = n >= 2
    count = np.zeros(S, np.int64)  # successors in the set (one edge per pair of states)
    for s in range(S):
        if keep[s]:
            for e in range(out_offsets[s], out_offsets[s + 1]):
                if keep[out_dst[e]]:
                    count[s] += 1
    stack = np.empty(S, np.int32)
    top = 0
    for s in range(S):
        if keep[s] and count[s] == 0:
            keep[s] = False
            stack[top] = s
            top += 1
    while top > 0:
        top -= 1
        q = stack[top]
        for i in range(in_offsets[q], in_offsets[q + 1]):
            p = in_src[i]
            if keep[p]:
                count[p] -= 1
                if count[p] == 0:
                    keep[p] = False
                    stack[top] = p
                    top += 1
    return keep


@nb.njit(cache=True, nogil=True)
def forced_going_on(start, length, choices, out_offsets, out_dst, out_group, group_atoms, group_offsets,
                    atom_offsets, atom_tokens):  # pragma: no cover - compiled
    """``_forced`` for a canvas that may end anywhere, where every state a token reaches
    can go on for as long as the canvas lasts: the states that ``start`` reaches in l
    tokens are then exactly the live ones at l, and no backward pass is needed. The sweep
    stops at the first position holding a state of ``choices`` (``choices_for_good``):
    nothing is forced there or after."""
    S = out_offsets.shape[0] - 1
    out = np.full(length, -1, np.int32)
    cur = np.empty(S, np.int32)
    nxt = np.empty(S, np.int32)
    seen = np.full(S, -1, np.int64)  # the position a state was last listed for
    cur[0] = start
    n = 1
    for l in range(length):
        for i in range(n):
            if choices[cur[i]]:
                return out
        tok = -1
        ok = True
        m = 0
        for i in range(n):
            s = cur[i]
            for e in range(out_offsets[s], out_offsets[s + 1]):
                d = out_dst[e]
                if seen[d] != l:
                    seen[d] = l
                    nxt[m] = d
                    m += 1
                if ok:
                    tok = _one_token(out_group[e], tok, group_atoms, group_offsets, atom_offsets, atom_tokens)
                    ok = tok != -2
        if ok and tok >= 0:
            out[l] = tok
        cur, nxt = nxt, cur
        n = m
    return out


@nb.njit(cache=True, nogil=True)
def _forced(live, state, rank, out_offsets, out_dst, out_group, group_atoms, group_offsets, atom_offsets, atom_tokens,
            L):  # pragma: no cover
    """Token forced at each position whatever the logits (-1 where there is a choice),
    from the support's mask ``live`` (L + 1, S) by row (``state``/``rank``: row <-> state)."""
    out = np.full(L, -1, np.int32)
    for l in range(L):
        tok = -1
        ok = False  # (a position with no live state forces nothing)
        here = live[l]
        after = live[l + 1]
        for r in range(here.shape[0]):
            if not here[r]:
                continue
            ok = True
            s = state[r]
            for e in range(out_offsets[s], out_offsets[s + 1]):
                if not after[rank[out_dst[e]]]:
                    continue  # an edge off every valid canvas
                tok = _one_token(out_group[e], tok, group_atoms, group_offsets, atom_offsets, atom_tokens)
                ok = tok != -2
                if not ok:
                    break
            if not ok:
                break
        if ok:
            out[l] = tok
    return out
