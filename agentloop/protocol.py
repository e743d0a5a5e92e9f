"""How a conversation is spelled for one wire format: turns, tool declarations, calls, results.

The wire format (``grammars/<name>.toml``) is data; this module renders messages with it,
so that the text the model reads and the calls the grammar lets it write use one spelling.
It also parses a model's *unconstrained* text back into calls (what prompt-and-parse
runtimes do; the constrained path parses with the grammar instead).

>>> p = Protocol("gemma4")
>>> p.render_call("get_weather", {"city": "Paris", "days": 3})
'<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>'
>>> p.parse_output('<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>').calls
[ToolCall(name='get_weather', arguments={'city': 'Paris', 'days': 3})]
"""

from __future__ import annotations

import json
import math
import operator
import re
from string import Template
from typing import Any, Mapping, Sequence

import jsonschema
from referencing.exceptions import Unresolvable

from .errors import ParseError, WireFormatError
from .grammar import ParsedOutput, ToolCall
from .grammar.numbers import bound_readings, canonical_spelling, plain_decimal
from .grammar.schema import canonical_key_rank, json_equal, rewrite_schemas
from .grammar.wireformat import WireFormat, load_wire_format

#: Keywords that make the grammar spell a number without an exponent (``grammar.numbers``).
_BOUNDS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

#: A piece of conversation text and whether it is encoded literally (user and tool text:
#: special-token strings in it are never control tokens).
Segment = tuple[str, bool]


