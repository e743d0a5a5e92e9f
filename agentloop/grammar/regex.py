"""The ECMA-262 regex subset that JSON Schema ``pattern`` and our ``format`` rules use.

Supported: literals, ``.``, classes ``[a-z]`` / ``[^...]``, escapes ``\\d \\w \\s`` (and
upper-case), ``\\n \\t \\r \\f \\v \\0 \\xHH \\uHHHH \\u{H..}``, identity escapes of
punctuation, groups ``(...)`` ``(?:...)`` ``(?<name>...)``, alternation, quantifiers
``* + ? {n} {n,} {n,m}`` (lazy forms mean the same language), and ``^`` / ``$`` at the ends of
top-level branches. Unsupported (back-references, lookaround, ``\\b``, ``\\p{..}``, anchors
mid-pattern, letter escapes that ECMA-262 and Python read differently such as ``\\A \\Z``)
raise a ``PatternError`` naming the construct and its offset.

Patterns are searches, not full matches: an unanchored side matches any prefix / suffix.
The parser emits fsa nodes through a ``spell`` callback that turns a code-point set into
the wire format's spelling of one character, so escaping lives in one place.

Two dialects judge a pattern: the spec's ECMA-262 and Python's ``re`` (what ``jsonschema``
runs). They differ on ``\\d \\w \\s`` (ASCII vs Unicode), ``.`` (Python lets ``\\r``,
U+2028 and U+2029 through) and ``$`` (Python also matches before a final newline). The
*under* language (default) holds only strings both dialects match; the *over* language
(``over=True``) holds every string either dialect matches. Negations (``not``, ``oneOf``)
subtract an over language, so every answer is sound under both dialects.
"""

from __future__ import annotations

from typing import Callable

from ..errors import PatternError
from . import charset as cs
from .fsa import EMPTY, Node, alt, rep, seq

Spell = Callable[[cs.CharSet], Node]

_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}


