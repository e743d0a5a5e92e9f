"""The copy constraint: a string may only be a copy from given texts, a number only one
written in them.

A copy is a substring that starts and ends at word boundaries and neither starts nor ends
with whitespace: from "Weather in Belri, please" the copies include "Belri", "in Belri"
and "Belri, please", not "Belr" or "ather". (A plain substring rule lets a small model stop
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
from typing import Any, Iterable

from .fsa import EMPTY, NEVER, Node, alt, graph, literal
from .wireformat import WireFormat


def _in_word(c: str) -> bool:
    return c.isalnum() or c == "_"


def copy_starts(text: str, i: int) -> bool:
    """Whether a copy may start at ``text[i]``."""
    return not text[i].isspace() and (i == 0 or not (_in_word(text[i - 1]) and _in_word(text[i])))


def copy_ends(text: str, j: int) -> bool:
    """Whether a copy may end just before ``text[j]`` (``j == len(text)``: at the end)."""
    return not text[j - 1].isspace() and (j == len(text) or not (_in_word(text[j - 1]) and _in_word(text[j])))


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