class Protocol:
    """Renders and parses conversations in one wire format (a name in grammars/ or a .toml path)."""

    def __init__(self, wire_format: str | WireFormat = "gemma4") -> None:
        self.wire_format = wire_format if isinstance(wire_format, WireFormat) else load_wire_format(wire_format)
        wf = self.wire_format
        for key in ("system", "user", "model", "model_end", "declaration", "response"):
            if key not in wf.turns:
                raise WireFormatError(f"wire format {wf.name!r} has no [turns] {key} template ({wf.source})")
        self._v = wf.value

    @property
    def name(self) -> str:
        return self.wire_format.name

    # ---- values ----------------------------------------------------------------------------
    def render_value(self, value: Any, schema: Mapping[str, Any] | None = None) -> str:
        """``value`` in the wire format's spelling; object keys in ``schema``'s property order
        (the order the grammar expects), others after them in their own order."""
        return self._value(value, schema, schema or {}, None)

    def _value(self, v: Any, schema: Mapping[str, Any] | None, root: Mapping[str, Any],
               marks: list[str] | None, canonical: bool = False) -> str:
        """``canonical``: the value lies inside a negation, where the grammar spells each
        value one way (``grammar.schema``: keys in the document's order, integers' digits)."""
        facets = _facets(schema, root, v)
        canonical = canonical or _negated(facets, v, root)
        member = _enum_member(facets, v)
        if member is not None:
            return self._literal(member[0], root, marks, canonical)
        if isinstance(v, dict):
            # declared keys in the grammar's order (properties, then required, over the
            # facets), then the others in their own order
            declared = [k for f in facets for k in _as(f.get("properties"), Mapping)]
            declared = list(dict.fromkeys(declared + [k for f in facets for k in _as(f.get("required"), list)]))
            keys = [k for k in declared if k in v] + [k for k in v if k not in declared]
            if canonical:
                keys = _canonical_order(v, root)
            members = [self._key(str(k)) + self._value(v[k], _member_schema(facets, k), root, marks, canonical)
                       for k in keys]
            return self._object(members)
        if isinstance(v, (list, tuple)):
            return self._array([self._value(x, _item_schema(facets, i), root, marks, canonical)
                                for i, x in enumerate(v)])
        if isinstance(v, str):
            return self.render_string(v, marks)
        if isinstance(v, bool) or v is None:
            return json.dumps(v)
        if isinstance(v, float) and math.isinf(v):
            # JSON has no infinity; a number past the double range (1e999) parses to it, so
            # spell it back that way rather than fail on a value the grammar let through.
            return "1e999" if v > 0 else "-1e999"
        if isinstance(v, float) and math.isnan(v):
            raise ValueError("NaN has no JSON spelling")
        if isinstance(v, float) and (canonical or any(_plain_numbers(f) for f in facets)):
            # an integer, a bounded number and any number inside a negation are spelled
            # without an exponent (see grammar.numbers): the shortest decimal that reads
            # back as the value (past 2**53, the digits the bounds take)
            if not v.is_integer():
                return plain_decimal(v)
            return _integer_digits(v, facets, _rivals(facets, v, root) if canonical else [], root)
        return json.dumps(v)

    def _literal(self, v: Any, root: Mapping[str, Any], marks: list[str] | None, canonical: bool) -> str:
        """An ``enum`` / ``const`` member as the grammar spells it: as written (objects in
        their own key order; an integer-valued float below 1e16 as its digits, others as
        JSON writes them: ``WireFormat.spell_value``), or inside a negation canonically
        (``numbers.canonical_spelling``, keys in the document's order)."""
        if isinstance(v, dict):
            keys = list(v)
            if canonical:
                keys = _canonical_order(v, root)
            members = [self._key(str(k)) + self._literal(v[k], root, marks, canonical) for k in keys]
            return self._object(members)
        if isinstance(v, (list, tuple)):
            return self._array([self._literal(x, root, marks, canonical) for x in v])
        if isinstance(v, str):
            return self.render_string(v, marks)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            spelled = canonical_spelling(v) if canonical else None
            return spelled if spelled is not None else bytes(self.wire_format.spell_number(v)).decode()
        return json.dumps(v)

    def _object(self, members: Sequence[str]) -> str:
        """Spelled members (key and value each) in the wire format's object."""
        return self._v["object_open"] + self._v["member_separator"].join(members) + self._v["object_close"]

    def _array(self, items: Sequence[str]) -> str:
        """Spelled items in the wire format's array."""
        return self._v["array_open"] + self._v["item_separator"].join(items) + self._v["array_close"]

    def _key(self, key: str) -> str:
        if self._v.get("key_style") == "identifier" and not _IDENT.match(key):
            raise ValueError(f"key {key!r} cannot be spelled in wire format {self.name!r} (keys must be identifiers)")
        spelled = key if self._v.get("key_style") == "identifier" else json.dumps(key, ensure_ascii=False)[1:-1]
        return Template(self._v["key"]).safe_substitute(key=spelled)

    def render_string(self, s: str, marks: list[str] | None = None) -> str:
        """A string value. Its content is text from the model, a user or a tool: with
        ``marks`` it is set aside (a placeholder stays) so that it can be encoded literally;
        without delimiter escapes (gemma4) a delimiter spelled as text inside it is only
        unambiguous that way."""
        vs = self._v
        body = json.dumps(s, ensure_ascii=False)[1:-1] if vs.get("string_escapes") == "json" else s
        if marks is not None:
            marks.append(body)
            body = f"\x00{len(marks) - 1}\x00"
        return vs["string_open"] + body + vs["string_close"]

    # ---- calls and answers -------------------------------------------------------------------
    def render_call(self, name: str, arguments: Mapping[str, Any], schema: Mapping[str, Any] | None = None,
                    marks: list[str] | None = None) -> str:
        args = self._value(dict(arguments), schema or {"type": "object"}, schema or {}, marks)
        return Template(self.wire_format.calls["call"]).safe_substitute(name=name, arguments=args)

    def render_calls(self, calls: Sequence[ToolCall], schemas: Mapping[str, Mapping[str, Any]] | None = None) -> str:
        """One or more calls in the envelope, without the stop token (as text, for reading)."""
        return "".join(t for t, _ in self.calls_segments(calls, schemas))

    def calls_segments(self, calls: Sequence[ToolCall],
                       schemas: Mapping[str, Mapping[str, Any]] | None = None) -> list[Segment]:
        """The calls as (text, literal) pieces: string values are literal, so a `<turn|>` or a
        delimiter the model wrote as text inside an argument stays text when re-encoded."""
        c = self.wire_format.calls
        marks: list[str] = []
        body = c.get("separator", "").join(self.render_call(x.name, x.arguments, (schemas or {}).get(x.name), marks)
                                             for x in calls)
        return _split_marks(c.get("open", "") + body + c.get("close", ""), marks)

    def render_text(self, text: str) -> str:
        """A final answer in the text branch, without the stop token (as text, for reading)."""
        return "".join(t for t, _ in self.text_segments(text))

    def text_segments(self, text: str) -> list[Segment]:
        """A final answer as (text, literal) pieces: the answer itself is literal."""
        t = self.wire_format.text
        marks: list[str] = []
        if t.get("body") == "string":
            body = self.render_string(text, marks)
        else:
            marks.append(text)
            body = "\x000\x00"
        return _split_marks(t.get("open", "") + body + t.get("close", ""), marks)

    @property
    def calls_stop(self) -> str:
        return self._resolve_special(self.wire_format.calls.get("end", "${eos}"))

    @property
    def text_stop(self) -> str:
        return self._resolve_special(self.wire_format.text.get("end", "${eos}"))

    def _resolve_special(self, s: str) -> str:
        return s.replace("${eos}", "<eos>")

    # ---- turns ---------------------------------------------------------------------------------
    def _turn(self, key: str, **fields: str) -> str:
        return Template(self.wire_format.turns.get(key, "")).safe_substitute(**fields)

    def _segments(self, key: str, untrusted: dict[str, str], **fields: str) -> list[Segment]:
        """A template with ``untrusted`` fields kept apart, to be encoded literally."""
        marks = {k: f"\x00{i}\x00" for i, k in enumerate(untrusted)}
        return _split_marks(self._turn(key, **fields, **marks), list(untrusted.values()))

    def user_segments(self, text: str) -> list[Segment]:
        """A user turn as (text, literal) pieces: the user's text is encoded literally."""
        return self._segments("user", {"content": text})

    def response_segments(self, name: str, content: str) -> list[Segment]:
        """A tool result as (text, literal) pieces: the tool's output is encoded literally."""
        if self._v.get("string_escapes") != "json" and self._v["string_close"] in content:
            content = content.replace(self._v["string_close"], "")
        return self._segments("response", {"content": content,
                                           "content_json": json.dumps(content, ensure_ascii=False)}, name=name)

    def after_calls_segments(self, results: Sequence[tuple[str, str]]) -> list[Segment]:
        """What follows a model's calls, for (tool name, result text) pairs."""
        out: list[Segment] = [(self._turn("calls_end"), False)]
        for name, content in results:
            out += self.response_segments(name, content)
        return out + [(self._turn("responses_end"), False)]

    def render_declaration(self, name: str, description: str, parameters: Mapping[str, Any]) -> str:
        """A tool's declaration for the system turn. Extension keywords ("x-copy", any
        "x-...") steer the grammar, not the model, and are left out of what it reads.

        With ``declared_schema = "gemma"`` in the wire format's [turns] the parameters are
        written as Gemma 4's chat template writes them (what its checkpoints read in
        training); otherwise the whole JSON Schema is written in the value spelling."""
        schema = _without_extensions(parameters)
        style = self.wire_format.turns.get("declared_schema", "full")
        if style not in ("full", "gemma"):
            raise WireFormatError(f'[turns] declared_schema must be "full" or "gemma", got {style!r} '
                                  f"({self.wire_format.source})")
        return self._turn("declaration", name=name, description=description,
                          description_json=json.dumps(description, ensure_ascii=False),
                          parameters=self._gemma_parameters(schema) if style == "gemma" else self._declared(schema))

    # Gemma 4's chat template writes a tool's parameters with a fixed set of keys: per
    # property (sorted by name) its description, enum (strings), items (arrays), nullable,
    # properties and required (objects), and its type in capitals, last; every other
    # keyword (bounds, patterns, defaults, additionalProperties) is not shown to the model.
    def _gemma_parameters(self, schema: Mapping[str, Any]) -> str:
        parts = []
        if schema.get("properties"):
            parts.append("properties:{" + self._gemma_properties(schema["properties"]) + "}")
        if schema.get("required"):
            parts.append("required:" + self._gemma_argument(list(schema["required"])))
        parts.append("type:" + self.render_string(str(schema.get("type", "object")).upper()))
        return "{" + ",".join(parts) + "}"

    def _gemma_properties(self, properties: Mapping[str, Any]) -> str:
        out = []
        for key in sorted(properties):
            # (one published version of the template skipped properties named like its own
            # keys, "description" or "type"; a later one writes them, as here)
            value = properties[key] if isinstance(properties[key], Mapping) else {}
            kind = str(value.get("type", "")).upper()
            parts = []
            if value.get("description"):
                parts.append("description:" + self.render_string(str(value["description"])))
            if kind == "STRING" and value.get("enum"):
                parts.append("enum:" + self._gemma_argument(list(value["enum"])))
            if kind == "ARRAY" and isinstance(value.get("items"), Mapping) and value["items"]:
                parts.append("items:{" + self._gemma_items(value["items"]) + "}")
            if value.get("nullable"):
                parts.append("nullable:true")
            if kind == "OBJECT" and isinstance(value.get("properties"), Mapping):
                parts.append("properties:{" + self._gemma_properties(value["properties"]) + "}")
            if kind == "OBJECT" and value.get("required"):
                parts.append("required:" + self._gemma_argument(list(value["required"])))
            parts.append("type:" + self.render_string(kind))
            out.append(f"{key}:{{" + ",".join(parts) + "}")
        return ",".join(out)

    def _gemma_items(self, items: Mapping[str, Any]) -> str:
        parts = []
        for key in sorted(items):
            value = items[key]
            if value is None:
                continue
            if key == "properties" and isinstance(value, Mapping):
                parts.append("properties:{" + self._gemma_properties(value) + "}")
            elif key == "required":
                parts.append("required:" + self._gemma_argument(list(value)))
            elif key == "type":
                upper = value.upper() if isinstance(value, str) else [str(v).upper() for v in value]
                parts.append("type:" + self._gemma_argument(upper))
            else:
                parts.append(f"{key}:" + self._gemma_argument(value))
        return ",".join(parts)

    def _gemma_argument(self, value: Any) -> str:
        """A literal as the template writes one: strings delimited, mapping keys sorted
        and delimited too, booleans lower-case, numbers as written."""
        if isinstance(value, str):
            return self.render_string(value)
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, Mapping):
            return "{" + ",".join(self.render_string(str(k)) + ":" + self._gemma_argument(value[k])
                                  for k in sorted(value)) + "}"
        if isinstance(value, (list, tuple)):
            return "[" + ",".join(self._gemma_argument(v) for v in value) + "]"
        return str(value)

    def _declared(self, schema: Any) -> str:
        """A JSON Schema for the model to read: the value spelling, any key allowed."""
        vs = self._v
        if isinstance(schema, dict):
            key_ident = vs.get("key_style") == "identifier"
            members = [Template(vs["key"]).safe_substitute(
                key=k if key_ident else json.dumps(k, ensure_ascii=False)[1:-1]) + self._declared(x)
                for k, x in schema.items()]
            return self._object(members)
        if isinstance(schema, list):
            return self._array([self._declared(x) for x in schema])
        if isinstance(schema, str):
            return self.render_string(schema)
        return json.dumps(schema)

    def system_turn(self, instructions: str, declarations: Sequence[str] = ()) -> str:
        return self._turn("system", content=instructions + "".join(declarations))

    def user_turn(self, text: str) -> str:
        return self._turn("user", content=text)

    @property
    def model_start(self) -> str:
        return self._turn("model")

    @property
    def model_end(self) -> str:
        """What follows a final answer (in gemma4 it starts with the text stop token)."""
        return self._turn("model_end")

    def render_response(self, name: str, content: str) -> str:
        return "".join(t for t, _ in self.response_segments(name, content))

    # ---- parsing unconstrained text ------------------------------------------------------------
    def parse_output(self, text: str) -> ParsedOutput:
        """Parse a model's free text (no grammar) into calls or a final text.

        Lenient about what follows the last call, strict about each call's spelling;
        raises ``ParseError`` for a malformed call (what a prompt-and-parse runtime retries).
        """
        c = self.wire_format.calls
        head, _, tail = c["call"].partition("${name}")
        if head not in text:
            return ParsedOutput(text=self._strip_text(text))
        calls = []
        pos = 0
        body = text
        if c.get("open") and body.lstrip().startswith(c["open"]):
            body = body.lstrip()[len(c["open"]):]
        while True:
            i = body.find(head, pos)
            if i < 0:
                break
            m = re.match(r"[A-Za-z_][A-Za-z0-9_.\-]*", body[i + len(head):])
            if not m:
                raise ParseError(f"a call without a tool name at character {i}")
            name = m.group(0)
            j = i + len(head) + len(name)
            args_tpl, _, after = tail.partition("${arguments}")
            if args_tpl and not body.startswith(args_tpl, j):
                raise ParseError(f"call {name!r}: expected {args_tpl!r} at character {j}")
            j += len(args_tpl)
            value, j = self._parse_value(body, j)
            if not isinstance(value, dict):
                raise ParseError(f"call {name!r}: the arguments are not an object")
            if after and not body.startswith(after, j):
                raise ParseError(f"call {name!r}: expected {after!r} at character {j}")
            calls.append(ToolCall(name, value))
            pos = j + len(after)
        return ParsedOutput(calls=calls)

    def _strip_text(self, text: str) -> str:
        t = self.wire_format.text
        s = text
        if t.get("open") and s.startswith(t["open"]):
            s = s[len(t["open"]):]
            if t.get("close") and s.endswith(t["close"]):
                s = s[: -len(t["close"])]
            if t.get("body") == "string":
                try:
                    v, _ = self._parse_value(s, 0)
                    return str(v)
                except ParseError:
                    return s
        return s

    def _parse_value(self, s: str, i: int) -> tuple[Any, int]:
        vs = self._v
        if s.startswith(vs["object_open"], i):
            i += len(vs["object_open"])
            out: dict[str, Any] = {}
            if s.startswith(vs["object_close"], i):
                return out, i + len(vs["object_close"])
            while True:
                key, i = self._parse_key(s, i)
                out[key], i = self._parse_value(s, i)
                if s.startswith(vs["member_separator"], i):
                    i += len(vs["member_separator"])
                elif s.startswith(vs["object_close"], i):
                    return out, i + len(vs["object_close"])
                else:
                    raise ParseError(f"expected {vs['member_separator']!r} or {vs['object_close']!r} at character {i}")
        if s.startswith(vs["array_open"], i):
            i += len(vs["array_open"])
            items: list[Any] = []
            if s.startswith(vs["array_close"], i):
                return items, i + len(vs["array_close"])
            while True:
                x, i = self._parse_value(s, i)
                items.append(x)
                if s.startswith(vs["item_separator"], i):
                    i += len(vs["item_separator"])
                elif s.startswith(vs["array_close"], i):
                    return items, i + len(vs["array_close"])
                else:
                    raise ParseError(f"expected {vs['item_separator']!r} or {vs['array_close']!r} at character {i}")
        if s.startswith(vs["string_open"], i):
            return self._parse_string(s, i)
        m = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?|true|false|null").match(s, i)
        if not m:
            raise ParseError(f"expected a value at character {i}: {s[i:i + 20]!r}")
        return json.loads(m.group(0)), m.end()

    def _parse_string(self, s: str, i: int) -> tuple[str, int]:
        vs = self._v
        i += len(vs["string_open"])
        if vs.get("string_escapes") == "json":
            try:
                value, end = json.JSONDecoder().raw_decode(s, i - 1)
            except json.JSONDecodeError as e:
                raise ParseError(f"bad string at character {i}: {e.msg}") from None
            return value, end
        j = s.find(vs["string_close"], i)
        if j < 0:
            raise ParseError(f"unterminated string at character {i}")
        return s[i:j], j + len(vs["string_close"])

    def _parse_key(self, s: str, i: int) -> tuple[str, int]:
        before, _, after = self._v["key"].partition("${key}")
        if not s.startswith(before, i):
            raise ParseError(f"expected a key at character {i}")
        i += len(before)
        if self._v.get("key_style") == "identifier":
            m = _IDENT.pattern[:-2]
            mm = re.compile(m).match(s, i)
            if not mm:
                raise ParseError(f"expected a key at character {i}")
            key, i = mm.group(0), mm.end()
        else:
            j = s.find('"', i)
            while j > 0 and s[j - 1] == "\\":
                j = s.find('"', j + 1)
            if j < 0:
                raise ParseError(f"unterminated key at character {i}")
            key, i = json.loads('"' + s[i:j] + '"'), j
        if not s.startswith(after, i):
            raise ParseError(f"expected {after!r} after key {key!r} at character {i}")
        return key, i + len(after)