class _Parser:
    def __init__(self, pattern: str, spell: Spell, pointer: str, over: bool = False) -> None:
        self.p = pattern
        self.i = 0
        self.spell = spell
        self.pointer = pointer
        self.over = over
        # Set when the pattern uses a construct the two dialects read differently, so its
        # under and over languages differ.
        self.inexact = False

    def error(self, what: str) -> PatternError:
        return PatternError(
            f"pattern {self.p!r}: {what} at offset {self.i} is not supported",
            keyword="pattern",
            pointer=self.pointer,
        )

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self) -> str:
        c = self.p[self.i]
        self.i += 1
        return c

    # pattern := branch ('|' branch)*, with anchors allowed at branch ends
    def parse_top(self) -> Node:
        branches = []
        while True:
            anchored_start = False
            if self.peek() == "^":
                self.i += 1
                anchored_start = True
            body, anchored_end = self.parse_seq(top=True)
            any_text = rep(self.spell(cs.ANY))
            if anchored_end:
                # Python's '$' also matches just before a final newline; ECMA's does not.
                self.inexact = True
                if self.over:
                    body = seq(body, rep(self.spell(cs.of_chars("\n")), 0, 1))
            parts = ([] if anchored_start else [any_text]) + [body] + ([] if anchored_end else [any_text])
            branches.append(seq(*parts))
            if self.peek() == "|":
                self.i += 1
                continue
            if self.peek() is not None:
                raise self.error(f"unbalanced {self.peek()!r}")
            return alt(*branches)

    def parse_alt(self) -> Node:
        branches = [self.parse_seq(top=False)[0]]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.parse_seq(top=False)[0])
        return alt(*branches)

    def parse_seq(self, top: bool) -> tuple[Node, bool]:
        items: list[Node] = []
        while True:
            c = self.peek()
            if c is None or c == "|" or c == ")":
                return seq(*items) if items else EMPTY, False
            if c == "$":
                self.i += 1
                nxt = self.peek()
                if top and (nxt is None or nxt == "|"):
                    return seq(*items) if items else EMPTY, True
                raise self.error("'$' before the end of the pattern")
            if c == "^":
                raise self.error("'^' after the start of the pattern")
            atom = self.parse_atom()
            items.append(self.parse_quantifier(atom))

    def parse_quantifier(self, atom: Node) -> Node:
        c = self.peek()
        lo: int
        hi: int | None
        if c == "*":
            lo, hi = 0, None
        elif c == "+":
            lo, hi = 1, None
        elif c == "?":
            lo, hi = 0, 1
        elif c == "{":
            q = self.try_braces()
            if q is None:
                return atom
            lo, hi = q
            if self.peek() == "?":
                self.i += 1
            return rep(atom, lo, hi)
        else:
            return atom
        self.i += 1
        if self.peek() == "?":  # lazy: same language
            self.i += 1
        return rep(atom, lo, hi)

    def try_braces(self) -> tuple[int, int | None] | None:
        j = self.p.find("}", self.i)
        if j < 0:
            return None
        body = self.p[self.i + 1 : j]
        if body.startswith(","):
            # Python reads {,n} as {0,n}; ECMA-262 reads it as literal text.
            raise self.error(f"quantifier {{{body}}} without a minimum")
        parts = body.split(",")
        try:
            if len(parts) == 1:
                lo = hi = int(parts[0])
            elif len(parts) == 2:
                lo = int(parts[0])
                hi = int(parts[1]) if parts[1] else None
            else:
                return None
        except ValueError:
            return None
        if hi is not None and hi < lo:
            raise self.error(f"quantifier {{{body}}} with max < min")
        self.i = j + 1
        return lo, hi

    def parse_atom(self) -> Node:
        c = self.take()
        if c == "(":
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith("?<", self.i) and not self.p.startswith("?<=", self.i) and not self.p.startswith("?<!", self.i):
                j = self.p.find(">", self.i)
                if j < 0:
                    raise self.error("unterminated group name")
                self.i = j + 1
            elif self.peek() == "?":
                raise self.error("lookaround or group flag '(?'")
            inner = self.parse_alt()
            if self.peek() != ")":
                raise self.error("missing ')'")
            self.i += 1
            return inner
        if c == "[":
            return self.spell(self.parse_class())
        if c == ".":
            # ECMA's '.' excludes four line terminators, Python's only '\n'.
            self.inexact = True
            return self.spell(cs.minus(cs.ANY, cs.of_chars("\n") if self.over else cs.LINE_TERMINATORS))
        if c == "\\":
            narrow, wide = self.parse_escape(in_class=False)
            return self.spell(wide if self.over else narrow)
        if c in "*+?":
            raise self.error(f"quantifier {c!r} with nothing to repeat")
        if c == ")":
            raise self.error("unbalanced ')'")
        return self.spell(cs.of_chars(c))

    def parse_escape(self, in_class: bool) -> tuple[cs.CharSet, cs.CharSet]:
        """Return (narrow, wide) sets; they differ only for \\d \\w \\s and complements."""
        if self.peek() is None:
            raise self.error("trailing backslash")
        c = self.take()
        if c in "dws":
            self.inexact = True
            return cs.class_escape(c)
        if c in "DWS":
            self.inexact = True
            narrow, wide = cs.class_escape(c.lower())
            return cs.complement(wide), cs.complement(narrow)
        if c in _SIMPLE_ESCAPES:
            if c == "0" and self.peek() is not None and self.peek().isdigit():  # type: ignore[union-attr]
                raise self.error("octal escape")
            s = cs.of_chars(_SIMPLE_ESCAPES[c])
            return s, s
        if c == "x":
            s = cs.of_chars(chr(self.hex_digits(2)))
            return s, s
        if c == "u":
            if self.peek() == "{":
                j = self.p.find("}", self.i)
                if j < 0:
                    raise self.error("unterminated \\u{")
                cp = int(self.p[self.i + 1 : j], 16)
                self.i = j + 1
            else:
                cp = self.hex_digits(4)
            s = ((cp, cp),)
            return s, s
        if c == "c":
            letter = self.take()
            s = cs.of_chars(chr(ord(letter) % 32))
            return s, s
        if c.isdigit():
            raise self.error(f"back-reference '\\{c}'")
        if c in "bB" and not in_class:
            raise self.error(f"word boundary '\\{c}'")
        if c == "b":  # [\b] is backspace
            s = cs.of_chars("\b")
            return s, s
        if c in "pPk":
            raise self.error(f"escape '\\{c}'")
        if c.isalnum() or ord(c) > 0x7F:
            # ECMA-262 reads an unknown letter escape as the letter; Python either rejects
            # it or gives it a meaning (\A \Z anchors, \a bell, \N{name}, \U........).
            raise self.error(f"escape '\\{c}'")
        s = cs.of_chars(c)
        return s, s

    def hex_digits(self, n: int) -> int:
        text = self.p[self.i : self.i + n]
        if len(text) != n or any(ch not in "0123456789abcdefABCDEF" for ch in text):
            raise self.error("malformed hex escape")
        self.i += n
        return int(text, 16)

    def parse_class(self) -> cs.CharSet:
        negate = False
        if self.peek() == "^":
            negate = True
            self.i += 1
        members: list[cs.CharSet] = []
        if self.peek() == "]":
            # ECMA-262: '[]' matches nothing and '[^]' anything; Python: ']' is a member.
            raise self.error("']' first in a class")
        while True:
            c = self.peek()
            if c is None:
                raise self.error("unterminated '['")
            if c == "]":
                self.i += 1
                break
            lo_set = self.class_atom(negate)
            if self.peek() == "-" and self.i + 1 < len(self.p) and self.p[self.i + 1] != "]":
                self.i += 1
                hi_set = self.class_atom(negate)
                if len(lo_set) != 1 or len(hi_set) != 1 or lo_set[0][0] != lo_set[0][1] or hi_set[0][0] != hi_set[0][1]:
                    raise self.error("class range with a class escape")
                lo, hi = lo_set[0][0], hi_set[0][0]
                if hi < lo:
                    raise self.error("class range out of order")
                members.append(((lo, hi),))
            else:
                members.append(lo_set)
        s = cs.union(*members)
        return cs.complement(s) if negate else cs.minus(s, (cs.SURROGATES,))

    def class_atom(self, negated_class: bool) -> cs.CharSet:
        c = self.take()
        if c == "\\":
            narrow, wide = self.parse_escape(in_class=True)
            # A negated class is complemented afterwards, which swaps narrow and wide.
            return wide if negated_class != self.over else narrow
        return cs.of_chars(c)


def pattern_node(pattern: str, spell: Spell, pointer: str = "", over: bool = False) -> Node:
    """The language of strings (as spelled by ``spell``) in which ``pattern`` finds a match.

    ``over=False``: strings both ECMA-262 and Python's ``re`` match; ``over=True``: strings
    either matches.
    """
    return _Parser(pattern, spell, pointer, over).parse_top()


def pattern_is_exact(pattern: str, pointer: str = "") -> bool:
    """Whether the two dialects agree on every string, so under and over languages are equal."""
    parser = _Parser(pattern, lambda chars: EMPTY, pointer)
    parser.parse_top()
    return not parser.inexact


def full_match_node(pattern: str, spell: Spell, pointer: str = "") -> Node:
    """The language of strings that ``pattern`` matches entirely (used for ``format``).

    Format patterns are our own (ASCII classes, no '.'), so there is no dialect to choose;
    the anchors are read the ECMA way (no final newline).
    """
    return _Parser("^(?:" + pattern + ")$", spell, pointer).parse_top()
