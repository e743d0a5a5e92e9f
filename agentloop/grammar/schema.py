"""JSON Schema (draft 2020-12 subset) -> expression node over a wire format's symbols.

The compiler works on *facets*: the schema at a pointer plus everything ``allOf`` and
``$ref`` pull in, each facet a plain dict with its JSON pointer. Keywords of all facets
are intersected (types, bounds, patterns, properties), ``anyOf`` / ``oneOf`` distribute
over the facets, ``enum`` / ``const`` become literals (filtered by jsonschema itself), and
each remaining type becomes a node. ``oneOf`` is exact: strings accepted by exactly one
branch, via DFA products.

Everything the compiler cannot represent exactly raises :class:`SchemaError` with the
keyword and its JSON pointer. Where the language must be bounded (recursion through
``$ref``, nesting under ``true`` schemas, counted lengths) the compiler *restricts*: it
never accepts an invalid instance, and the bounds are parameters of :class:`SchemaOptions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal
from functools import reduce
from typing import Any, Sequence

import jsonschema

from ..errors import SchemaError
from . import charset as cs
from . import numbers
from .fsa import (
    EMPTY,
    NEVER,
    Dfa,
    Node,
    alt,
    embed,
    exactly_one,
    graph,
    intersect_all,
    literal,
    product,
    rep,
    seq,
    to_dfa,
)
from .regex import full_match_node, pattern_node
from .wireformat import WireFormat

Facet = tuple[dict[str, Any], str]

ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$comment", "deprecated", "readOnly",
    "writeOnly", "$schema", "$id", "$defs", "definitions", "contentMediaType",
    "contentEncoding", "contentSchema", "$vocabulary",
})
ASSERTIONS = frozenset({
    "type", "properties", "required", "additionalProperties", "enum", "const", "anyOf",
    "oneOf", "allOf", "items", "prefixItems", "minItems", "maxItems", "minLength",
    "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "multipleOf", "$ref", "nullable", "uniqueItems", "x-copy",
})
UNSUPPORTED = frozenset({
    "not", "if", "then", "else", "patternProperties", "propertyNames", "dependentRequired",
    "dependentSchemas", "unevaluatedProperties", "unevaluatedItems", "contains",
    "minContains", "maxContains", "minProperties", "maxProperties", "$dynamicRef",
    "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor", "dependencies", "additionalItems",
    "$anchor",
})
TYPES = ("null", "boolean", "object", "array", "number", "integer", "string")

# JSON Schema formats as full-match patterns (canonical spellings: upper-case T and Z).
_YEAR = r"(?:[0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"
_LEAP = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (
    rf"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    rf"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{_LEAP}-02-29)"
)
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": rf"{_DATE}T{_TIME}",
    "email": rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "uri": r"[A-Za-z][A-Za-z0-9+.-]*:(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?#]|%[0-9A-Fa-f]{2})*",
    "ipv4": rf"{_OCTET}(?:\.{_OCTET}){{3}}",
    "hostname": rf"{_LABEL}(?:\.{_LABEL})*",
}


@dataclass(frozen=True)
class SchemaOptions:
    """Bounds and policies of the compiler (all restrictions, never relaxations)."""

    #: An object schema without ``additionalProperties`` accepts only its declared
    #: properties (OpenAI-style strict tool schemas). False follows the spec: extra keys
    #: with any value are allowed after the declared ones.
    strict: bool = True
    #: How many times one ``$ref`` may be expanded along a path (recursive schemas).
    max_ref_depth: int = 3
    #: Nesting depth of values under ``true`` schemas (any JSON value).
    any_value_depth: int = 2
    #: Largest counted ``minLength`` / ``maxLength`` / ``minItems`` / ``maxItems``.
    max_counted_length: int = 512
    #: Largest integer ``multipleOf`` (its automaton has that many states).
    max_multiple_of: int = 10_000
    #: Texts that ``x-copy`` string parameters must be substrings of (copy constraint).
    copy_sources: tuple[str, ...] = field(default=())


def _ptr(base: str, *parts: object) -> str:
    out = base
    for p in parts:
        out += "/" + str(p).replace("~", "~0").replace("/", "~1")
    return out


def _json_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


class SchemaCompiler:
    """Compile one root schema for one wire format. ``node()`` is the value language."""

    def __init__(self, root: Any, wf: WireFormat, options: SchemaOptions = SchemaOptions()) -> None:
        self.root = root
        self.wf = wf
        self.opt = options
        self.n_symbols = wf.n_symbols
        try:
            jsonschema.Draft202012Validator.check_schema(root)
        except jsonschema.SchemaError as e:
            raise SchemaError(f"not a valid JSON Schema: {e.message}", pointer="/" + "/".join(map(str, e.path))) from None
        self.validator = jsonschema.Draft202012Validator(root, format_checker=jsonschema.FormatChecker())
        self.char_any = wf.spell_char(cs.ANY)
        self._string_dfa_cache: dict[Any, Dfa] = {}

    # ---- entry ------------------------------------------------------------------------
    def node(self) -> Node:
        return self.facets_node([(self.root, "")], ref_stack=(), depth=self.opt.any_value_depth)

    # ---- facets -------------------------------------------------------------------------
    def resolve_ref(self, ref: str, pointer: str) -> tuple[Any, str]:
        if not ref.startswith("#"):
            raise SchemaError(f"remote $ref {ref!r} is not supported (inline it in $defs)", keyword="$ref", pointer=pointer)
        frag = ref[1:]
        if frag and not frag.startswith("/"):
            raise SchemaError(f"$ref to an anchor {ref!r} is not supported (use a JSON pointer)", keyword="$ref", pointer=pointer)
        node: Any = self.root
        for raw in frag.split("/")[1:] if frag else []:
            key = raw.replace("~1", "/").replace("~0", "~")
            from urllib.parse import unquote

            key = unquote(key)
            try:
                node = node[int(key)] if isinstance(node, list) else node[key]
            except (KeyError, IndexError, ValueError, TypeError):
                raise SchemaError(f"$ref {ref!r} points nowhere", keyword="$ref", pointer=pointer) from None
        return node, frag or ""

    def expand(self, facets: Sequence[Facet], ref_stack: tuple[str, ...]) -> tuple[list[Facet], tuple[str, ...]] | None:
        """Flatten allOf and $ref. None means the conjunction is unsatisfiable (false)."""
        out: list[Facet] = []
        todo = list(facets)
        stack = ref_stack
        while todo:
            schema, ptr = todo.pop(0)
            if schema is True or schema == {}:
                continue
            if schema is False:
                return None
            if not isinstance(schema, dict):
                raise SchemaError("a schema must be an object or a boolean", pointer=ptr)
            for key in schema:
                if key in UNSUPPORTED:
                    if key == "uniqueItems":
                        continue
                    raise SchemaError(f"keyword {key!r} is not supported by the grammar compiler", keyword=key, pointer=_ptr(ptr, key))
            if schema.get("uniqueItems") is True:
                raise SchemaError("keyword 'uniqueItems' (true) is not supported by the grammar compiler", keyword="uniqueItems", pointer=_ptr(ptr, "uniqueItems"))
            rest = dict(schema)
            if "$ref" in rest:
                ref = rest.pop("$ref")
                if stack.count(ref) >= self.opt.max_ref_depth:
                    return None  # bounded recursion: deeper instances are not generated
                stack = stack + (ref,)
                target, target_ptr = self.resolve_ref(ref, _ptr(ptr, "$ref"))
                todo.append((target, target_ptr))
            if "allOf" in rest:
                subs = rest.pop("allOf")
                todo.extend((s, _ptr(ptr, "allOf", i)) for i, s in enumerate(subs))
            out.append((rest, ptr))
        return out, stack

    def facets_node(self, facets: Sequence[Facet], ref_stack: tuple[str, ...], depth: int) -> Node:
        expanded = self.expand(facets, ref_stack)
        if expanded is None:
            return NEVER
        fs, stack = expanded
        if not fs:
            return self.any_value(depth)
        # distribute the first anyOf / oneOf over the facets
        for i, (schema, ptr) in enumerate(fs):
            for kw in ("anyOf", "oneOf"):
                if kw in schema:
                    rest = dict(schema)
                    branches = rest.pop(kw)
                    others = fs[:i] + [(rest, ptr)] + fs[i + 1 :]
                    nodes = [
                        self.facets_node(others + [(b, _ptr(ptr, kw, j))], stack, depth)
                        for j, b in enumerate(branches)
                    ]
                    if kw == "anyOf":
                        return alt(*nodes)
                    return embed(exactly_one([to_dfa(n, self.n_symbols) for n in nodes]))
        return self.typed_node(fs, stack, depth)

    # ---- keyword intersection ---------------------------------------------------------
    def typed_node(self, fs: list[Facet], stack: tuple[str, ...], depth: int) -> Node:
        enum_values: list[Any] | None = None
        for schema, ptr in fs:
            vals = None
            if "const" in schema:
                vals = [schema["const"]]
            if "enum" in schema:
                e = list(schema["enum"])
                vals = e if vals is None else [v for v in vals if any(_json_equal(v, x) for x in e)]
            if vals is not None:
                enum_values = vals if enum_values is None else [v for v in enum_values if any(_json_equal(v, x) for x in vals)]
        if enum_values is not None:
            return self.enum_node(enum_values, fs)

        types = set(TYPES)
        for schema, ptr in fs:
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
                branches.append(self.number_node(fs, integer=(t == "integer")))
            elif t == "string":
                branches.append(self.string_node(fs))
            elif t == "array":
                branches.append(self.array_node(fs, stack, depth))
            elif t == "object":
                branches.append(self.object_node(fs, stack, depth))
        return alt(*branches)

    def enum_node(self, values: list[Any], fs: list[Facet]) -> Node:
        kept = []
        for v in values:
            if all(self.validator.evolve(schema=s).is_valid(v) for s, _ in fs):
                try:
                    kept.append(literal(self.wf.spell_value(v)))
                except SchemaError:
                    continue  # a key the wire format cannot spell: that value cannot occur
        return alt(*kept)

    # ---- numbers ----------------------------------------------------------------------
    def number_node(self, fs: list[Facet], integer: bool) -> Node:
        lo: Decimal | None = None
        lo_x = False
        hi: Decimal | None = None
        hi_x = False
        multiples: list[tuple[Any, str]] = []

        def tighten_lo(v: Any, excl: bool) -> None:
            nonlocal lo, lo_x
            d = Decimal(repr(v)) if isinstance(v, float) else Decimal(v)
            if lo is None or d > lo or (d == lo and excl):
                lo, lo_x = d, excl

        def tighten_hi(v: Any, excl: bool) -> None:
            nonlocal hi, hi_x
            d = Decimal(repr(v)) if isinstance(v, float) else Decimal(v)
            if hi is None or d < hi or (d == hi and excl):
                hi, hi_x = d, excl

        for schema, ptr in fs:
            if "minimum" in schema:
                tighten_lo(schema["minimum"], False)
            if "exclusiveMinimum" in schema:
                tighten_lo(schema["exclusiveMinimum"], True)
            if "maximum" in schema:
                tighten_hi(schema["maximum"], False)
            if "exclusiveMaximum" in schema:
                tighten_hi(schema["exclusiveMaximum"], True)
            if "multipleOf" in schema:
                multiples.append((schema["multipleOf"], _ptr(ptr, "multipleOf")))

        int_multiple = 1
        only_integers = integer
        for m, ptr in multiples:
            dm = Decimal(repr(m)) if isinstance(m, float) else Decimal(m)
            if dm == dm.to_integral_value():
                int_multiple = math.lcm(int_multiple, int(dm))
                only_integers = True
            elif (Decimal(1) / dm) == (Decimal(1) / dm).to_integral_value() and integer:
                continue  # every integer is a multiple of 1/k
            else:
                raise SchemaError(f"multipleOf {m} on numbers is not supported (integer multiples are)", keyword="multipleOf", pointer=ptr)
        if int_multiple > self.opt.max_multiple_of:
            raise SchemaError(f"multipleOf {int_multiple} exceeds the compiler bound {self.opt.max_multiple_of}", keyword="multipleOf", pointer=multiples[-1][1])

        if only_integers:
            ilo = None if lo is None else (math.floor(lo) + 1 if lo_x and lo == lo.to_integral_value() else math.ceil(lo))
            ihi = None if hi is None else (math.ceil(hi) - 1 if hi_x and hi == hi.to_integral_value() else math.floor(hi))
            if ilo is not None and ihi is not None and ilo > ihi:
                return NEVER
            node = numbers.int_range(ilo, ihi)
            if int_multiple > 1:
                node = embed(product(to_dfa(node, 256), to_dfa(numbers.multiple_of(int_multiple), 256), "and"))
            return node
        if lo is None and hi is None:
            return numbers.any_number()
        return numbers.decimal_range(lo, lo_x, hi, hi_x)

    # ---- strings ----------------------------------------------------------------------
    def string_node(self, fs: list[Facet]) -> Node:
        min_len, max_len = 0, None
        patterns: list[tuple[str, str]] = []
        formats: list[tuple[str, str]] = []
        copy = False
        for schema, ptr in fs:
            if "minLength" in schema:
                min_len = max(min_len, int(schema["minLength"]))
                if min_len > self.opt.max_counted_length:
                    raise SchemaError(f"minLength {min_len} exceeds the compiler bound {self.opt.max_counted_length}", keyword="minLength", pointer=_ptr(ptr, "minLength"))
            if "maxLength" in schema:
                m = int(schema["maxLength"])
                max_len = m if max_len is None else min(max_len, m)
            if "pattern" in schema:
                patterns.append((schema["pattern"], _ptr(ptr, "pattern")))
            if "format" in schema:
                f = schema["format"]
                if f not in FORMATS:
                    raise SchemaError(f"format {f!r} is not supported; supported: {', '.join(sorted(FORMATS))}", keyword="format", pointer=_ptr(ptr, "format"))
                formats.append((f, _ptr(ptr, "format")))
            if schema.get("x-copy"):
                copy = True
        if max_len is not None:
            # Restriction, not relaxation: a canvas is a few hundred tokens, so longer
            # strings are cut at the bound (documented in SchemaOptions).
            max_len = min(max_len, self.opt.max_counted_length)
            if max_len < min_len:
                return NEVER
        content: Node = rep(self.char_any, min_len, max_len)
        constraints: list[Node] = [pattern_node(p, self.wf.spell_char, ptr) for p, ptr in patterns]
        constraints += [full_match_node(FORMATS[f], self.wf.spell_char, ptr) for f, ptr in formats]
        if copy:
            from .copy import substring_node

            constraints.append(substring_node(self.opt.copy_sources, self.wf))
        if constraints:
            dfas = [to_dfa(content, self.n_symbols)] + [to_dfa(c, self.n_symbols) for c in constraints]
            content = embed(intersect_all(dfas))
        return self.wf.string_node(content)

    # ---- arrays -----------------------------------------------------------------------
    def array_node(self, fs: list[Facet], stack: tuple[str, ...], depth: int) -> Node:
        lo, hi = 0, None
        k = 0  # prefix length
        for schema, ptr in fs:
            lo = max(lo, int(schema.get("minItems", 0)))
            if "maxItems" in schema:
                hi = int(schema["maxItems"]) if hi is None else min(hi, int(schema["maxItems"]))
            k = max(k, len(schema.get("prefixItems", [])))
        if lo > self.opt.max_counted_length:
            raise SchemaError(f"minItems {lo} exceeds the compiler bound {self.opt.max_counted_length}", keyword="minItems", pointer=fs[0][1])
        if hi is not None:
            hi = min(hi, self.opt.max_counted_length)

        def item(i: int | None) -> Node | None:
            """Item i (None: any item past every prefix); None when no item may be there."""
            f: list[Facet] = []
            for schema, ptr in fs:
                pre = schema.get("prefixItems", [])
                if i is not None and i < len(pre):
                    f.append((pre[i], _ptr(ptr, "prefixItems", i)))
                elif "items" in schema:
                    if schema["items"] is False:
                        return None
                    f.append((schema["items"], _ptr(ptr, "items")))
            return self.facets_node(f, stack, depth - 1)

        rest = item(None)
        if rest is None:
            hi = k if hi is None else min(hi, k)
        if hi is not None and hi < lo:
            return NEVER
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

        if hi == 0:
            body: Node = EMPTY
        else:
            first = item(0) if k > 0 else rest
            nonempty = seq(first or NEVER, tail(1))
            body = nonempty if lo > 0 else alt(EMPTY, nonempty)
        return seq(literal(self.wf.lit("array_open")), body, literal(self.wf.lit("array_close")))

    # ---- objects ----------------------------------------------------------------------
    def object_node(self, fs: list[Facet], stack: tuple[str, ...], depth: int) -> Node:
        order: list[str] = []
        required: list[str] = []
        for schema, ptr in fs:
            for k in schema.get("properties", {}):
                if k not in order:
                    order.append(k)
        for schema, ptr in fs:
            for k in schema.get("required", []):
                if k not in required:
                    required.append(k)
                if k not in order:
                    order.append(k)

        def facets_for(key: str) -> list[Facet] | None:
            out: list[Facet] = []
            for schema, ptr in fs:
                props = schema.get("properties", {})
                if key in props:
                    out.append((props[key], _ptr(ptr, "properties", key)))
                elif "additionalProperties" in schema:
                    if schema["additionalProperties"] is False:
                        return None
                    out.append((schema["additionalProperties"], _ptr(ptr, "additionalProperties")))
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
            value = self.facets_node(f, stack, depth - 1)
            key_node = literal(self.wf.key_symbols(key, _ptr(ptr, "properties", key)))
            members.append((key, seq(key_node, value), is_req))

        # extra keys: forbidden if any facet says false, or strict with nothing said
        extra: Node | None = None
        add_facets: list[Facet] = []
        forbidden = False
        said = False
        for schema, ptr in fs:
            if "additionalProperties" in schema:
                said = True
                if schema["additionalProperties"] is False:
                    forbidden = True
                else:
                    add_facets.append((schema["additionalProperties"], _ptr(ptr, "additionalProperties")))
        if not forbidden and (said or not self.opt.strict) and depth > 0:
            value = self.facets_node(add_facets, stack, depth - 1)
            any_key = to_dfa(self.wf.any_key_node(), self.n_symbols)
            if order:
                declared = to_dfa(alt(*(literal(self.wf.key_symbols(k)) for k in order if self._spellable(k))), self.n_symbols)
                any_key = product(any_key, declared, "minus")
            extra = seq(embed(any_key), value)

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

    def _spellable(self, key: str) -> bool:
        try:
            self.wf.key_symbols(key)
            return True
        except SchemaError:
            return False

    # ---- any value (true schemas), bounded nesting -------------------------------------
    def any_value(self, depth: int) -> Node:
        """Any JSON value, nested at most ``depth`` levels (a ``true`` schema)."""
        scalars = [literal(b"null"), literal(b"true"), literal(b"false"), numbers.any_number(),
                   self.wf.string_node(rep(self.char_any))]
        arr_open, arr_close = literal(self.wf.lit("array_open")), literal(self.wf.lit("array_close"))
        obj_open, obj_close = literal(self.wf.lit("object_open")), literal(self.wf.lit("object_close"))
        if depth <= 0:
            return alt(*scalars, seq(arr_open, arr_close), seq(obj_open, obj_close))
        inner = self.any_value(depth - 1)
        isep = literal(self.wf.lit("item_separator"))
        msep = literal(self.wf.lit("member_separator"))
        member = seq(self.wf.any_key_node(), inner)
        arr = seq(arr_open, alt(EMPTY, seq(inner, rep(seq(isep, inner)))), arr_close)
        obj = seq(obj_open, alt(EMPTY, seq(member, rep(seq(msep, member)))), obj_close)
        return alt(*scalars, arr, obj)