def _without_extensions(schema: Any) -> Any:
    """``schema`` with its "x-..." keywords left out, in every subschema (a property that is
    *named* "x-..." stays: only keywords go)."""
    return rewrite_schemas(schema, lambda s: {k: v for k, v in s.items() if not k.startswith("x-")})


def _split_marks(text: str, marks: list[str]) -> list[Segment]:
    """Template text with ``\\x00i\\x00`` placeholders -> segments, the marked ones literal."""
    out: list[Segment] = []
    for i, part in enumerate(re.split("\x00(\\d+)\x00", text)):
        if i % 2:
            out.append((marks[int(part)], True))
        elif part:
            out.append((part, False))
    return out


def _facets(schema: Any, root: Mapping[str, Any], v: Any) -> list[Mapping[str, Any]]:
    """The schema nodes the grammar applies to ``v``, in the order it meets them:
    ``schema``, what its ``$ref`` names, its ``allOf`` members, an ``if`` that ``v`` meets
    and its ``then`` (else the ``else``), and of each ``anyOf`` / ``oneOf`` the branch
    ``v`` is spelled under (``_branch``). The grammar intersects a schema's facets and
    distributes unions over them (grammar.schema), so a spelling is taken when it fits
    every facet of one case that ``v`` is valid in; a branch picked by type alone could
    lend the spelling a bound that does not hold for ``v``, or miss the integer branch
    it is valid under."""
    out: list[Mapping[str, Any]] = []
    todo = [schema]
    while todo and len(out) < 256:  # (a bound on $ref cycles)
        node = todo.pop(0)
        if not isinstance(node, Mapping):
            continue
        out.append(node)
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            todo.append(_ref_target(ref, root))
        todo.extend(_as(node.get("allOf"), list))
        if _conditional(node):
            todo.extend([node["if"], node.get("then")] if _valid(v, node["if"], root) else [node.get("else")])
        for key in ("anyOf", "oneOf"):
            branches = node.get(key)
            if isinstance(branches, list):
                todo.append(_branch(branches, v, root))
    return out


