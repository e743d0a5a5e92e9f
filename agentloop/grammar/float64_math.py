"""float64 helpers for compiled loops that must vectorise: exp, log, order-preserving keys.

The log-space canvas passes (``log_canvas``) add one term into a running log-sum-exp per
edge and position, an exp each, and take a log per state and position. numba hands
``math.exp`` and ``math.log`` to libm one element at a time, ~10 ns a call; written here
from operations the compiler vectorises they cost ~1 ns an element (2-core EPYC, 8 lanes
of float64): a Cody-Waite range reduction with a degree-13 Taylor polynomial for exp
(within ~1 ulp), and the exponent split off the bits with a series in
u = (f - 1) / (f + 1) for log (within ~1 ulp). Loops that divide must be compiled with
``error_model="numpy"``: numba's default checks every division for a zero divisor, which
keeps the loop scalar.

>>> import numpy as np
>>> round(float(exp_nonpositive(-1.0)), 12), round(float(log_positive(np.e)), 12)
(0.367879441171, 1.0)
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types

from .float32_math import bitcast

bits_to_double = bitcast("bits_to_double", types.float64(types.int64), ir.DoubleType())
double_to_bits = bitcast("double_to_bits", types.int64(types.float64), ir.IntType(64))


_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that n * _LN2_HI is exact for |n| < 2**11
_LN2_LO = 1.90821492927058770002e-10
#: Below this exp is flushed to 0: in a sum whose largest term is 1 (how every caller here
#: adds), a term under e**-708 changes nothing.
EXP_FLOOR = -708.0
#: The bits of sqrt(2) / 2: log takes mantissas from [sqrt(2) / 2, sqrt(2)).
_HALF_SQRT2_BITS = np.int64(0x3FE6A09E667F3BCD)


@nb.njit(cache=True, nogil=True, inline="always", fastmath={"contract"})
def exp_nonpositive(d):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """exp(d) for a float64 d <= 0: 0 below -708, at -inf and at nan.

    >>> float(exp_nonpositive(0.0)), float(exp_nonpositive(-709.0)), float(exp_nonpositive(float("nan")))
    (1.0, 0.0, 0.0)
    """
    z = d if d > EXP_FLOOR else EXP_FLOOR
    n = np.floor(z * _LOG2E + 0.5)
    r = (z - n * _LN2_HI) - n * _LN2_LO  # |r| <= ln(2) / 2: the Taylor series to r**13 is within 5e-18
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * (r * r) + r + 1.0
    e = p * bits_to_double((np.int64(n) + np.int64(1023)) << 52)  # p * 2**n (n >= -1022: a normal number)
    return e if d >= EXP_FLOOR else 0.0


@nb.njit(cache=True, nogil=True, inline="always", fastmath={"contract"}, error_model="numpy")
def log_positive(s):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """log(s) for a normal float64 s > 0 (the caller keeps 0, subnormals, inf and nan out).

    >>> float(log_positive(1.0)), round(float(log_positive(1e-300)), 9)
    (0.0, -690.775527898)
    """
    bits = double_to_bits(s)
    k = (bits - _HALF_SQRT2_BITS) >> 52  # s = 2**k * f with f in [sqrt(2) / 2, sqrt(2))
    f = bits_to_double(bits - (k << 52))
    u = (f - 1.0) / (f + 1.0)  # |u| < 0.172: log f = 2 (u + u**3 / 3 + ...), to u**21 within 1e-19
    u2 = u * u
    q = 1.0 / 21.0
    q = q * u2 + 1.0 / 19.0
    q = q * u2 + 1.0 / 17.0
    q = q * u2 + 1.0 / 15.0
    q = q * u2 + 1.0 / 13.0
    q = q * u2 + 1.0 / 11.0
    q = q * u2 + 1.0 / 9.0
    q = q * u2 + 1.0 / 7.0
    q = q * u2 + 1.0 / 5.0
    q = q * u2 + 1.0 / 3.0
    kf = np.float64(k)
    return kf * _LN2_HI + (kf * _LN2_LO + (2.0 * u + 2.0 * u * u2 * q))


@nb.njit(cache=True, nogil=True, inline="always")
def order_key(x):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """The int64 whose order is the (non-nan) float64's order: an int max vectorises where
    a float max does not (``key_to_double`` maps it back).

    >>> float(key_to_double(max(order_key(-2.0), order_key(-3.0), order_key(float("-inf")))))
    -2.0
    """
    b = double_to_bits(x)
    return b ^ ((b >> 63) & np.int64(0x7FFFFFFFFFFFFFFF))


@nb.njit(cache=True, nogil=True, inline="always")
def key_to_double(key):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """The float64 of an ``order_key``."""
    return bits_to_double(key ^ ((key >> 63) & np.int64(0x7FFFFFFFFFFFFFFF)))
