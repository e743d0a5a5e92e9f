"""JSON Schema (draft 2020-12 subset) -> expression node over a wire format's symbols.

The compiler works on *facets*: the schema at a pointer plus everything ``allOf`` and
``$ref`` pull in, each facet a plain dict with its JSON pointer and base URI. Keywords of
all facets are intersected (types, bounds, patterns, properties), ``anyOf`` / ``oneOf`` /
``if`` distribute over the facets, ``enum`` / ``const`` become literals (filtered by a
validator with our own pattern and format semantics), and each remaining type becomes a
node.

Two languages per schema. The *under* language (the one a canvas uses) is sound: every
string in it parses to a value that validates, under the spec (ECMA-262 patterns, RFC
formats) and under ``jsonschema`` (Python's ``re``, its format checkers). The *over*
language is complete: it holds the spelling of every valid value and perhaps more.
Where the two differ the compiler restricted something (bounded recursion and nesting,
counted lengths, a pattern escape the two regex dialects read differently, a format).
Negation needs both: ``not X`` is "a value minus over(X)", ``oneOf`` is "under(branch i)
minus over(every other branch)", and ``if`` / ``dependent*`` become such branches.

Subtracting spellings is only subtracting values when each value has one spelling, so
inside a negation the compiler switches to *canonical* spellings: object keys in one
global order (their first appearance in the schema document), numbers in one form
(:func:`numbers.canonical_number`), at most one key the schema never names.

Everything the compiler cannot represent exactly raises :class:`SchemaError` with the
keyword and its JSON pointer; it never accepts an invalid instance, and the bounds it
restricts by are parameters of :class:`SchemaOptions`. Where a bound leaves valid values
out, the compiler logs a :class:`Narrowing` (``SchemaCompiler.narrowings``).
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal, localcontext
from typing import Any, Callable, Iterator, Literal, Sequence
from urllib.parse import unquote, urldefrag, urljoin

import jsonschema
import numpy as np
import referencing.exceptions

from ..errors import AutomatonTooLarge, SchemaError
from . import charset as cs
from . import numbers
from . import fsa
from .fsa import (
    EMPTY,
    NEVER,
    Dfa,
    Node,
    alt,
    embed,
    graph,
    intersect_all,
    literal,
    minimize,
    product,
    rep,
    separated,
    seq,
    sym,
    to_dfa,
)
from .regex import full_match_node, pattern_is_exact, pattern_node
from .copy import (STRING_HOLE, STRING_NUMBERS_HOLE, copied_number_node, copied_numbers, copies_node, is_copied,
                   number_hole, numbers_are_copied, numbers_copied_node, written_numbers)
from .wireformat import WireFormat

Facet = tuple[Any, str, str]
"""(schema, JSON pointer, base URI the schema's own ``$id`` resolves against)."""

ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$comment", "deprecated", "readOnly",
    "writeOnly", "$schema", "$id", "$defs", "definitions", "contentMediaType",
    "contentEncoding", "contentSchema", "$vocabulary", "$anchor", "$dynamicAnchor",
})
ASSERTIONS = frozenset({
    "type", "properties", "required", "additionalProperties", "enum", "const", "anyOf",
    "oneOf", "allOf", "items", "prefixItems", "minItems", "maxItems", "minLength",
    "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "multipleOf", "$ref", "nullable", "uniqueItems", "x-copy", "not",
    "if", "then", "else", "patternProperties", "propertyNames", "dependentRequired",
    "dependentSchemas", "minProperties", "maxProperties", "contains", "minContains",
    "maxContains", "unevaluatedProperties", "unevaluatedItems",
})
UNSUPPORTED = frozenset({
    # Dynamic scope resolution.
    "$dynamicRef", "$recursiveRef", "$recursiveAnchor",
    # Earlier drafts' spellings: 2020-12 ignores them, a tool author most likely did not
    # mean that, so they are errors rather than silently dropped constraints.
    "dependencies", "additionalItems",
})
TYPES = ("null", "boolean", "object", "array", "number", "integer", "string")

# JSON Schema formats as full-match patterns. Each is the RFC grammar intersected with
# what jsonschema's checker accepts (no leap seconds: rfc3339-validator rejects them).
_YEAR = r"(?:[0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"
_LEAP = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (
    rf"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    rf"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{_LEAP}-02-29)"
)
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:[Zz]|[+\-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_H16 = r"[0-9A-Fa-f]{1,4}"
_LS32 = rf"(?:{_H16}:{_H16}|{_IPV4})"
_IPV6 = "(?:" + "|".join([
    rf"(?:{_H16}:){{6}}{_LS32}",
    rf"::(?:{_H16}:){{5}}{_LS32}",
    rf"(?:{_H16})?::(?:{_H16}:){{4}}{_LS32}",
    rf"(?:(?:{_H16}:){{0,1}}{_H16})?::(?:{_H16}:){{3}}{_LS32}",
    rf"(?:(?:{_H16}:){{0,2}}{_H16})?::(?:{_H16}:){{2}}{_LS32}",
    rf"(?:(?:{_H16}:){{0,3}}{_H16})?::{_H16}:{_LS32}",
    rf"(?:(?:{_H16}:){{0,4}}{_H16})?::{_LS32}",
    rf"(?:(?:{_H16}:){{0,5}}{_H16})?::{_H16}",
    rf"(?:(?:{_H16}:){{0,6}}{_H16})?::",
]) + ")"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
_A = r"[A-Za-z0-9]"
_LDH = r"[A-Za-z0-9\-]"


def _host_label(n: int) -> str:
    """Host name labels (RFC 1123) of at most n characters, without '--' in the 3rd and 4th
    position: those are reserved for IDNA A-labels ('xn--'), whose Punycode validity is
    not a regular language."""
    return rf"(?:{_A}|{_A}{_A}|{_A}{_LDH}{_A}|{_A}{_LDH}{{2}}{_A}|{_A}{_LDH}(?:{_A}{_LDH}|-{_A}){_LDH}{{0,{n - 5}}}{_A})"


# A host name has at most 253 characters. Counting them next to the label length takes
# ~24k DFA states, so the grammar keeps two shapes that cannot exceed it: up to 3 labels
# of up to 63 characters, or up to 8 labels of up to 30.
_HOSTNAME = rf"(?:{_host_label(63)}(?:\.{_host_label(63)}){{0,2}}|{_host_label(30)}(?:\.{_host_label(30)}){{3,7}})"
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+"
_QUOTED = r'"(?:[\x20\x21\x23-\x5B\x5D-\x7E]|\\[\x20-\x7E])*"'
# RFC 3986 (URI) and RFC 3987 (IRI: the same with non-ASCII letters).
_PCT = r"%[0-9A-Fa-f]{2}"
_SUB = r"!$&'()*+,;="
_UCS = (r"\u00A0-\uD7FF\uF900-\uFDCF\uFDF0-\uFFEF"
        + "".join(rf"\u{{{p:X}0000}}-\u{{{p:X}FFFD}}" for p in range(1, 14))
        + r"\u{E1000}-\u{EFFFD}")
_PRIVATE = r"\uE000-\uF8FF\u{F0000}-\u{FFFFD}\u{100000}-\u{10FFFD}"


def _uri_grammar(unreserved: str, private: str) -> tuple[str, str]:
    """(absolute, reference) patterns of RFC 3986 over the given unreserved class body."""
    pchar = rf"(?:[{unreserved}{_SUB}:@]|{_PCT})"
    seg, seg_nz = f"{pchar}*", f"{pchar}+"
    seg_nz_nc = rf"(?:[{unreserved}{_SUB}@]|{_PCT})+"
    userinfo = rf"(?:[{unreserved}{_SUB}:]|{_PCT})*"
    ip_future = rf"[vV][0-9A-Fa-f]+\.[A-Za-z0-9\-._~{_SUB}:]+"
    host = rf"(?:\[(?:{_IPV6}|{ip_future})\]|(?:[{unreserved}{_SUB}]|{_PCT})*)"
    authority = rf"(?:{userinfo}@)?{host}(?::[0-9]*)?"
    abempty = rf"(?:/{seg})*"
    absolute = rf"/(?:{seg_nz}(?:/{seg})*)?"
    query = rf"(?:{pchar}|[/?{private}])*"
    fragment = rf"(?:{pchar}|[/?])*"
    tail = rf"(?:\?{query})?(?:#{fragment})?"
    hier = rf"(?://{authority}{abempty}|{absolute}|{seg_nz}(?:/{seg})*|)"
    relative = rf"(?://{authority}{abempty}|{absolute}|{seg_nz_nc}(?:/{seg})*|)"
    full = rf"[A-Za-z][A-Za-z0-9+\-.]*:{hier}{tail}"
    return full, rf"(?:{full}|{relative}{tail})"


_URI, _URI_REF = _uri_grammar(r"A-Za-z0-9\-._~", "")
_IRI, _IRI_REF = _uri_grammar(rf"A-Za-z0-9\-._~{_UCS}", _PRIVATE)
_VARCHAR = rf"(?:[A-Za-z0-9_]|{_PCT})"
_VARSPEC = rf"{_VARCHAR}(?:\.?{_VARCHAR})*(?::[1-9][0-9]{{0,3}}|\*)?"
_DUR_TIME = r"T(?:[0-9]+H(?:[0-9]+M(?:[0-9]+S)?)?|[0-9]+M(?:[0-9]+S)?|[0-9]+S)"
_JSON_POINTER = r"(?:/(?:[^~/]|~[01])*)*"
FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": rf"{_DATE}[Tt]{_TIME}",
    "duration": rf"P(?:(?:[0-9]+D|[0-9]+M(?:[0-9]+D)?|[0-9]+Y(?:[0-9]+M(?:[0-9]+D)?)?)(?:{_DUR_TIME})?|{_DUR_TIME}|[0-9]+W)",
    # IPv6 address literals are left out: they double the automaton of every e-mail field.
    "email": rf"(?:{_ATOM}(?:\.{_ATOM})*|{_QUOTED})@(?:{_LABEL}(?:\.{_LABEL})*|\[{_IPV4}\])",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "uri": _URI,
    "uri-reference": _URI_REF,
    "iri": _IRI,
    "iri-reference": _IRI_REF,
    # literals as RFC 6570 with erratum 6937 (the apostrophe is a literal)
    "uri-template": (rf"(?:[!#$&'(-;=?-\[\]_a-z~{_UCS}{_PRIVATE}]|{_PCT}"
                     rf"|\{{[+#./;?&=,!@|]?{_VARSPEC}(?:,{_VARSPEC})*\}})*"),
    "ipv4": _IPV4,
    "ipv6": _IPV6,
    "hostname": _HOSTNAME,
    "json-pointer": _JSON_POINTER,
    # jsonschema's checker rejects a '0' followed by a digit anywhere in the prefix ("100")
    "relative-json-pointer": rf"(?:0|[1-9]+0?)(?:#|{_JSON_POINTER})",
}