def _canonical_order(v: Mapping[str, Any], root: Mapping[str, Any]) -> list[str]:
    """An object's keys as the grammar orders them inside a negation: those the document
    names in its order of first mention (``canonical_key_rank``), then the one it does not."""
    rank = canonical_key_rank(root)
    return sorted((k for k in v if k in rank), key=rank.__getitem__) + [k for k in v if k not in rank]


def _enum_member(facets: Sequence[Mapping[str, Any]], v: Any) -> tuple[Any] | None:
    """(the member,) of the first ``enum`` / ``const`` among ``facets`` equal to ``v``
    (JSON Schema's equality), whose spelling the grammar writes; None without one."""
    for f in facets:
        members = [f["const"]] if "const" in f else f.get("enum")
        if isinstance(members, list):
            return next(((m,) for m in members if json_equal(m, v)), None)
    return None


def _conditional(schema: Mapping[str, Any]) -> bool:
    """Whether ``schema``'s ``if`` splits the grammar into cases: one with a ``then`` or
    an ``else`` (a lone ``if`` constrains nothing; ``SchemaCompiler.expand``)."""
    return "if" in schema and ("then" in schema or "else" in schema)


def _member_schema(facets: Sequence[Mapping[str, Any]], key: str) -> Mapping[str, Any] | None:
    """The schema of an object's member ``key`` as the grammar takes it: each facet's
    property ``key``, or its ``additionalProperties`` where it names no such property."""
    parts = []
    for f in facets:
        props = f.get("properties")
        if isinstance(props, Mapping) and key in props:
            parts.append(props[key])
        elif isinstance(f.get("additionalProperties"), Mapping):
            parts.append(f["additionalProperties"])
    return _all_of(parts)


