"""Languages of numbers: canonical integers in a range, multiples, bounded decimals.

All spellings are canonical JSON: no leading zeros, no ``+``, no ``-0``. Bounded numbers
are spelled without an exponent, which keeps bounds exact with a finite automaton.

A parser (Python's ``json``, ours) reads ``-?\\d+`` as an exact integer and anything else as
a double, so a decimal spelling is judged by the double it rounds to; see
:func:`double_le_bound` for turning a bound on doubles into a bound on decimal spellings.
"""

from __future__ import annotations

import math
import struct
import sys
from decimal import Decimal, localcontext
from typing import Optional

from .fsa import EMPTY, NEVER, Node, alt, byte_range, embed, graph, literal, opt, product, rep, seq, sym, to_dfa

DIGIT = byte_range(0x30, 0x39)
NONZERO = byte_range(0x31, 0x39)
MINUS = sym(0x2D)
DOT = sym(0x2E)


def digits(lo: int, hi: int) -> Node:
    if lo > hi:
        return NEVER
    return byte_range(0x30 + lo, 0x30 + hi)


_INTEGER_PART = alt(sym(0x30), seq(NONZERO, rep(DIGIT)))
_FRACTION = seq(DOT, rep(DIGIT, 1))
_EXPONENT = seq(sym(0x65, 0x45), opt(sym(0x2B, 0x2D)), rep(DIGIT, 1))


def any_number() -> Node:
    """Any JSON number: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?"""
    return seq(opt(MINUS), _INTEGER_PART, opt(_FRACTION), opt(_EXPONENT))


def non_integer_spellings() -> Node:
    """JSON numbers with a fraction or an exponent: the spellings a parser reads as doubles."""
    return seq(opt(MINUS), _INTEGER_PART, alt(seq(_FRACTION, opt(_EXPONENT)), _EXPONENT))


def _fixed(sa: str, sb: str) -> Node:
    """Digit strings of len(sa) between sa and sb (leading zeros allowed).

    An automaton of its own, not nested nodes: a bound's digits can run to hundreds (1e308,
    or a JSON integer of any length), and a node nested a level per digit overflowed
    Python's recursion when built. States, at each position i: the prefix equals both
    bounds' (``both``), only the lower's (``low``: already below the upper), only the
    upper's (``high``), or neither (``free``: any digits follow)."""
    n = len(sa)
    if not n:
        return EMPTY
    both, low, high, free = (lambda i, k=k: 4 * i + k for k in range(4))  # (state numbers)
    edges: list[tuple[int, int, Node]] = []
    for i in range(n):
        a, b = int(sa[i]), int(sb[i])
        if a == b:
            edges.append((both(i), both(i + 1), digits(a, a)))
        elif a < b:
            edges += [(both(i), low(i + 1), digits(a, a)), (both(i), high(i + 1), digits(b, b))]
            if b - a > 1:
                edges.append((both(i), free(i + 1), digits(a + 1, b - 1)))
        edges += [(low(i), low(i + 1), digits(a, a)), (high(i), high(i + 1), digits(b, b)),
                  (free(i), free(i + 1), DIGIT)]
        if a < 9:
            edges.append((low(i), free(i + 1), digits(a + 1, 9)))
        if b > 0:
            edges.append((high(i), free(i + 1), digits(0, b - 1)))
    return graph(4 * (n + 1), [both(n), low(n), high(n), free(n)], edges)


def uint_range(a: int, b: Optional[int]) -> Node:
    """Canonical non-negative integers in [a, b] (b None: unbounded).

    Only the lengths of a and b need a bound's automaton (``_fixed``); every length
    between takes any digits, one chain for all of them (an automaton per length made
    the states grow with the square of b's digits: seconds to compile a bound of 1e300)."""
    if b is not None and b < a:
        return NEVER
    la = len(str(a))
    branches = [_fixed(str(a), str(10**la - 1 if b is None else min(b, 10**la - 1)))]
    if b is None:  # every longer length
        return alt(*branches, seq(NONZERO, rep(DIGIT, la)))
    lb = len(str(b))
    if lb - la > 1:  # the lengths between: any digits after a non-zero one
        branches.append(seq(NONZERO, rep(DIGIT, la, lb - 2)))
    if lb > la:
        branches.append(_fixed(str(10 ** (lb - 1)), str(b)))
    return alt(*branches)