# Over languages of the formats: every string valid under the RFC or under jsonschema's
# checker (with its optional package installed), so that subtracting one is sound for
# both. rfc3339-validator accepts what ``re.match(...$)`` does: a final newline too.
# None: any string (jsonschema checks these only with optional packages whose grammars
# we do not mirror).
_ANY_CHAR = r"(?:.|[\n\r\u2028\u2029])"
_TIME_ANY = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\.[0-9]+)?(?:[Zz]|[+\-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
#: The formats draft 2020-12 defines. One of them the compiler cannot represent is an
#: error; any other name (pydantic's "path", "password", "ipvanyaddress") only annotates
#: the string, as the spec says of formats it does not define.
STANDARD_FORMATS = frozenset({
    "date-time", "date", "time", "duration", "email", "idn-email", "hostname", "idn-hostname", "ipv4", "ipv6",
    "uri", "uri-reference", "iri", "iri-reference", "uuid", "uri-template", "json-pointer", "relative-json-pointer",
    "regex"})

FORMATS_OVER: dict[str, str | None] = {
    "date": _DATE,
    "time": rf"{_TIME_ANY}\n?",
    "date-time": rf"{_DATE}[Tt]{_TIME_ANY}\n?",
    "email": rf"[^@]*@{_ANY_CHAR}*",
    "ipv4": _IPV4,
    "ipv6": rf"{_IPV6}(?:%{_ANY_CHAR}+)?",
    "uuid": rf"{_ANY_CHAR}{{8}}-{_ANY_CHAR}{{4}}-{_ANY_CHAR}{{4}}-{_ANY_CHAR}{{4}}-{_ANY_CHAR}*",
}

_DEFAULT_BASE = "https://agentloop.invalid/schema.json"
# Private keys on the compiler's own copies of facets: the facet's id and the ids of the
# facets it was applied in place from (allOf, $ref, anyOf / oneOf branch, if / then /
# else, dependentSchemas). unevaluatedProperties / unevaluatedItems of a facet see the
# annotations of exactly the facets whose ancestry contains its id.
_ID = "$agentloop:id"
_PARENTS = "$agentloop:parents"
#: Keywords that name an object's keys: strict mode closes an object to them.
_KEY_NAMING_KEYWORDS = frozenset({"properties", "patternProperties", "required"})
_ABSOLUTE_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
# Keywords whose values are subschemas: one schema, a list of schemas, a name -> schema map.
SUBSCHEMA_ONE = ("additionalProperties", "items", "contains", "propertyNames", "not", "if", "then",
                 "else", "unevaluatedItems", "unevaluatedProperties", "contentSchema", "additionalItems")
SUBSCHEMA_LIST = ("allOf", "anyOf", "oneOf", "prefixItems")
SUBSCHEMA_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def rewrite_schemas(schema: Any, rewrite: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    """``schema`` with ``rewrite`` applied to each of its subschemas, innermost first, and
    to itself. Only schemas are rewritten: the values of other keywords (a ``default``, an
    ``enum``) and a property *named* like a keyword stay as they are.

    >>> rewrite_schemas({"title": "T", "properties": {"title": {"title": "U", "type": "string"}}},
    ...                 lambda s: {k: v for k, v in s.items() if k != "title"})
    {'properties': {'title': {'type': 'string'}}}
    """
    if not isinstance(schema, Mapping):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in SUBSCHEMA_MAP and isinstance(value, Mapping):
            value = {name: rewrite_schemas(sub, rewrite) for name, sub in value.items()}
        elif key in SUBSCHEMA_LIST and isinstance(value, list):
            value = [rewrite_schemas(sub, rewrite) for sub in value]
        elif key in SUBSCHEMA_ONE:
            value = rewrite_schemas(value, rewrite)
        out[key] = value
    return rewrite(out)


# Largest number of distinct patternProperties per object (regions are their subsets).
_MAX_PATTERNS = 5
# Largest number of if/then/else splits (dependentRequired / dependentSchemas entries
# included) one facet set may hold: each split doubles the branches.
_MAX_CONDITIONALS = 8
# uniqueItems is exact when items come from at most this many values (states: subsets).
_MAX_UNIQUE_VALUES = 10
# anyOf branches when unevaluated* is in use (each subset of branches is a case).
_MAX_ANY_OF_SUBSETS = 6
# Known keys a canonical object may carry as additional properties (each is a member
# slot of the object's automaton).
_MAX_KNOWN_EXTRAS = 32


@dataclass(frozen=True)
class SchemaOptions:
    """Bounds and policies of the compiler (all restrictions, never relaxations)."""

    #: An object schema that names keys (``properties``, ``patternProperties``,
    #: ``required``) without saying ``additionalProperties`` accepts only those keys
    #: (OpenAI-style strict tool schemas); one that names none is a free-form object.
    #: False follows the spec: extra keys with any value are allowed after the declared ones.
    strict: bool = True
    #: How many times one ``$ref`` may be expanded along a path (recursive schemas).
    max_ref_depth: int = 3
    #: Nesting depth of values under ``true`` schemas (any JSON value).
    any_value_depth: int = 2
    #: Largest counted ``minLength`` / ``maxLength`` / ``minItems`` / ``maxItems``.
    max_counted_length: int = 512
    #: Largest integer ``multipleOf`` (its automaton has that many states).
    max_multiple_of: int = 10_000
    #: Texts that ``x-copy`` parameters must be copied from (the copy constraint: a
    #: conversation's user messages and tool results). None, the default, compiles
    #: without a conversation: the marks are not enforced (each such parameter is what
    #: its other keywords say); a tuple, even an empty one, enforces them (with none, a
    #: copied parameter can take no value).
    copy_sources: tuple[str, ...] | None = None
    #: Compile copied values as hole symbols (``copy.HOLE_SYMBOLS``) instead of from
    #: ``copy_sources``: a language that does not depend on the conversation, into which
    #: ``fsa.substitute`` splices each turn's copies (where ``copy_sources`` is a tuple:
    #: with None the marks are not enforced). Only for schemas ``copy.holes_fit``.
    copy_holes: bool = False
    #: A tool envelope's final text may only write numbers that ``copy_sources`` write
    #: (the numbers rule of ``"x-copy": "numbers"``, applied to the answer).
    grounded_text_numbers: bool = False


#: The integers a double holds exactly reach this magnitude (2**53 - 1) ...
_EXACT_IN_DOUBLES = 2**53 - 1
#: ... and the largest double's (2**1024 - 2**971): past it an integer is no double.
_LARGEST_DOUBLE = 2**1024 - 2**971


def _within_exact_doubles(lo: int | None, hi: int | None, magnitude: int = _EXACT_IN_DOUBLES) -> tuple[int, int]:
    """[lo, hi] (None: unbounded) cut to the integers a double holds exactly (or, with
    ``magnitude`` ``_LARGEST_DOUBLE``, at all)."""
    return (-magnitude if lo is None else max(lo, -magnitude), magnitude if hi is None else min(hi, magnitude))


@dataclass(frozen=True)
class Narrowing:
    """A place where the compiled language holds fewer values than the schema allows.

    The grammar never lets through a value the schema refuses. Where the exact language
    has no finite automaton (lengths and item counts past ``max_counted_length``,
    recursion and nesting past their depths) or no single spelling per value (inside
    ``not`` and ``oneOf``, whose values are spelled one way to be taken away), it leaves
    valid values out and records where, as a :class:`SchemaCompiler`'s ``narrowings`` and
    :func:`agentloop.grammar.check_schema`'s result. ``negated``: the narrowing is of a
    subschema whose values are taken away (``not``, ``oneOf``, a failed ``if``, items
    that ``contains`` does not count), approximated there from above, so the values it
    covers beyond its own are the ones left out.

    Not listed: where jsonschema and the spec read a keyword differently (ECMA-262 against
    Python's ``re`` on ``$``, ``.`` and ``\\d``; a bound's decimal against the double a
    parser reads; the two format checkers), the grammar takes the values both accept.
    """

    #: JSON pointer of the keyword in the schema; for a value the schema leaves free (an
    #: array's items, an object's other keys), of its array or object, whose ``keyword``
    #: would describe it
    pointer: str
    keyword: str
    reason: str  #: what is left out, and the option that moves the bound where one does
    negated: bool = False

    def __str__(self) -> str:
        where = self.pointer or "(root)"
        if self.keyword and not self.pointer.endswith("/" + self.keyword):
            where += f" ({self.keyword})"
        negated = " (in a subschema whose values are taken away: not / oneOf / if / contains)" if self.negated else ""
        return f"{where}: {self.reason}{negated}"


@dataclass(frozen=True)
class _Ctx:
    """Where a subschema is compiled."""

    stack: tuple[str, ...]  # $ref targets expanded on the way here (recursion bound)
    depth: int  # nesting left for values under `true` schemas
    over: bool = False  # False: the sound under language; True: the complete over language
    canonical: bool = False  # one spelling per value (inside negations)


def _ptr(base: str, *parts: object) -> str:
    out = base
    for p in parts:
        out += "/" + str(p).replace("~", "~0").replace("/", "~1")
    return out


def json_equal(a: Any, b: Any) -> bool:
    """JSON Schema's equality (``enum``, ``const``): 1 == 1.0, true != 1, objects by keys."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _join(base: str, ref: str) -> str:
    """Resolve ``ref`` against ``base`` (RFC 3986; a bare fragment keeps any base scheme)."""
    if _ABSOLUTE_URI.match(ref):
        return ref
    if ref.startswith("#"):
        return urldefrag(base)[0] + ref
    return urljoin(base, ref)


def _strip_fragment(uri: str) -> str:
    return urldefrag(uri)[0]


# A one-sided bound on numbers: (value, inclusive).
_Side = tuple[Decimal, bool]


def _tighter_hi(a: _Side | None, b: _Side | None) -> _Side | None:
    if a is None or b is None:
        return a if b is None else b
    if a[0] != b[0]:
        return a if a[0] < b[0] else b
    return a[0], a[1] and b[1]


def _looser_hi(a: _Side | None, b: _Side | None) -> _Side | None:
    if a is None or b is None:
        return None
    if a[0] != b[0]:
        return a if a[0] > b[0] else b
    return a[0], a[1] or b[1]


#: 2**-54 exactly (a float's Decimal is exact; Decimal(2) ** -54 rounds to 28 digits,
#: below it, and refused 0.1, whose reciprocal error is 2**-54 itself)
_HALF_ULP = Decimal(2.0**-54)


#: A nest of counted repeats blamed for an automaton too large counts at least this many
#: positions (each several states; the budget is 1M states).
_BLAMED_COUNT = 1000


def _reciprocal_error(m: float, dm: Decimal) -> Decimal | None:
    """|d| where 1 / m (read as the decimal ``dm``) is an integer k and the double m is
    (1 + d) / k, else None. jsonschema's float division n / m rounds to the integer n * k
    for every integer n below 2**53 when |d| <= 2**-54: the exact quotient n * k / (1 + d)
    then lies about n * k * 2**-54 from n * k (a hair more for d < 0), under half an ulp
    on either side of it, n * k being below 2**53 (a quotient from 2**53 up is an
    integer anyway). 0.5 (d = 0: at any size), 0.1 and
    0.2 (d = 2**-54 exactly) and 1e-08 do; 1e-05 does not (1 / 1e-05 is
    99999.99999999999), nor 1/3 (whose shortest spelling has no integer reciprocal)."""
    with localcontext() as ctx:
        ctx.prec = 1200  # (m's exact expansion has at most 767 digits)
        k = Decimal(1) / dm
        if k != k.to_integral_value():
            return None
        return abs(Decimal(m) * k - 1)


def _neg(s: _Side | None) -> _Side | None:
    return None if s is None else (s[0].copy_negate(), s[1])


def _int_hi(s: _Side | None) -> int | None:
    if s is None:
        return None
    v, inclusive = s
    f = math.floor(v)
    return f - 1 if (not inclusive and f == v) else f


_checked: "OrderedDict[str, None]" = OrderedDict()


def _check_schema(root: Any) -> None:
    """Meta-validate ``root`` (memoised: per-step recompiles meet the same schemas again)."""
    key = json.dumps(root, sort_keys=True, default=repr)
    if key in _checked:
        return
    try:
        jsonschema.Draft202012Validator.check_schema(root)
    except jsonschema.SchemaError as e:
        hint = ""
        if e.validator == "format" and e.validator_value == "regex":
            hint = " (a pattern must compile with Python's re, which jsonschema checks with: no \\p{..} classes)"
        elif isinstance(root, dict) and isinstance(root.get("$schema"), str) and "2020-12" not in root["$schema"]:
            hint = (f" (the schema says it is {root['$schema']!r}; agentloop reads draft 2020-12, where an "
                    "array of `items` is `prefixItems` and `definitions` is `$defs`)")
        raise SchemaError(f"not a valid JSON Schema: {e.message}{hint}",
                          pointer="/" + "/".join(map(str, e.path))) from None
    _checked[key] = None
    while len(_checked) > 512:
        _checked.popitem(last=False)


def _check_json_value(v: Any, keyword: str, pointer: str) -> None:
    """``const`` and ``enum`` values must be JSON values (a Python schema can hold others)."""
    if isinstance(v, float) and not math.isfinite(v):
        raise SchemaError(f"{keyword} holds {v}, which JSON cannot spell", keyword=keyword, pointer=pointer)
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise SchemaError(f"{keyword} holds an object key {k!r}; JSON keys are strings", keyword=keyword,
                                  pointer=pointer)
            _check_json_value(x, keyword, _ptr(pointer, k))
    elif isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            _check_json_value(x, keyword, f"{pointer}/{i}")
    elif not (v is None or isinstance(v, (str, int, float))):
        raise SchemaError(f"{keyword} holds a {type(v).__name__} ({v!r}), which is not a JSON value"[:300],
                          keyword=keyword, pointer=pointer)


_char_any: dict[tuple[str, str], Dfa] = {}


def _char_any_dfa(wf: WireFormat) -> Dfa:
    key = (wf.name, wf.file_text)
    d = _char_any.get(key)
    if d is None:
        d = _char_any[key] = to_dfa(wf.spell_char(cs.ANY), wf.n_symbols)
    return d


_char_classes: "OrderedDict[tuple[str, str, cs.CharSet], Dfa]" = OrderedDict()
#: Printable ASCII but the quote and backslash: spelled as themselves in every wire format.
_PLAIN_ASCII = cs.minus(((0x20, 0x7E),), cs.of_chars('"\\'))


def _char_class_dfa(wf: WireFormat, chars: cs.CharSet) -> Dfa:
    """One spelled character of ``chars`` as a DFA (the latest 256 classes kept)."""
    key = (wf.name, wf.file_text, chars)
    d = _char_classes.get(key)
    if d is None:
        d = _char_classes[key] = to_dfa(wf.spell_char(chars), wf.n_symbols)
        while len(_char_classes) > 256:
            _char_classes.popitem(last=False)
    return d


_copies: "OrderedDict[tuple[Any, ...], Dfa]" = OrderedDict()


def _copies_dfa(sources: tuple[str, ...], wf: WireFormat,
                kind: Literal["copies", "string_numbers", "text_numbers"] = "copies") -> Dfa:
    """The copy constraint's automata, shared by every copied parameter of a model step:
    ``copies`` (string content that is a copy), ``string_numbers`` (string content whose
    numbers are copied) or ``text_numbers`` (a final answer's raw text, idem, not empty)."""
    if kind != "copies":  # the numbers rule reads only the numbers, which later steps often repeat
        sources = (" ".join(sorted(written_numbers(sources))),)
    key = (sources, wf.name, wf.file_text, kind)
    d = _copies.get(key)
    if d is None:
        if kind == "copies":
            node = copies_node(sources, wf)
        elif kind == "string_numbers":
            node = numbers_copied_node(sources, wf.spell_char)
        else:
            node = numbers_copied_node(sources, cs.utf8_node, nonempty=True)
        d = _copies[key] = to_dfa(node, wf.n_symbols)
        while len(_copies) > 16:
            _copies.popitem(last=False)
    return d


def canonical_key_rank(document: Any) -> dict[str, int]:
    """Every key a schema document names (properties, required, dependent*, enum / const
    objects), ranked by first appearance: the key order of canonical objects (the
    spelling inside negations; ``Protocol`` writes such objects in this order too)."""
    rank: dict[str, int] = {}

    def add(k: Any) -> None:
        if isinstance(k, str) and k not in rank:
            rank[k] = len(rank)

    def value_keys(v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                add(k)
                value_keys(x)
        elif isinstance(v, list):
            for x in v:
                value_keys(x)

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "properties" and isinstance(v, dict):
                    for name in v:
                        add(name)
                elif k == "required" and isinstance(v, list):
                    for name in v:
                        add(name)
                elif k == "dependentRequired" and isinstance(v, dict):
                    for name, names in v.items():
                        add(name)
                        for n in names if isinstance(names, list) else ():
                            add(n)
                elif k == "dependentSchemas" and isinstance(v, dict):
                    for name in v:
                        add(name)
                elif k in ("enum", "const", "examples", "default"):
                    value_keys(v)
                    continue
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(document)
    return rank


class SchemaCompiler:
    """Compile one root schema for one wire format. ``node()`` is the value language."""

    def __init__(self, root: Any, wf: WireFormat, options: SchemaOptions = SchemaOptions()) -> None:
        self.root = root
        self.wf = wf
        self.opt = options
        # (whether x-copy marks are enforced: with copy_holes as holes the sources fill)
        self._copying = options.copy_sources is not None
        self.n_symbols = wf.n_symbols
        _check_schema(root)
        # One spelled character as a small DFA: its expression (UTF-8 ranges, escapes) has
        # hundreds of nodes, and strings repeat it once per counted position.
        self.char_any = embed(_char_any_dfa(wf))
        # Counts restrictions taken while compiling (under differs from over there);
        # a branch compiled without any is exact and serves as both languages. The
        # narrowings a user may want to know of are logged too, as met (a memoised
        # branch logs its own again where it is reused).
        self._approx = 0
        self._narrowing_log: list[Narrowing] = []
        self._next_id = 0
        # Whether unevaluated* may occur (a cheap over-estimate): anyOf then splits into
        # every set of branches and a lone `if` is kept for its annotations.
        self._unevaluated = "unevaluated" in repr(root)
        self._dfa_cache: dict[Any, Dfa] = {}
        self._memo: dict[Any, tuple[Node, int, tuple[Narrowing, ...]]] = {}
        # The counted repeats built (schema location -> (keyword, count)): where an
        # automaton outgrows the compiler's budget, nested ones multiply (see too_large)
        self._counted: dict[str, tuple[str, int]] = {}
        self._index_resources()
        self._rank = canonical_key_rank(root)
        self._max_nesting = self._nesting_bound()
        self._validators = {False: self._validator_class(False), True: self._validator_class(True)}
        # The 2020-12 checker set: FormatChecker() mixes drafts (its "time" is draft 3's).
        checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
        self._roots = {over: cls(root, format_checker=checker) for over, cls in self._validators.items()}

    # ---- entry ------------------------------------------------------------------------
    def node(self) -> Node:
        ctx = _Ctx(stack=(), depth=self.opt.any_value_depth)
        return self.facets_node([(self.root, "", self.root_base)], ctx)

    def _dfa(self, node: Node) -> Dfa:
        return to_dfa(node, self.n_symbols)

    @property
    def narrowings(self) -> tuple[Narrowing, ...]:
        """Where the language compiled so far is narrower than the schema, in the order met."""
        return tuple(dict.fromkeys(self._narrowing_log))

    def _count(self, location: str, keyword: str, count: int) -> None:
        if count > 1 and count > self._counted.get(location, ("", 0))[1]:
            self._counted[location] = (keyword, count)

    def too_large(self, error: AutomatonTooLarge) -> AutomatonTooLarge:
        """``error`` (the automaton of this compiler's value outgrew the budget) with the
        nesting of counted repeats most likely to blame: the chain of locations, each
        inside the one before, whose counts multiply to the most (300 items of strings of
        up to 300 characters: 90,000 counted characters, each several states). Without
        counted repeats, ``error`` as it is."""
        def chain(location: str) -> list[str]:
            return [at for at in self._counted if location == at or location.startswith(at + "/")]

        if not self._counted:
            return error
        inner = max(self._counted, key=lambda at: (math.prod(self._counted[a][1] for a in chain(at)), len(at)))
        outer = sorted(chain(inner), key=len)
        parts = ", ".join(f"{self._counted[at][0]} {self._counted[at][1]} at '{at or '/'}'" for at in outer)
        total = math.prod(self._counted[at][1] for at in outer)
        if total < _BLAMED_COUNT:  # (too few counted positions to be the cause: the error as it was)
            return error
        return AutomatonTooLarge(
            f"the automaton of this value grows past {fsa.MAX_SUBSET_STATES:,} states while being built; its largest "
            f"nest of counted repeats is {parts} ({total:,} counted positions, each several states): lower those "
            "bounds (a canvas holds a few hundred tokens), or drop one (an unbounded string or array is a loop of "
            "a few states)", keyword=self._counted[outer[0]][0], pointer=_ptr(outer[0], self._counted[outer[0]][0]))

    def _narrow(self, ctx: _Ctx, pointer: str, keyword: str, reason: str) -> None:
        self._approx += 1
        self._narrowing_log.append(Narrowing(pointer, keyword, reason, ctx.over))

    def _too_deep(self, ctx: _Ctx, pointer: str, keyword: str, what: str) -> None:
        """The nesting bound met: ``what`` is generated there."""
        self._narrow(ctx, pointer, keyword, f"{what} from {self.opt.any_value_depth} levels below the root on "
                     "(SchemaOptions.any_value_depth)")

    # ---- $id / $anchor index and $ref resolution ----------------------------------------
    def _index_resources(self) -> None:
        """Map each schema resource URI and anchor of the document to its JSON pointer."""
        self.root_base = _DEFAULT_BASE
        self._resources: dict[str, str] = {}
        self._anchors: dict[str, str] = {}
        self._bases: dict[str, str] = {}  # pointer -> effective base URI of that schema

        def walk(schema: Any, ptr: str, base: str) -> None:
            if not isinstance(schema, dict):
                return
            if isinstance(schema.get("$id"), str):
                base = _strip_fragment(_join(base, schema["$id"]))
                self._resources.setdefault(base, ptr)
            self._bases[ptr] = base
            for kw in ("$anchor", "$dynamicAnchor"):
                if isinstance(schema.get(kw), str):
                    self._anchors.setdefault(base + "#" + schema[kw], ptr)
            for kw in SUBSCHEMA_ONE:
                if kw in schema:
                    walk(schema[kw], _ptr(ptr, kw), base)
            for kw in SUBSCHEMA_LIST:
                if isinstance(schema.get(kw), list):
                    for i, sub in enumerate(schema[kw]):
                        walk(sub, _ptr(ptr, kw, i), base)
            for kw in SUBSCHEMA_MAP:
                if isinstance(schema.get(kw), dict):
                    for k, sub in schema[kw].items():
                        walk(sub, _ptr(ptr, kw, k), base)

        self._resources[self.root_base] = ""
        walk(self.root, "", self.root_base)

    def _at(self, ptr: str) -> Any:
        node: Any = self.root
        for raw in ptr.split("/")[1:] if ptr else []:
            key = raw.replace("~1", "/").replace("~0", "~")
            node = node[int(key)] if isinstance(node, list) else node[key]
        return node

    def _parent_base(self, ptr: str) -> str:
        """Base URI in effect for the schema at ``ptr`` before its own ``$id``."""
        parts = ptr.split("/")
        for n in range(len(parts) - 1, 0, -1):
            p = "/".join(parts[:n])
            if p in self._bases:
                return self._bases[p]
        return self.root_base

    def resolve_ref(self, ref: str, base: str, pointer: str) -> tuple[Any, str]:
        """The target schema of ``ref`` (written at ``pointer``) and its JSON pointer."""
        uri, frag = urldefrag(_join(base, ref))
        doc = self._resources.get(uri)
        if doc is None:
            raise SchemaError(f"$ref {ref!r} points outside this schema document (inline it in $defs)", keyword="$ref", pointer=pointer)
        if frag and not frag.startswith("/"):
            target = self._anchors.get(uri + "#" + unquote(frag))
            if target is None:
                raise SchemaError(f"$ref {ref!r}: no $anchor {frag!r}", keyword="$ref", pointer=pointer)
        else:
            target = doc
            for raw in frag.split("/")[1:] if frag else []:
                target = _ptr(target, unquote(raw).replace("~1", "/").replace("~0", "~"))
        try:
            return self._at(target), target
        except (KeyError, IndexError, ValueError, TypeError):
            raise SchemaError(f"$ref {ref!r} points nowhere", keyword="$ref", pointer=pointer) from None

    # ---- a validator with our semantics (enum filtering, concrete keys) -------------------
    def _validator_class(self, over: bool) -> Any:
        """jsonschema's 2020-12 validator with our pattern / format semantics, judging
        negated subschemas with the opposite polarity (see the module docstring)."""
        base = jsonschema.Draft202012Validator
        comp = self
        error = jsonschema.ValidationError

        def other(validator: Any, schema: Any, flip: bool) -> Any:
            cls = comp._validators[over != flip]
            return cls(schema, _resolver=validator._resolver, format_checker=validator.format_checker)

        def pattern(validator: Any, patrn: str, instance: Any, schema: Any) -> Iterator[Any]:
            if isinstance(instance, str) and not comp._string_in(("pattern", patrn, over), instance):
                yield error(f"{instance!r} does not match {patrn!r}")

        def format_(validator: Any, fmt: str, instance: Any, schema: Any) -> Iterator[Any]:
            if not isinstance(instance, str):
                return
            if fmt not in FORMATS:
                # a standard format the compiler refuses on strings (idn-email, regex, ...)
                # still holds an enum or const member to jsonschema's check; any other name
                # only annotates
                if not over and fmt in STANDARD_FORMATS:
                    yield from base.VALIDATORS["format"](validator, fmt, instance, schema)
                return
            if not comp._string_in(("format", fmt, over), instance):
                yield error(f"{instance!r} is not a {fmt!r}")
                return
            if not over:
                yield from base.VALIDATORS["format"](validator, fmt, instance, schema)

        def type_(validator: Any, types: Any, instance: Any, schema: Any) -> Iterator[Any]:
            if instance is None and schema.get("nullable") is True:  # OpenAPI's nullable
                return
            yield from base.VALIDATORS["type"](validator, types, instance, schema)

        def not_(validator: Any, sub: Any, instance: Any, schema: Any) -> Iterator[Any]:
            if other(validator, sub, True).is_valid(instance):
                yield error(f"{instance!r} should not be valid under {sub!r}")

        def one_of(validator: Any, subs: Any, instance: Any, schema: Any) -> Iterator[Any]:
            same = [validator.evolve(schema=s).is_valid(instance) for s in subs]
            opposite = [other(validator, s, True).is_valid(instance) for s in subs]
            if not any(same[i] and not any(opposite[j] for j in range(len(subs)) if j != i) for i in range(len(subs))):
                yield error(f"{instance!r} is not valid under exactly one of the given schemas")

        def if_(validator: Any, sub: Any, instance: Any, schema: Any) -> Iterator[Any]:
            if validator.evolve(schema=sub).is_valid(instance):
                if validator.evolve(schema=schema.get("then", True)).is_valid(instance):
                    return
            if not other(validator, sub, True).is_valid(instance):
                if validator.evolve(schema=schema.get("else", True)).is_valid(instance):
                    return
            yield error(f"{instance!r} fails the if / then / else")

        def copy(validator: Any, on: Any, instance: Any, schema: Any) -> Iterator[Any]:
            if not on or over or comp.opt.copy_sources is None:
                return
            if on == "numbers" and isinstance(instance, str):
                if not numbers_are_copied(instance, comp.opt.copy_sources):
                    yield error(f"{instance!r} has a number not written in the conversation")
            elif isinstance(instance, str) and not is_copied(instance, comp.opt.copy_sources):
                yield error(f"{instance!r} is not copied from the conversation (whole words)")
            elif isinstance(instance, (int, float)) and not isinstance(instance, bool) and \
                    instance not in copied_numbers(comp.opt.copy_sources):
                yield error(f"{instance!r} is not a number written in the conversation")

        return jsonschema.validators.extend(
            base, {"pattern": pattern, "format": format_, "type": type_, "not": not_, "oneOf": one_of, "if": if_,
                   "x-copy": copy}
        )

    def _valid(self, value: Any, facet: Facet, over: bool) -> bool:
        schema, ptr, _base = facet
        if isinstance(schema, dict) and "$schema" in schema:
            # evolve() would pick a validator class by $schema and lose our semantics.
            schema = {k: v for k, v in schema.items() if k != "$schema"}
        try:
            return bool(self._roots[over].evolve(schema=schema).is_valid(value))
        except referencing.exceptions.Unresolvable as e:
            raise SchemaError(f"cannot resolve a $ref: {e}", keyword="$ref", pointer=ptr) from None

    def _string_dfa(self, key: tuple[Any, ...], ptr: str = "") -> Dfa:
        """Content languages of patterns / formats, over spelled string content (``ptr``:
        where the keyword is, for errors)."""
        d = self._dfa_cache.get(key)
        if d is None:
            try:
                if key[0] == "pattern":
                    d = self._dfa(pattern_node(key[1], self._spell_class, "", over=key[2]))
                else:
                    d = self._dfa(self.format_node(key[1], key[2]))
            except AutomatonTooLarge as e:
                raise AutomatonTooLarge(f"{key[0]} {key[1]!r}: {e.message}", keyword=key[0], pointer=ptr) from None
            self._dfa_cache[key] = d
        return d

    def _string_in(self, key: tuple[Any, ...], s: str) -> bool:
        return self._string_dfa(key).accepts(self.wf.spell_string_content(s))

    def _spell_class(self, chars: cs.CharSet) -> Node:
        """One character of ``chars``, spelled, for a pattern: a class beyond printable ASCII
        (non-ASCII, controls, a quote or backslash) as its small DFA, embedded (spelled
        out, '.' is ~200 NFA states in JSON's wire format: the NFA of '.{0,14}x.{0,14}' had
        6k, too many to simulate when its subset construction blows up; see
        ``fsa.to_dfa``)."""
        if not cs.minus(chars, _PLAIN_ASCII):  # (a byte a character: a few NFA edges, cheaper inline)
            return self.wf.spell_char(chars)
        return embed(_char_class_dfa(self.wf, chars))

    def format_node(self, name: str, over: bool = False) -> Node:
        if not over:
            return full_match_node(FORMATS[name], self._spell_class)
        pattern = FORMATS_OVER.get(name)
        return rep(self.char_any) if pattern is None else full_match_node(pattern, self._spell_class)

    def format_is_exact(self, name: str) -> bool:
        return FORMATS_OVER.get(name) == FORMATS[name]

    # ---- facets -------------------------------------------------------------------------
    def _check_keywords(self, schema: dict[str, Any], ptr: str) -> None:
        for key in schema:
            if key in UNSUPPORTED:
                raise SchemaError(f"keyword {key!r} is not supported by the grammar compiler", keyword=key, pointer=_ptr(ptr, key))
        if "x-copy" in schema and schema["x-copy"] not in (True, False, "numbers"):
            raise SchemaError(f'x-copy must be true, false or "numbers", got {schema["x-copy"]!r}', keyword="x-copy",
                              pointer=_ptr(ptr, "x-copy"))

    def expand(self, facets: Sequence[Facet], ctx: _Ctx) -> tuple[list[Facet], list[Facet], list[Facet], tuple[str, ...]] | str | None:
        """Flatten allOf and $ref; split off ``not`` subschemas and if/then/else facets.

        Returns (facets, negated facets, conditional facets, $ref stack); None when the
        conjunction is unsatisfiable (false), "junk" where the over language stops
        following the schema (recursion past the bound) and takes any value.
        """
        out: list[Facet] = []
        negs: list[Facet] = []
        conds: list[Facet] = []
        todo = list(facets)
        stack = ctx.stack
        while todo:
            schema, ptr, base = todo.pop(0)
            if schema is True or (isinstance(schema, dict) and not (schema.keys() - {_PARENTS})):
                continue
            if schema is False:
                return None
            if not isinstance(schema, dict):
                raise SchemaError("a schema must be an object or a boolean", pointer=ptr)
            self._check_keywords(schema, ptr)
            rest = dict(schema)
            if _ID not in rest:
                self._next_id += 1
                rest[_ID] = self._next_id
            tag = self._tagger(rest)
            if isinstance(rest.get("$id"), str):
                # Dropped once applied: expanded facets are expanded again after splits.
                base = _strip_fragment(_join(base, rest.pop("$id")))
            if "$ref" in rest:
                ref = rest.pop("$ref")
                target, target_ptr = self.resolve_ref(ref, base, _ptr(ptr, "$ref"))
                if stack.count(target_ptr) >= self.opt.max_ref_depth:
                    # Bounded recursion: deeper instances are not generated.
                    self._narrow(ctx, _ptr(ptr, "$ref"), "$ref",
                                 f"values that expand {ref!r} more than {self.opt.max_ref_depth} times along a path "
                                 "are not generated (SchemaOptions.max_ref_depth)")
                    return "junk" if ctx.over else None
                stack = stack + (target_ptr,)
                todo.append((tag(target), target_ptr, self._parent_base(target_ptr)))
            if "allOf" in rest:
                subs = rest.pop("allOf")
                todo.extend((tag(s), _ptr(ptr, "allOf", i), base) for i, s in enumerate(subs))
            if "not" in rest:
                # A negated subschema keeps no annotations: it starts its own scope.
                negs.append((rest.pop("not"), _ptr(ptr, "not"), base))
            then_, else_ = rest.pop("then", True), rest.pop("else", True)
            if "if" in rest:
                cond = {"if": tag(rest.pop("if")), "then": tag(then_), "else": tag(else_)}
                # Without then / else an `if` only matters for its annotations.
                if cond["then"] is not True or cond["else"] is not True or self._unevaluated:
                    conds.append((cond, ptr, base))
            # dependentRequired / dependentSchemas: "if the key is there, then ...".
            for name, names in rest.pop("dependentRequired", {}).items():
                if names:
                    conds.append(({"if": {"required": [name]}, "then": {"required": list(names)}, "else": True},
                                  _ptr(ptr, "dependentRequired", name), base))
            for name, sub in rest.pop("dependentSchemas", {}).items():
                if sub is not True and sub != {}:
                    conds.append(({"if": {"required": [name]}, "then": tag(sub), "else": True},
                                  _ptr(ptr, "dependentSchemas", name), base))
            out.append((rest, ptr, base))
        return out, negs, conds, stack

    @staticmethod
    def _tagger(parent: dict[str, Any]) -> Callable[[Any], Any]:
        """Copy a subschema applied in place from ``parent``, recording the ancestry."""
        scope = tuple(parent.get(_PARENTS, ())) + (parent[_ID],)

        def tag(sub: Any) -> Any:
            return {**sub, _PARENTS: scope} if isinstance(sub, dict) else sub

        return tag

    def _unevaluated_facets(self, fs: list[Facet], ctx: _Ctx) -> list[Facet]:
        """Rewrite each unevaluatedProperties / unevaluatedItems as a plain facet.

        The facets here are the ones this branch validates (anyOf / oneOf / if already
        chose), so the annotations a facet U sees come from the facets in its scope.
        Keys they evaluate become ``properties: true`` / ``patternProperties: true``, and U's
        schema becomes ``additionalProperties`` (items: ``prefixItems: [true, ...]`` and
        ``items``). anyOf is split into every set of branches (see facets_node), so the
        set that holds for a value is one of the cases and the rewrite is exact.
        """
        if not any("unevaluatedProperties" in s or "unevaluatedItems" in s for s, _, _ in fs):
            return fs
        out: list[Facet] = []
        extra: list[Facet] = []
        for schema, ptr, base in fs:
            if "unevaluatedProperties" not in schema and "unevaluatedItems" not in schema:
                out.append((schema, ptr, base))
                continue
            rest = dict(schema)
            props_kw = rest.pop("unevaluatedProperties", None)
            items_kw = rest.pop("unevaluatedItems", None)
            out.append((rest, ptr, base))
            me = schema[_ID]
            scope = [s for s, _, _ in fs if s is schema or me in s.get(_PARENTS, ())]
            if props_kw is not None:
                if not any("additionalProperties" in s or ("unevaluatedProperties" in s and s is not schema) for s in scope):
                    names = {k: True for s in scope for k in s.get("properties", {})}
                    pats = {p: True for s in scope for p in s.get("patternProperties", {})}
                    extra.append(({"properties": names, "patternProperties": pats, "additionalProperties": props_kw},
                                  _ptr(ptr, "unevaluatedProperties"), base))
            if items_kw is not None:
                if any("contains" in s for s in scope):
                    raise SchemaError("unevaluatedItems next to 'contains' is not supported (which items contains "
                                      "evaluates depends on their values)", keyword="unevaluatedItems",
                                      pointer=_ptr(ptr, "unevaluatedItems"))
                if not any("items" in s or ("unevaluatedItems" in s and s is not schema) for s in scope):
                    n = max([len(s.get("prefixItems", [])) for s in scope] or [0])
                    extra.append(({"prefixItems": [True] * n, "items": items_kw}, _ptr(ptr, "unevaluatedItems"), base))
        return out + extra

    def _memo_key(self, facets: Sequence[Facet], ctx: _Ctx, negs: Sequence[Facet]) -> Any:
        """What a facet set's language depends on: each facet's location, base and
        keywords (the compiler only ever removes keywords from its copies), the in-place
        ancestry among them (for unevaluated*), the negated facets and the context."""

        def one(f: Facet) -> Any:
            schema, ptr, base = f
            if not isinstance(schema, dict):
                return (ptr, base, schema)
            return (ptr, base, frozenset(k for k in schema if k not in (_ID, _PARENTS)))

        relations: Any = ()
        if self._unevaluated:
            ids = [s.get(_ID) if isinstance(s, dict) else None for s, _, _ in facets]
            relations = frozenset((i, j) for i, (s, _, _) in enumerate(facets) if isinstance(s, dict)
                                  for j, x in enumerate(ids) if x is not None and x in s.get(_PARENTS, ()))
        return (tuple(one(f) for f in facets), relations, tuple(one(f) for f in negs), ctx)

    def facets_node(self, facets: Sequence[Facet], ctx: _Ctx, negs: Sequence[Facet] = (),
                    at: tuple[str, str] = ("", "")) -> Node:
        """The language of values valid for every facet and for none of ``negs``; ``at``
        is where a value that no facet describes sits, which narrowings name: the
        pointer of its array or object and the keyword that would describe it ("items",
        "additionalProperties").

        Memoized: negations and oneOf compile the same subschemas many times over.
        """
        key = self._memo_key(facets, ctx, negs) if facets else (self._memo_key(facets, ctx, negs), at)
        hit = self._memo.get(key)
        if hit is not None:
            self._approx += hit[1]
            self._narrowing_log.extend(hit[2])
            return hit[0]
        before, start = self._approx, len(self._narrowing_log)
        node = self._facets_node(facets, ctx, negs, at)
        added = tuple(dict.fromkeys(self._narrowing_log[start:]))
        self._memo[key] = (node, self._approx - before, added)
        return node

    def _facets_node(self, facets: Sequence[Facet], ctx: _Ctx, negs: Sequence[Facet], at: tuple[str, str]) -> Node:
        expanded = self.expand(facets, ctx)
        if expanded is None:
            return NEVER
        if expanded == "junk":
            return self.over_any()
        fs, new_negs, conds, stack = expanded  # type: ignore[misc]
        ctx = replace(ctx, stack=stack)
        negs = list(negs) + new_negs
        if conds:
            return self.conditional_node(fs, conds, ctx, negs)
        # distribute the first anyOf / oneOf over the facets
        for i, (schema, ptr, base) in enumerate(fs):
            for kw in ("anyOf", "oneOf"):
                if kw in schema:
                    rest = dict(schema)
                    branches = rest.pop(kw)
                    tag = self._tagger(rest)
                    others = fs[:i] + [(rest, ptr, base)] + fs[i + 1 :]
                    items = [others + [(tag(b), _ptr(ptr, kw, j), base)] for j, b in enumerate(branches)]
                    if kw == "anyOf" and self._unevaluated and len(branches) > 1:
                        # unevaluated* sees the annotations of every valid branch: one
                        # case per set of branches that hold together.
                        if len(branches) > _MAX_ANY_OF_SUBSETS:
                            raise SchemaError(f"anyOf with more than {_MAX_ANY_OF_SUBSETS} branches in a schema that uses "
                                              "unevaluatedProperties / unevaluatedItems", keyword="anyOf", pointer=ptr)
                        items = [others + [(tag(b), _ptr(ptr, kw, j), base) for j, b in enumerate(branches) if m >> j & 1]
                                 for m in range(1, 1 << len(branches))]
                    if kw == "anyOf":
                        return alt(*(self.facets_node(f, ctx, negs) for f in items))
                    return self.one_of_node(others, [(tag(b), _ptr(ptr, kw, j), base) for j, b in enumerate(branches)],
                                            ctx, negs)
        if negs:
            return self.negation_node(fs, negs, ctx)
        if not fs:
            return self.any_value(ctx, *((facets[0][1], "") if facets else at))
        return self.typed_node(fs, ctx)

    def conditional_node(self, fs: list[Facet], conds: list[Facet], ctx: _Ctx, negs: list[Facet]) -> Node:
        """``if`` / ``then`` / ``else``: (if and then) or (not if and else), two disjoint
        branches, so their union is exact in both polarities."""
        if len(conds) > _MAX_CONDITIONALS:
            raise SchemaError(f"more than {_MAX_CONDITIONALS} if / dependent* conditions on one value",
                              keyword="if", pointer=conds[0][1])
        (cond, ptr, base), later = conds[0], conds[1:]
        if_f = (cond["if"], _ptr(ptr, "if"), base)
        then_f = (cond["then"], _ptr(ptr, "then"), base)
        else_f = (cond["else"], _ptr(ptr, "else"), base)
        yes = self.facets_node(fs + later + [if_f, then_f], ctx, negs)
        no = self.facets_node(fs + later + [else_f], ctx, negs + [if_f])
        return alt(yes, no)

    def _both(self, facets: list[Facet], ctx: _Ctx, negs: Sequence[Facet], over_narrows: bool = True
              ) -> tuple[Dfa, Dfa]:
        """(under, over) DFAs of a facet set in canonical spelling; one compile when exact.
        ``over_narrows=False``: the caller reads the over language only where nothing
        takes it away, so its approximations are not the grammar's narrowings."""
        c = replace(ctx, canonical=True)
        before = self._approx
        under = self._dfa(self.facets_node(facets, replace(c, over=False), negs))
        if self._approx == before:
            return under, under
        if over_narrows:
            return under, self._dfa(self.facets_node(facets, replace(c, over=True), negs))
        kept, self._narrowing_log = self._narrowing_log, []
        try:
            return under, self._dfa(self.facets_node(facets, replace(c, over=True), negs))
        finally:
            self._narrowing_log = kept

    def one_of_node(self, others: list[Facet], branches: list[Facet], ctx: _Ctx, negs: Sequence[Facet]) -> Node:
        """Exactly one branch, with the sibling facets ``others``:
        under = U_i (under(others, b_i) - U_{j!=i} over(b_j)); over = U_i (over(others, b_i) -
        U_{j!=i} under(b_j)), in canonical spelling, where a value has one spelling.

        The subtracted branches stand alone: whether a value is valid for branch j does not
        depend on the siblings (whose unevaluated* would see branch j's annotations).
        """
        c = replace(ctx, canonical=True)
        keep = [self._dfa(self.facets_node(others + [b], c, negs)) for b in branches]
        drop = [p[0] if ctx.over else p[1] for p in (self._both([b], ctx, ()) for b in branches)]
        n = len(branches)
        # prefix / suffix unions of `drop`, so each branch subtracts all the others once
        pre: list[Dfa | None] = [None] * (n + 1)
        suf: list[Dfa | None] = [None] * (n + 1)
        for i in range(n):
            pre[i + 1] = drop[i] if pre[i] is None else product(pre[i], drop[i], "or")  # type: ignore[arg-type]
        for i in range(n - 1, -1, -1):
            suf[i] = drop[i] if suf[i + 1] is None else product(drop[i], suf[i + 1], "or")  # type: ignore[arg-type]
        parts: list[Node] = []
        for i in range(n):
            rivals = [d for d in (pre[i], suf[i + 1]) if d is not None]
            mine = keep[i]
            if rivals:
                rest = rivals[0] if len(rivals) == 1 else product(rivals[0], rivals[1], "or")
                mine = product(mine, rest, "minus")
            if not mine.is_empty():
                parts.append(embed(mine))
        return alt(*parts)

    def negation_node(self, fs: list[Facet], negs: Sequence[Facet], ctx: _Ctx) -> Node:
        """Values of ``fs`` (canonical spelling) minus values of any negated facet, taken in
        the opposite polarity."""
        c = replace(ctx, canonical=True)
        base = self.typed_node(fs, c) if fs else self.any_value(c, negs[0][1].rsplit("/", 1)[0] if negs else "", "")
        flipped = replace(c, over=not ctx.over)
        removed = [self._dfa(self.facets_node([n], flipped)) for n in negs]
        out = self._dfa(base)
        for d in removed:
            out = product(out, d, "minus")
        return embed(out)

    # ---- keyword intersection ---------------------------------------------------------
    def typed_node(self, fs: list[Facet], ctx: _Ctx) -> Node:
        fs = self._unevaluated_facets(fs, ctx)
        enum_values: list[Any] | None = None
        for schema, ptr, base in fs:
            vals = None
            if "const" in schema:
                _check_json_value(schema["const"], "const", f"{ptr}/const")
                vals = [schema["const"]]
            if "enum" in schema:
                e = list(schema["enum"])
                for i, v in enumerate(e):
                    _check_json_value(v, "enum", f"{ptr}/enum/{i}")
                vals = e if vals is None else [v for v in vals if any(json_equal(v, x) for x in e)]
            if vals is not None:
                enum_values = vals if enum_values is None else [v for v in enum_values if any(json_equal(v, x) for x in vals)]
        if enum_values is not None:
            return self.enum_node(enum_values, fs, ctx)

        types = set(TYPES)
        for schema, ptr, base in fs:
            if "type" in schema:
                t = schema["type"]
                ts = {t} if isinstance(t, str) else set(t)
                if schema.get("nullable") is True:
                    ts.add("null")
                if "number" in ts:
                    ts.add("integer")
                types &= ts
        if "number" in types:
            types.discard("integer")  # the number language contains the integers
        branches = []
        for t in TYPES:
            if t not in types:
                continue
            if t == "null":
                branches.append(literal(b"null"))
            elif t == "boolean":
                branches.append(alt(literal(b"true"), literal(b"false")))
            elif t in ("integer", "number"):
                branches.append(self.number_node(fs, ctx, integer=(t == "integer")))
            elif t == "string":
                branches.append(self.string_node(fs, ctx))
            elif t == "array":
                branches.append(self.array_node(fs, ctx))
            elif t == "object":
                branches.append(self.object_node(fs, ctx))
        return alt(*branches)

    def enum_node(self, values: list[Any], fs: list[Facet], ctx: _Ctx) -> Node:
        kept: list[Node] = []
        seen: set[tuple[int, ...]] = set()
        differs = False
        for v in values:
            ok = all(self._valid(v, f, ctx.over) for f in fs)
            if ok != all(self._valid(v, f, not ctx.over) for f in fs):
                differs = True
            if not ok:
                continue
            spelled = self.spell_value(v, ctx)
            if spelled is not None and tuple(spelled) not in seen:
                seen.add(tuple(spelled))
                kept.append(literal(spelled))
        if differs:
            self._approx += 1
        return alt(*kept)

    def spell_value(self, v: Any, ctx: _Ctx) -> list[int] | None:
        """A literal's spelling (canonical inside negations); None if it has none here."""
        if not ctx.canonical:
            try:
                return self.wf.spell_value(v)
            except SchemaError:
                return None  # a key the wire format cannot spell: that value cannot occur
        return self._canonical_spelling(v)

    def _canonical_spelling(self, v: Any) -> list[int] | None:
        wf = self.wf
        if v is None or isinstance(v, bool):
            return wf.spell_value(v)
        if isinstance(v, (int, float)):
            text = numbers.canonical_spelling(v)
            return None if text is None else list(text.encode())
        if isinstance(v, str):
            return wf.spell_value(v)
        if isinstance(v, list):
            out = wf.lit("array_open")
            for i, item in enumerate(v):
                s = self._canonical_spelling(item)
                if s is None:
                    return None
                out += (wf.lit("item_separator") if i else []) + s
            return out + wf.lit("array_close")
        if isinstance(v, dict):
            unknown = [k for k in v if k not in self._rank]
            if len(unknown) > 1:
                return None  # canonical objects carry at most one unnamed key
            keys = sorted((k for k in v if k in self._rank), key=self._rank.__getitem__) + unknown
            out = wf.lit("object_open")
            for i, k in enumerate(keys):
                s = self._canonical_spelling(v[k])
                if s is None:
                    return None
                try:
                    ks = wf.key_symbols(k)
                except SchemaError:
                    return None
                out += (wf.lit("member_separator") if i else []) + ks + s
            return out + wf.lit("object_close")
        return None

    # ---- numbers ----------------------------------------------------------------------
    def number_node(self, fs: list[Facet], ctx: _Ctx, integer: bool) -> Node:
        # Each bound in both readings: the decimal the schema text says and the exact
        # value a parser compares against (a double). Integers are parsed exactly, other
        # spellings to a double, so each gets the bounds of its own reading.
        dec_hi: _Side | None = None  # decimal reading
        exact_hi: _Side | None = None  # exact reading (ints)
        dbl_hi: _Side | None = None  # condition on a decimal spelling that rounds within
        dec_lo: _Side | None = None  # lower bounds are kept negated (as upper bounds of -x)
        exact_lo: _Side | None = None
        dbl_lo: _Side | None = None
        multiples: list[tuple[Any, str]] = []
        for schema, ptr, base in fs:
            for kw, upper, strict in (("maximum", True, False), ("exclusiveMaximum", True, True),
                                      ("minimum", False, False), ("exclusiveMinimum", False, True)):
                if kw not in schema:
                    continue
                if isinstance(schema[kw], float) and not math.isfinite(schema[kw]):
                    if schema[kw] == (math.inf if upper else -math.inf):  # (pydantic's le=inf: no bound)
                        continue
                    raise SchemaError(f"{kw} {schema[kw]} admits no finite number (JSON has no infinities or nan)",
                                      keyword=kw, pointer=_ptr(ptr, kw))
                dec, exact = numbers.bound_readings(schema[kw])
                if not upper:  # (copy_negate is exact: unary minus rounds to the context's 28 digits)
                    dec, exact = dec.copy_negate(), exact.copy_negate()
                m, inclusive = numbers.double_le_bound(exact, strict)
                if upper:
                    dec_hi = _tighter_hi(dec_hi, (dec, not strict))
                    exact_hi = _tighter_hi(exact_hi, (exact, not strict))
                    dbl_hi = _tighter_hi(dbl_hi, (m, inclusive))
                else:
                    dec_lo = _tighter_hi(dec_lo, (dec, not strict))
                    exact_lo = _tighter_hi(exact_lo, (exact, not strict))
                    dbl_lo = _tighter_hi(dbl_lo, (m, inclusive))
            if "multipleOf" in schema:
                multiples.append((schema["multipleOf"], _ptr(ptr, "multipleOf")))

        # under: both readings hold; over: either does
        combine = _looser_hi if ctx.over else _tighter_hi
        int_hi, int_lo = combine(dec_hi, exact_hi), combine(dec_lo, exact_lo)
        frac_hi, frac_lo = combine(dec_hi, dbl_hi), combine(dec_lo, dbl_lo)
        if (int_hi, int_lo) != (_looser_hi(dec_hi, exact_hi), _looser_hi(dec_lo, exact_lo)) or \
                (frac_hi, frac_lo) != (_looser_hi(dec_hi, dbl_hi), _looser_hi(dec_lo, dbl_lo)):
            self._approx += 1

        int_multiple = 1
        only_integers = integer
        divided_as_doubles = False
        within_doubles = False  # (the integers a double holds, exactly or not)
        # (over language) a whole float multipleOf on the integers below 2**53 alone
        whole_multiple_below = 1
        for m, ptr in multiples:
            dm = Decimal(repr(m)) if isinstance(m, float) else Decimal(m)
            if isinstance(m, float):
                # jsonschema divides doubles for a float multipleOf. Below 2**53 an integer
                # n over a whole m is an integer exactly when n is a multiple (n / m is off
                # an integer by 1 / m at least, more than its rounding); past 2**53 and on
                # other spellings it may round to one. The under language keeps the
                # multiples below 2**53; the over one keeps a whole m's multiples there and
                # every other number (so that ``not`` takes the odd integers from it).
                self._approx += 1
                if ctx.over:
                    if dm == dm.to_integral_value() and 1 < dm <= self.opt.max_multiple_of:
                        whole_multiple_below = math.lcm(whole_multiple_below, int(dm))
                    continue
            if dm == dm.to_integral_value():
                int_multiple = math.lcm(int_multiple, int(dm))
                only_integers = True
                divided_as_doubles = divided_as_doubles or isinstance(m, float)
            elif integer and (d := _reciprocal_error(m, dm)) is not None and d <= _HALF_ULP:
                # n / m rounds to the integer n * (1 / m) for every integer n (exactly, where
                # 1 / m is exact); past the double range jsonschema cannot divide (it makes
                # n a double first: OverflowError), so the integers stop there
                divided_as_doubles = divided_as_doubles or d != 0
                within_doubles = True
                continue
            else:
                why = ("on numbers is not supported" if not (integer and isinstance(m, float)) else
                       f"jsonschema divides doubles, and n / {m} comes out off an integer for some integers n "
                       f"(the double {m} is not 1/k for an integer k closely enough)")
                raise SchemaError(f"multipleOf {m}: {why} (integer multiples, and 1/k on integers where the "
                                  "division is exact, are)", keyword="multipleOf", pointer=ptr)
        if int_multiple > self.opt.max_multiple_of:
            raise SchemaError(f"multipleOf {int_multiple} exceeds the compiler bound {self.opt.max_multiple_of} "
                              "(raise it with SchemaOptions(max_multiple_of=...))", keyword="multipleOf",
                              pointer=multiples[-1][1])

        narrowed_below = whole_multiple_below > 1 and int_multiple % whole_multiple_below != 0
        ilo, ihi = _int_hi(int_lo), _int_hi(int_hi)
        ilo = None if ilo is None else -ilo
        if divided_as_doubles:
            ilo, ihi = _within_exact_doubles(ilo, ihi)
        elif within_doubles:
            ilo, ihi = _within_exact_doubles(ilo, ihi, _LARGEST_DOUBLE)
        if ilo is not None and ihi is not None and ilo > ihi:
            ints: Node = NEVER
        else:
            ints = numbers.multiples_in(ilo, ihi, int_multiple)
            if narrowed_below:
                small = numbers.multiples_in(*_within_exact_doubles(ilo, ihi),
                                             math.lcm(int_multiple, whole_multiple_below))
                large = [numbers.multiples_in(lo, hi, int_multiple)
                         for lo, hi in ((ilo, -_EXACT_IN_DOUBLES - 1), (_EXACT_IN_DOUBLES + 1, ihi))
                         if lo is None or hi is None or lo <= hi]
                ints = alt(small, *large)
        if only_integers:
            node = ints
        elif int_hi is None and int_lo is None:
            node = alt(ints, numbers.non_integer_spellings()) if narrowed_below else numbers.any_number()
        else:
            lo = _neg(frac_lo)
            fracs = numbers.decimal_range(None if lo is None else lo[0], lo is not None and not lo[1],
                                          None if frac_hi is None else frac_hi[0], frac_hi is not None and not frac_hi[1],
                                          fraction_only=True)
            node = alt(ints, fracs)
        if ctx.canonical:
            node = embed(product(self._dfa(node), self._canonical_numbers(), "and"))
        if self._copying and any(schema.get("x-copy") for schema, _, _ in fs):
            self._approx += 1  # the validator reads values; the automaton, spellings
            if not ctx.over and self.opt.copy_holes:
                return sym(number_hole(self._dfa(node)))
            if not ctx.over:
                copied = self._dfa(copied_number_node(self.opt.copy_sources))
                node = embed(product(self._dfa(node), copied, "and"))
        return node

    def _canonical_numbers(self) -> Dfa:
        d = self._dfa_cache.get("canonical-numbers")
        if d is None:
            d = self._dfa_cache["canonical-numbers"] = self._dfa(numbers.canonical_number())
        return d

    # ---- strings ----------------------------------------------------------------------
    def string_node(self, fs: list[Facet], ctx: _Ctx) -> Node:
        return self.wf.string_node(self.string_content(fs, ctx))

    def string_content(self, fs: list[Facet], ctx: _Ctx) -> Node:
        """The spelled content (between the delimiters) of strings valid for ``fs``."""
        min_len, max_len, max_len_ptr = 0, None, ""
        patterns: list[tuple[str, str]] = []
        formats: list[tuple[str, str]] = []
        copy = copy_numbers = False
        for schema, ptr, base in fs:
            if "minLength" in schema:
                min_len = max(min_len, int(schema["minLength"]))
                if min_len > self.opt.max_counted_length:
                    raise SchemaError(f"minLength {min_len} exceeds the compiler bound {self.opt.max_counted_length} "
                                      "(raise it with SchemaOptions(max_counted_length=...))", keyword="minLength",
                                      pointer=_ptr(ptr, "minLength"))
            if "maxLength" in schema:
                m = int(schema["maxLength"])
                if max_len is None or m < max_len:
                    max_len, max_len_ptr = m, _ptr(ptr, "maxLength")
            if "pattern" in schema:
                patterns.append((schema["pattern"], _ptr(ptr, "pattern")))
            if "format" in schema:
                f = schema["format"]
                if f not in FORMATS and f in STANDARD_FORMATS:
                    raise SchemaError(f"format {f!r} is not supported; supported: {', '.join(sorted(FORMATS))}", keyword="format", pointer=_ptr(ptr, "format"))
                if f not in FORMATS:  # (a format the spec does not define is an annotation)
                    continue
                formats.append((f, _ptr(ptr, "format")))
            if schema.get("x-copy") == "numbers":
                copy_numbers = self._copying
            elif schema.get("x-copy"):
                copy = self._copying
        if max_len is not None:
            if max_len < min_len:
                return NEVER
            if max_len > self.opt.max_counted_length:
                # Restriction, not relaxation: a canvas is a few hundred tokens, so longer
                # strings are cut at the bound (documented in SchemaOptions).
                self._narrow(ctx, max_len_ptr, "maxLength", f"strings longer than {self.opt.max_counted_length} "
                             "characters are not generated (SchemaOptions.max_counted_length)")
                max_len = None if ctx.over else self.opt.max_counted_length
        self._count(fs[0][1], "maxLength" if max_len is not None else "minLength",
                    max_len if max_len is not None else min_len)
        content: Node = rep(self.char_any, min_len, max_len)
        constraints: list[Dfa] = []
        for p, ptr in patterns:
            if not pattern_is_exact(p, ptr):
                self._approx += 1
            constraints.append(self._string_dfa(("pattern", p, ctx.over), ptr))
        for f, ptr in formats:
            # Formats are asserted (format-assertion vocabulary, and jsonschema with its
            # format checkers): under holds strings valid for both, over for either.
            if ctx.over and FORMATS_OVER.get(f) is None:  # (taken as any string: see format_node)
                self._narrow(ctx, ptr, "format", f"format {f!r} has no exact grammar here: under not or oneOf it "
                             "is taken as any string, so the strings it refuses are left out too")
            elif not self.format_is_exact(f):
                self._approx += 1
            constraints.append(self._string_dfa(("format", f, ctx.over)))
        if copy:
            self._approx += 1
            if not ctx.over and self.opt.copy_holes:
                return sym(STRING_HOLE)  # holes_fit: a plain copied string
            if not ctx.over:
                copied = _copies_dfa(self.opt.copy_sources, self.wf)
                if not constraints and min_len == 0 and max_len is None and not copy_numbers:
                    return embed(copied)  # the substrings alone: every spelled character is valid
                constraints.append(copied)
        if copy_numbers:
            self._approx += 1
            if not ctx.over and self.opt.copy_holes:  # holes_fit: at most a pattern and length bounds
                if not constraints and min_len == 0 and max_len is None:
                    return sym(STRING_NUMBERS_HOLE)
                language = intersect_all([self._dfa(content)] + constraints)
                return sym(number_hole(language, "string_numbers"))
            if not ctx.over:
                numbers = _copies_dfa(self.opt.copy_sources, self.wf, "string_numbers")
                if not constraints and min_len == 0 and max_len is None:
                    return embed(numbers)
                constraints.append(numbers)
        if constraints:
            content = embed(intersect_all([self._dfa(content)] + constraints))
        return content

    # ---- arrays -----------------------------------------------------------------------
    def array_node(self, fs: list[Facet], ctx: _Ctx) -> Node:
        lo, hi, hi_ptr = 0, None, ""
        k = 0  # prefix length
        contains: list[Facet] = []
        min_c, max_c = 1, None
        unique = False
        for schema, ptr, base in fs:
            lo = max(lo, int(schema.get("minItems", 0)))
            if "maxItems" in schema and (hi is None or int(schema["maxItems"]) < hi):
                hi, hi_ptr = int(schema["maxItems"]), _ptr(ptr, "maxItems")
            k = max(k, len(schema.get("prefixItems", [])))
            if "contains" in schema:
                contains.append((schema["contains"], _ptr(ptr, "contains"), base))
                min_c = int(schema.get("minContains", 1))
                max_c = int(schema["maxContains"]) if "maxContains" in schema else None
            if schema.get("uniqueItems") is True:
                unique = True
        if lo > self.opt.max_counted_length:
            raise SchemaError(f"minItems {lo} exceeds the compiler bound {self.opt.max_counted_length} (raise it with "
                              "SchemaOptions(max_counted_length=...))", keyword="minItems",
                              pointer=next((_ptr(p, "minItems") for sch, p, _ in fs if sch.get("minItems") == lo),
                                           fs[0][1]))
        if hi is not None and hi > self.opt.max_counted_length:
            self._narrow(ctx, hi_ptr, "maxItems", f"arrays of more than {self.opt.max_counted_length} items are not "
                         "generated (SchemaOptions.max_counted_length)")
            hi = None if ctx.over else self.opt.max_counted_length
        if len(contains) > 1:
            raise SchemaError("'contains' in more than one allOf branch of one array is not supported",
                              keyword="contains", pointer=contains[1][1])
        if contains and min_c == 0 and max_c is None:
            contains = []  # minContains 0 without a maximum asserts nothing
        if unique and contains:
            raise SchemaError("'uniqueItems' together with 'contains' is not supported", keyword="uniqueItems", pointer=fs[0][1])
        child = replace(ctx, depth=ctx.depth - 1, canonical=ctx.canonical or bool(contains) or unique)

        def item(i: int | None) -> Node | None:
            """Item i (None: any item past every prefix); None when no item may be there."""
            f: list[Facet] = []
            for schema, ptr, base in fs:
                pre = schema.get("prefixItems", [])
                if i is not None and i < len(pre):
                    f.append((pre[i], _ptr(ptr, "prefixItems", i), base))
                elif "items" in schema:
                    if schema["items"] is False:
                        return None
                    f.append((schema["items"], _ptr(ptr, "items"), base))
            return self.facets_node(f, child, (), (fs[0][1], "items"))

        rest = item(None)
        if rest is None:
            hi = k if hi is None else min(hi, k)
        if hi is not None and hi < lo:
            return NEVER
        open_, close = literal(self.wf.lit("array_open")), literal(self.wf.lit("array_close"))
        if unique:
            body = self.unique_body([item(i) for i in range(k)], rest, lo, hi)
            if body is not None:
                return seq(open_, body, close)
            if not ctx.over:
                raise SchemaError(f"uniqueItems needs items drawn from at most {_MAX_UNIQUE_VALUES} values (an enum, booleans, ...)",
                                  keyword="uniqueItems", pointer=fs[0][1])
            self._narrow(ctx, _ptr(fs[0][1], "uniqueItems"), "uniqueItems", "uniqueness is not tracked")
        if contains:
            return seq(open_, self.contains_body([item(i) for i in range(k)], rest, lo, hi, contains[0], min_c, max_c, child), close)
        sep = literal(self.wf.lit("item_separator"))

        def tail(i: int) -> Node:
            """What may follow once i >= 1 items are written."""
            if i >= k:
                if rest is None:
                    return EMPTY if i >= lo else NEVER
                return rep(seq(sep, rest), max(lo - i, 0), None if hi is None else hi - i)
            stop = EMPTY if i >= lo else NEVER
            if hi is not None and i >= hi:
                return stop
            return alt(stop, seq(sep, item(i) or NEVER, tail(i + 1)))

        self._count(fs[0][1], ("maxItems" if hi_ptr else "prefixItems") if hi is not None else "minItems",
                    hi if hi is not None else lo)
        if hi == 0:
            body: Node = EMPTY
        else:
            if k == 0 and rest is not None and hi is None and lo <= 1:
                nonempty = separated(rest, sep)  # the item built once (see ``separated``)
            else:
                first = item(0) if k > 0 else rest
                nonempty = seq(first or NEVER, tail(1))
            body = nonempty if lo > 0 else alt(EMPTY, nonempty)
        return seq(open_, body, close)

    def contains_body(self, prefix: list[Node | None], rest: Node | None, lo: int, hi: int | None,
                      facet: Facet, min_c: int, max_c: int | None, ctx: _Ctx) -> Node:
        """Items counted by ``contains``: each item is either in C (counted) or surely not
        (not counted); under takes under(C) and removes over(C), over the reverse."""
        c_under, c_over = self._both([facet], replace(ctx, over=False), ())
        c_in, c_out = (c_over, c_under) if ctx.over else (c_under, c_over)
        sep = literal(self.wf.lit("item_separator"))

        def split(node: Node | None) -> tuple[Node, Node]:
            if node is None:
                return NEVER, NEVER
            d = self._dfa(node)
            return embed(product(d, c_in, "and")), embed(product(d, c_out, "minus"))

        parts = [split(p) for p in prefix]
        rest_parts = split(rest)
        k = len(prefix)
        top = hi if hi is not None else max(k, lo, 1)
        cap = max_c if max_c is not None else min_c
        edges: list[tuple[int, int, Node]] = []

        def sid(pos: int, c: int) -> int:
            return pos * (cap + 1) + c

        for pos in range(top + 1):
            if hi is not None and pos >= hi:
                continue
            if rest is None and pos >= k:
                continue
            counted, other = parts[pos] if pos < k else rest_parts
            nxt = min(pos + 1, top)
            for c in range(cap + 1):
                lead = [sep] if pos > 0 else []
                c2 = c + 1 if max_c is not None else min(c + 1, cap)
                if c2 <= cap:
                    edges.append((sid(pos, c), sid(nxt, c2), seq(*lead, counted)))
                edges.append((sid(pos, c), sid(nxt, c), seq(*lead, other)))
        finals = [sid(pos, c) for pos in range(lo, top + 1) for c in range(min_c, cap + 1)]
        return graph((top + 1) * (cap + 1), finals, edges)

    def unique_body(self, prefix: list[Node | None], rest: Node | None, lo: int, hi: int | None) -> Node | None:
        """uniqueItems over a finite item language: states are the sets of values used (in
        canonical spelling a value has one spelling, so distinct strings are distinct
        values). None when the items are not drawn from a small finite set."""
        langs = [None if p is None else self._dfa(p) for p in prefix] + [None if rest is None else self._dfa(rest)]
        values: list[tuple[int, ...]] = []
        for d in langs:
            if d is None:
                continue
            words = _finite_words(d, _MAX_UNIQUE_VALUES)
            if words is None:
                return None
            values.extend(w for w in words if w not in values)
        if len(values) > _MAX_UNIQUE_VALUES:
            return None
        k = len(prefix)
        sep = literal(self.wf.lit("item_separator"))
        edges: list[tuple[int, int, Node]] = []
        finals: list[int] = []
        n = len(values)
        for used in range(1 << n):
            pos = bin(used).count("1")
            if pos >= lo and (hi is None or pos <= hi):
                finals.append(used)
            if hi is not None and pos >= hi:
                continue
            lang = langs[pos] if pos < k else langs[k]
            if lang is None:
                continue
            for j, w in enumerate(values):
                if used >> j & 1 or not lang.accepts(w):
                    continue
                edges.append((used, used | 1 << j, seq(sep, literal(w)) if pos else literal(w)))
        return graph(1 << n, finals, edges)

    # ---- objects ----------------------------------------------------------------------
    def object_node(self, fs: list[Facet], ctx: _Ctx) -> Node:
        advanced = any(kw in schema for schema, _, _ in fs
                       for kw in ("patternProperties", "propertyNames", "minProperties", "maxProperties"))
        if not ctx.canonical and not advanced:
            return self.object_plain(fs, ctx)
        return self.object_general(fs, ctx)

    def _declared(self, fs: list[Facet]) -> tuple[list[str], list[str]]:
        order: list[str] = []
        required: list[str] = []
        for schema, ptr, base in fs:
            for k in schema.get("properties", {}):
                if k not in order:
                    order.append(k)
        for schema, ptr, base in fs:
            for k in schema.get("required", []):
                if k not in required:
                    required.append(k)
                if k not in order:
                    order.append(k)
        return order, required

    def object_plain(self, fs: list[Facet], ctx: _Ctx) -> Node:
        """Objects with properties / required / additionalProperties: declared keys in
        schema order, then extra keys in any order."""
        order, required = self._declared(fs)
        child = replace(ctx, depth=ctx.depth - 1)

        def facets_for(key: str) -> list[Facet] | None:
            out: list[Facet] = []
            for schema, ptr, base in fs:
                props = schema.get("properties", {})
                if key in props:
                    out.append((props[key], _ptr(ptr, "properties", key), base))
                elif "additionalProperties" in schema:
                    if schema["additionalProperties"] is False:
                        return None
                    out.append((schema["additionalProperties"], _ptr(ptr, "additionalProperties"), base))
            return out

        members: list[tuple[str, Node, bool]] = []
        for key in order:
            f = facets_for(key)
            is_req = key in required
            if f is None:
                if is_req:
                    return NEVER
                continue
            ptr = fs[0][1]
            value = self.facets_node(f, child)
            key_node = literal(self.wf.key_symbols(key, _ptr(ptr, "properties", key)))
            members.append((key, seq(key_node, value), is_req))

        # extra keys: forbidden if any facet says false, or strict with nothing said
        extra: Node | None = None
        add_facets: list[Facet] = []
        forbidden = False
        said = False
        for schema, ptr, base in fs:
            if "additionalProperties" in schema:
                said = True
                if schema["additionalProperties"] is False:
                    forbidden = True
                else:
                    add_facets.append((schema["additionalProperties"], _ptr(ptr, "additionalProperties"), base))
        if not forbidden and (said or not self._strict_closes(fs)):
            if ctx.depth > 0 or ctx.over:
                value = self.facets_node(add_facets, child, (), (fs[0][1], "additionalProperties"))
                any_key = self._any_key()
                if order:
                    declared = to_dfa(alt(*(literal(self.wf.key_symbols(k)) for k in order if self._spellable(k))), self.n_symbols)
                    any_key = product(any_key, declared, "minus")
                extra = seq(embed(any_key), value)
            if ctx.depth <= 0:  # nesting bound: no extra keys this deep
                self._too_deep(ctx, fs[0][1], "additionalProperties", "no keys but the named ones")

        msep = literal(self.wf.lit("member_separator"))
        n = len(members)
        # states: 2*i + e, i = members considered, e = whether anything was written yet
        edges: list[tuple[int, int, Node]] = []
        for i, (key, node, is_req) in enumerate(members):
            for e in (0, 1):
                src = 2 * i + e
                edges.append((src, 2 * (i + 1) + 1, seq(msep, node) if e else node))
                if not is_req:
                    edges.append((src, 2 * (i + 1) + e, EMPTY))
        finals = [2 * n, 2 * n + 1]
        if extra is not None:
            edges.append((2 * n, 2 * n + 1, extra))
            edges.append((2 * n + 1, 2 * n + 1, seq(msep, extra)))
        body = graph(2 * n + 2, finals, edges)
        return seq(literal(self.wf.lit("object_open")), body, literal(self.wf.lit("object_close")))

    def _any_key(self) -> Dfa:
        d = self._dfa_cache.get("any-key")
        if d is None:
            d = self._dfa_cache["any-key"] = self._dfa(self.wf.any_key_node())
        return d

    def _spellable(self, key: str) -> bool:
        try:
            self.wf.key_symbols(key)
            return True
        except SchemaError:
            return False

    # -- general objects: patternProperties, propertyNames, min/maxProperties, canonical --
    def _key_content(self, key: str) -> list[int] | None:
        """A key's spelled content (what sits in the key template's ${key})."""
        try:
            ks = self.wf.key_symbols(key)
        except SchemaError:
            return None
        if self.wf.value.get("key_style") == "identifier":
            return list(key.encode())
        del ks
        return self.wf.spell_string_content(key)

    def _key_domain(self) -> Dfa:
        """Every spellable key content."""
        d = self._dfa_cache.get("key-domain")
        if d is None:
            if self.wf.value.get("key_style") == "identifier":
                first = cs.utf8_node(cs.normalize([(65, 90), (97, 122), (95, 95)]))
                more = cs.utf8_node(cs.normalize([(48, 57), (65, 90), (97, 122), (95, 95)]))
                node: Node = seq(first, rep(more))
            else:
                node = rep(self.char_any)
            d = self._dfa_cache["key-domain"] = self._dfa(node)
        return d

    def _key_node(self, content: Node) -> Node:
        parts: list[Node] = []
        for part in self.wf.template(self.wf.value["key"]):
            parts.append(content if part == "key" else literal(part))  # type: ignore[arg-type]
        return seq(*parts)

    def _key_match(self, pattern: str, key: str) -> bool | None:
        """Whether ``pattern`` finds ``key``: True / False when both regex dialects agree,
        None when they do not."""
        under = self._string_in(("pattern", pattern, False), key)
        over = self._string_in(("pattern", pattern, True), key)
        return True if under else (None if over else False)

    def _content_of(self, value_dfa: Dfa) -> Dfa:
        """The string contents c such that the spelled string "c" is in ``value_dfa``."""
        q0 = value_dfa.run(self.wf.lit("string_open"))
        if q0 < 0:
            return self._dfa(NEVER)
        close = self.wf.lit("string_close")
        accept = np.array([(q2 := value_dfa.run(close, q)) >= 0 and bool(value_dfa.accept[q2])
                           for q in range(value_dfa.n_states)], bool)
        return minimize(value_dfa.trans.copy(), accept, q0, value_dfa.sym_class, list(value_dfa.class_masks))

    def _strict_closes(self, fs: list[Facet]) -> bool:
        """Whether strict mode closes these facets' objects to their declared keys: where
        one of them names keys (``properties``, ``patternProperties``, ``required``). An
        object schema that names none ({"type": "object"}, {"minProperties": 1}) asks for
        a free-form object, and an annotation alone ({"description": ...}) says nothing of
        objects: both stay open, as {} is (closing them would leave {} alone)."""
        return self.opt.strict and any(not _KEY_NAMING_KEYWORDS.isdisjoint(schema) for schema, _, _ in fs)

    def object_general(self, fs: list[Facet], ctx: _Ctx) -> Node:
        """Objects with the object keywords (patternProperties, propertyNames, min/max
        Properties) or in canonical spelling.

        Canonical layout: the keys the document names in their global order, each a
        member slot (declared, or allowed as an additional property), then at most one key
        the document never names (under; the over language allows any number of them).
        Otherwise declared keys in schema order, then extra keys in any order.
        """
        wf = self.wf
        order, required = self._declared(fs)
        child = replace(ctx, depth=ctx.depth - 1)
        min_p = max([int(s["minProperties"]) for s, _, _ in fs if "minProperties" in s] or [0])
        maxes = [int(s["maxProperties"]) for s, _, _ in fs if "maxProperties" in s]
        max_p = min(maxes) if maxes else None
        if max_p is not None and max_p < min_p:
            return NEVER
        canonical = ctx.canonical
        said = any("additionalProperties" in s for s, _, _ in fs)
        # Policy for keys nothing declares. Strict mode is a restriction of the spec, so
        # the over language (which must hold every valid value) follows the spec.
        extras_open = said or not self._strict_closes(fs) or ctx.over
        if not extras_open:
            self._approx += 1
        names = [(s["propertyNames"], _ptr(p, "propertyNames"), b) for s, p, b in fs if "propertyNames" in s]
        patterns: list[str] = []
        for s, ptr, _ in fs:
            for p in s.get("patternProperties", {}):
                if not pattern_is_exact(p, _ptr(ptr, "patternProperties", p)):
                    self._approx += 1
                if p not in patterns:
                    patterns.append(p)
        if len(patterns) > _MAX_PATTERNS:
            raise SchemaError(f"more than {_MAX_PATTERNS} patternProperties on one object", keyword="patternProperties", pointer=fs[0][1])

        # (names are strings: the other types' languages would only cost, and narrow nothing)
        name_dfas = [self._both([n, ({"type": "string"}, n[1], n[2])], replace(ctx, depth=0), (), over_narrows=ctx.over)
                     for n in names]

        def name_ok(key: str) -> bool:
            spelled = wf.spell_value(key)
            return all((o if ctx.over else u).accepts(spelled) for u, o in name_dfas)

        def key_facets(key: str, declared: bool) -> list[Facet] | None:
            """Facets the value of a concrete key must satisfy; None: the key is forbidden."""
            out: list[Facet] = []
            matched_any = False
            for schema, ptr, base in fs:
                hit, unsure = False, False
                for p, sub in schema.get("patternProperties", {}).items():
                    m = self._key_match(p, key)
                    if m is True:
                        hit = True
                        out.append((sub, _ptr(ptr, "patternProperties", p), base))
                    elif m is None:
                        unsure = True
                        if not ctx.over:  # under: the value must satisfy it either way
                            out.append((sub, _ptr(ptr, "patternProperties", p), base))
                matched_any = matched_any or hit or (unsure and ctx.over)
                props = schema.get("properties", {})
                if key in props:
                    out.append((props[key], _ptr(ptr, "properties", key), base))
                elif not hit and "additionalProperties" in schema and not (unsure and ctx.over):
                    a = schema["additionalProperties"]
                    if a is False:
                        return None
                    out.append((a, _ptr(ptr, "additionalProperties"), base))
            if not declared and not matched_any and not extras_open:
                return None
            if names and not name_ok(key):
                return None
            return out

        # member slots
        few_named = len(self._rank) <= _MAX_KNOWN_EXTRAS
        if canonical:
            slot_keys = [k for k in sorted(self._rank, key=self._rank.__getitem__) if k in order or few_named]
            if not few_named:
                self._narrow(ctx, fs[0][1], "properties", f"the document names more than {_MAX_KNOWN_EXTRAS} keys: "
                             "objects here spell only the keys this schema declares")
            slot_keys += [k for k in order if k not in self._rank]
        else:
            slot_keys = order
        members: list[tuple[Node, bool]] = []
        value_cache: dict[tuple[str, ...], Node] = {}
        for key in slot_keys:
            is_req = key in required
            f = key_facets(key, key in order)
            content = self._key_content(key)
            if content is None and key in order:
                wf.key_symbols(key, _ptr(fs[0][1], "properties", key))  # raises, naming the key
            if f is None or content is None:
                if is_req:
                    return NEVER
                continue
            if key not in order and ctx.depth <= 0 and not f and not ctx.over:  # nesting bound
                self._too_deep(ctx, fs[0][1], "additionalProperties", "no keys but the named ones")
                continue
            sig = tuple(p for _, p, _ in f)
            value = value_cache.get(sig)
            if value is None:
                # one DFA per distinct value language: slots share it, and an embedded
                # DFA is far smaller in the object's NFA than the expression tree
                language = self.facets_node(f, child, (), (fs[0][1], "additionalProperties"))
                value = value_cache[sig] = embed(self._dfa(language))
            members.append((seq(literal(wf.key_symbols(key)), value), is_req))

        # extra keys, split into regions by which patterns match. Canonical spellings put
        # every named key in its slot (when there are few) or leave out named keys that
        # the object does not declare; the over language must still hold a one-member
        # object spelled by any_value, so with many named keys it lets them be extras.
        named = list(self._rank) + order if canonical and (few_named or not ctx.over) else order
        excluded = [c for k in named if (c := self._key_content(k)) is not None]
        exclude = self._dfa(alt(*(literal(c) for c in excluded))) if excluded else None
        extras: list[Node] = []
        if ctx.depth > 0 or ctx.over:
            for mask in range(1 << len(patterns)):
                region = self._extra_region(fs, patterns, mask, ctx, extras_open, child, exclude, name_dfas)
                if region is not None:
                    extras.append(region)
        else:
            self._too_deep(ctx, fs[0][1], "additionalProperties", "no keys but the named ones")
        extra = alt(*extras) if extras else None
        if extra is not None and canonical and not ctx.over:
            self._narrow(ctx, fs[0][1], "additionalProperties", "objects here hold at most one key the schema does "
                         "not name (a value has one spelling here, and such keys have no order)")

        if not ctx.over and extra is not None and min_p > len(members) + 1:
            # Keys the schema does not name may repeat one another (a regular language
            # cannot tell them apart), so only one of them counts as a distinct key.
            raise SchemaError(f"minProperties {min_p} needs more distinct keys than the {len(members)} this object "
                              "names plus one other; name the keys in 'properties'",
                              keyword="minProperties", pointer=fs[0][1])
        msep = literal(wf.lit("member_separator"))
        n = len(members)
        cap = max(1, max_p if max_p is not None else min_p)
        slots = n + 2  # members, then "after the one unnamed key" (canonical under)
        # States (slot i, a named members written, b extra members written). Outside
        # canonical spelling extra keys may repeat one another, so only the first counts
        # toward minProperties; every member counts toward maxProperties (a repeated key
        # makes the parsed object smaller, never larger).

        counted = min_p > 0 or max_p is not None

        def sid(i: int, a: int, b: int) -> int:
            if not counted:  # only "anything written yet" matters: fold (a, b) into one bit
                return i * 2 + min(a + b, 1)
            return (i * (cap + 1) + a) * (cap + 1) + b

        def step(x: int) -> int:
            return x + 1 if max_p is not None else min(x + 1, cap)

        def fits(a: int, b: int) -> bool:
            return (max_p is None or a + b <= max_p) and a <= cap and b <= cap

        edges: list[tuple[int, int, Node]] = []
        for a in range(cap + 1):
            for b in range(cap + 1):
                if not fits(a, b):
                    continue
                written = a + b > 0
                for i, (node, is_req) in enumerate(members):
                    if fits(step(a), b):
                        edges.append((sid(i, a, b), sid(i + 1, step(a), b), seq(msep, node) if written else node))
                    if not is_req:
                        edges.append((sid(i, a, b), sid(i + 1, a, b), EMPTY))
                if extra is None or not fits(a, step(b)):
                    continue
                item = seq(msep, extra) if written else extra
                if canonical and not ctx.over:
                    if b == 0:
                        edges.append((sid(n, a, 0), sid(n + 1, a, 1), item))
                else:  # schema order, or over: any number of unnamed keys at the end
                    edges.append((sid(n, a, b), sid(n, a, step(b)), item))
        finals = [sid(i, a, b) for i in (n, n + 1) for a in range(cap + 1) for b in range(cap + 1)
                  if fits(a, b) and a + (b if canonical else min(b, 1)) >= min_p]
        edges = list(dict.fromkeys(edges))  # folded states repeat edges
        body = graph(slots * (cap + 1) ** 2 if counted else slots * 2, sorted(set(finals)), edges)
        return seq(literal(wf.lit("object_open")), body, literal(wf.lit("object_close")))

    def _extra_region(self, fs: list[Facet], patterns: list[str], mask: int, ctx: _Ctx, extras_open: bool,
                      child: _Ctx, exclude: Dfa | None, name_dfas: list[tuple[Dfa, Dfa]]) -> Node | None:
        """Extra keys matched by exactly the patterns in ``mask``, with their values."""
        inside = [p for j, p in enumerate(patterns) if mask >> j & 1]
        value: list[Facet] = []
        for schema, ptr, base in fs:
            own = [p for p in schema.get("patternProperties", {}) if p in inside]
            for p in own:
                value.append((schema["patternProperties"][p], _ptr(ptr, "patternProperties", p), base))
            if not own and "additionalProperties" in schema:
                a = schema["additionalProperties"]
                if a is False:
                    return None
                value.append((a, _ptr(ptr, "additionalProperties"), base))
        if not inside and not extras_open:
            return None
        # Key contents: under takes the patterns' under languages and removes the others'
        # over languages; over the reverse.
        keys = self._key_domain()
        for j, p in enumerate(patterns):
            where = next((_ptr(ptr, "patternProperties", p) for schema, ptr, _ in fs
                          if p in schema.get("patternProperties", {})), "")
            if mask >> j & 1:
                keys = product(keys, self._string_dfa(("pattern", p, ctx.over), where), "and")
            else:
                keys = product(keys, self._string_dfa(("pattern", p, not ctx.over), where), "minus")
        for u, o in name_dfas:
            keys = product(keys, self._content_of(o if ctx.over else u), "and")
        if exclude is not None:
            keys = product(keys, exclude, "minus")
        if keys.is_empty():
            return None
        values = self.facets_node(value, child, (), (fs[0][1], "additionalProperties"))
        return seq(self._key_node(embed(keys)), values)

    # ---- any value (true schemas), bounded nesting -------------------------------------
    def _nesting_bound(self) -> int:
        """An upper bound on how deep values of any under language of this document nest.

        A value sits below at most D containers the schema describes (the longest chain of
        properties / items / ... subschemas, following $ref as often as expansion does);
        a `true` schema there adds at most any_value_depth + 1 levels, a literal its own.
        """
        budget = [50_000]  # schema nodes to visit; past it, a cruder bound
        descending = ("properties", "patternProperties", "additionalProperties", "items", "prefixItems",
                      "contains", "unevaluatedProperties", "unevaluatedItems")
        in_place = ("allOf", "anyOf", "oneOf", "not", "if", "then", "else", "dependentSchemas")

        def desc(x: Any, ptr: str, base: str, stack: tuple[str, ...]) -> int:
            budget[0] -= 1
            if budget[0] < 0:
                raise OverflowError
            if not isinstance(x, dict):
                return 0
            if isinstance(x.get("$id"), str):
                base = _strip_fragment(_join(base, x["$id"]))
            best = 0
            if isinstance(x.get("$ref"), str):
                try:
                    target, tptr = self.resolve_ref(x["$ref"], base, ptr)
                except SchemaError:
                    target, tptr = None, ""
                if target is not None and stack.count(tptr) < self.opt.max_ref_depth:
                    best = desc(target, tptr, self._parent_base(tptr), stack + (tptr,))
            for kw in descending + in_place:
                if kw not in x:
                    continue
                v = x[kw]
                step = 1 if kw in descending else 0
                if isinstance(v, dict) and kw in SUBSCHEMA_MAP:
                    subs = [(k, sub) for k, sub in v.items()]
                elif isinstance(v, list):
                    subs = list(enumerate(v))
                else:
                    subs = [(None, v)]
                for k, sub in subs:
                    best = max(best, step + desc(sub, _ptr(ptr, kw) if k is None else _ptr(ptr, kw, k), base, stack))
            return best

        try:
            tree = desc(self.root, "", self.root_base, ())
        except OverflowError:
            # each stretch between $ref jumps descends at most the document's own depth
            def depth(x: Any) -> int:
                if isinstance(x, dict):
                    return 1 + max((depth(v) for v in x.values()), default=0)
                if isinstance(x, list):
                    return 1 + max((depth(v) for v in x), default=0)
                return 0

            tree = depth(self.root) * (1 + repr(self.root).count("$ref") * self.opt.max_ref_depth)
        literal_depth = 0

        def value_depth(v: Any) -> int:
            if isinstance(v, dict):
                return 1 + max((value_depth(x) for x in v.values()), default=0)
            if isinstance(v, list):
                return 1 + max((value_depth(x) for x in v), default=0)
            return 0

        def literals(x: Any) -> None:
            nonlocal literal_depth
            if isinstance(x, dict):
                for kw, v in x.items():
                    if kw == "const":
                        literal_depth = max(literal_depth, value_depth(v))
                    elif kw == "enum" and isinstance(v, list):
                        literal_depth = max([literal_depth] + [value_depth(e) for e in v])
                    else:
                        literals(v)
            elif isinstance(x, list):
                for v in x:
                    literals(v)

        literals(self.root)
        return tree + self.opt.any_value_depth + literal_depth + 2

    def over_any(self) -> Node:
        """A regular superset of every value an under language here can spell: strings,
        numbers, literals and brackets nested up to the document's nesting bound, with
        separators anywhere inside brackets (only the nesting is followed)."""
        d = self._dfa_cache.get("over-any")
        if d is None:
            scalars = alt(literal(b"null"), literal(b"true"), literal(b"false"), numbers.any_number(),
                          self.wf.string_node(rep(self.char_any)))
            opens = alt(literal(self.wf.lit("array_open")), literal(self.wf.lit("object_open")))
            closes = alt(literal(self.wf.lit("array_close")), literal(self.wf.lit("object_close")))
            seps = alt(*(literal(self.wf.lit(k)) for k in ("item_separator", "member_separator")),
                       embed(self._any_key()))
            node: Node = scalars
            for _ in range(self._max_nesting):
                node = alt(scalars, seq(opens, rep(alt(seps, node)), closes))
            d = self._dfa_cache["over-any"] = self._dfa(node)
        return embed(d)

    def any_value(self, ctx: _Ctx, ptr: str, keyword: str) -> Node:
        """Any JSON value, nested at most ``depth`` levels (a ``true`` schema at ``ptr``).

        Canonical spelling: canonical numbers and objects of at most one member (whose
        spelling needs no key order). The over language is :meth:`over_any`.
        """
        depth = ctx.depth
        if ctx.over:
            return self.over_any()
        numbers_node = embed(self._canonical_numbers()) if ctx.canonical else numbers.any_number()
        scalars = [literal(b"null"), literal(b"true"), literal(b"false"), numbers_node,
                   self.wf.string_node(rep(self.char_any))]
        arr_open, arr_close = literal(self.wf.lit("array_open")), literal(self.wf.lit("array_close"))
        obj_open, obj_close = literal(self.wf.lit("object_open")), literal(self.wf.lit("object_close"))
        if depth <= 0:
            self._too_deep(ctx, ptr, keyword, "only empty arrays and objects")
            return alt(*scalars, seq(arr_open, arr_close), seq(obj_open, obj_close))
        inner = self.any_value(replace(ctx, depth=depth - 1), ptr, keyword)
        isep = literal(self.wf.lit("item_separator"))
        msep = literal(self.wf.lit("member_separator"))
        member = seq(embed(self._any_key()), inner)
        arr = seq(arr_open, alt(EMPTY, separated(inner, isep)), arr_close)
        if ctx.canonical:
            self._narrow(ctx, ptr, keyword, "objects here hold at most one member (a value has one spelling here, and "
                         "keys have no order)")
            obj = seq(obj_open, alt(EMPTY, member), obj_close)
        else:
            obj = seq(obj_open, alt(EMPTY, separated(member, msep)), obj_close)
        return alt(*scalars, arr, obj)


def _finite_words(d: Dfa, limit: int) -> list[tuple[int, ...]] | None:
    """Every word of a finite language with at most ``limit`` words; None otherwise."""
    words: list[tuple[int, ...]] = []

    def walk(q: int, prefix: tuple[int, ...], on_path: frozenset[int]) -> bool:
        if d.accept[q]:
            words.append(prefix)
            if len(words) > limit:
                return False
        for c in np.nonzero(d.trans[q] >= 0)[0]:
            q2 = int(d.trans[q, c])
            if q2 in on_path:
                return False  # a cycle: infinitely many words (every state is useful)
            mask = d.class_masks[c]
            if bin(mask).count("1") > limit:
                return False
            while mask:
                low = mask & -mask
                mask ^= low
                if not walk(q2, prefix + (low.bit_length() - 1,), on_path | {q2}):
                    return False
        return True

    return words if walk(d.start, (), frozenset({d.start})) else None