def _item_schema(facets: Sequence[Mapping[str, Any]], i: int) -> Mapping[str, Any] | None:
    """The schema of an array's item ``i``: each facet's ``prefixItems[i]``, or its ``items``."""
    parts = []
    for f in facets:
        prefix = f.get("prefixItems")
        if isinstance(prefix, list) and i < len(prefix):
            parts.append(prefix[i])
        elif isinstance(f.get("items"), Mapping):
            parts.append(f["items"])
    return _all_of(parts)


def _all_of(parts: list[Any]) -> Mapping[str, Any] | None:
    """One schema for all of ``parts`` (None for none)."""
    return None if not parts else parts[0] if len(parts) == 1 else {"allOf": parts}


def _as(x: Any, kind: type) -> Any:
    """``x`` where it is a ``kind`` (a schema's list or map), else an empty one."""
    return x if isinstance(x, kind) else ()


def _branch(branches: list[Any], v: Any, root: Mapping[str, Any]) -> Any:
    """The union branch the grammar spells ``v`` under: one ``v`` is valid under, naming
    every key of an object (the grammar writes no key its schema does not name), else
    the first whose type fits ``v`` (None if none does)."""
    valid = [b for b in branches if _valid(v, b, root)]
    if isinstance(v, Mapping):
        valid = [b for b in valid if _names_keys(b, v, root)] or valid
    return valid[0] if valid else next((b for b in branches if _fits(b, v, root)), None)