def int_range(lo: Optional[int], hi: Optional[int]) -> Node:
    """Canonical integers in [lo, hi] (either side None: unbounded)."""
    branches = []
    if hi is None or hi >= 0:
        branches.append(uint_range(max(lo, 0) if lo is not None else 0, hi))
    if lo is None or lo < 0:
        # negative numbers: magnitudes in [max(-hi, 1), -lo]
        mag_lo = max(-hi, 1) if hi is not None else 1
        mag_hi = -lo if lo is not None else None
        if mag_hi is None or mag_hi >= mag_lo:
            branches.append(seq(MINUS, uint_range(mag_lo, mag_hi)))
    return alt(*branches)


def multiples_in(lo: Optional[int], hi: Optional[int], m: int) -> Node:
    """Canonical integers in [lo, hi] (either side None: unbounded) divisible by m."""
    if lo is not None and hi is not None and lo > hi:
        return NEVER
    ints = int_range(lo, hi)
    if m > 1:
        ints = embed(product(to_dfa(ints, 256), to_dfa(multiple_of(m), 256), "and"))
    return ints


def multiple_of(m: int) -> Node:
    """Canonical integers divisible by m (a remainder automaton over the digits)."""
    # states: 0 start, 1 after '-', 2 after a lone '0', 3+r remainder r after >=1 digit
    edges: list[tuple[int, int, Node]] = [(0, 1, MINUS), (0, 2, sym(0x30))]
    for d in range(1, 10):
        edges.append((0, 3 + d % m, digits(d, d)))
        edges.append((1, 3 + d % m, digits(d, d)))
    for r in range(m):
        by_dst: dict[int, list[int]] = {}
        for d in range(10):
            by_dst.setdefault((10 * r + d) % m, []).append(d)
        for r2, ds in by_dst.items():
            edges.append((3 + r, 3 + r2, sym(*(0x30 + d for d in ds))))
    return graph(3 + m, [2, 3], edges)


# ---- bounded decimals -------------------------------------------------------------------
# A fraction part is "" or "." digits+. The tails below are digit strings read as 0.xxx,
# compared with a bound's fraction digits d; each returns (node for non-empty strings,
# whether the empty string qualifies).


def _tail(d: str, op: str) -> tuple[Node, bool]:
    """Non-empty digit strings x with 0.x ``op`` 0.d (op: ">=", ">", "<=", "<"), and
    whether the empty string qualifies. An automaton of its own, as ``_fixed`` (a bound's
    fraction can run to 767 digits: 5e-324). States: 0 the start; 1 + i the digits so far
    equal d's first i (i = len(d): all of d, trailing zeros dropped); then above and
    below, which any digits keep."""
    d = d.rstrip("0")
    n = len(d)
    above, below = n + 2, n + 3
    equal = [1 + i for i in range(n + 1)]
    edges: list[tuple[int, int, Node]] = [(above, above, DIGIT), (below, below, DIGIT)]
    for src, i in [(0, 0)] + [(equal[i], i) for i in range(n + 1)]:  # (the start reads as "equal so far, 0 digits")
        if i == n:  # all of d read: a zero keeps equality, any other digit goes above
            edges += [(src, equal[n], digits(0, 0)), (src, above, digits(1, 9))]
            continue
        c = int(d[i])
        edges.append((src, equal[i + 1], digits(c, c)))
        if c < 9:
            edges.append((src, above, digits(c + 1, 9)))
        if c > 0:
            edges.append((src, below, digits(0, c - 1)))
    finals = {">=": [above, equal[n]], ">": [above], "<=": [below, *equal], "<": [below, *equal[:n]]}[op]
    empty_ok = {">=": n == 0, ">": False, "<=": True, "<": n > 0}[op]
    return graph(n + 4, finals, edges), empty_ok


