"""The copy constraint: a string may only be a substring of given texts, a number only one
written in them.

The substrings of a text form a regular language accepted by its suffix automaton (at
most 2n states, built online in O(n)), so a parameter marked ``"x-copy": true`` can be
intersected with the rest of its schema. The automaton works on characters; each edge is
spelled by the wire format (escapes included), so the language is over the same symbols
as everything else.

Example::

    >>> from agentloop.grammar.wireformat import load_wire_format
    >>> from agentloop.grammar.fsa import to_dfa
    >>> wf = load_wire_format("json")
    >>> d = to_dfa(substring_node(["Reykjavik"], wf), wf.n_symbols)
    >>> d.accepts(b"kjav"), d.accepts(b"Paris")
    (True, False)
"""

from __future__ import annotations

import re
from typing import Iterable

from .fsa import NEVER, Node, alt, graph, literal
from .wireformat import WireFormat


def suffix_automaton(text: str) -> list[dict[str, int]]:
    """Transitions of the suffix automaton of ``text``; every state accepts a substring."""
    nxt: list[dict[str, int]] = [{}]
    length = [0]
    link = [-1]
    last = 0
    for ch in text:
        cur = len(nxt)
        nxt.append({})
        length.append(length[last] + 1)
        link.append(0)
        p = last
        while p != -1 and ch not in nxt[p]:
            nxt[p][ch] = cur
            p = link[p]
        if p != -1:
            q = nxt[p][ch]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:
                clone = len(nxt)
                nxt.append(dict(nxt[q]))
                length.append(length[p] + 1)
                link.append(link[q])
                while p != -1 and nxt[p].get(ch) == q:
                    nxt[p][ch] = clone
                    p = link[p]
                link[q] = clone
                link[cur] = clone
        last = cur
    return nxt


def substring_node(texts: Iterable[str], wf: WireFormat) -> Node:
    """String content equal to a substring (possibly empty) of one of ``texts``."""
    branches = []
    spelled: dict[str, Node] = {}
    for text in texts:
        trans = suffix_automaton(text)
        edges = []
        for s, out in enumerate(trans):
            for ch, t in out.items():
                if ch not in spelled:
                    spelled[ch] = wf.spell_char(((ord(ch), ord(ch)),))
                edges.append((s, t, spelled[ch]))
        branches.append(graph(len(trans), list(range(len(trans))), edges))
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