def _names_keys(schema: Any, v: Mapping[str, Any], root: Mapping[str, Any]) -> bool:
    """Whether ``schema``'s facets for the object ``v`` name each of its keys (as a
    property, by a pattern, or through an ``additionalProperties`` schema)."""
    names: set[str] = set()
    patterns: list[str] = []
    for f in _facets(schema, root, v):
        names.update(_as(f.get("properties"), Mapping))
        patterns.extend(_as(f.get("patternProperties"), Mapping))
        extra = f.get("additionalProperties")
        if isinstance(extra, Mapping) or extra is True:
            return True
    return all(k in names or any(_search(p, k) for p in patterns) for k in v)


def _search(pattern: str, text: str) -> bool:
    try:
        return re.search(pattern, text) is not None
    except re.error:
        return False


def _negated(facets: Sequence[Mapping[str, Any]], v: Any, root: Mapping[str, Any]) -> bool:
    """Whether the grammar spells ``v`` (and all inside it) canonically: under a ``not``,
    a ``oneOf``, or the negated side of a condition (an ``if`` with ``then`` / ``else``
    that ``v`` fails, a ``dependent*`` key an object lacks): see ``SchemaCompiler.expand``."""
    for f in facets:
        if "not" in f or "oneOf" in f:
            return True
        if _conditional(f) and not _valid(v, f["if"], root):
            return True
        if isinstance(v, dict):
            required, schemas = f.get("dependentRequired"), f.get("dependentSchemas")
            if isinstance(required, Mapping) and any(names and k not in v for k, names in required.items()):
                return True
            if isinstance(schemas, Mapping) and any(sub not in (True, {}) and k not in v for k, sub in schemas.items()):
                return True
    return False


