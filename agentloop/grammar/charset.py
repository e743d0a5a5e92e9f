"""Sets of Unicode code points and their UTF-8 byte automata.

A ``CharSet`` is a sorted tuple of disjoint inclusive ranges. ``utf8_node`` turns one into
the byte-level expression that spells exactly its members in UTF-8 (surrogates excluded,
as UTF-8 cannot carry them), which is how string content reaches the symbol automaton.
"""

from __future__ import annotations

import functools
import re
from typing import Iterable

import numpy as np

from .fsa import Node, alt, byte_range, seq

MAX_CP = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)

CharSet = tuple[tuple[int, int], ...]


def normalize(ranges: Iterable[tuple[int, int]]) -> CharSet:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if lo > hi:
            continue
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((a, b) for a, b in out)


def union(*sets: CharSet) -> CharSet:
    return normalize(r for s in sets for r in s)


def _gaps(s: CharSet) -> CharSet:
    """Every code point in [0, MAX_CP] outside ``s`` (surrogates included)."""
    out = []
    prev = 0
    for lo, hi in s:
        if lo > prev:
            out.append((prev, lo - 1))
        prev = hi + 1
    if prev <= MAX_CP:
        out.append((prev, MAX_CP))
    return tuple(out)


def complement(s: CharSet) -> CharSet:
    """Every character outside ``s`` (surrogates are never characters in UTF-8)."""
    return intersect(_gaps(s), _gaps((SURROGATES,)))


def intersect(a: CharSet, b: CharSet) -> CharSet:
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo = max(a[i][0], b[j][0])
        hi = min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


def minus(a: CharSet, b: CharSet) -> CharSet:
    return intersect(a, _gaps(b)) if b else a


def contains(s: CharSet, cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in s)


def of_chars(chars: str) -> CharSet:
    return normalize((ord(c), ord(c)) for c in chars)


ANY: CharSet = minus(((0, MAX_CP),), (SURROGATES,))


# ---- UTF-8 -----------------------------------------------------------------------------

_LENGTH_BOUNDS = ((0, 0x7F), (0x80, 0x7FF), (0x800, 0xFFFF), (0x10000, MAX_CP))


def _encode(cp: int) -> bytes:
    return chr(cp).encode("utf-8", "surrogatepass")


def _split_utf8(lo: int, hi: int, out: list[list[tuple[int, int]]]) -> None:
    """Split [lo, hi] (same encoded length) into ranges whose bytes vary independently."""
    n = len(_encode(lo))
    for i in range(1, n):
        m = (1 << (6 * i)) - 1
        if lo & ~m != hi & ~m:
            if lo & m != 0:
                _split_utf8(lo, lo | m, out)
                _split_utf8((lo | m) + 1, hi, out)
                return
            if hi & m != m:
                _split_utf8(lo, (hi & ~m) - 1, out)
                _split_utf8(hi & ~m, hi, out)
                return
    a, b = _encode(lo), _encode(hi)
    out.append([(a[k], b[k]) for k in range(n)])


def utf8_sequences(s: CharSet) -> list[list[tuple[int, int]]]:
    out: list[list[tuple[int, int]]] = []
    for lo, hi in minus(s, (SURROGATES,)):
        for blo, bhi in _LENGTH_BOUNDS:
            a, b = max(lo, blo), min(hi, bhi)
            if a <= b:
                _split_utf8(a, b, out)
    return out


def utf8_node(s: CharSet) -> Node:
    """Byte-level node spelling exactly one member of ``s`` in UTF-8."""
    return alt(*(seq(*(byte_range(a, b) for a, b in parts)) for parts in utf8_sequences(s)))


# ---- character classes used by patterns and formats -------------------------------------
# JSON Schema patterns are ECMA-262, but jsonschema checks them with Python's `re`, whose
# \d \w \s are Unicode-wide. To stay sound under both, a positive escape uses the narrower
# set and a negated one the complement of the wider set.

DIGIT = of_chars("0123456789")
WORD = normalize([(ord("a"), ord("z")), (ord("A"), ord("Z")), (ord("0"), ord("9")), (95, 95)])
ECMA_SPACE = normalize(
    [(9, 13), (32, 32), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
     (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF)]
)
LINE_TERMINATORS = normalize([(10, 10), (13, 13), (0x2028, 0x2029)])


def _every_code_point() -> str:
    """One string of every code point in order, NUL in the surrogates' places (a str
    cannot encode them; NUL is in none of the classes below). 4.4 MB: built for each
    class (~20 ms), not kept."""
    cps = np.arange(MAX_CP + 1, dtype=np.uint32)  # (MAX_CP + 1,)
    cps[SURROGATES[0]:SURROGATES[1] + 1] = 0
    return cps.astype("<u4").tobytes().decode("utf-32-le")


def _python_class(escape: str) -> CharSet:
    """The code points Python's ``re`` matches with ``escape`` (what jsonschema checks
    patterns with), as ranges: ``re`` itself runs over every code point, ~20 ms a class,
    where a test per code point in Python took 150-270 ms (a cold compile of a pattern
    with \\d paid that in every new process)."""
    return tuple((m.start(), m.end() - 1) for m in re.finditer(escape + "+", _every_code_point()))


@functools.cache
def python_digit() -> CharSet:
    return _python_class(r"\d")


@functools.cache
def python_word() -> CharSet:
    return _python_class(r"\w")


@functools.cache
def python_space() -> CharSet:
    return _python_class(r"\s")


def class_escape(letter: str) -> tuple[CharSet, CharSet]:
    """(narrow, wide) sets of \\d \\w \\s; the upper-case escapes are complements of wide."""
    if letter == "d":
        return DIGIT, python_digit()
    if letter == "w":
        return WORD, python_word()
    if letter == "s":
        return intersect(ECMA_SPACE, python_space()), union(ECMA_SPACE, python_space())
    raise KeyError(letter)
