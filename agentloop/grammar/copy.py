"""The copy constraint: a string may only be a copy from given texts, a number only one
written in them.

A copy is a substring that starts and ends at word boundaries, neither starts nor ends
with whitespace, and does not end with the punctuation that closes a clause: from "Weather
in Belri, please." the copies include "Belri", "in Belri" and "Belri, please", not "Belr",
"ather", "Belri," or "please.". (A plain substring rule lets a small model stop
a name one letter short.) The copies of a text of n characters form a regular language: an
automaton with a state per position, entered at every word start and accepting at every
word end, so a parameter marked ``"x-copy": true`` can be intersected with the rest of its
schema. Its edges are spelled by the wire format (escapes included), so the language is
over the same symbols as everything else.

Example::

    >>> from agentloop.grammar.wireformat import load_wire_format
    >>> from agentloop.grammar.fsa import to_dfa
    >>> wf = load_wire_format("json")
    >>> d = to_dfa(copies_node(["Weather in Reykjavik?"], wf), wf.n_symbols)
    >>> d.accepts(b"Reykjavik"), d.accepts(b"in Reykjavik"), d.accepts(b"Reykja"), d.accepts(b"Paris")
    (True, True, False, False)
"""

from __future__ import annotations

import re
import threading
from typing import Any, Callable, Iterable

from . import charset as cs
from .fsa import EMPTY, NEVER, Node, alt, graph, literal
from .wireformat import WireFormat


def _in_word(c: str) -> bool:
    return c.isalnum() or c == "_"


def copy_starts(text: str, i: int) -> bool:
    """Whether a copy may start at ``text[i]``."""
    return not text[i].isspace() and (i == 0 or not (_in_word(text[i - 1]) and _in_word(text[i])))


#: Punctuation that ends a clause when whitespace or the end of the text follows it.
_CLAUSE_END = frozenset(".,;:!?")


def copy_ends(text: str, j: int) -> bool:
    """Whether a copy may end just before ``text[j]`` (``j == len(text)``: at the end).
    Not after the punctuation that ends a clause: "Read notes.txt." copies "notes.txt"."""
    at_end = j == len(text)
    if text[j - 1] in _CLAUSE_END and (at_end or text[j].isspace()):
        return False
    return not text[j - 1].isspace() and (at_end or not (_in_word(text[j - 1]) and _in_word(text[j])))


def is_copied(value: str, texts: Iterable[str]) -> bool:
    """Whether ``value`` is a copy from one of ``texts`` (the validator's side of the automaton)."""
    if not value:
        return True
    for text in texts:
        i = text.find(value)
        while i >= 0:
            if copy_starts(text, i) and copy_ends(text, i + len(value)):
                return True
            i = text.find(value, i + 1)
    return False


def uses_copy(schema: Any) -> bool:
    """Whether ``schema`` marks anything ``"x-copy": true`` (it then depends on the conversation)."""
    if isinstance(schema, dict):
        return bool(schema.get("x-copy")) or any(uses_copy(v) for v in schema.values())
    if isinstance(schema, list):
        return any(uses_copy(v) for v in schema)
    return False


def without_copy(schema: Any) -> Any:
    """``schema`` with every ``x-copy`` mark removed: the plain schema's language."""
    if isinstance(schema, dict):
        return {k: without_copy(v) for k, v in schema.items() if k != "x-copy"}
    if isinstance(schema, list):
        return [without_copy(v) for v in schema]
    return schema


def copies_node(texts: Iterable[str], wf: WireFormat) -> Node:
    """String content that is a copy (see above), or empty, from one of ``texts``."""
    branches = []
    spelled: dict[str, Node] = {}
    for text in texts:
        n = len(text)
        # state 0: before the copy; state k + 1: at position k of the text
        edges: list[tuple[int, int, Node]] = [(0, i + 1, EMPTY) for i in range(n) if copy_starts(text, i)]
        for k, ch in enumerate(text):
            if ch not in spelled:
                spelled[ch] = wf.spell_char(((ord(ch), ord(ch)),))
            edges.append((k + 1, k + 2, spelled[ch]))
        finals = [0] + [j + 1 for j in range(1, n + 1) if copy_ends(text, j)]
        branches.append(graph(n + 2, finals, edges))
    return alt(*branches) if branches else NEVER


