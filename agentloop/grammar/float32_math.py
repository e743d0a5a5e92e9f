"""float32 helpers for compiled loops that must vectorise: exp, and order-preserving keys.

numba hands ``math.exp`` to libm one element at a time (no vector math library ships with
it) and does not vectorise a float max. The canvas scan needs both over every allowed
token of every position, so they are written here from operations the compiler
vectorises: a Cody-Waite range reduction with a degree-6 polynomial for exp (within
~1.5 ulp of the true value; numpy's float32 exp is within ~3.5), and the integer image
of a float's bits, whose int max vectorises.
"""

from __future__ import annotations

from typing import Any

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic


def bitcast(name: str, sig: types.Type, llvm_type: ir.Type) -> Any:
    """A compiled function ``name`` that reinterprets its argument's bits as the return
    type of ``sig`` (a no-op in registers)."""

    def cast(typingctx, x):  # type: ignore[no-untyped-def]  # pragma: no cover - compile time
        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.bitcast(args[0], llvm_type)

        return sig, codegen

    cast.__name__ = cast.__qualname__ = name
    cast.__doc__ = f"Reinterpret {sig.args[0]} bits as a {sig.return_type}."
    return intrinsic(cast)


bits_to_float = bitcast("bits_to_float", types.float32(types.int32), ir.FloatType())
float_to_bits = bitcast("float_to_bits", types.int32(types.float32), ir.IntType(32))


_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)  # ln 2 split so that n * _LN2_HI is exact for |n| < 2**9
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_FLOOR = np.float32(-87.0)  # below this exp is flushed to 0 (float32's normal range ends at ~-87.3)
_EXP_CEIL = np.float32(88.0)  # exp(88.72) is float32's largest


@nb.njit(cache=True, nogil=True, inline="always", fastmath={"contract"})
def _exp_in_range(z):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """exp(z) for a float32 z in [-87, 88]: the range reduction and the polynomial."""
    n = np.floor(z * _LOG2E + np.float32(0.5))
    r = z - n * _LN2_HI
    r = r - n * _LN2_LO
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * (r * r) + r + np.float32(1.0)
    return p * bits_to_float((np.int32(n) + np.int32(127)) << 23)  # p * 2**n (-126 <= n <= 127: normal)


@nb.njit(cache=True, nogil=True, fastmath={"contract"})  # no reassociation: the reduction relies on its order
def exp_nonpositive(d):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """exp(d) for a float32 d <= 0: 0 below -87 (and at -inf), nan at nan and +inf.

    >>> float(exp_nonpositive(np.float32(-1.0)))  # doctest: +ELLIPSIS
    0.36787945...
    """
    e = _exp_in_range(min(max(d, _EXP_FLOOR), np.float32(0.0)))
    if d >= _EXP_FLOOR and d <= np.float32(0.0):
        return e
    if d < _EXP_FLOOR:
        return np.float32(0.0)
    return np.float32(np.nan)  # nan, or a positive d (a +inf logit above a finite best)


@nb.njit(cache=True, nogil=True, fastmath={"contract"})
def exp_to_88(d):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """exp(d) for a float32 d <= 88, as ``exp_nonpositive``: 0 below -87 (and at -inf),
    nan at nan and above 88.

    >>> float(exp_to_88(np.float32(80.0)))  # doctest: +ELLIPSIS
    5.54062...e+34
    """
    e = _exp_in_range(min(max(d, _EXP_FLOOR), _EXP_CEIL))
    if d >= _EXP_FLOOR and d <= _EXP_CEIL:
        return e
    if d < _EXP_FLOOR:
        return np.float32(0.0)
    return np.float32(np.nan)


@nb.njit(cache=True, nogil=True, inline="always", fastmath={"reassoc", "contract"})
def exp_sums(bits, best):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """Over ``bits``, a run of float32 logits as int32 bits (a few hundred: the sums are
    float32, a handful of terms per lane), with ``best`` at least each of them: the sums
    of e = exp(x - best) and of e * (x - best), a term of 0 where e is 0 (at -inf). A nan
    or +inf x makes both nan. Inlined, so that the loop vectorises in its caller (and the
    second sum goes where the caller drops it)."""
    s = np.float32(0.0)
    sx = np.float32(0.0)
    for i in range(bits.shape[0]):
        d = bits_to_float(bits[i]) - best
        e = exp_nonpositive(d)
        s += e
        sx += e * d if e > np.float32(0.0) else np.float32(0.0)  # 0 * -inf is nan
    return s, sx


#: The key of -inf: a key no higher belongs to no usable logit (-inf, or nothing).
KEY_NEG_INF = np.int32(-2139095041)
#: The key of +inf: finite floats' keys are below it.
KEY_POS_INF = np.int32(0x7F800000)
#: The key of any nan: above every float's, so that a max over keys shows a nan.
KEY_NAN = np.int32(2**31 - 1)


@nb.njit(cache=True, nogil=True)
def order_key(bits):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """The int32 whose order is the float32's order, from the float's bits (an int32
    view of the value); every nan gets KEY_NAN. The map is its own inverse on the keys
    of non-nan floats."""
    key = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))
    return key if (bits & np.int32(0x7FFFFFFF)) <= KEY_POS_INF else KEY_NAN


@nb.njit(cache=True, nogil=True)
def key_to_bits(key):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """The float32 bits of a (non-nan) key."""
    return key ^ ((key >> 31) & np.int32(0x7FFFFFFF))
