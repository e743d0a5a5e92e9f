"""Huge finite logits: rows masked whole, and masks a canvas cannot avoid.

A model or a logits processor masks a token with a huge finite logit as often as with
-inf: ``torch.finfo(dtype).min`` (-3.4e38 in float32), -1e9, -1e20, or +1e20 to force
one. The canvas passes take the constrained distribution at face value: a canvas weighs
exp(sum of its logits). Two things then need care, because float64 keeps ~16 digits:

- a row of logits all near one huge value (a position masked whole): each canvas
  carries the row's constant, which cancels out, but added into a score in float64 it
  drowns every other row's O(1) differences. Such a row is taken from its best logit
  (``moved_rows``), exactly in float32 (Sterbenz).
- a huge value some valid canvases cannot avoid: the stop token masked with -3.4e38 at
  every position (each canvas passes it once, at another position), or a token forced
  with +1e20 where the grammar forbids it (each row's valid tokens lie 1e20 below the
  row's best). The canvases' weights differ by O(1) beside a 1e20 or 1e38 that float64
  cannot hold next to them. Exactly, each canvas carries the masks it passes; the
  constrained distribution is the one over the canvases with the fewest (negative) or
  most (positive) of them, weighed by their other logits.

Logits of magnitude ``MASK_LOGIT`` or more (float32's step there is 1024: they carry no
O(1) information) are read as masks, each replaced where it matters by a stand-in
(``stand_ins``): -G for every negative one, +G for every positive one, G beyond the
reach of every other logit of the canvas together. Canvases with the same masks then
weigh exactly as they should (a constant cancels), and one mask more (negative) costs at
least e^-1000, which float64 cannot tell from 0. Masks of different huge values count
alike where they stand in: -1e20 and -3.4e38 both mean "never, unless no valid canvas
avoids it". Where float64 holds their difference at one position, it is kept: tokens
of one atom weigh from the atom's best (a -1e10 beside a -1e20 takes all the atom's
weight); a row whose allowed logits all lie within a factor 2 of one huge value is
taken from its best first (``moved_rows``: -8.6e9 beside -1e10 there are no masks); and
the fast passes weigh each position's tokens from its best, so of two positive masks
there the smaller weighs nothing (+1e10 beside +1e20). Across positions masks count
alike, and a positive and a negative one cancel (+1e20 against -3.4e38).

Where it matters (``CompiledGrammar``): the fast passes are exact under masks the
canvases can avoid (their weights flush to 0, as they should); where none can be
avoided the passes find no mass, and the canvas goes to log space, where a negative
mask takes its stand-in at once and a positive one where the passes' total weight
lies ``MASK_LOGIT`` below the rows' best logits (a forced token the grammar forbids).
The Viterbi pass is redone with the stand-ins where its canvas passes a mask, or where a
row holds a positive one (at face value a canvas through it and a larger negative mask
loses to canvases without masks, where the pair cancels). A step without masks pays a
compare a row for this.

    >>> import numpy as np
    >>> v = np.array([[0.5, -3.4e38], [-1.0, 2.0]])
    >>> out = stand_ins(v)
    >>> bool(out[1, 1] == 2.0), bool(out[0, 1] < -1000.0)
    (True, True)
"""

from __future__ import annotations

import numpy as np

from .canvas import HUGE_ROWMAX

#: Logits at least this far from 0 are masks (2**33, ~8.6e9; a canvas's sum of a few of
#: them in float64 keeps no digit below ~1e-6). A model's logits at a temperature of
#: 1e-9 would reach it; no sampler goes there.
MASK_LOGIT = 2.0**33

#: How far beyond the canvas's other logits a stand-in lies (nats): a canvas with one
#: negative mask more weighs e^-1000 of one without, 0 in float64 beside it.
_MARGIN = 1000.0

#: Per position, more than the log of an atom's count of tokens, which a sum of the
#: atom's weights adds to its best logit (log 262,144 = 12.5).
_ATOM_SLACK = 32.0


def moved_rows(amax: np.ndarray, rowmax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of atom maxima ``amax`` (N, K) float32 whose allowed logits all lie near
    one huge value (best ``rowmax`` (N,) of magnitude HUGE_ROWMAX or more, the least
    finite one within a factor 2 of it, same sign), and the float32 constant (n,) to take
    from each: x - best is exact in float32 there (Sterbenz)."""
    huge = np.flatnonzero(np.abs(rowmax) >= HUGE_ROWMAX)
    if not huge.size:
        return huge, np.zeros(0, np.float32)
    rows = amax[huge]  # (n, K)
    best = rowmax[huge].astype(np.float32)  # (n,)
    lo = np.min(np.where(np.isfinite(rows), rows, best[:, None]), axis=1)  # (n,) the least finite one
    alike = (np.sign(lo) == np.sign(best)) & (np.abs(best) / 2 <= np.abs(lo)) & (np.abs(lo) / 2 <= np.abs(best))
    return huge[alike], best[alike]


def effective_maxima(amax: np.ndarray, rowmax: np.ndarray) -> np.ndarray:
    """``amax`` (N, K) float32 with the rows of ``moved_rows`` taken from their best
    (a copy where any is; else ``amax`` itself)."""
    moved, shift = moved_rows(amax, rowmax)
    if not moved.size:
        return amax
    out = amax.copy()
    out[moved] -= shift[:, None]
    return out


def has_masks(values: np.ndarray, negative: bool = False) -> bool:
    """Whether any finite value of ``values`` is a mask (magnitude ``MASK_LOGIT`` or more;
    with ``negative``, a negative one)."""
    if negative:
        return bool(((values <= -MASK_LOGIT) & (values > -np.inf)).any())
    a = np.abs(values)
    return bool(((a >= MASK_LOGIT) & (a < np.inf)).any())


def stand_ins(values: np.ndarray) -> np.ndarray:
    """``values`` (L, K), one canvas's atom logits (float; -inf: no such atom), as float64
    with every finite mask replaced by its stand-in: -G where negative, +G where
    positive, G = 2 x (sum over positions of the largest other magnitude there, plus
    ``_ATOM_SLACK``) + ``_MARGIN``. Between two canvases that differ by one mask (one
    more negative mask, or one fewer positive one), every other position then moves the
    score by less than G - _MARGIN. G is a whole number, exact in float32 below 2**24."""
    v = np.asarray(values, np.float64)
    a = np.abs(v)
    mask = (a >= MASK_LOGIT) & (a < np.inf)
    other = np.where(mask | ~np.isfinite(v), 0.0, a)  # (L, K)
    G = float(np.ceil(2.0 * float(np.sum(other.max(axis=1, initial=0.0) + _ATOM_SLACK)) + _MARGIN))
    return np.where(mask, np.copysign(G, v), v)