# A number as people write it; a copied number is one of these, whole (not "16" out of "167").
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def copied_number_spellings(texts: Iterable[str]) -> list[str]:
    """Every number written in ``texts`` (with and without its minus sign), as written."""
    found: dict[str, None] = {}
    for text in texts:
        for m in _NUMBER.finditer(text):
            found[m.group(0)] = None
            found[m.group(0).lstrip("-")] = None
    return list(found)


def copied_number_node(texts: Iterable[str]) -> Node:
    """Spellings of a copied number: the numbers written in ``texts``, whole. Intersected
    with the schema's number automaton, so "007" still needs a schema that allows it."""
    spellings = copied_number_spellings(texts)
    return alt(*(literal(s.encode()) for s in spellings)) if spellings else NEVER


def copied_numbers(texts: Iterable[str]) -> set[float]:
    """The values a copied number parameter may take (the validator's side)."""
    return {float(s) for s in copied_number_spellings(texts)}


# ---- numbers copied into free text ----------------------------------------------------------
# The numbers rule (``"x-copy": "numbers"`` on a string, ``grounded_text_numbers`` on an
# answer): the text is free, but every number in it is one written in the sources. A small
# model that writes "46883" for a tool's "46.83", or "327 * 888" for "327 times 848", cannot.
#: A number inside free text as the rule reads it: a run of digits, with its fraction when a
#: digit follows the point ("6.83" in "6.83 m."; "1.2" and "3" in "1.2.3"). Signs are text.
_TEXT_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def written_numbers(texts: Iterable[str]) -> set[str]:
    """The numbers written in ``texts``, as the numbers rule reads them (unsigned)."""
    return {m.group(0) for text in texts for m in _TEXT_NUMBER.finditer(text)}


def numbers_are_copied(value: str, texts: Iterable[str]) -> bool:
    """Whether every number in ``value`` is written in one of ``texts`` (the validator's
    side of ``numbers_copied_node``)."""
    allowed = written_numbers(texts)
    return all(m.group(0) in allowed for m in _TEXT_NUMBER.finditer(value))


def numbers_copied_node(texts: Iterable[str], spell: Callable[[cs.CharSet], Node], nonempty: bool = False) -> Node:
    """Free text whose numbers are all written in ``texts``; ``spell`` spells one character
    of a set (``wf.spell_char`` inside a string, ``charset.utf8_node`` in raw text).

    States: outside a number; inside one, at a prefix of an allowed number (a trie); and
    "a whole number then a point that no digit may follow" (the point ends a sentence, not a
    fraction). Leaving a number is allowed only where the prefix is a whole allowed number,
    which mirrors ``_TEXT_NUMBER``'s greedy reading of the text.
    """
    allowed = written_numbers(texts)
    START, OUT, POINT = 0, 1, 2  # START: OUT before the first character (final unless nonempty)
    trie: dict[str, int] = {}
    for number in sorted(allowed):
        for i in range(1, len(number) + 1):
            trie.setdefault(number[:i], 3 + len(trie))
    non_digit = cs.minus(cs.ANY, cs.DIGIT)
    point = cs.of_chars(".")
    plain: dict[str, Node] = {"non_digit": spell(non_digit), "non_digit_point": spell(cs.minus(non_digit, point)),
                              "point": spell(point)}
    digit = {d: spell(cs.of_chars(d)) for d in "0123456789"}
    edges: list[tuple[int, int, Node]] = []
    finals = [OUT, POINT] + ([] if nonempty else [START])
    for q in (START, OUT):
        edges.append((q, OUT, plain["non_digit"]))
        edges += [(q, trie[d], digit[d]) for d in digit if d in trie]
    edges.append((POINT, OUT, plain["non_digit"]))
    for prefix, q in trie.items():
        edges += [(q, trie[prefix + d], digit[d]) for d in digit if prefix + d in trie]
        if "." not in prefix:  # the integer part
            whole = prefix in allowed
            if prefix + "." in trie:
                edges.append((q, trie[prefix + "."], plain["point"]))
            elif whole:
                edges.append((q, POINT, plain["point"]))
            if whole:
                edges.append((q, OUT, plain["non_digit_point"]))
                finals.append(q)
        else:  # after the point: a fraction follows, or the point was text after a whole number
            whole = prefix[:-1] in allowed if prefix.endswith(".") else prefix in allowed
            if whole:
                edges.append((q, OUT, plain["non_digit"]))
                finals.append(q)
    return graph(3 + len(trie), finals, edges)