def _valid(v: Any, schema: Any, root: Mapping[str, Any]) -> bool:
    """Whether ``v`` is valid under ``schema``, a subschema of ``root`` (its refs read there)."""
    try:
        return bool(jsonschema.Draft202012Validator(root).evolve(schema=schema).is_valid(v))
    # (a schema the grammar refused to compile; RecursionError: a union that names itself,
    # {"anyOf": [..., {"$ref": <itself>}]})
    except (Unresolvable, re.error, TypeError, ValueError, RecursionError):
        return False


def _plain_numbers(schema: Mapping[str, Any]) -> bool:
    """Whether the grammar spells a number under this facet without an exponent: an
    integer type or a numeric bound (the plain spelling is one every number language takes)."""
    types = schema.get("type")
    return types == "integer" or (isinstance(types, list) and "integer" in types) or bool(_BOUNDS & set(schema))


def _integer_digits(v: float, facets: Sequence[Mapping[str, Any]], rivals: Sequence[Any] = (),
                    root: Mapping[str, Any] | None = None) -> str:
    """The digits of an integer-valued float ``v`` as the grammar takes them under
    ``facets``' bounds. Past 2**53 its shortest decimal (100000000000000000000000 for
    1e23) and its exact value (99999999999999991611392) differ, and a parser reads digits
    as an exact integer, which the grammar takes only within each bound under both of its
    readings (its decimal text and the double it parses to; ``SchemaCompiler.number_node``):
    under "maximum": 1e23 only the exact digits fit, under "maximum": 1e308 only the
    shortest. Inside a negation the grammar also takes out the digits that a ``rivals``
    schema (negated, or another ``oneOf`` branch) might hold under either reading. The
    shortest is written unless refused. No -0 (canonical JSON)."""
    shortest = plain_decimal(v).removesuffix(".0") if v else "0"
    exact = str(int(v))
    if exact == shortest:
        return shortest
    for digits in (shortest, exact):
        n = int(digits)
        if all(_fits_bounds(n, f) for f in facets) and not any(_may_hold(n, r, root or {}) for r in rivals):
            return digits
    return shortest