def _fraction(tail: tuple[Node, bool], fraction_only: bool = False) -> Node:
    node, empty_ok = tail
    dotted = seq(DOT, node)
    return alt(dotted, EMPTY) if empty_ok and not fraction_only else dotted


def _split(x: Decimal) -> tuple[int, str]:
    """Integer part and fraction digits of a non-negative decimal (-0 included: a bound
    of -0.0, or a zero negated exactly)."""
    if x.is_zero():
        return 0, ""
    assert x > 0, x
    text = format(x, "f")
    if "." in text:
        i, f = text.split(".")
        return int(i), f.rstrip("0")
    return int(text), ""


def _magnitudes(a: Decimal, a_excl: bool, b: Optional[Decimal], b_excl: bool, fo: bool = False) -> Node:
    """Non-negative decimals m (spelled I or I.F; only I.F when ``fo``) with a <=/< m <=/< b."""
    A, fa = _split(a)
    lower = _tail(fa, ">" if a_excl else ">=")
    if b is None:
        return alt(seq(literal(str(A).encode()), _fraction(lower, fo)),
                   seq(uint_range(A + 1, None), _fraction((rep(DIGIT, 1), True), fo)))
    if b < a or (b == a and (a_excl or b_excl)):
        return NEVER
    B, fb = _split(b)
    upper = _tail(fb, "<" if b_excl else "<=")
    if A == B:
        from .fsa import embed, product, to_dfa

        lo_d = to_dfa(_fraction(lower, fo), 256)
        hi_d = to_dfa(_fraction(upper, fo), 256)
        return seq(literal(str(A).encode()), embed(product(lo_d, hi_d, "and")))
    parts = [seq(literal(str(A).encode()), _fraction(lower, fo)),
             seq(literal(str(B).encode()), _fraction(upper, fo))]
    if B - A > 1:
        parts.append(seq(uint_range(A + 1, B - 1), _fraction((rep(DIGIT, 1), True), fo)))
    return alt(*parts)


def decimal_range(lo: Optional[Decimal], lo_excl: bool, hi: Optional[Decimal], hi_excl: bool,
                  fraction_only: bool = False) -> Node:
    """Decimals (no exponent) x with lo <=/< x <=/< hi; None is unbounded.

    ``fraction_only`` keeps only spellings with a '.', the ones a parser reads as doubles.
    """
    fo = fraction_only
    zero = Decimal(0)
    branches = []
    # x >= 0 part
    if hi is None or hi > zero or (hi == zero and not hi_excl):
        a, a_excl = (lo, lo_excl) if lo is not None and lo >= zero else (zero, False)
        branches.append(_magnitudes(a, a_excl, hi, hi_excl, fo))
    # x < 0 part: m = -x > 0 with -hi <=/< m <=/< -lo (copy_negate: exact, where unary
    # minus would round a double's exact expansion to the context's 28 digits)
    if lo is None or lo < zero:
        if hi is not None and hi < zero:
            a, a_excl = hi.copy_negate(), hi_excl
        else:
            a, a_excl = zero, True
        b, b_excl = (lo.copy_negate(), lo_excl) if lo is not None else (None, False)
        branches.append(seq(MINUS, _magnitudes(a, a_excl, b, b_excl, fo)))
    return alt(*branches)


# ---- canonical numbers ------------------------------------------------------------------
# Inside ``not`` / ``oneOf`` the compiler subtracts languages, which is only sound when a
# value has one spelling. Integers are spelled as integers (any length: parsed exactly);
# other numbers as decimals with no trailing zero and at most 15 significant digits, so
# that two different spellings are two different doubles (DBL_DIG = 15) and none of them
# is a double with an integer value. DBL_DIG holds for normal doubles only: below 2.2e-308
# decimals collapse onto subnormals and 0.0 (0.<400 zeros>1 parses to 0.0, which a
# `not: {const: 0}` refuses), so a fraction has at most MAX_LEADING_ZEROS zeros before its
# first significant digit (the smallest such number is 1e-307).