# ---- holes: the envelope compiled once, each turn's copies spliced in ---------------------
#: Bytes that never occur in UTF-8. A copied value compiled as one of these ("a hole") keeps
#: its place in an automaton that does not depend on the conversation; each turn, the
#: copies are spliced in (``fsa.substitute``) instead of recompiling every tool.
HOLE_SYMBOLS = (0xFF, 0xFE, 0xFD, 0xFC, 0xFB, 0xFA, 0xF9, 0xF8, 0xF7, 0xF6, 0xF5, 0xC1, 0xC0)
STRING_HOLE = HOLE_SYMBOLS[0]  #: a copied string's content
STRING_NUMBERS_HOLE = HOLE_SYMBOLS[1]  #: a string's content under the numbers rule
TEXT_NUMBERS_HOLE = HOLE_SYMBOLS[2]  #: a final answer's raw text under the numbers rule
_NUMBER_HOLES = HOLE_SYMBOLS[3:]
#: What each fixed hole's fill is this turn: the ``schema._copies_dfa`` automaton of this kind.
FIXED_HOLE_KINDS = {STRING_HOLE: "copies", STRING_NUMBERS_HOLE: "string_numbers", TEXT_NUMBERS_HOLE: "text_numbers"}
#: A hole per distinct language that copies are intersected with: a copied number's
#: (integer, minimum...) or, under the numbers rule, a string's content (a pattern);
#: process-wide so that every tool agrees on the symbols.
_number_holes: dict[bytes, tuple[int, str, Any]] = {}  # key -> (symbol, kind, language)
_holes_lock = threading.Lock()

#: What a copied value's schema may say and still be a hole (anything else: full compile).
_HOLE_KEYS = {"type", "x-copy", "description", "title", "default", "examples"}
_NUMBER_KEYS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
_STRING_NUMBERS_KEYS = {"pattern", "minLength", "maxLength"}
_COMBINATORS = {"anyOf", "oneOf", "allOf", "not", "if", "then", "else", "$ref", "dependentSchemas"}


class HolesExhausted(Exception):
    """Every hole symbol is taken: compile this grammar in full (internal, never escapes
    ``compile_tools``)."""


def number_hole(dfa: Any, kind: str = "number") -> int:
    """The hole symbol standing for copied numbers of the language ``dfa`` (``kind``
    "number"), or for string content of the language ``dfa`` under the numbers rule
    ("string_numbers"); raises :class:`HolesExhausted` when every symbol is taken."""
    key = b"|".join([kind.encode(), dfa.trans.tobytes(), dfa.accept.tobytes(), str(dfa.start).encode(),
                     dfa.sym_class.tobytes()])
    with _holes_lock:
        if key not in _number_holes:
            free = [h for h in _NUMBER_HOLES if h not in {s for s, _, _ in _number_holes.values()}]
            if not free:
                raise HolesExhausted
            _number_holes[key] = (free[0], kind, dfa)
        return _number_holes[key][0]


def number_hole_language(symbol: int) -> tuple[str, Any]:
    """What a hole from ``number_hole`` stands for: (kind, language)."""
    with _holes_lock:
        return next((k, d) for s, k, d in _number_holes.values() if s == symbol)


def holes_fit(schema: Any, under_combinator: bool = False) -> bool:
    """Whether every copied value in ``schema`` can be a hole: a plain string, a number
    with at most bounds, a string under the numbers rule with at most a pattern and
    length bounds, and not under a combinator or reference (where the compiler
    reasons about values, which a hole does not have)."""
    if isinstance(schema, list):
        return all(holes_fit(v, under_combinator) for v in schema)
    if not isinstance(schema, dict):
        return True
    if schema.get("x-copy"):
        allowed = _HOLE_KEYS | (_NUMBER_KEYS if schema.get("type") in ("number", "integer") else set()) | (
            _STRING_NUMBERS_KEYS if schema.get("x-copy") == "numbers" and schema.get("type") == "string" else set())
        if under_combinator or not set(schema) <= allowed or schema.get("type") not in ("string", "number", "integer"):
            return False
    return all(holes_fit(v, under_combinator or k in _COMBINATORS) for k, v in schema.items())