def _rivals(facets: Sequence[Mapping[str, Any]], v: Any, root: Mapping[str, Any]) -> list[Any]:
    """The schemas whose values a negation takes out where ``v`` is spelled (see
    ``SchemaCompiler.one_of_node`` / ``negation_node``): each ``not``, each ``oneOf``
    branch but the one ``v`` goes under, and an ``if`` that ``v`` fails."""
    out: list[Any] = []
    for f in facets:
        if "not" in f:
            out.append(f["not"])
        branches = f.get("oneOf")
        if isinstance(branches, list):
            mine = _branch(branches, v, root)
            out.extend(b for b in branches if b is not mine)
        if _conditional(f) and not _valid(v, f["if"], root):
            out.append(f["if"])
    return out


def _may_hold(n: int, schema: Any, root: Mapping[str, Any]) -> bool:
    """Whether the integer digits ``n`` may be valid under ``schema`` by its type and
    numeric bounds, each bound under either of its readings (the grammar's "over"
    language, which a negation takes out, is that generous)."""
    return schema is not False and all(_fits(f, n, root) and _fits_bounds(n, f, every_reading=False)
                                       for f in _facets(schema, root, float(n)))


def _fits_bounds(n: int, schema: Mapping[str, Any], every_reading: bool = True) -> bool:
    """Whether the integer ``n`` meets one facet's numeric bounds under both readings of
    each (its decimal text and the double it parses to), or with ``every_reading=False``
    under either."""
    holds = all if every_reading else any
    for kw, ok in (("maximum", operator.le), ("exclusiveMaximum", operator.lt),
                   ("minimum", operator.ge), ("exclusiveMinimum", operator.gt)):
        b = schema.get(kw)
        if isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b):
            if not holds(ok(n, r) for r in bound_readings(b)):
                return False
    return True


def _ref_target(ref: str, root: Mapping[str, Any]) -> Any:
    """What a local ``$ref`` ("#/$defs/x") names in ``root`` ({} where it names nothing)."""
    node: Any = root
    for part in ref[2:].split("/"):
        node = node.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(node, Mapping) else {}
    return node


def _fits(schema: Any, value: Any, root: Mapping[str, Any]) -> bool:
    """Whether ``value``'s JSON type is one that ``schema`` (and what its ``$ref`` chain
    names) allows."""
    kind = ("object" if isinstance(value, dict) else "array" if isinstance(value, (list, tuple))
            else "string" if isinstance(value, str) else "boolean" if isinstance(value, bool)
            else "null" if value is None else "integer" if isinstance(value, int)
            or (isinstance(value, float) and value.is_integer()) else "number")
    for _ in range(16):
        if not isinstance(schema, Mapping):
            return schema is not False
        t = schema.get("type")
        types = t if isinstance(t, list) else [t]
        if t is not None and kind not in types and not (kind == "integer" and "number" in types):
            return False
        ref = schema.get("$ref")
        if not (isinstance(ref, str) and ref.startswith("#/")):
            return True
        schema = _ref_target(ref, root)
    return True