MAX_CANONICAL_DIGITS = 15
MAX_LEADING_ZEROS = 306


def canonical_number() -> Node:
    """Numbers with exactly one spelling per value (see the comment above)."""
    n = MAX_CANONICAL_DIGITS
    integer = alt(sym(0x30), seq(opt(MINUS), NONZERO, rep(DIGIT)))
    # I.F with I >= 1: 1 + a integer digits, then b fraction digits and a final non-zero.
    big = alt(*(seq(NONZERO, rep(DIGIT, a, a), DOT, rep(DIGIT, 0, n - 2 - a), NONZERO) for a in range(n - 1)))
    # 0.0...0F: the significant digits start at the first non-zero fraction digit.
    small = seq(sym(0x30), DOT, rep(sym(0x30), 0, MAX_LEADING_ZEROS), alt(NONZERO, seq(NONZERO, rep(DIGIT, 0, n - 2), NONZERO)))
    return alt(integer, seq(opt(MINUS), alt(big, small)))


def plain_decimal(v: float) -> str:
    """The shortest decimal that reads back as the finite float ``v``, without an
    exponent (how bounded numbers are spelled): 1e-07 -> '0.0000001', 1e16 ->
    '10000000000000000', 3.0 -> '3.0'."""
    return format(Decimal(repr(v)), "f")


def canonical_spelling(v: int | float) -> str | None:
    """The spelling of ``v`` in :func:`canonical_number`, or None if it has none."""
    if isinstance(v, bool):
        raise TypeError("bool is not a number")
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):
        return None
    if v.is_integer():
        return str(int(v))
    if len(Decimal(repr(v)).as_tuple().digits) > MAX_CANONICAL_DIGITS:  # (repr: the shortest that rounds to v)
        return None
    if abs(v) < 1e-307:  # (see MAX_LEADING_ZEROS)
        return None
    return plain_decimal(v)


# ---- bounds on doubles ------------------------------------------------------------------


def _is_even(f: float) -> bool:
    return struct.unpack("<q", struct.pack("<d", f))[0] & 1 == 0


def bound_readings(v: int | float) -> tuple[Decimal, Decimal]:
    """(decimal, exact) values of a schema bound: what the JSON text says, and what a
    parsed double is (they differ for doubles like 0.1 and 1e23). The grammar holds a
    number to a bound under both."""
    if isinstance(v, float):
        return Decimal(repr(v)), Decimal(v)
    return Decimal(v), Decimal(v)


def double_le_bound(b: Decimal, strict: bool) -> tuple[Decimal, bool]:
    """(m, inclusive): a decimal x rounds to a double <= b (< b when ``strict``) exactly when
    x < m, or x == m and ``inclusive``.

    ``b`` is the bound's exact value (an int, or a double's exact expansion). The largest
    double F that satisfies the bound decides it: decimals round to F or below up to the
    midpoint between F and the next double, and the midpoint itself rounds to the even one.
    """
    big = sys.float_info.max
    with localcontext() as ctx:
        ctx.prec = 1200  # a double's exact expansion has at most 767 significant digits

        def ok(f: float) -> bool:
            return Decimal(f) < b if strict else Decimal(f) <= b

        if b < Decimal(-big) or (b == Decimal(-big) and strict):
            # Only -inf qualifies: decimals below -(max + ulp/2) round to it.
            ulp = Decimal(big) - Decimal(math.nextafter(big, 0.0))
            return -(Decimal(big) + ulp / 2), False
        f = max(min(float(b), big), -big)
        while not ok(f):
            f = math.nextafter(f, -math.inf)
        while True:
            nxt = math.nextafter(f, math.inf)
            if math.isinf(nxt) or not ok(nxt):
                break
            f = nxt
        up = math.nextafter(f, math.inf)
        if math.isinf(up):  # F is the largest double: past F + ulp/2 decimals round to inf
            ulp = Decimal(f) - Decimal(math.nextafter(f, -math.inf))
            return Decimal(f) + ulp / 2, False
        return (Decimal(f) + Decimal(up)) / 2, _is_even(f)
